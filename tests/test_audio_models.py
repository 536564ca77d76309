"""Backbones beyond text and images, from Hugging Face configs (random weights, written with
save_pretrained and read through backbone.hf): an audio encoder with a weight-normed
convolution, and an encoder-decoder tapped at its encoder. model.py never names the folder the
model came from."""

import pytest
import torch

import reconfx
from tests.support import compile_and_verify, write_spec


def saved(tmp_path, arch, **config):
    import transformers

    config_class = getattr(transformers, arch.replace("Model", "Config"))
    torch.manual_seed(0)
    folder = tmp_path / arch
    getattr(transformers, arch)(config_class(**config)).save_pretrained(folder)
    return folder


WAV2VEC2 = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
                num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, mask_time_prob=0.0,
                layerdrop=0.0)
WHISPER = dict(vocab_size=100, pad_token_id=1, bos_token_id=2, eos_token_id=3,
               decoder_start_token_id=2, num_mel_bins=8, encoder_layers=2, decoder_layers=2,
               d_model=32, encoder_attention_heads=2, decoder_attention_heads=2,
               encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=16,
               max_target_positions=16)
HEADS = [{"name": "a", "head": {"out_features": 3, "pool": "mean"}},
         {"name": "b", "head": {"out_features": 2, "pool": "mean"}}]


def test_an_audio_encoder_with_a_weight_normed_convolution_is_built_by_its_own_classes(
        tmp_path):
    folder = saved(tmp_path, "Wav2Vec2Model", **WAV2VEC2)
    spec = write_spec(tmp_path, "wav", backbone={"hf": {"path": str(folder)},
                                                  "feature": "last_hidden_state"},
                      inputs=[{"name": "input_values", "shape": [2, 400], "dynamic": [0, 1]}],
                      tasks=HEADS, select={"layers": ["backbone.encoder.layers.1"]})
    out = tmp_path / "out"
    compile_and_verify(spec, out)
    source = (out / "model.py").read_text()
    assert str(folder) not in source and str(tmp_path) not in source
    assert "Wav2Vec2PositionalConvEmbedding(" in source and "_restored" not in source
    assert "Wav2Vec2FeatureEncoder(WAV2_VEC2_CONFIG)" in source


@pytest.mark.parametrize("decoder_inputs", [False, True])
def test_an_encoder_decoder_tapped_at_its_encoder_runs_only_the_encoder(tmp_path,
                                                                        decoder_inputs):
    """feature: encoder_last_hidden_state keeps the encoder alone: the decoder's inputs are
    not needed (and ignored where the spec lists them), its parameters are not counted, and
    model.py builds no decoder."""
    folder = saved(tmp_path, "WhisperModel", **WHISPER)
    inputs = [{"name": "input_features", "shape": [2, 8, 32]}]
    if decoder_inputs:
        inputs.append({"name": "decoder_input_ids", "shape": [2, 4], "dtype": "int64",
                       "high": 100})
    spec = write_spec(tmp_path, "whisper", backbone={"hf": {"path": str(folder)},
                                                      "feature": "encoder_last_hidden_state"},
                      inputs=inputs, tasks=HEADS,
                      select={"layers": ["backbone.encoder.layers.1"]})
    out = tmp_path / "out"
    compiled = compile_and_verify(spec, out)
    source = (out / "model.py").read_text()
    assert "backbone.decoder" not in source and "Decoder" not in source
    assert source.count("decoder_input_ids") == decoder_inputs  # (the spec's input, unused)
    import transformers

    whole = transformers.WhisperModel.from_pretrained(folder)
    encoder = sum(p.numel() for p in whole.encoder.parameters())
    heads = sum(p.numel() for p in compiled.branched.module.heads.parameters())
    layer = sum(p.numel() for p in whole.encoder.layers[1].parameters())
    loaded = reconfx.load(out)
    assert sum(p.numel() for p in loaded.parameters()) == encoder + heads + layer
    features = torch.randn(2, 8, 32)
    model = compiled.prepared.model.eval()
    with torch.no_grad():
        want = whole.encoder(input_features=features).last_hidden_state
        assert torch.equal(model.backbone(input_features=features).last_hidden_state, want)
        given = {"input_features": features}
        if decoder_inputs:
            given["decoder_input_ids"] = torch.randint(0, 100, (2, 4))
        expected, got = model(**given), loaded(**given)
    for task in ("a", "b"):
        torch.testing.assert_close(got[task], expected[task], rtol=0, atol=1e-5)


def test_train_mode_randomness_of_the_config_is_named_and_the_named_fix_works(tmp_path, capsys):
    """Wav2Vec2's default SpecAugment masks (numpy) and LayerDrop differ between the tiers and
    the model in train mode: the error names the config keys and how to switch them off, and
    that fix compiles."""
    from reconfx.cli import main

    folder = saved(tmp_path, "Wav2Vec2Model", **{**WAV2VEC2, "mask_time_prob": 0.05,
                                                 "layerdrop": 0.1})
    fields = dict(inputs=[{"name": "input_values", "shape": [2, 400], "dynamic": [0, 1]}],
                  tasks=HEADS, select={"layers": ["backbone.encoder.layers.1"]})
    spec = write_spec(tmp_path, "wav", backbone={"hf": {"path": str(folder)},
                                                  "feature": "last_hidden_state"}, **fields)
    capsys.readouterr()  # (save_pretrained's progress)
    assert main(["compile", str(spec), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()  # (--quiet: transformers' loading bar too)
    assert err.count("\n") == 0 and err.startswith("reconfx: error: ")
    assert ("(mask_time_prob=0.05, layerdrop=0.1: masks or skipped layers that neither tier "
            "reproduces)") in err
    assert "backbone.hf.kwargs: {mask_time_prob: 0.0, layerdrop: 0.0}" in err
    spec = write_spec(tmp_path, "wav", backbone={
        "hf": {"path": str(folder), "kwargs": {"mask_time_prob": 0.0, "layerdrop": 0.0}},
        "feature": "last_hidden_state"}, **fields)
    compile_and_verify(spec, tmp_path / "out")
