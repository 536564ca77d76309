"""Parameters read directly by the graph (class token, position table) and MultiheadAttention."""

import pytest
import torch

import reconfx
from tests.support import compile_and_verify, write_spec


def spec(tmp_path, layers, tier="auto"):
    return write_spec(tmp_path, "tokens",
                      model={"factory": "tests.models:TokenAttention", "kwargs": {"dim": 8}},
                      inputs=[{"name": "patches", "shape": [2, 6, 4]}],
                      tasks=[{"name": "a"}, {"name": "b"}, {"name": "c"}],
                      select={"layers": layers}, trace={"tier": tier})


def test_directly_read_parameters_form_one_layer_of_their_owner(tmp_path):
    compiled = compile_and_verify(spec(tmp_path, ["root"]), tmp_path / "out")
    (layer,) = compiled.branched.layers
    assert layer.type == "parameters"
    assert set(layer.params) == {"cls_token", "pos"}
    model = reconfx.load(tmp_path / "out")
    assert isinstance(model.cls_token, torch.nn.ParameterDict)
    assert set(model.cls_token) == {"a", "b", "c"}


@pytest.mark.parametrize("layers", [["attn"], ["attn", "norm"], ["patch"]])
def test_multihead_attention_is_one_layer(tmp_path, layers):
    compiled = compile_and_verify(spec(tmp_path, layers), tmp_path / "out")
    attn = next(layer for layer in compiled.prepared.layers if layer.name == "attn")
    assert attn.type == "MultiheadAttention"
    assert attn.num_params == 4 * 8 * 8 + 4 * 8  # in_proj + out_proj, weights and biases


def test_attention_model_through_torch_export(tmp_path):
    compiled = compile_and_verify(spec(tmp_path, ["norm", "root"], tier="export"),
                                  tmp_path / "out")
    assert compiled.prepared.traced.tier == "export"
