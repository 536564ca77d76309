"""A small ResNet with BatchNorm and residual connections, several branch sets, 2 and 3 tasks,
both tracing tiers."""

import pytest
import torch

from tests.support import compile_and_verify, diff_lines, write_spec

BRANCH_SETS = {
    "early": ["conv1", "bn1"],
    "middle": ["layer2.0.conv1", "layer2.0.bn1"],
    "late": ["layer4.0.conv2", "layer4.0.bn2"],
    # The block's input is shared, its output branched: each stream needs the skip connection.
    "block-output": ["layer3.0.bn2"],
    "every": ["*"],
}


def resnet_spec(tmp_path, layers, tasks=("left", "right"), tier="auto", norm_stats="per_task"):
    return write_spec(
        tmp_path, "resnet",
        model={"factory": "reconfx.zoo:small_resnet",
               "kwargs": {"num_classes": 4, "tasks": list(tasks), "width": 8}},
        inputs=[{"name": "image", "shape": [4, 1, 12, 12]}],
        tasks=[{"name": t} for t in tasks],
        select={"layers": layers}, branch={"norm_stats": norm_stats}, trace={"tier": tier})


@pytest.mark.parametrize("where", list(BRANCH_SETS))
def test_branch_sets_two_tasks_fx(tmp_path, where):
    compiled = compile_and_verify(resnet_spec(tmp_path, BRANCH_SETS[where]), tmp_path / "out")
    assert compiled.prepared.traced.tier == "fx"
    expected = 24 if where == "every" else len(BRANCH_SETS[where])
    assert len(compiled.branched.layers) == expected


@pytest.mark.parametrize("where", ["early", "block-output", "every"])
def test_branch_sets_three_tasks(tmp_path, where):
    tasks = ("a", "b", "c")
    compiled = compile_and_verify(resnet_spec(tmp_path, BRANCH_SETS[where], tasks),
                                  tmp_path / "out")
    assert set(compiled.branched.copies[compiled.branched.layers[0].name]) == set(tasks)


@pytest.mark.parametrize("where", ["middle", "block-output"])
def test_branch_sets_through_torch_export(tmp_path, where):
    compiled = compile_and_verify(resnet_spec(tmp_path, BRANCH_SETS[where], tier="export"),
                                  tmp_path / "out")
    assert compiled.prepared.traced.tier == "export"


def test_skip_connection_feeds_every_stream(tmp_path):
    out = tmp_path / "out"
    compile_and_verify(resnet_spec(tmp_path, BRANCH_SETS["block-output"]), out)
    source = (out / "model.py").read_text()
    # The shared downsample (called as the module it is) is added to both task streams: once
    # per task's rows of the streams.
    assert "layer3_0_downsample = self.layer3[0].downsample(layer2)" in source
    assert ("layer3_0_downsample_streams = torch.cat([layer3_0_downsample, "
            "layer3_0_downsample])\n") in source
    assert "layer3_0_add = layer3_0_bn2 + layer3_0_downsample_streams\n" in source


def test_diff_touches_only_the_branched_part(tmp_path):
    out = tmp_path / "out"
    compile_and_verify(resnet_spec(tmp_path, BRANCH_SETS["late"]), out)
    removed, added = diff_lines(out)
    untouched = ("self.conv1", "self.layer1", "self.layer2", "self.layer3", "self.bn1")
    assert not [line for line in removed + added if any(u in line for u in untouched)]
    assert any("layer4_0_conv2_left = self.layer4[0].conv2.left(" in line for line in added)


@pytest.mark.parametrize("tier", ["fx", "export"])
def test_bn_uses_batch_statistics_in_train_and_running_in_eval(tmp_path, tier):
    import reconfx

    out = tmp_path / "out"
    compile_and_verify(resnet_spec(tmp_path, BRANCH_SETS["middle"], tier=tier), out)
    model = reconfx.load(out)
    x = torch.randn(6, 1, 12, 12)
    bn = model.layer2[0].bn1.left
    before = bn.running_mean.clone()
    model.train()(image=x)
    assert not torch.equal(bn.running_mean, before)  # batch statistics were used and recorded
    model.eval()
    frozen = bn.running_mean.clone()
    first = model(image=x)["left"]
    assert torch.equal(bn.running_mean, frozen)
    assert torch.equal(first, model(image=x)["left"])


@pytest.mark.slow
def test_the_same_compile_gives_the_same_answer_on_every_run(tmp_path):
    """Three compiles of the paper's ResNet-18 with an early selection, each in a fresh process:
    all pass (the checks' tolerances and seeded perturbations leave no run-to-run flake) and
    write byte-identical model.py and weights."""
    import hashlib
    import subprocess
    import sys

    spec = write_spec(tmp_path, "r18", model={"factory": "reconfx.zoo:resnet18"},
                      inputs=[{"name": "image", "shape": [2, 1, 36, 36]}],
                      tasks=[{"name": "left"}, {"name": "right"}],
                      select={"layers": ["conv1", "bn1", "layer1.0.*", "layer3.0.conv2"]})
    seen = set()
    for run in range(3):
        out = tmp_path / f"out{run}"
        done = subprocess.run([sys.executable, "-m", "reconfx", "compile", str(spec), "--out",
                               str(out), "--quiet"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        seen.add(tuple(hashlib.sha256((out / f).read_bytes()).hexdigest()
                       for f in ("model.py", "weights.safetensors")))
    assert len(seen) == 1
