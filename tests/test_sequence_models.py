"""An nn.LSTM model and an nn.TransformerEncoder model; train/eval behaviour of dropout."""

import pytest
import torch

import reconfx
from tests.support import compile_and_verify, write_spec


@pytest.mark.parametrize("layers", [["lstm"], ["proj"], ["embed", "lstm", "proj"]])
def test_lstm_tagger(tmp_path, layers):
    spec = write_spec(tmp_path, "lstm", model={"factory": "tests.models:LSTMTagger"},
                      inputs=[{"name": "tokens", "shape": [2, 7], "dtype": "int64", "high": 40,
                               "dynamic": [0, 1]}],
                      tasks=[{"name": "tags"}, {"name": "sentence"}], select={"layers": layers})
    compiled = compile_and_verify(spec, tmp_path / "out")
    lstm = next(layer for layer in compiled.prepared.layers if layer.name == "lstm")
    assert lstm.type == "LSTM"


def encoder_spec(tmp_path, layers, tier="auto"):
    return write_spec(tmp_path, "encoder",
                      model={"factory": "reconfx.zoo:EncoderClassifier", "kwargs": {"dim": 16}},
                      inputs=[{"name": "tokens", "shape": [3, 5], "dtype": "int64", "high": 30,
                               "dynamic": [0, 1]}],
                      tasks=[{"name": "tokens"}, {"name": "sequence"}],
                      select={"layers": layers}, trace={"tier": tier})


@pytest.mark.parametrize("layers", [["encoder.layers.1.*"], ["encoder.layers.0.linear2"],
                                    ["embed"]])
def test_transformer_encoder(tmp_path, layers):
    compiled = compile_and_verify(encoder_spec(tmp_path, layers), tmp_path / "out")
    names = [layer.name for layer in compiled.prepared.layers]
    assert "encoder.layers.0.self_attn" in names  # traced through the encoder, MHA a leaf


def test_encoder_that_fx_traces_only_as_a_coarse_leaf_goes_through_torch_export(tmp_path):
    compiled = compile_and_verify(encoder_spec(tmp_path, ["embed"]), tmp_path / "out")
    traced = compiled.prepared.traced
    assert traced.tier == "export"
    assert any("coarse fx leaves hide several layers: encoder" in n for n in traced.notes)


@pytest.mark.parametrize(("layers", "tier", "taken"), [
    # the coarse leaf branched whole: its copies are whole modules
    (["encoder"], "fx-coarse", ["encoder"]),
    (["encoder", "embed"], "fx-coarse", ["encoder", "embed"]),
    (["*"], "fx-coarse", ["encoder", "embed"]),  # (the heads are task-specific already)
    (["encoder.layers.1.*"], "export", []),  # a layer inside the leaf: it would be split
    (["embed"], "export", []),  # the leaf, untouched, would run once per task stream
])
def test_a_coarse_fx_leaf_is_kept_where_the_selection_takes_it_whole(tmp_path, layers, tier,
                                                                    taken):
    compiled = compile_and_verify(encoder_spec(tmp_path, layers), tmp_path / "out")
    assert compiled.prepared.traced.tier == tier
    if tier == "fx-coarse":
        model = compiled.prepared.model
        assert "encoder" in [layer.name for layer in compiled.branched.layers]
        assert sum(layer.num_params for layer in compiled.branched.layers) == sum(
            p.numel() for name in taken for p in model.get_submodule(name).parameters())
        source = (tmp_path / "out" / "model.py").read_text()
        assert "self.encoder = nn.ModuleDict({" in source
        assert "self.encoder.tokens(embed" in source
    else:
        assert "encoder.layers.0.self_attn" in [layer.name for layer in compiled.prepared.layers]
        assert not any(layer.name == "encoder" for layer in compiled.prepared.layers)


def test_forcing_fx_keeps_the_coarse_leaf(tmp_path):
    compiled = compile_and_verify(encoder_spec(tmp_path, ["encoder"], tier="fx"),
                                  tmp_path / "out")
    assert compiled.prepared.traced.tier == "fx"
    assert [layer.type for layer in compiled.branched.layers] == ["TransformerEncoder"]


