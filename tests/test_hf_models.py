"""Hugging Face transformers models built from small configs (fx cannot trace them in
transformers 5.x, so they go through torch.export), converted with backbone + heads specs."""

import re

import pytest
import torch

import reconfx
from tests.support import compile_and_verify, write_spec

IMAGE = [{"name": "pixel_values", "shape": [2, 3, 32, 32]}]
TOKENS = [{"name": "input_ids", "shape": [2, 8], "dtype": "int64", "high": 100,
           "dynamic": [0, 1]}]
CASES = {
    "bert": ("BertModel", dict(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=64,
                               max_position_embeddings=64), TOKENS, "last_hidden_state",
             ["backbone.encoder.layer.1.*"]),
    "gpt2": ("GPT2Model", dict(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                               bos_token_id=0, eos_token_id=0), TOKENS, "last_hidden_state",
             ["backbone.h.1.mlp.*"]),  # export lifts empty constant tensors in its attention
    "llama": ("LlamaModel", dict(vocab_size=100, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=2,
                                 num_key_value_heads=1, max_position_embeddings=64), TOKENS,
              "last_hidden_state", ["backbone.layers.1.mlp.*"]),  # rotary: autocast region
    "vit": ("ViTModel", dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                             num_attention_heads=2, intermediate_size=64), IMAGE,
            "last_hidden_state", ["backbone.embeddings", "backbone.layers.1.mlp.*"]),
    "swin": ("SwinModel", dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                               num_heads=[2, 2], window_size=4), IMAGE, "last_hidden_state",
             ["backbone.encoder.layers.1.blocks.0.attention.*"]),  # long module paths
    "resnet": ("ResNetModel", dict(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                                   layer_type="basic"), IMAGE, "pooler_output",
               ["backbone.encoder.stages.1.*"]),
    "convnext": ("ConvNextModel", dict(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1],
                                       patch_size=2), IMAGE, "pooler_output",
                 ["backbone.encoder.stages.1.layers.0.*"]),
}

TOKEN_CONFIG = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, max_position_embeddings=64)
# More architectures, run on demand (`make test-slow`): each has its own tracing or emitting
# trouble (shared ALBERT layers, 95-character module paths, T5's relative attention bias, ...).
MORE_CASES = {
    "albert": ("AlbertModel", dict(TOKEN_CONFIG, embedding_size=16), TOKENS,
               "last_hidden_state",
               ["backbone.encoder.albert_layer_groups.0.albert_layers.0.attention.dense"]),
    "deit": ("DeiTModel", dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=64), IMAGE,
             "last_hidden_state", ["backbone.layers.1.attention.q_proj"]),
    "mobilebert": ("MobileBertModel", dict(TOKEN_CONFIG, embedding_size=16,
                                           intra_bottleneck_size=16), TOKENS,
                   "last_hidden_state", ["backbone.encoder.layer.1.attention.self.query"]),
    "distilbert": ("DistilBertModel", dict(vocab_size=100, dim=32, n_layers=2, n_heads=2,
                                           hidden_dim=64, max_position_embeddings=64), TOKENS,
                   "last_hidden_state", ["backbone.transformer.layer.1.attention.q_lin"]),
    "roberta": ("RobertaModel", TOKEN_CONFIG, TOKENS, "last_hidden_state",
                ["backbone.encoder.layer.1.attention.self.query"]),
    "electra": ("ElectraModel", dict(TOKEN_CONFIG, embedding_size=16), TOKENS,
                "last_hidden_state", ["backbone.encoder.layer.0.output.dense"]),
    "qwen2": ("Qwen2Model", dict(vocab_size=100, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=2,
                                 num_key_value_heads=1, max_position_embeddings=64), TOKENS,
              "last_hidden_state", ["backbone.layers.1.self_attn.q_proj"]),
    "t5": ("T5EncoderModel", dict(vocab_size=100, d_model=32, d_kv=16, num_heads=2,
                                  num_layers=2, d_ff=64), TOKENS, "last_hidden_state",
           ["backbone.encoder.block.1.layer.0.SelfAttention.q"]),
    # OPT's positional embedding reads position ids but is called with the attention mask;
    # Falcon's rotary embedding is built from the config; DeBERTa hands modules parameter views.
    "opt": ("OPTModel", dict(TOKEN_CONFIG, ffn_dim=64, word_embed_proj_dim=32), TOKENS,
            "last_hidden_state", ["backbone.decoder.layers.1.self_attn.k_proj"]),
    "falcon": ("FalconModel", dict(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=2), TOKENS, "last_hidden_state",
               ["backbone.h.1.self_attention.query_key_value"]),
    "deberta": ("DebertaModel", TOKEN_CONFIG, TOKENS, "last_hidden_state",
                ["backbone.encoder.layer.1.attention.self.in_proj"]),
    "xlm-roberta": ("XLMRobertaModel", TOKEN_CONFIG, TOKENS, "last_hidden_state",
                    ["backbone.encoder.layer.1.attention.self.query"]),
}


