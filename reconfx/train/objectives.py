"""Losses, metrics and optimisers named by the spec (``tasks[].loss``, ``tasks[].metric``,
``train.optimizer``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from reconfx.build import locate_callable, resolve_factory
from reconfx.data.padding import IGNORE
from reconfx.errors import ModelError, SpecError
from reconfx.spec import ScheduleSpec, TaskSpec

__all__ = [
    "check_objectives", "DEFAULT_METRIC", "loss_functions", "LOSSES", "make_optimizer",
    "make_schedule", "Metric", "metric_functions", "METRICS", "unreadable"
]


def _flat(out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(items, classes) logits against (items,) labels. Token-level logits (batch, seq,
    classes) against (batch, seq) labels, and dense ones in PyTorch's layout (batch, classes,
    h, w) against (batch, h, w) labels (segmentation), are flattened to one item per position;
    where both layouts fit the labels, the classes are taken to be last."""
    if out.dim() <= 2:
        return out, y
    if out.shape[:1] + out.shape[2:] == y.shape and out.shape[:-1] != y.shape:
        out = out.movedim(1, -1)
    return out.flatten(0, -2), y.flatten()


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
    """Each task's loss, by name or ``package.module:function``, times the task's ``weight``."""
    fns = []
    for i, task in enumerate(tasks):
        field = f"{where}: tasks[{i}].loss"
        if task.loss is None:
            raise SpecError("profiling needs a loss for every task", where=field,
                            fix=f"one of {', '.join(LOSSES)}, or package.module:function")
        fn = _loss(task.loss, field)
        fns.append(fn if task.weight == 1.0 else _weighted(fn, task.weight))
    return fns


def _loss(name: str, field: str) -> Callable:
    if ":" in name:
        return resolve_factory(name, field)
    if name not in LOSSES:
        raise SpecError(f"unknown loss '{name}'", where=field,
                        fix=f"one of {', '.join(LOSSES)}, or package.module:function")
    return LOSSES[name]


def unreadable(what: str, *, output: torch.Tensor, target: torch.Tensor, exc: Exception,
               where: str, fix: str) -> ModelError:
    """``what`` (``the loss of task 'a' cannot compare``) failing on one output and target: a
    ModelError with both shapes and dtypes and the error's first line."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return ModelError(f"{what} the model's output {tuple(output.shape)} {output.dtype} with the "
                      f"target {tuple(target.shape)} {target.dtype}: {first}", where=where,
                      fix=fix)


def check_objectives(tasks: list, where: str, run_code: bool = True) -> None:
    """Resolve every loss and metric the tasks name, without calling them, so that a misspelt
    name or a function that does not import fails before any tracing or training. Without
    ``run_code`` (``validate``), one given as ``package.module:function`` is only located: its
    module is found and its source read, nothing of it imported."""
    for i, task in enumerate(tasks):
        for field, name in (("loss", task.loss), ("metric", task.metric)):
            if name is not None and ":" in name and not run_code:
                locate_callable(name, f"{where}: tasks[{i}].{field}")
            elif name is not None and field == "loss":
                _loss(name, f"{where}: tasks[{i}].loss")
            elif name is not None:
                _metric(task, f"{where}: tasks[{i}].metric")


def _weighted(fn: Callable, weight: float) -> Callable:
    return lambda out, y: weight * fn(out, y)


def make_schedule(optimizer: torch.optim.Optimizer, spec: ScheduleSpec, steps_per_epoch: int,
                  epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """``train.schedule`` as a scheduler stepped after every optimiser step."""
    per_epoch = max(steps_per_epoch, 1)
    total = max(per_epoch * epochs - spec.warmup_steps, 1)

    def factor(step: int) -> float:
        if step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        epoch = step // per_epoch
        if spec.kind == "step":
            return spec.gamma ** (epoch // spec.every)
        if spec.kind == "multistep":
            return spec.gamma ** sum(epoch >= m for m in spec.milestones)
        if spec.kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(step - spec.warmup_steps, total) / total))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimizer(params: list[nn.Parameter], name: str, lr: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    return cls(params, lr=lr, weight_decay=weight_decay)




def _ratio(total: torch.Tensor, count: torch.Tensor) -> float:
    return float(total.sum()) / max(float(count.sum()), 1.0)


@dataclass(frozen=True)
class Metric:
    """Per batch, a sum and what it is divided by (a scalar each, or one per class), added up
    over the split; ``reduce`` turns the two totals into the value (default: their ratio, the
    mean over items); its direction."""

    total: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    count: Callable[[torch.Tensor, torch.Tensor], int | torch.Tensor]
    higher_is_better: bool
    reduce: Callable[[torch.Tensor, torch.Tensor], float] = _ratio


def _class_counts(out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class: positions predicted and labelled so (intersection), and either (union)."""
    logits, labels = _labelled(out, y)
    classes = logits.shape[-1]
    predicted = logits.argmax(-1)
    hit = torch.bincount(labels[predicted == labels], minlength=classes)
    union = torch.bincount(predicted, minlength=classes) + torch.bincount(
        labels, minlength=classes) - hit
    return hit, union


def _mean_iou(hits: torch.Tensor, unions: torch.Tensor) -> float:
    """The mean over the classes that were predicted or labelled of intersection / union."""
    seen = unions > 0
    return float((hits[seen] / unions[seen]).mean()) if bool(seen.any()) else 0.0


METRICS: dict[str, Metric] = {
    "accuracy": Metric(lambda out, y: (_labelled(out, y)[0].argmax(-1)
                                       == _labelled(out, y)[1]).sum(),
                       lambda out, y: _labelled(out, y)[1].numel(), True),
    "miou": Metric(lambda out, y: _class_counts(out, y)[0],
                   lambda out, y: _class_counts(out, y)[1], True, _mean_iou),
    "mse": Metric(lambda out, y: ((out - y.to(out.dtype).view_as(out)) ** 2).sum(),
                  lambda out, y: out.numel(), False),
    "mae": Metric(lambda out, y: (out - y.to(out.dtype).view_as(out)).abs().sum(),
                  lambda out, y: out.numel(), False),
}
DEFAULT_METRIC = {"cross_entropy": "accuracy", "bce": "accuracy", "mse": "mse", "l1": "mae"}


def metric_functions(tasks: list, where: str) -> list[tuple[str, Metric]]:
    """Each task's metric, by name or ``package.module:function`` (one value per item)."""
    return [_metric(task, f"{where}: tasks[{i}].metric") for i, task in enumerate(tasks)]


def _metric(task: TaskSpec, field: str) -> tuple[str, Metric]:
    name = task.metric or DEFAULT_METRIC.get(task.loss or "", None)
    if name is not None and ":" in name:
        return (name.rpartition(":")[2],
                _custom(resolve_factory(name, field), task.higher_is_better))
    if name not in METRICS:
        raise SpecError(f"unknown metric '{name}'", where=field,
                        fix=f"one of {', '.join(METRICS)}, or package.module:function")
    return name, METRICS[name]


def _custom(fn: Callable, higher_is_better: bool) -> Metric:
    """A metric from a function giving one value per item."""
    return Metric(lambda out, y: torch.as_tensor(fn(out, y)).sum(),
                  lambda out, y: torch.as_tensor(fn(out, y)).numel(), higher_is_better)
