"""Aggregators: the spec's ``train.aggregator`` name -> a function of the T×P gradient matrix.

The combination math is torchjd's (pinned to 0.18.0, whose aggregators are plain callables of
the matrix). Scale: torchjd's aggregators return a vector on the scale of one task's gradient
(``Mean`` averages). Like Recon, reconfx multiplies the aggregated shared gradient by T, so that
``ew`` equals the gradient of the summed task losses: the shared layers then get the same
update as plain joint training of the summed loss, and task-specific parameters (heads,
branched copies), which receive their own task's gradient unscaled, keep their relative step
size whatever T is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from reconfx.errors import SpecError

__all__ = [
    "Aggregate", "aggregator", "AGGREGATORS", "LINEAR"
]

LINEAR = ("ew", "mean")  # the shared gradient is the sum of the task gradients


@dataclass(frozen=True)
class Aggregate:
    """``matrix (T×P) -> shared gradient (P)``, scaled by T. ``linear``: the result is the sum
    of the rows, which one backward pass of the summed losses gives without the matrix."""

    combine: Callable[[torch.Tensor], torch.Tensor]
    linear: bool = False
    name: str = ""

    def __call__(self, matrix: torch.Tensor) -> torch.Tensor:
        return self.combine(matrix) * matrix.shape[0]


# name -> (torchjd class name, default keyword arguments, extra that installs its solver)
AGGREGATORS: dict[str, tuple[str, dict[str, Any], str | None]] = {
    "ew": ("Mean", {}, None),
    "mean": ("Mean", {}, None),
    "pcgrad": ("PCGrad", {}, None),
    "mgda": ("MGDA", {}, None),
    "graddrop": ("GradDrop", {}, None),
    "imtlg": ("IMTLG", {}, None),
    "alignedmtl": ("AlignedMTL", {}, None),
    "cagrad": ("CAGrad", {"c": 0.4}, "cvxpy"),
    "upgrad": ("UPGrad", {}, "quadprog"),
    "dualproj": ("DualProj", {}, "quadprog"),
    "nashmtl": ("NashMTL", {}, "ecos"),
}


def aggregator(name: str, tasks: int, where: str = "spec", **kwargs: Any) -> Aggregate:
    """The function ``matrix (T×P) -> shared gradient (P)`` named ``name``, scaled by T."""
    key = name.lower()
    if key not in AGGREGATORS:
        raise SpecError(f"unknown aggregator '{name}'", where=f"{where}: train.aggregator",
                        fix=f"one of {', '.join(AGGREGATORS)}")
    class_name, defaults, solver = AGGREGATORS[key]
    import torchjd.aggregation as aggregation

    options = {**defaults, **kwargs}
    if key == "nashmtl":
        options.setdefault("n_tasks", tasks)
    try:
        combine = getattr(aggregation, class_name)(**options)
    except ImportError as exc:
        raise SpecError(f"aggregator '{name}' needs the solver package {solver}",
                        where=f"{where}: train.aggregator",
                        fix="pip install 'reconfx[solvers]'") from exc
    return Aggregate(combine, linear=key in LINEAR, name=key)
