"""Glue outside any leaf that reads self.training: both tiers keep a train and an eval graph."""

import copy

import pytest
import torch

import reconfx
from reconfx.streams import regions_of
from tests.models import TrainingGlue
from tests.support import compile_and_verify, write_spec


def test_a_traced_graph_that_rounds_differently_is_accepted_within_the_stated_tolerance():
    """A graph whose ops round differently from the model's kernels (here: the same sum taken
    in another order, as torch.export's ops against a fused kernel) is accepted, with the
    tolerance it needed recorded so that I1 and I4 compare within it; a real difference is
    not."""
    from dataclasses import replace

    from torch import fx, nn

    from reconfx.modes import ATOL
    from reconfx.tracing import Traced, _accepted, traced_matches

    class Sum(nn.Module):
        def forward(self, x):
            return {"a": x.sum(-1)}

    class Reversed(nn.Module):
        def forward(self, x):
            return {"a": x.flip(-1).cumsum(-1)[..., -1]}

    class Off(nn.Module):
        def forward(self, x):
            return {"a": x.sum(-1) + 1e-3}

    examples = [{"x": torch.randn(4, 1000, generator=torch.Generator().manual_seed(0))}]
    message, worst = traced_matches(Sum(), Reversed(), {"a": "a"}, examples)
    assert message is None and 0.0 < worst <= ATOL
    traced = Traced(fx.symbolic_trace(Reversed()), "export")
    accepted = _accepted(traced, "torch.export", Sum(), {"a": "a"}, examples)
    assert accepted.atol == ATOL and "within 1e-05, not bit-exactly" in accepted.notes[-1]
    assert _accepted(replace(traced, module=fx.symbolic_trace(Sum())), "fx", Sum(), {"a": "a"},
                     examples).atol == 0.0
    message, _ = traced_matches(Sum(), Off(), {"a": "a"}, examples)
    assert message.startswith("traced graph differs from the model for task 'a' in eval mode")


@pytest.mark.parametrize("tier", ["fx", "export"])
@pytest.mark.parametrize("layers", [["fc1"], ["fc2"]])
def test_training_dependent_glue(tmp_path, tier, layers):
    spec = write_spec(tmp_path, "glue", model={"factory": "tests.models:TrainingGlue"},
                      inputs=[{"name": "x", "shape": [3, 12]}],
                      tasks=[{"name": "a"}, {"name": "b"}], select={"layers": layers},
                      trace={"tier": tier})
    out = tmp_path / "out"
    compiled = compile_and_verify(spec, out)
    assert compiled.prepared.traced.module.dual
    # A deep copy keeps both graphs and owns its parameters (the experiment copies models).
    for graph_module in (compiled.prepared.traced.module, compiled.branched.module):
        twin = copy.deepcopy(graph_module)
        assert twin.dual and twin.training == graph_module.training
        assert not {id(p) for p in twin.parameters()} & {id(p) for p in graph_module.parameters()}
        x = torch.randn(4, 12)
        for training in (True, False):
            twin.train(training)
            graph_module.train(training)
            assert twin.graph is (twin.train_graph if training else twin.eval_graph)
            for task in ("a", "b"):
                assert torch.equal(twin(x=x)[task], graph_module(x=x)[task])
    model = reconfx.load(out)
    reference = TrainingGlue()
    reference.load_state_dict(compiled.prepared.model.state_dict())
    x = torch.randn(4, 12)
    for training in (True, False):
        model.train(training)
        reference.train(training)
        want = reference(x)
        for task in ("a", "b"):
            assert torch.equal(model(x=x)[task], want[task])


@pytest.mark.parametrize("layers", [["fc1"], ["fc2"]])
def test_autocast_and_no_grad_regions_are_kept(tmp_path, layers):
    """torch.export wraps code under ``torch.autocast``/``torch.no_grad`` in higher-order ops;
    tier 2 inlines them as enter/exit calls: same outputs, same (absent) gradients, the autocast
    region follows the input's device type, and stream batching never moves ops across them.
    fc2 is called and its weight also read directly before the call: branching it gives each
    task's direct read its own copy."""
    spec = write_spec(tmp_path, "contexts", model={"factory": "tests.models:ContextRegions"},
                      inputs=[{"name": "x", "shape": [3, 6]}],
                      tasks=[{"name": "a"}, {"name": "b"}], select={"layers": layers},
                      trace={"tier": "export"})
    out = tmp_path / "out"
    compiled = compile_and_verify(spec, out)
    source = (out / "model.py").read_text()
    enter = "torch.amp.autocast_mode._enter_autocast(\n            device_type, torch.bfloat16"
    assert "device_type = device.type" in source and enter in source
    assert "submod" not in source and "higher_order" not in source
    for forward in source.split("\n    def ")[1:]:
        for start, end in [("_set_grad_enabled(False)", "_set_grad_enabled(is_grad_enabled)"),
                           ("_enter_autocast(", "_exit_autocast(")]:
            if start in forward:
                assert "fits(" not in forward[forward.index(start):forward.index(end)]
    if layers == ["fc1"]:  # the task rows from fc1 on, through both blocks as they are
        assert "        x_streams = torch.cat([x, x])\n" in source and "fits(" not in source
    else:
        assert "self.fc2.a.weight" in source and "self.fc2.weight" not in source
    model, reference = reconfx.load(out), compiled.prepared.model
    x = torch.randn(5, 6)
    for module in (model, reference):
        module.train()
        sum(o.sum() for o in module(x=x).values()).backward()
    assert reference.scale.grad is None and model.scale.grad is None  # only used under no_grad
    for head in ("a", "b"):
        grads = [getattr(m, head).weight.grad for m in (model, reference)]
        assert torch.allclose(*grads, atol=1e-6)
    if layers == ["fc2"]:  # fc1 shared: both tasks' gradients (bf16 matmuls round per task)
        assert torch.allclose(model.fc1.weight.grad, reference.fc1.weight.grad, atol=1e-2)


