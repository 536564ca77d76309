"""Converting a single-task backbone: tap a module's output or the model's output, add heads."""

import pytest
import torch

import reconfx
from reconfx.errors import ModelError
from tests.models import SingleTaskCNN
from tests.support import compile_and_verify, write_spec


def backbone_spec(tmp_path, feature, heads, layers, checkpoint=None):
    backbone = {"factory": "tests.models:SingleTaskCNN", "kwargs": {"width": 4},
                "feature": feature}
    if checkpoint:
        backbone["checkpoint"] = str(checkpoint)
    return write_spec(tmp_path, "cnn", backbone=backbone,
                      inputs=[{"name": "image", "shape": [3, 1, 12, 12]}],
                      tasks=[{"name": n, "head": h} for n, h in heads.items()],
                      select={"layers": layers})


def test_tap_a_module_path_keeps_the_pretrained_weights(tmp_path):
    pretrained = SingleTaskCNN(width=4)
    torch.nn.init.normal_(pretrained.block[0].weight)
    torch.save(pretrained.state_dict(), tmp_path / "pretrained.pt")
    heads = {"digit": {"out_features": 10, "pool": "mean"},
             "parity": {"type": "mlp", "hidden": [6], "out_features": 2, "pool": "max"}}
    out = tmp_path / "out"
    compiled = compile_and_verify(
        backbone_spec(tmp_path, "block.2", heads, ["backbone.block.0"], tmp_path / "pretrained.pt"),
        out)
    names = [layer.name for layer in compiled.prepared.layers]
    assert "backbone.classifier" not in names  # everything past the tap is cut away
    model = reconfx.load(out)
    assert torch.equal(model.backbone.block[0].digit.weight, pretrained.block[0].weight)
    assert torch.equal(model.backbone.stem[0].weight, pretrained.stem[0].weight)
    x = torch.randn(2, 1, 12, 12)
    feature = pretrained.eval().block(pretrained.stem(x))
    head = compiled.prepared.model.heads["digit"]
    assert torch.equal(model(image=x)["digit"], head(feature))


def test_tap_the_whole_output(tmp_path):
    heads = {"a": {"out_features": 3}, "b": {"out_features": 4}}
    compiled = compile_and_verify(backbone_spec(tmp_path, "output", heads, ["backbone.stem.*"]),
                                  tmp_path / "out")
    assert compiled.prepared.layers[-1].name in {"heads.a.0", "heads.b.0"}


def test_unknown_feature_is_a_clear_error(tmp_path):
    from reconfx.errors import ModelError
    from reconfx.pipeline import prepare

    heads = {"a": {"out_features": 3}, "b": {"out_features": 4}}
    with pytest.raises(ModelError, match="'blocks' is neither an output field, a submodule"):
        prepare(backbone_spec(tmp_path, "blocks", heads, ["x"]))


def test_tap_a_graph_node_name(tmp_path):
    heads = {"a": {"out_features": 3, "pool": "mean"}, "b": {"out_features": 4, "pool": "max"}}
    compiled = compile_and_verify(backbone_spec(tmp_path, "stem_2", heads, ["backbone.stem.0"]),
                                  tmp_path / "out")
    names = [layer.name for layer in compiled.prepared.layers]
    assert not any(name.startswith("backbone.block") for name in names)  # cut after stem.2


# -- loading by name -----------------------------------------------------------------------------
def hf_folder_spec(tmp_path, hf, **fields):
    return write_spec(tmp_path, "byname", backbone={"hf": hf, "feature": "last_hidden_state"},
                      inputs=[{"name": "input_ids", "shape": [2, 8], "dtype": "int64",
                               "high": 30522, "dynamic": [0, 1]}],
                      tasks=[{"name": "ner", "head": {"out_features": 9}},
                             {"name": "sentiment", "head": {"out_features": 2, "pool": "mean"}}],
                      select={"layers": ["backbone.encoder.layer.5"]}, **fields)


def test_a_hugging_face_folder_is_loaded_by_path_offline(tmp_path):
    from reconfx.zoo import minilm, minilm_path

    out = tmp_path / "out"
    compiled = compile_and_verify(hf_folder_spec(tmp_path, {"path": str(minilm_path())}), out)
    # the module path selected every layer of the last encoder layer, and nothing else
    assert all(layer.name.startswith("backbone.encoder.layer.5.")
               for layer in compiled.branched.layers)
    last = minilm().encoder.layer[5]
    assert sum(layer.num_params for layer in compiled.branched.layers) == sum(
        p.numel() for p in last.parameters())
    pretrained = minilm().state_dict()
    loaded = reconfx.load(out).state_dict()
    assert torch.equal(loaded["backbone.embeddings.word_embeddings.weight"],
                       pretrained["embeddings.word_embeddings.weight"])
    assert torch.equal(loaded["backbone.encoder.layer.5.ner.output.dense.weight"],
                       pretrained["encoder.layer.5.output.dense.weight"])


