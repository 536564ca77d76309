"""Running statistics of shared BatchNorm layers after a branch point: one set per task by
default, Recon's single mixed set with norm_stats: shared."""

import copy

import pytest
import torch

import reconfx
from reconfx.layers import inventory
from reconfx.streams import regions_of
from tests.support import compile_and_verify, write_spec


def compiled_model(tmp_path, norm_stats, batching="eval"):
    spec = write_spec(tmp_path, "bn",
                      model={"factory": "reconfx.zoo:small_resnet",
                             "kwargs": {"num_classes": 3, "width": 8}},
                      inputs=[{"name": "image", "shape": [4, 1, 12, 12]}],
                      tasks=[{"name": "left"}, {"name": "right"}],
                      select={"layers": ["layer2.0.conv1"]},
                      branch={"norm_stats": norm_stats, "stream_batching": batching})
    compiled = compile_and_verify(spec, tmp_path / "out")
    return compiled, reconfx.load(tmp_path / "out")


def test_per_task_statistics_equal_the_module_run_on_each_stream_alone(tmp_path):
    compiled, model = compiled_model(tmp_path, "per_task")
    assert "layer2.0.bn1" in compiled.branched.per_task_norms
    # Its parameters stay one shared layer, named by its original path (so statistics of the
    # branched model line up with the unbranched model's).
    layer = next(x for x in inventory(compiled.branched.module, ["left", "right"])
                 if "layer2.0.bn1.left" in x.modules)
    assert (layer.name, layer.modules, layer.shared) == (
        "layer2.0.bn1", ("layer2.0.bn1.left", "layer2.0.bn1.right"), True)
    with torch.no_grad():  # the copies start equal; make the streams differ, as training would
        model.layer2[0].conv1.right.weight.mul_(1.5)
    original_bn = compiled.prepared.model.layer2[0].bn1
    references = {t: copy.deepcopy(original_bn).train() for t in ("left", "right")}
    seen = {"left": [], "right": []}
    hooks = [getattr(model.layer2[0].bn1, t).register_forward_pre_hook(
        lambda m, args, t=t: seen[t].append(args[0].detach().clone())) for t in seen]
    model.train()
    for _ in range(3):
        model(image=torch.randn(5, 1, 12, 12))
    for hook in hooks:
        hook.remove()
    for task, bn in references.items():
        for x in seen[task]:
            bn(x)
        copy_ = getattr(model.layer2[0].bn1, task)
        assert torch.equal(copy_.running_mean, bn.running_mean)
        assert torch.equal(copy_.running_var, bn.running_var)
    assert not torch.equal(model.layer2[0].bn1.left.running_mean,
                           model.layer2[0].bn1.right.running_mean)
    # Affine parameters stay shared: one Parameter for both tasks.
    assert model.layer2[0].bn1.left.weight is model.layer2[0].bn1.right.weight


def test_shared_statistics_are_the_mixture_of_both_streams(tmp_path):
    compiled, model = compiled_model(tmp_path, "shared")
    assert compiled.branched.per_task_norms == []
    with torch.no_grad():
        model.layer2[0].conv1.right.weight.mul_(1.5)
    reference = copy.deepcopy(compiled.prepared.model.layer2[0].bn1).train()
    seen = []
    hook = model.layer2[0].bn1.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].detach().clone()))
    model.train()
    for _ in range(3):
        model(image=torch.randn(5, 1, 12, 12))
    hook.remove()
    assert len(seen) == 6  # once per stream per step
    for x in seen:
        reference(x)
    assert torch.equal(model.layer2[0].bn1.running_mean, reference.running_mean)
    assert torch.equal(model.layer2[0].bn1.running_var, reference.running_var)


@pytest.mark.parametrize("norm_stats", ["per_task", "shared"])
@pytest.mark.parametrize("batching", ["eval", "off"])
def test_both_modes_keep_init_parity(tmp_path, norm_stats, batching):
    compiled, _ = compiled_model(tmp_path, norm_stats, batching)
    # Stream batching (shared convolutions, and BatchNorm in eval mode with shared statistics)
    # rounds differently: I1 then holds within atol 1e-5.
    assert bool(regions_of(compiled.branched.module)) == (batching == "eval")
    exact = "bit-exact" if batching == "off" else "atol 1e-05"
    assert compiled.checks[0].detail.startswith(f"{exact}, eval and train mode")


def test_model_py_writes_each_norm_with_per_task_statistics_as_one_line(tmp_path):
    """A shared BatchNorm after the branch point is ``per_task_statistics(nn.BatchNorm2d(16))``
    in model.py: one copy per task holding the shared affine parameters (no tie lines), and the
    loaded copies share them as the compiled ones do."""
    _compiled, loaded = compiled_model(tmp_path, "per_task")
    source = (tmp_path / "out" / "model.py").read_text()
    assert "        self.layer2[0].bn1 = per_task_statistics(nn.BatchNorm2d(16))\n" in source
    assert "def per_task_statistics(norm: nn.Module) -> PerTask:" in source  # (on task rows)
    assert ".right.weight = " not in source
    bn = loaded.layer2[0].bn1
    assert bn.left.weight is bn.right.weight and bn.left.bias is bn.right.bias
    assert bn.left.running_mean is not bn.right.running_mean