def test_no_grad_block_that_fx_drops_sends_tracing_to_tier_2(tmp_path):
    spec = write_spec(tmp_path, "nograd", model={"factory": "tests.models:NoGradGate"},
                      inputs=[{"name": "x", "shape": [3, 6]}],
                      tasks=[{"name": "a"}, {"name": "b"}], select={"layers": ["fc1"]})
    out = tmp_path / "out"
    compiled = compile_and_verify(spec, out)
    traced = compiled.prepared.traced
    assert traced.tier == "export"
    assert "parameter 'fc2.weight' gets a gradient in the traced graph only" in traced.notes[0]
    model = reconfx.load(out)
    model.train()
    sum(o.sum() for o in model(x=torch.randn(4, 6)).values()).backward()
    assert model.fc2.weight.grad is None and model.fc1.a.weight.grad is not None


def test_report_counts_flops_when_a_submodule_gets_a_parameter_view(tmp_path):
    """The report's FLOP count hooks every module's inputs; a parameter view passed to a
    submodule (here the batched region after fc) used to break it. Linear layers count
    2 * rows * in * out: fc 288, mix 384, heads 96 + 144 at the spec's batch of 3; branching
    fc runs fc and mix once per task."""
    spec = write_spec(tmp_path, "scaled", model={"factory": "tests.models:LayerScale"},
                      inputs=[{"name": "x", "shape": [3, 6]}],
                      tasks=[{"name": "a"}, {"name": "b"}], select={"layers": ["fc"]})
    out = tmp_path / "out"
    compiled = compile_and_verify(spec, out)
    assert regions_of(compiled.branched.module)
    report = (out / "report.md").read_text()
    assert "- FLOPs per forward (example inputs): 912 -> 1,584 (+73.7%)" in report


def test_traced_graph_that_raises_is_a_mismatch_and_prints_nothing(capsys):
    """A traced graph with a batch size baked in fails where the model runs: the check says so
    (so the next tier is tried) instead of raising, and fx's own dump of the generated code's
    traceback does not reach the user's terminal."""
    from torch import fx, nn

    from reconfx.tracing import traced_matches

    class Flatten(nn.Module):
        def forward(self, x):
            return {"a": x.reshape(x.shape[0], -1)}

    baked = fx.GraphModule(Flatten(), fx.symbolic_trace(Flatten()).graph)
    node = next(n for n in baked.graph.nodes if n.target == "reshape")
    node.args = (node.args[0], 2, 12)  # what a tracer that specialised the batch would keep
    baked.recompile()
    examples = [{"x": torch.randn(2, 3, 4)}, {"x": torch.randn(3, 3, 4)}]
    message, _worst = traced_matches(Flatten(), baked, {"a": "a"}, examples)
    assert message == ("the traced graph fails in eval mode at batch 3 where the model runs "
                       "(RuntimeError: shape '[2, 12]' is invalid for input of size 36)")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("tier", ["fx", "export"])
def test_functional_dropout_after_a_branch_point_leaves_train_mode_uncompared(tmp_path, tier):
    """Its random draws come in another order once the streams are duplicated, and no dropout
    module's p switches it off: I1 compares eval mode bit-exactly and says why train mode is
    not compared, instead of failing."""
    out = tmp_path / "out"
    spec = write_spec(tmp_path, "noisy", model={"factory": "tests.models:NoisyNet"},
                      inputs=[{"name": "x", "shape": [4, 8]}], tasks=[{"name": "a"},
                                                                      {"name": "b"}],
                      select={"layers": ["trunk"]}, trace={"tier": tier})
    compiled = compile_and_verify(spec, out)
    i1 = compiled.checks[0].detail
    assert i1.startswith("bit-exact, eval and train mode, batch 4, 5; train mode not compared: "
                         "modules after a branch point draw random numbers no dropout module's "
                         "p controls, in another order (noisy")