@pytest.mark.parametrize(("hf", "needles"), [
    ({"path": "/nonexistent/model"}, ["backbone.hf: cannot load '/nonexistent/model' offline",
                                      "never downloads"]),
    ({"path": "some-org/not-in-the-cache"}, ["cannot load 'some-org/not-in-the-cache' offline"]),
    ({"path": ".", "class": "NoSuchModel"}, ["transformers has no model class 'NoSuchModel'"]),
])
def test_a_hugging_face_model_that_cannot_be_loaded_offline_is_one_line(tmp_path, capsys, hf,
                                                                        needles):
    from reconfx.cli import main

    code = main(["compile", str(hf_folder_spec(tmp_path, hf)), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and err[0].startswith("reconfx: error: "), err
    for needle in needles:
        assert needle in err[0]


def test_a_timm_model_is_created_without_download_and_takes_the_checkpoint(tmp_path,
                                                                          monkeypatch):
    import sys
    import types

    from reconfx.build import call_factory
    from reconfx.spec import BackboneSpec
    from tests.models import SingleTaskCNN

    made = []

    def create_model(name, pretrained=False, **kwargs):
        made.append((name, pretrained, kwargs))
        return SingleTaskCNN(**kwargs)

    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(create_model=create_model))
    reference = SingleTaskCNN(num_classes=5)
    torch.save(reference.state_dict(), tmp_path / "w.pt")
    spec = BackboneSpec(timm={"name": "tiny_cnn", "kwargs": {"num_classes": 5}},
                        checkpoint=tmp_path / "w.pt")
    model = call_factory(spec, "spec: backbone")
    assert made == [("tiny_cnn", False, {"num_classes": 5})]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 reference.state_dict().values(), strict=True))
    with pytest.raises(ModelError, match="spec: backbone.timm: timm's pretrained=True downloads"):
        call_factory(BackboneSpec(timm={"name": "x", "kwargs": {"pretrained": True}}),
                     "spec: backbone")


def test_timm_that_cannot_be_imported_is_one_line(monkeypatch):
    import sys

    from reconfx.build import call_factory
    from reconfx.spec import BackboneSpec

    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(ModelError, match=r"spec: backbone.timm: timm cannot be imported .*"
                                         r"fix: pip install timm"):
        call_factory(BackboneSpec(timm={"name": "convnext_atto"}), "spec: backbone")


@pytest.mark.parametrize(("backbone", "needle"), [
    ({"factory": "reconfx.zoo:minilm", "hf": {"path": "x"}}, "got factory, hf"),
    ({"hf": {"path": "x"}, "kwargs": {"a": 1}}, "kwargs go inside hf"),
    ({"feature": "output"}, "give exactly one of factory"),
])
def test_a_backbone_names_exactly_one_source(tmp_path, capsys, backbone, needle):
    from reconfx.cli import main

    path = write_spec(tmp_path, backbone=backbone, inputs=[{"name": "x", "shape": [2, 4]}],
                      tasks=[{"name": "a", "head": {"out_features": 2}},
                             {"name": "b", "head": {"out_features": 2}}])
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1


def test_a_model_named_like_a_class_it_uses_gets_that_class_under_an_alias(tmp_path):
    """The spec "pool" makes model.py's class Pool, and its mean-pooling head is reconfx's own
    Pool, written into the file: that one is written as Pool_, the import aliased before any
    call of it is rendered. The names of model.py's helper classes are not given to a model."""
    from reconfx.spec import class_name

    heads = {"a": {"out_features": 3, "pool": "mean"}, "b": {"out_features": 4, "pool": "max"}}
    spec = write_spec(tmp_path, "pool", backbone={
        "factory": "tests.models:SingleTaskCNN", "kwargs": {"width": 4}, "feature": "block.2"},
        inputs=[{"name": "image", "shape": [3, 1, 12, 12]}],
        tasks=[{"name": n, "head": h} for n, h in heads.items()],
        select={"layers": ["backbone.block.0"]})
    out = tmp_path / "out"
    compile_and_verify(spec, out)
    source = (out / "model.py").read_text()
    assert source.count("class Pool(nn.Module):") == 1
    assert source.count("class Pool_(nn.Module):") == 1
    assert 'Pool_("mean"' in source and 'Pool_("max"' in source
    assert "Pool(" not in source.replace("class Pool(", "")
    assert [class_name(n) for n in ("per-task", "any", "pool")] == ["PerTaskModel", "AnyModel",
                                                                    "Pool"]


def test_an_encoder_fed_by_the_model_keeps_the_model_whole(tmp_path):
    """Tapped at its encoder's output, an encoder–decoder whose encoder takes none of the
    spec's inputs (the model computes its input) runs whole: its encoder alone would get no
    input."""
    spec = write_spec(tmp_path, "fed", backbone={
        "factory": "tests.models:EncoderFedByModel", "feature": "encoder_last_hidden_state"},
        inputs=[{"name": "past_values", "shape": [4, 3]}],
        tasks=[{"name": "a", "head": {"out_features": 2}},
               {"name": "b", "head": {"out_features": 3}}],
        select={"layers": ["backbone.encoder.fc"]})
    compiled = compile_and_verify(spec, tmp_path / "out")
    assert [layer.name for layer in compiled.branched.layers] == ["backbone.encoder.fc"]
    assert "backbone.scale" in dict(compiled.prepared.model.named_modules())
