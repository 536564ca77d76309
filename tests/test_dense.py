"""Dense prediction (segmentation): per-pixel losses and metrics, per-pixel heads on a backbone's
feature map, image sides that must stay multiples, and MultiDigits' segmentation variant."""

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

import reconfx
from reconfx.build import second_size
from reconfx.cli import main
from reconfx.data import multidigits
from reconfx.train.objectives import LOSSES, METRICS
from tests.support import compile_and_verify, write_spec

DENSE = {"factory": "reconfx.data:multidigits", "kwargs": {"dense": True, "size": 256},
         "batch_size": 64}
TASKS = [{"name": "left", "loss": "cross_entropy"}, {"name": "right", "loss": "cross_entropy"}]


def test_dense_multidigits_labels_each_digits_stroke_with_the_digit():
    dense, plain = multidigits("val", seed=0, dense=True), multidigits("val", seed=0)
    assert len(dense) == len(plain)
    for i in range(50):
        (image, maps), (same, labels) = dense[i], plain[i]
        assert torch.equal(image["image"], same["image"])
        for task in ("left", "right"):
            assert maps[task].shape == (12, 12) and maps[task].dtype == torch.int64
            assert set(maps[task].unique().tolist()) == {0, int(labels[task]) + 1}
    # where the strokes overlap, the two tasks label one pixel with two digits
    maps = multidigits("train", seed=0, dense=True, size=64)
    both = [(m["left"] > 0) & (m["right"] > 0) for _, m in (maps[i] for i in range(64))]
    assert sum(int(b.sum()) for b in both) > 0


def test_per_pixel_cross_entropy_and_accuracy_read_the_classes_on_axis_one():
    torch.manual_seed(0)
    logits, labels = torch.randn(3, 11, 5, 7), torch.randint(0, 11, (3, 5, 7))
    assert torch.equal(LOSSES["cross_entropy"](logits, labels), F.cross_entropy(logits, labels))
    accuracy = METRICS["accuracy"]
    assert accuracy.total(logits, labels) == (logits.argmax(1) == labels).sum()
    assert accuracy.count(logits, labels) == 3 * 5 * 7
    # token-level logits keep their classes last
    tokens, token_labels = torch.randn(2, 6, 4), torch.randint(0, 4, (2, 6))
    assert torch.equal(LOSSES["cross_entropy"](tokens, token_labels),
                       F.cross_entropy(tokens.transpose(1, 2), token_labels))


@pytest.mark.parametrize(("size", "axis", "second"), [
    (8, 0, 9), (12, 2, 16), (16, 3, 32), (7, 1, 8), (224, 2, 256), (1, 1, 2)])
def test_the_second_size_keeps_an_image_side_a_multiple(size, axis, second):
    assert second_size(size, axis) == second


def test_a_unet_with_dynamic_image_sides_compiles_and_exports(tmp_path):
    """Its sides must stay multiples of 4: checked at 12 and 16, exported with named dynamic
    sides, and run by onnxruntime at a third size."""
    out = tmp_path / "out"
    path = write_spec(tmp_path, "unet", model={"factory": "reconfx.zoo:small_unet",
                                               "kwargs": {"width": 8}},
                      inputs=[{"name": "image", "shape": [2, 1, 12, 12],
                               "dynamic": {0: "batch", 2: "height", 3: "width"}}],
                      tasks=TASKS, select={"layers": ["dec1.*"]},
                      export={"formats": ["python", "onnx"]})
    compiled = compile_and_verify(path, out)
    assert compiled.prepared.examples[1]["image"].shape == (3, 1, 16, 16)
    assert compiled.checks[0].detail.startswith(
        "bit-exact, eval and train mode, image (2, 1, 12, 12), (3, 1, 16, 16)")
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [d for d in session.get_inputs()[0].shape] == ["batch", 1, "height", "width"]
    image = torch.randn(1, 1, 20, 24)
    want = reconfx.load(out)(image=image)
    got = dict(zip([o.name for o in session.get_outputs()],
                   session.run(None, {"image": image.numpy()}), strict=True))
    for task in ("left", "right"):
        assert got[task].shape == (1, 11, 20, 24)
        np.testing.assert_allclose(got[task], want[task].detach().numpy(), atol=1e-4, rtol=1e-3)


