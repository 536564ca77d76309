"""Losses, metrics and optimisers named by the spec (``tasks[].loss``, ``tasks[].metric``,
``train.optimizer``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from reconfx.data.padding import IGNORE
from reconfx.errors import SpecError


def _flat(out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level logits (batch, seq, classes) against (batch, seq) labels, flattened."""
    return (out.flatten(0, -2), y.flatten()) if out.dim() > 2 else (out, y)


def _labelled(out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`_flat`, without the positions labelled IGNORE (padding)."""
    out, y = _flat(out, y)
    keep = y != IGNORE
    return out[keep], y[keep]


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cross_entropy": lambda out, y: F.cross_entropy(*_flat(out, y)),
    "mse": lambda out, y: F.mse_loss(out, y.to(out.dtype).view_as(out)),
    "l1": lambda out, y: F.l1_loss(out, y.to(out.dtype).view_as(out)),
    "bce": lambda out, y: F.binary_cross_entropy_with_logits(out, y.to(out.dtype).view_as(out)),
}


def loss_functions(tasks: list, where: str) -> list[Callable]:
    fns = []
    for i, task in enumerate(tasks):
        if task.loss is None:
            raise SpecError("profiling needs a loss for every task",
                            where=f"{where}: tasks[{i}].loss", fix=f"one of {', '.join(LOSSES)}")
        if task.loss not in LOSSES:
            raise SpecError(f"unknown loss '{task.loss}'", where=f"{where}: tasks[{i}].loss",
                            fix=f"one of {', '.join(LOSSES)}")
        fns.append(LOSSES[task.loss])
    return fns


def make_optimizer(params: list[nn.Parameter], name: str, lr: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    return cls(params, lr=lr, weight_decay=weight_decay)




@dataclass(frozen=True)
class Metric:
    """A per-batch sum (divided by the number of items at the end) and its direction."""

    total: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    count: Callable[[torch.Tensor, torch.Tensor], int]
    higher_is_better: bool


METRICS: dict[str, Metric] = {
    "accuracy": Metric(lambda out, y: (_labelled(out, y)[0].argmax(-1)
                                       == _labelled(out, y)[1]).sum(),
                       lambda out, y: _labelled(out, y)[1].numel(), True),
    "mse": Metric(lambda out, y: ((out - y.to(out.dtype).view_as(out)) ** 2).sum(),
                  lambda out, y: out.numel(), False),
    "mae": Metric(lambda out, y: (out - y.to(out.dtype).view_as(out)).abs().sum(),
                  lambda out, y: out.numel(), False),
}
DEFAULT_METRIC = {"cross_entropy": "accuracy", "bce": "accuracy", "mse": "mse", "l1": "mae"}


def metric_functions(tasks: list, where: str) -> list[tuple[str, Metric]]:
    out = []
    for i, task in enumerate(tasks):
        name = task.metric or DEFAULT_METRIC.get(task.loss or "", None)
        if name not in METRICS:
            raise SpecError(f"unknown metric '{name}'", where=f"{where}: tasks[{i}].metric",
                            fix=f"one of {', '.join(METRICS)}")
        out.append((name, METRICS[name]))
    return out
