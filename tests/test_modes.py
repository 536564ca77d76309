"""Glue outside any leaf that reads self.training: both tiers keep a train and an eval graph."""

import copy

import pytest
import torch

import reconfx
from reconfx.zoo import TrainingGlue
from tests.support import compile_and_verify, write_spec


@pytest.mark.parametrize("tier", ["fx", "export"])
@pytest.mark.parametrize("layers", [["fc1"], ["fc2"]])
def test_training_dependent_glue(tmp_path, tier, layers):
    spec = write_spec(tmp_path, "glue", model={"factory": "reconfx.zoo:TrainingGlue"},
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
