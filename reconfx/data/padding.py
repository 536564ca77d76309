"""Batches of variable-length items (token sequences of different lengths).

The loaders' collate function stacks each input of a batch's items; where their shapes differ
it pads every item at the end of each axis to the longest one, with the input's ``pad`` value
from the spec. An input declared ``mask_of: <input>`` is the padding mask of that input: where
an item does not carry it, it is built as ones over the item's first axis, and padding fills
it with zeros, so a mask marks exactly the positions the data had. Integer targets of variable
length (token labels) are padded with :data:`IGNORE`, which cross-entropy and the metrics skip.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from reconfx.errors import ModelError
from reconfx.spec import DTYPES, InputSpec

__all__ = [
    "Collate", "collate_of", "IGNORE", "Padded", "padded", "padded_data"
]

IGNORE = -100  # a padded token label: cross-entropy's default ignore_index, skipped by metrics


class Padded(torch.utils.data.Dataset):
    """A data set whose batches :class:`Collate` makes (see :func:`collate_of`)."""

    def __init__(self, dataset: Any, collate: Collate):
        self.dataset, self.collate = dataset, collate

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]


def padded_data(dataset: Any, inputs: Sequence[InputSpec], where: str) -> Any:
    """``dataset``, wrapped so that its loaders pad where the spec gives pad values or masks."""
    if not any(spec.pad is not None or spec.mask_of is not None for spec in inputs):
        return dataset
    return Padded(dataset, Collate(inputs, where))


def collate_of(dataset: Any) -> Collate | None:
    """The collate function a loader over ``dataset`` (or a subset of it) uses; None: torch's
    default."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return dataset.collate if isinstance(dataset, Padded) else None


class Collate:
    """``collate_fn`` for a DataLoader over (inputs, targets) items, padding per ``inputs``."""

    def __init__(self, inputs: Sequence[InputSpec], where: str = "spec"):
        self.pads = {spec.name: spec.pad for spec in inputs}
        self.masks = {spec.name: (spec.mask_of, DTYPES[spec.dtype]) for spec in inputs
                      if spec.mask_of is not None}
        self.fields = {spec.name: f"inputs[{i}].pad" for i, spec in enumerate(inputs)}
        self.where = where

    def __call__(self, items: Sequence[tuple[dict[str, Any], dict[str, Any]]]
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        inputs = [dict(item[0]) for item in items]
        for name, (source, dtype) in self.masks.items():
            for values in inputs:
                if name not in values and isinstance(values.get(source), torch.Tensor):
                    values[name] = torch.ones(values[source].shape[:1], dtype=dtype)
        batch = {name: self._input(name, [values[name] for values in inputs])
                 for name in inputs[0]}
        targets = {name: _target(name, [item[1][name] for item in items], self.where)
                   for name in items[0][1]}
        return batch, targets

    def _input(self, name: str, values: list[Any]) -> torch.Tensor:
        pad = 0 if name in self.masks else self.pads.get(name)
        if not _ragged(values):
            return _stacked(values)
        if pad is None:
            field = self.fields.get(name, "inputs")
            raise ModelError(
                f"input '{name}' has items of different shapes in one batch "
                f"({_shapes(values)}) and the spec gives no pad value for it",
                where=f"{self.where}: {field}",
                fix=f"set {field} (e.g. 0 for token ids) to pad them to the longest item, and "
                "declare a mask input with mask_of: " + name)
        return padded(values, pad)


def _target(name: str, values: list[Any], where: str) -> torch.Tensor:
    if not _ragged(values):
        return _stacked(values)
    if any(v.is_floating_point() for v in values):
        raise ModelError(f"targets of task '{name}' have items of different shapes in one batch "
                         f"({_shapes(values)}); only integer labels are padded (with {IGNORE})",
                         where=f"{where}: data.factory",
                         fix="return integer labels per position, or targets of one shape")
    return padded(values, IGNORE)


def _stacked(values: list[Any]) -> torch.Tensor:
    """Items of one shape as a batch (tensors stacked, numbers as a tensor)."""
    return torch.stack(values) if isinstance(values[0], torch.Tensor) else torch.as_tensor(values)


def _ragged(values: list[Any]) -> bool:
    return (all(isinstance(v, torch.Tensor) for v in values)
            and len({tuple(v.shape) for v in values}) > 1)


def _shapes(values: list[torch.Tensor]) -> str:
    shapes = sorted({tuple(v.shape) for v in values})
    return f"{shapes[0]} and {shapes[-1]}"


def padded(values: Sequence[torch.Tensor], pad: float) -> torch.Tensor:
    """The items stacked along a new first axis, each padded with ``pad`` at the end of every
    axis to the largest size in the batch."""
    if len({v.dim() for v in values}) > 1:
        raise ModelError(f"items of {len({v.dim() for v in values})} different ranks in one "
                         f"batch ({_shapes(list(values))}); only sizes may differ")
    size = [max(v.shape[axis] for v in values) for axis in range(values[0].dim())]
    out = torch.full((len(values), *size), pad, dtype=values[0].dtype)
    for i, value in enumerate(values):
        out[(i, *(slice(0, s) for s in value.shape))] = value
    return out