@pytest.mark.parametrize(("tier", "layers"), [("fx", ["embed"]),
                                              ("auto", ["encoder.layers.1.linear1"])])
def test_dropout_is_active_in_train_and_off_in_eval(tmp_path, tier, layers):
    out = tmp_path / "out"
    compile_and_verify(encoder_spec(tmp_path, layers, tier), out)
    model = reconfx.load(out)
    tokens = torch.randint(0, 30, (4, 6))
    model.eval()
    assert torch.equal(model(tokens=tokens)["sequence"], model(tokens=tokens)["sequence"])
    model.train()
    torch.manual_seed(0)
    first = model(tokens=tokens)["sequence"]
    assert not torch.equal(first, model(tokens=tokens)["sequence"])


def test_leaf_whose_ops_read_another_tensor_than_its_argument_stays_aten_ops(tmp_path):
    """torch.export records a leaf's ops; re-lifting calls the leaf on the one tensor they read.
    OPT's positional embedding reads the positions it is given by keyword but takes the mask
    as its argument, so that call would compute something else: it stays as its aten ops.
    model.py calls it whole, with both arguments the model gave it (the mask it never reads
    included)."""
    path = write_spec(tmp_path, "positions", model={"factory": "tests.models:PositionsFromMask"},
                      inputs=[{"name": "ids", "shape": [2, 8], "dtype": "int64", "high": 50,
                               "dynamic": [0, 1]}],
                      tasks=[{"name": "a"}, {"name": "b"}], select={"layers": ["fc"]},
                      trace={"tier": "export"})
    out = tmp_path / "out"
    compiled = compile_and_verify(path, out)
    traced = compiled.prepared.traced
    assert traced.tier == "export"
    assert any(note.startswith("'positions' (OffsetPositions) is kept as aten ops: called on")
               for note in traced.notes)
    called = {str(n.target) for n in traced.module.graph.nodes if n.op == "call_module"}
    assert called == {"embed", "fc", "a", "b"}
    source = (out / "model.py").read_text()
    assert "positions = self.positions(ones_like, sub)\n" in source
    assert "ones_like = torch.ones_like(ids)\n" in source


def test_forward_argument_left_out_of_the_spec_keeps_its_default(tmp_path):
    """fx fixes an argument the spec does not give to its default and guards it with an assert
    on a placeholder; the compiled model takes only the spec's inputs and uses the default."""
    path = write_spec(tmp_path, "scaled", model={"factory": "tests.models:DefaultScale"},
                      inputs=[{"name": "x", "shape": [2, 4]}],
                      tasks=[{"name": "a"}, {"name": "b"}], select={"layers": ["fc"]})
    out = tmp_path / "out"
    compiled = compile_and_verify(path, out)
    assert compiled.prepared.traced.tier == "fx"
    source = (out / "model.py").read_text()
    assert "def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:" in source
    assert "relu * 2.0" in source


def test_a_coarse_fx_leaf_is_checked_and_kept_where_torch_export_fails_too(tmp_path):
    """Tier 1's coarse graph is checked only where it is used: here tier 2 fails, so the
    coarse graph is accepted after its check, and the compile says why."""
    spec = write_spec(tmp_path, "gated", model={"factory": "tests.models:GatedNet"},
                      inputs=[{"name": "x", "shape": [2, 4], "dynamic": [0]}],
                      tasks=[{"name": "a"}, {"name": "b"}], select={"layers": ["stem"]})
    compiled = compile_and_verify(spec, tmp_path / "out")
    traced = compiled.prepared.traced
    assert traced.tier == "fx-coarse"
    assert "gated" in [layer.name for layer in compiled.prepared.layers]
    assert any("coarse fx leaves hide several layers: gated" in n for n in traced.notes)
    assert any(n.startswith("the coarse fx leaves are kept: tier 2 failed too") for n in
               traced.notes)
