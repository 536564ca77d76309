"""Weight tying both ways: one module called at two places, two modules sharing a Parameter."""

import pytest

import reconfx
from tests.support import compile_and_verify, write_spec


@pytest.mark.parametrize("tier", ["fx", "export"])
@pytest.mark.parametrize("layers", [["proj"], ["inp"], ["norm", "proj"]])
def test_module_called_twice_is_one_layer_with_one_copy_per_task(tmp_path, tier, layers):
    spec = write_spec(tmp_path, "calltwice",
                      model={"factory": "tests.models:SharedCallTwice", "kwargs": {"dim": 8}},
                      inputs=[{"name": "x", "shape": [3, 8]}],
                      tasks=[{"name": "left"}, {"name": "right"}],
                      select={"layers": layers}, trace={"tier": tier})
    out = tmp_path / "out"
    compiled = compile_and_verify(spec, out)
    proj = next(layer for layer in compiled.prepared.layers if layer.name == "proj")
    assert proj.num_params == 8 * 8 + 8  # counted once although called twice
    if "proj" in layers:
        model = reconfx.load(out)
        source = (out / "model.py").read_text()
        # Every call site of the streams uses the per-task copies: one call on the task rows
        # (each task's copy on its rows), or one call per task stream where the rows form is
        # not written (the export tier's graph reads the branched weights directly).
        forward = source[source.rindex("    def forward("):]
        calls = "self.proj(" if "class PerTask(" in source else "self.proj.left("
        assert forward.count(calls) == 2 - ("inp" in layers)
        assert model.proj.left.weight is not model.proj.right.weight


@pytest.mark.parametrize("tier", ["fx", "export"])
def test_tied_embedding_and_decoder_branch_together(tmp_path, tier):
    spec = write_spec(tmp_path, "tied",
                      model={"factory": "tests.models:TiedEmbedding", "kwargs": {}},
                      inputs=[{"name": "tokens", "shape": [2, 5], "dtype": "int64", "high": 50}],
                      tasks=[{"name": "lm"}, {"name": "cls"}],
                      select={"layers": ["decoder"]}, trace={"tier": tier})
    out = tmp_path / "out"
    compiled = compile_and_verify(spec, out)
    (group,) = compiled.branched.layers
    assert set(group.modules) == {"embed", "decoder"}
    assert group.num_params == 50 * 16  # the shared weight counted once
    model = reconfx.load(out)
    # The tie is kept inside the task's copy; only 'lm' calls the decoder, so 'cls' has none.
    assert model.decoder.lm.weight is model.embed.lm.weight
    assert "cls" not in model.decoder
    assert model.embed.lm.weight is not model.embed.cls.weight


@pytest.mark.parametrize("tier", ["fx", "export"])
def test_in_place_update_of_a_shared_tensor_runs_out_of_place_per_stream(tmp_path, tier):
    spec = write_spec(tmp_path, "inplace", model={"factory": "tests.models:InPlaceOnShared"},
                      inputs=[{"name": "x", "shape": [3, 4]}], tasks=[{"name": "a"}, {"name": "b"}],
                      select={"layers": ["branch"]}, trace={"tier": tier})
    out = tmp_path / "out"
    compile_and_verify(spec, out)
    source = (out / "model.py").read_text()
    if tier == "export":  # the graph keeps aten.add_; per stream it becomes an addition
        assert "torch.ops.aten.add_" not in source
        return
    assert "add_a = trunk + branch_a" in source  # trunk itself stays shared and unchanged
    assert "        add_a.mul_(0.5)\n" in source  # in place on the task's own tensor, kept