def test_a_backbone_feature_map_gets_per_pixel_heads_resized_to_the_image(tmp_path, capsys):
    """A ResNet cut after its second stage (6x6 maps) with 1x1-convolution heads whose logits
    are resized to the 12x12 image, profiled and trained on dense MultiDigits."""
    out = tmp_path / "out"
    path = write_spec(
        tmp_path, "seg", backbone={"factory": "reconfx.zoo:small_resnet",
                                   "kwargs": {"width": 8}, "feature": "layer2"},
        inputs=[{"name": "image", "shape": [2, 1, 12, 12]}],
        tasks=[{**t, "head": {"type": "mlp", "hidden": [16], "out_features": 11,
                              "resize_to": "image"}} for t in TASKS],
        data=DENSE, profile={"steps": 4}, select={"top_k": 2},
        train={"epochs": 1, "threads": 1}, export={"dir": str(out)})
    assert main(["run", str(path), "--quiet"]) == 0
    model = reconfx.load(out)
    heads = [m for name, m in model.named_modules() if name.startswith("heads.left")]
    assert [type(m).__name__ for m in heads[1:]] == ["Conv2d", "ReLU", "Conv2d"]
    image = torch.randn(5, 1, 12, 12)
    assert {k: tuple(v.shape) for k, v in model(image=image).items()} == {
        "left": (5, 11, 12, 12), "right": (5, 11, 12, 12)}
    report = (out / "report.md").read_text()
    assert "| left | accuracy |" in report and "| right | accuracy |" in report


@pytest.mark.parametrize(("head", "inputs", "needle"), [
    ({"out_features": 3, "pool": "mean", "resize_to": "image"}, ["image"],
     "resize_to applies to a per-pixel head (pool: none), and this head's pool is mean"),
    ({"out_features": 3, "resize_to": "picture"}, ["image"],
     "tasks[0].head.resize_to: 'picture' is not an input (inputs: image)"),
])
def test_resize_to_is_checked_by_the_spec(tmp_path, capsys, head, inputs, needle):
    path = write_spec(tmp_path, "bad", backbone={"factory": "reconfx.zoo:small_resnet",
                                                 "feature": "layer2"},
                      inputs=[{"name": n, "shape": [2, 1, 12, 12]} for n in inputs],
                      tasks=[{"name": "a", "head": head}, {"name": "b", "head": head}])
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1


def test_resize_to_from_a_token_feature_is_refused(tmp_path, capsys):
    path = write_spec(tmp_path, "tokens", backbone={
        "factory": "reconfx.zoo:hf_model", "feature": "last_hidden_state",
        "kwargs": {"arch": "BertModel", "config": dict(
            vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=32, max_position_embeddings=32)}},
        inputs=[{"name": "input_ids", "shape": [2, 8], "dtype": "int64", "high": 50}],
        tasks=[{"name": n, "head": {"out_features": 3, "resize_to": "input_ids"}}
               for n in ("a", "b")])
    assert main(["compile", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "task 'a' resizes its output to input 'input_ids'" in err[0]


class _Logits(torch.nn.Module):
    """Returns its input as the logits of task 'seg' (evaluation of given predictions)."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))  # (evaluate reads the device)

    def forward(self, logits):
        return {"seg": logits}


def test_mean_iou_is_taken_over_the_whole_split_not_averaged_over_batches():
    from reconfx.train.loop import evaluate

    torch.manual_seed(1)
    logits, labels = torch.randn(7, 4, 5, 5), torch.randint(0, 4, (7, 5, 5))
    labels[labels == 3] = 2  # class 3 is never labelled, only sometimes predicted
    items = [({"logits": logits[i]}, {"seg": labels[i]}) for i in range(7)]
    predicted = logits.argmax(1)
    want = [((predicted == c) & (labels == c)).sum().double()
            / ((predicted == c) | (labels == c)).sum()
            for c in range(4)]
    got = evaluate(_Logits(), items, tasks=["seg"], metrics=[("miou", METRICS["miou"])],
                   batch_size=3)
    assert got["seg"] == pytest.approx(float(torch.stack(want).mean()), abs=1e-12)
    accuracy = evaluate(_Logits(), items, tasks=["seg"],
                        metrics=[("accuracy", METRICS["accuracy"])], batch_size=3)
    assert accuracy["seg"] == pytest.approx(float((predicted == labels).double().mean()))


def test_a_metric_that_cannot_read_the_output_names_the_task_and_the_field():
    from reconfx.errors import ModelError
    from reconfx.train.loop import evaluate

    items = [({"logits": torch.randn(4, 5, 5)}, {"seg": torch.rand(5, 5)}) for _ in range(3)]
    with pytest.raises(ModelError) as raised:
        evaluate(_Logits(), items, tasks=["seg"], metrics=[("miou", METRICS["miou"])], batch_size=3)
    assert str(raised.value).startswith(
        "tasks[0].metric: the metric 'miou' of task 'seg' cannot read the model's output "
        "(3, 4, 5, 5) torch.float32 with the target (3, 5, 5) torch.float32: ")
