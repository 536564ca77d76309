"""MultiDigits: two overlapping handwritten digits per image, one task per digit (DESIGN §7).

Built from scikit-learn's bundled digits (1,797 8×8 images, no download). The source images are
split first (80% train / 20% test; 1/8 of the training images are held out for validation), so
no test example reuses a training image. Each example puts one digit at offset (0–1, 0–1) and
one at (3–4, 3–4) of a 12×12 canvas (jitter per example), combines them with max and adds
Gaussian noise (σ = 0.15). Tasks: ``left`` and ``right``, 10 classes each. Deterministic for a
seed: the same (split, seed) gives the same tensors.

With ``dense=True`` the tasks are segmentations: each target is a 12×12 map labelling every
pixel of that task's digit stroke (source intensity above ``STROKE``) with the digit plus one,
and every other pixel 0 (11 classes), so the two tasks label the same image differently where
the digits overlap.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "CANVAS", "MultiDigits", "multidigits", "SIZES", "STROKE"
]

CANVAS = 12
SIZES = {"train": 8000, "val": 2000, "test": 4000}
STROKE = 0.5  # a source pixel brighter than this is part of the digit (dense=True)


def _source_split(seed: int) -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    order = np.random.default_rng(seed).permutation(len(images))
    n_test = len(images) // 5
    n_val = (len(images) - n_test) // 8
    parts = {"test": order[:n_test], "val": order[n_test:n_test + n_val],
             "train": order[n_test + n_val:]}
    return {"images": images, "labels": digits.target.astype(np.int64), **parts}


class MultiDigits(Dataset):
    """Items are ``({"image": (1, 12, 12) float32}, {"left": int64, "right": int64})``; with
    ``dense``, each target is a (12, 12) int64 label map."""

    def __init__(self, split: str = "train", seed: int = 0, size: int | None = None,
                 noise: float = 0.15, dense: bool = False):
        if split not in SIZES:
            raise ValueError(f"split must be one of {', '.join(SIZES)}, got {split!r}")
        source = _source_split(seed)
        pool = source[split]
        count = size if size is not None else SIZES[split]
        # One generator per split, so each split is reproducible on its own.
        rng = np.random.default_rng([seed, list(SIZES).index(split)])
        first = pool[rng.integers(0, len(pool), count)]
        second = pool[rng.integers(0, len(pool), count)]
        offsets = rng.integers(0, 2, size=(count, 4))
        canvas = np.zeros((count, CANVAS, CANVAS), dtype=np.float32)
        maps = np.zeros((2, count, CANVAS, CANVAS), dtype=np.int64)
        for i in range(count):
            y0, x0, y1, x1 = offsets[i]
            a = np.zeros((CANVAS, CANVAS), dtype=np.float32)
            b = np.zeros((CANVAS, CANVAS), dtype=np.float32)
            a[y0:y0 + 8, x0:x0 + 8] = source["images"][first[i]]
            b[3 + y1:11 + y1, 3 + x1:11 + x1] = source["images"][second[i]]
            canvas[i] = np.maximum(a, b)
            maps[0, i] = (a > STROKE) * (source["labels"][first[i]] + 1)
            maps[1, i] = (b > STROKE) * (source["labels"][second[i]] + 1)
        canvas += rng.normal(0.0, noise, size=canvas.shape).astype(np.float32)
        self.images = torch.from_numpy(canvas).unsqueeze(1)
        if dense:
            self.left, self.right = torch.from_numpy(maps[0]), torch.from_numpy(maps[1])
        else:
            self.left = torch.from_numpy(source["labels"][first])
            self.right = torch.from_numpy(source["labels"][second])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        return {"image": self.images[index]}, {"left": self.left[index],
                                               "right": self.right[index]}


def multidigits(split: str = "train", seed: int = 0, **kwargs) -> MultiDigits:
    """The ``data.factory`` for specs: ``reconfx.data:multidigits``."""
    return MultiDigits(split, seed, **kwargs)