def hf_spec(tmp_path, case, tasks=2, layers=None, **fields):
    arch, config, inputs, feature, case_layers = {**CASES, **MORE_CASES}[case]
    layers = layers or case_layers
    token_level = feature == "last_hidden_state"
    heads = [{"name": "a", "head": {"out_features": 3, "pool": "none" if case == "bert"
                                    else ("cls" if token_level else "none")}},
             {"name": "b", "head": {"type": "mlp", "hidden": [8], "out_features": 2,
                                    "pool": "mean" if token_level else "none"}},
             {"name": "c", "head": {"out_features": 4, "pool": "max" if token_level
                                    else "none"}}][:tasks]
    return write_spec(tmp_path, case,
                      backbone={"factory": "reconfx.zoo:hf_model",
                                "kwargs": {"arch": arch, "config": config},
                                "feature": feature},
                      inputs=inputs, tasks=heads, select={"layers": layers}, **fields)


@pytest.mark.parametrize("tasks", [2, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_hf_backbone(tmp_path, case, tasks):
    compiled = compile_and_verify(hf_spec(tmp_path, case, tasks), tmp_path / "out")
    traced = compiled.prepared.traced
    # fx traces none of these whole (transformers 5.25); where the selection takes each coarse
    # leaf whole or leaves it before the branch point, tier 1 keeps it
    assert traced.tier == "export" or traced.tier == "fx-coarse" and any(
        "branches each whole or runs it before any branch point" in n for n in traced.notes)
    assert compiled.branched.layers
    assert all(layer.name.startswith("backbone.") for layer in compiled.branched.layers)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(MORE_CASES))
def test_more_hf_backbones(tmp_path, case):
    compiled = compile_and_verify(hf_spec(tmp_path, case, tasks=3), tmp_path / "out")
    assert compiled.prepared.traced.tier in ("fx", "export")  # Falcon traces with fx, not coarse
    assert [layer.name for layer in compiled.branched.layers] == [
        layer.name for layer in compiled.prepared.layers
        if any(layer.matches(p) for p in MORE_CASES[case][4])]


def test_a_config_named_like_the_tail_of_another_is_written_whole(tmp_path):
    """RobertaConfig(...) is the tail of XLMRobertaConfig(...) with the same fields: emitted
    after it, in one process, the XLM-R model keeps its own config constant."""
    for case in ("roberta", "xlm-roberta"):
        compile_and_verify(hf_spec(tmp_path, case), tmp_path / case)
    source = (tmp_path / "xlm-roberta" / "model.py").read_text()
    assert "\nXLMROBERTA_CONFIG = XLMRobertaConfig(\n" in source
    assert "ROBERTA_CONFIG" not in source.replace("XLMROBERTA_CONFIG", "")


def test_a_call_found_not_to_fit_prints_nothing(tmp_path, capfd):
    """RoFormer's attention, collapsed into one call and run on another sequence length, raises
    inside a GraphModule, which prints the generated code's traceback before raising: the
    candidate is written out op by op, and the terminal shows nothing of it."""
    path = write_spec(tmp_path, "roformer", backbone={
        "factory": "reconfx.zoo:hf_model", "feature": "last_hidden_state",
        "kwargs": {"arch": "RoFormerModel", "config": dict(TOKEN_CONFIG, embedding_size=32)}},
        inputs=TOKENS, tasks=[{"name": "a", "head": {"out_features": 3}},
                              {"name": "b", "head": {"out_features": 2, "pool": "mean"}}],
        select={"layers": ["backbone.encoder.layer.1.attention.self.query"]})
    capfd.readouterr()
    reconfx.compile_spec(path, tmp_path / "out")
    assert capfd.readouterr().err == ""


def test_backbone_weights_are_kept(tmp_path):
    """The converted model's shared trunk computes exactly the backbone's feature."""
    out = tmp_path / "out"
    compiled = compile_and_verify(hf_spec(tmp_path, "bert"), out)
    model = reconfx.load(out)
    backbone = compiled.prepared.model.backbone
    ids = torch.randint(0, 100, (3, 6))
    feature = backbone(input_ids=ids).last_hidden_state
    head = compiled.prepared.model.heads["a"]  # task a: a linear head on the token features
    assert torch.equal(model(input_ids=ids)["a"], head(feature))
    word = model.backbone.embeddings.word_embeddings.weight
    assert torch.equal(word, backbone.embeddings.word_embeddings.weight)


# With only the query branched, the self-attention holds shared and branched layers and is
# written out op by op, with the glue the tracer baked in (its attention mask, dropout_p).
QUERY = ["backbone.encoder.layer.1.attention.self.query"]


def test_glue_that_depends_on_training_mode_is_kept_for_both_modes(tmp_path):
    out = tmp_path / "out"
    # (stream batching off: with it, eval mode runs the shared attention batched, apart)
    compiled = compile_and_verify(hf_spec(tmp_path, "bert", layers=QUERY,
                                          branch={"stream_batching": "off"}), out)
    assert compiled.branched.module.dual  # attention dropout_p is baked into the glue
    source = (out / "model.py").read_text()
    # One forward: the attention call (its dropout) differs between the modes, written once
    # where it is used.
    # (one per class)
    assert source.count("    def forward(") == source.count("(nn.Module):") >= 1
    assert "_forward_" not in source
    assert re.search(r"dropout_p=0\.\d+ if self\.training else 0\.0,\n", source)


@pytest.mark.parametrize("case", ["bert", "llama"])
def test_factory_ops_follow_the_input_device(tmp_path, case):
    """torch.export bakes device=cpu into BERT's arange and Llama's ``inv_freq.to(cpu)``; the
    compiled graph and the emitted model take the device from their input instead (checked on
    the meta device: no GPU needed). (BERT with stream batching off: on task rows, model.py
    calls its embeddings whole, so it writes no factory op to check.)"""
    out = tmp_path / "out"
    compiled = compile_and_verify(
        hf_spec(tmp_path, case, layers=QUERY if case == "bert" else None,
                branch={"stream_batching": "off"} if case == "bert" else {}), out)
    source = (out / "model.py").read_text()
    assert 'torch.device("cpu")' not in source and "device = input_ids.device" in source
    ids = torch.zeros(2, 8, dtype=torch.long, device="meta")
    for model in (compiled.branched.module, reconfx.load(out)):
        outputs = model.to("meta")(input_ids=ids)
        assert {t: o.device.type for t, o in outputs.items()} == {"a": "meta", "b": "meta"}


def test_hf_model_takes_the_config_class_of_the_model_class():
    from reconfx.errors import ModelError
    from reconfx.zoo import hf_model

    t5 = hf_model("T5EncoderModel", dict(vocab_size=100, d_model=32, d_kv=16, num_heads=2,
                                         num_layers=2, d_ff=64))  # its config is T5Config
    assert type(t5.config).__name__ == "T5Config" and t5.config.d_model == 32
    for bad in ("NoSuchModel", "BertConfig"):
        with pytest.raises(ModelError, match=f"no model class '{bad}'.*fix: use a model class"):
            hf_model(bad)


# Decoders with their last layer branched: torch.export's graph is the source of facts, and
# model.py calls what the surgery left untouched (decoder layers with their position
# embeddings, the rotary embedding with the hidden states it reads only the dtype of).
DECODERS = {
    "llama": ("LlamaModel", dict(vocab_size=100, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=4, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=64),
              "backbone.layers", "LlamaDecoderLayer"),
    "gpt2": ("GPT2Model", dict(vocab_size=100, n_embd=64, n_layer=4, n_head=4, n_positions=64,
                               bos_token_id=0, eos_token_id=0), "backbone.h", "GPT2Block"),
}


def decoder_spec(tmp_path, case, layer):
    """A spec for the decoder ``case`` with heads a and b and ``layer`` (below its layer list)
    branched."""
    arch, config, layers, _block = DECODERS[case]
    return write_spec(tmp_path, case, backbone={
        "factory": "reconfx.zoo:hf_model", "kwargs": {"arch": arch, "config": config},
        "feature": "last_hidden_state"},
        inputs=[dict(TOKENS[0], shape=[2, 16])],
        tasks=[{"name": "a", "head": {"out_features": 3}},
               {"name": "b", "head": {"out_features": 2, "pool": "mean"}}],
        select={"layers": [f"{layers}.{layer}"]})


@pytest.mark.parametrize("case", list(DECODERS))
def test_a_decoder_with_its_last_layer_branched_calls_its_own_modules(tmp_path, case):
    _arch, _config, layers, block = DECODERS[case]
    path = decoder_spec(tmp_path, case, "3")
    compiled = compile_and_verify(path, tmp_path / "out")
    assert compiled.prepared.traced.tier == "export"
    source = (tmp_path / "out" / "model.py").read_text()
    diff = (tmp_path / "out" / "branch.diff").read_text()
    assert len(source.splitlines()) <= 120 and len(diff.splitlines()) <= 80
    assert "torch.ops.aten" not in source and "sym_size" not in source
    access = "self." + layers
    assert f"for layer in {access}[:3]:" in source
    assert f"nn.ModuleDict({{task: {block}(" in source
    assert f"{access}[3].a(" in source and f"{access}[3].b(" in source
    if case == "llama":
        assert "= self.backbone.rotary_emb(\n" in source
        assert "    backbone_embed_tokens, backbone_unsqueeze\n" in source
        assert "position_embeddings=(" in source


def test_a_decoder_layer_holding_a_branched_part_is_called_whole_on_task_rows(tmp_path):
    """Recon's usual late selection: part of the last decoder layer (its MLP) branched. The
    layer stays LlamaDecoderLayer, called whole on the task rows with its MLP one copy per task
    (the attention before the MLP runs on every task's rows), instead of written out op by op
    with the causal mask the model builds."""
    compile_and_verify(decoder_spec(tmp_path, "llama", "3.mlp"), tmp_path / "out")
    source = (tmp_path / "out" / "model.py").read_text()
    diff = (tmp_path / "out" / "branch.diff").read_text()
    # (per stream: 253 lines, the layer and the mask written out. The PerTask class is 20
    # lines of both files, and the diff opens the LlamaModel that original.py calls whole.)
    assert len(source.splitlines()) <= 130 and len(diff.splitlines()) <= 110
    assert "torch.ops.aten" not in source and "self.training" not in source
    assert "self.backbone.layers[3].mlp = PerTask({task: LlamaMLP(LLAMA_CONFIG) for task in " \
           "TASKS})" in source
    forward = source[source.rindex("    def forward("):]
    assert "for layer in self.backbone.layers[:3]:" in forward
    assert "= self.backbone.layers[3](\n            backbone_layers_streams," in forward
    assert forward.count("torch.arange(") == 1  # (the position ids; no mask built op by op)
