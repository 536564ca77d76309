"""Converting a single-task backbone: tap a module's output or the model's output, add heads."""

import pytest
import torch

import reconfx
from reconfx.zoo import SingleTaskCNN
from tests.support import compile_and_verify, write_spec


def backbone_spec(tmp_path, feature, heads, layers, checkpoint=None):
    backbone = {"factory": "reconfx.zoo:SingleTaskCNN", "kwargs": {"width": 4},
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
