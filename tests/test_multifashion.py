"""Multi-Fashion+MNIST built from real images: the tests' copy of a few hundred source images
(tests/data/multifashion), and the full data set where `make data` has fetched it."""

from pathlib import Path

import numpy as np
import pytest
import torch

from reconfx.build import call_data_factory
from reconfx.data.multifashion import (
    CANVAS,
    FILES,
    SIZES,
    MultiFashionMNIST,
    read_idx,
    verify,
)
from reconfx.errors import ModelError
from reconfx.spec import DataSpec

ROOT = Path(__file__).resolve().parents[1]
SUBSET = ROOT / "tests" / "data" / "multifashion"


def test_each_example_is_a_shifted_digit_and_item_overlaid_by_maximum():
    data = MultiFashionMNIST("test", seed=3, size=64, root=SUBSET)
    digits = read_idx(SUBSET / FILES["mnist/t10k-images"])
    items = read_idx(SUBSET / FILES["fashion-mnist/t10k-images"])
    digit_labels = read_idx(SUBSET / FILES["mnist/t10k-labels"])
    item_labels = read_idx(SUBSET / FILES["fashion-mnist/t10k-labels"])
    assert len(data) == 64 and data.shifts.min() == 0 and data.shifts.max() == 4
    for n in range(len(data)):
        inputs, targets = data[n]
        image = inputs["image"]
        assert image.shape == (1, CANVAS, CANVAS) and image.dtype == torch.float32
        y0, x0, y1, x1 = data.shifts[n]
        # which source images: the ones whose labels and pixels rebuild this canvas exactly
        canvas = np.zeros((CANVAS, CANVAS), dtype=np.uint8)
        found = [(i, j) for i in np.flatnonzero(digit_labels == int(targets["left"]))
                 for j in np.flatnonzero(item_labels == int(targets["right"]))
                 if _rebuilt(canvas, digits[i], items[j], (y0, x0, y1, x1), image)]
        assert found, f"example {n} is not a digit and an item overlaid"


def _rebuilt(canvas, digit, item, shifts, image):
    y0, x0, y1, x1 = shifts
    canvas[:] = 0
    canvas[y0:y0 + 28, x0:x0 + 28] = digit
    far = CANVAS - 28
    corner = canvas[far - y1:CANVAS - y1, far - x1:CANVAS - x1]
    np.maximum(corner, item, out=corner)
    return torch.equal(torch.from_numpy(canvas).float() / 255.0, image[0])


def test_validation_images_are_held_out_from_training_before_pairing():
    train = MultiFashionMNIST("train", seed=0, size=3000, root=SUBSET)
    val = MultiFashionMNIST("val", seed=0, size=600, root=SUBSET)
    for task in ("left", "right"):  # 300 source images each: 50 for validation, 250 training
        used_train, used_val = set(train.sources[task]), set(val.sources[task])
        assert not used_train & used_val
        assert len(used_train) == 250 and len(used_val) == 50  # (all drawn, at these sizes)
    labels = read_idx(SUBSET / FILES["mnist/train-labels"])
    assert torch.equal(train.left, torch.from_numpy(labels[train.sources["left"]]).long())


def test_the_same_seed_gives_the_same_tensors_and_another_seed_others():
    a, b = (MultiFashionMNIST("train", seed=5, size=32, root=SUBSET) for _ in range(2))
    c = MultiFashionMNIST("train", seed=6, size=32, root=SUBSET)
    assert np.array_equal(a.pixels, b.pixels) and torch.equal(a.left, b.left)
    assert not np.array_equal(a.pixels, c.pixels)


def test_missing_files_name_make_data(tmp_path):
    spec = DataSpec(factory="reconfx.data:multi_fashion_mnist", kwargs={"root": str(tmp_path)})
    with pytest.raises(ModelError, match=r"make data") as caught:
        call_data_factory(spec, "train", 0, "specs/multifashion-cpu.yaml: data")
    assert caught.value.where == "data.kwargs.root" and str(tmp_path) in str(caught.value)


def test_a_corrupt_file_is_named(tmp_path):
    for name in FILES.values():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes((SUBSET / name).read_bytes())
    (tmp_path / FILES["mnist/train-images"]).write_bytes(b"not an idx file")
    with pytest.raises(ModelError, match="train-images-idx3-ubyte is not an IDX file"):
        MultiFashionMNIST("train", root=tmp_path, size=4)


@pytest.mark.skipif(not (ROOT / "data" / "mnist").is_dir(),
                    reason="the Multi-Fashion+MNIST files are not fetched: run `make data`")
def test_the_full_data_set_from_the_fetched_files():
    assert verify(ROOT / "data") == []
    train = MultiFashionMNIST("train", seed=0, root=ROOT / "data")
    assert len(train) == SIZES["train"] == 120_000
    assert sorted(torch.unique(train.left).tolist()) == list(range(10))
    assert sorted(torch.unique(train.right).tolist()) == list(range(10))
    test = MultiFashionMNIST("test", seed=0, size=1000, root=ROOT / "data")
    assert len(test) == 1000 and test[0][0]["image"].max() <= 1.0


def test_the_papers_resnet18_has_torchvisions_layout():
    """torchvision's ResNet-18 has 11,689,512 parameters: a 3-channel stem (9,408) and a
    1000-class classifier (513,000). With a one-channel stem (3,136) and two 10-class heads
    (2 x 5,130) that is 11,180,500."""
    from reconfx.zoo import resnet18

    model = resnet18()
    assert sum(p.numel() for p in model.parameters()) == 11_689_512 - 9_408 + 3_136 \
        - 513_000 + 2 * 5_130 == 11_180_500
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)
    outputs = model(image=torch.rand(2, 1, CANVAS, CANVAS))
    assert {t: tuple(v.shape) for t, v in outputs.items()} == {"left": (2, 10), "right": (2, 10)}
    assert model.heads["left"].in_features == 512
