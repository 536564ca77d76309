"""The training loop, evaluation and Δm.

``fit`` trains a graph module (original or branched) for ``epochs`` over a data set with the
spec's optimiser and aggregator, evaluates on the validation split after every epoch and keeps
the best weights (by mean relative metric, each task's metric turned so that higher is better).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from reconfx import outdir
from reconfx.artifacts import replace_file, save_weights
from reconfx.conflicts import ConflictCounter
from reconfx.data.padding import collate_of
from reconfx.distributed import World
from reconfx.errors import TrainingError
from reconfx.layers import Layer
from reconfx.spec import TrainSpec
from reconfx.train.objectives import Metric, make_optimizer, make_schedule, unreadable
from reconfx.train.resume import Batches, Checkpoint, restore, snapshot
from reconfx.train.scalars import logged_to
from reconfx.train.sparse import SparseMask
from reconfx.train.step import MultiTaskStep, to_device

__all__ = [
    "delta_m", "evaluate", "fit", "FitResult", "save_checkpoint"
]


@dataclass(frozen=True)
class FitResult:
    """What :func:`fit` did (the module itself is trained in place)."""

    history: list[dict[str, float]]  # per epoch: loss + metrics
    steps: list[dict[str, float]]  # per step: lr + task losses
    best_epoch: int  # (0-based) the best validation epoch and its validation metrics
    best: dict[str, float]
    kept_epoch: int  # the epoch whose weights the module ends with (train.keep) and ...
    kept: dict[str, float]  # ... its validation metrics
    conflicts: ConflictCounter | None  # statistics of the shared layers while training
    stopped_after: int | None  # the epoch early stopping ended training after


@torch.no_grad()
def evaluate(module: nn.Module, dataset: torch.utils.data.Dataset, *, tasks: list[str],
             metrics: list[tuple[str, Metric]], batch_size: int = 256,
             world: World | None = None) -> dict[str, float]:
    """Each task's metric over the whole data set, in eval mode. With several ranks each
    evaluates every ``size``-th item and the sums are all-reduced."""
    w = world or World()
    was_training = module.training
    module.eval()
    if w.active:
        dataset = torch.utils.data.Subset(dataset, range(w.rank, len(dataset), w.size))
    sums: dict[str, list[torch.Tensor]] = {}  # task -> metric totals, what they divide by
    device = next(module.parameters()).device
    for inputs, targets in torch.utils.data.DataLoader(dataset, batch_size=batch_size,
                                                       collate_fn=collate_of(dataset)):
        outputs = module(**to_device(inputs, device))
        targets = to_device(targets, device)
        for i, (task, (name, metric)) in enumerate(zip(tasks, metrics, strict=True)):
            batch = _measured(task, i, name=name, metric=metric, output=outputs[task],
                              target=targets[task])
            previous = sums.get(task)
            sums[task] = batch if previous is None else [
                a + b for a, b in zip(previous, batch, strict=True)]
    module.train(was_training)
    pairs = [sums.get(task) or [torch.zeros(1, dtype=torch.float64)] * 2 for task in tasks]
    flat = w.sum_(torch.cat([x.flatten() for pair in pairs for x in pair]))
    values, start = {}, 0
    for task, (_name, metric), (total, _count) in zip(tasks, metrics, pairs, strict=True):
        size = total.numel()
        values[task] = metric.reduce(flat[start:start + size], flat[start + size:start + 2 * size])
        start += 2 * size
    return values


def _measured(task: str, index: int, *, name: str, metric: Metric, output: torch.Tensor,
              target: torch.Tensor) -> list[torch.Tensor]:
    """One batch's metric total and count; a metric that cannot read the pair is a ModelError
    naming the task's field."""
    try:
        return [torch.as_tensor(f(output, target)).detach().cpu().double()
                for f in (metric.total, metric.count)]
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        raise unreadable(f"the metric '{name}' of task '{task}' cannot read", output=output,
                         target=target, exc=exc, where=f"tasks[{index}].metric",
                         fix="choose a metric that fits the task's output and targets") from exc


def delta_m(values: dict[str, float], baselines: dict[str, float],
            metrics: dict[str, Metric]) -> float:
    """Δm% = mean over tasks of (−1)^l (M − B) / B × 100, l = 1 when lower is better."""
    terms = []
    for task, base in baselines.items():
        sign = 1.0 if metrics[task].higher_is_better else -1.0
        terms.append(sign * (values[task] - base) / base * 100.0)
    return sum(terms) / len(terms)


def fit(module: nn.Module, *, shared: list[Layer], tasks: list[str], loss_fns: list[Callable],
        metrics: list[tuple[str, Metric]], aggregate: Callable[[torch.Tensor], torch.Tensor],
        batches: Batches, val_data: torch.utils.data.Dataset | None, settings: TrainSpec,
        progress: bool = True, threshold: float | None = None, sparse: SparseMask | None = None,
        checkpoints: Path | None = None, resume: Checkpoint | None = None,
        tensorboard: Path | None = None, steps: int | None = None, phase: str = "train",
        record: Callable[[torch.Tensor], None] | None = None) -> FitResult:
    """Train ``module`` in place on its current device with ``settings`` (optimiser, lr, weight
    decay, epochs, seed, precision); at the end it holds the best validation epoch's weights
    (``keep: best``) or the last epoch's. The one training loop: the profiling pass is this
    loop bounded by ``steps`` (:func:`reconfx.profiling.profile`).

    - ``batches``: the training batches (their size, seed, ``drop_last``, loader processes and
      ranks: with several ranks each trains on its shard of every global batch, and only rank
      0 writes files and shows progress).
    - ``threshold``: conflict statistics of the shared layers are counted from the per-task
      gradients on every ``conflict_every``-th step.
    - ``checkpoints``: ``best.safetensors`` (the best validation epoch so far) and
      ``last.safetensors`` (the end of the latest epoch) are written there, each atomically,
      after every epoch.
    - ``resume``: the full training state is saved every ``resume.every`` steps and at every
      epoch's end, and a state loaded from it (phase ``train``) is continued exactly.
    - Every step's learning rate and task losses are recorded (``FitResult.steps``); with
      ``tensorboard`` (a folder) they and the epoch rows are written there live as TensorBoard
      scalars (rank 0).
    - ``steps``: training stops after that many optimiser steps, as many epochs as that takes
      (``settings.epochs`` is not read), with one progress bar named ``phase``.
    - ``phase``: the name of the state saved in and resumed from ``resume``.
    - ``record`` (tests) receives a copy of each counted step's T×P gradient matrix (of each
      part of it, when ``settings.gradient_memory_gb`` cuts the shared layers into parts)."""
    w = batches.world
    progress = progress and w.main
    torch.manual_seed(settings.seed)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, settings.optimizer, settings.lr, settings.weight_decay)
    step = MultiTaskStep(module, shared, tasks=tasks, loss_fns=loss_fns, aggregate=aggregate,
                         optimizer=optimizer, sparse=sparse, precision=settings.precision,
                         world=w, cap=int(settings.gradient_memory_gb * 1e9))
    conflicts = None if threshold is None else ConflictCounter(
        step.buffer.blocks, len(tasks), threshold, step.buffer.matrix.device)
    stopped_after = None
    observe = conflicts if record is None or conflicts is None else _Recorded(conflicts, record)
    epochs = settings.epochs if steps is None else -(-steps // max(len(batches), 1))
    schedule = make_schedule(optimizer, settings.schedule, len(batches), epochs)
    run = _FitState()
    parts: dict[str, Any] = {"model": module, "optimizer": optimizer, "schedule": schedule,
                             "data": batches, "scaler": step.scaler, "fit": run}
    if conflicts is not None:
        parts["counter"] = conflicts
    state = resume.phase(phase) if resume is not None else None
    done = restore(parts, state) if state is not None else 0
    last = steps if steps is not None else epochs * len(batches)
    bounded = tqdm(total=steps, initial=done, desc=phase, disable=not progress or steps is None,
                   leave=False)
    with logged_to(tensorboard if w.main else None, done) as board:
        for epoch in range(batches.epoch, epochs):
            module.train()
            bar = bounded if steps is not None else tqdm(
                total=len(batches), initial=batches.index, desc=f"epoch {epoch + 1}/{epochs}",
                disable=not progress, leave=False)
            for inputs, targets in itertools.islice(batches.epoch_batches(), last - done):
                try:
                    counted = done % settings.conflict_every == 0
                    step(inputs, targets, observe if counted else None, batches.share)
                except TrainingError as exc:
                    where = (f"{phase} step {done + 1} of {steps}" if steps is not None else
                             f"training epoch {epoch + 1}, batch {batches.index} (step {done + 1})")
                    raise exc.at(where) from exc
                lr = schedule.get_last_lr()[0]  # (the step's rate: the schedule moves after it)
                schedule.step()
                done += 1
                losses = dict(zip(tasks, step.values, strict=True))
                run.steps.append({"step": done, "epoch": epoch + 1, "lr": lr,
                                  **{f"loss/{t}": v for t, v in losses.items()}})
                if board is not None:
                    board.add(done, run.steps[-1], prefix="step/")
                bar.update(1)
                if progress and done % 10 == 1:
                    bar.set_postfix({t: f"{v:.3f}" for t, v in losses.items()})
                if resume is not None and resume.due(done) and batches.index < len(batches) \
                        and done < last and w.main:
                    resume.save(phase, snapshot(parts, done))
            if steps is None:
                bar.close()
            # (this epoch's steps: the end of the step rows, in order)
            ran = list(itertools.takewhile(lambda r, e=epoch + 1: r["epoch"] == e,
                                           reversed(run.steps)))[::-1]
            row = {"epoch": epoch + 1, "lr": schedule.get_last_lr()[0],
                   **{f"loss/{t}": sum(r[f"loss/{t}"] for r in ran) / max(len(ran), 1)
                      for t in tasks}}
            if conflicts is not None:  # this epoch's strongly conflicting gradient pairs
                strong = int(conflicts.strong.sum()) - sum(
                    int(r.get("conflict/strong", 0)) for r in run.history)
                valid = int(conflicts.valid.sum()) - sum(
                    int(r.get("conflict/valid", 0)) for r in run.history)
                row.update({"conflict/strong": strong, "conflict/valid": valid,
                            "conflict/strong_share": strong / valid if valid else None})
            improved = False
            if val_data is not None:
                values = evaluate(module, val_data, tasks=tasks, metrics=metrics, world=w)
                row.update({f"val/{t}": v for t, v in values.items()})
                score = sum(v if m.higher_is_better else -v
                            for v, (_n, m) in zip(values.values(), metrics, strict=True))
                if run.best_score is None or score > run.best_score:
                    run.best_score, run.best_epoch, improved = score, epoch, True
                    if settings.keep == "best":
                        run.best_state = copy.deepcopy(module.state_dict())
                    run.best = values
            run.history.append(row)
            if board is not None:
                board.add(done, row)
            if checkpoints is not None and w.main:
                save_checkpoint(module, checkpoints / "last.safetensors")
                if improved:
                    save_checkpoint(module, checkpoints / "best.safetensors")
            if settings.early_stopping is not None and val_data is not None and (
                    epoch - run.best_epoch >= settings.early_stopping):
                stopped_after = epoch + 1  # (no better validation score for that long)
                break
            if done >= last:
                break
            if resume is not None and epoch + 1 < epochs and w.main:
                resume.save(phase, snapshot(parts, done))

    bounded.close()
    if settings.keep == "best" and run.best_state is not None:
        module.load_state_dict(run.best_state)
    kept_epoch, kept = run.best_epoch, run.best
    if settings.keep == "last" and run.history:
        kept_epoch = run.history[-1]["epoch"] - 1
        kept = {t: run.history[-1][f"val/{t}"] for t in tasks if f"val/{t}" in run.history[-1]}
    return FitResult(run.history, run.steps, run.best_epoch, run.best, kept_epoch, kept,
                     conflicts, stopped_after)


class _Recorded:
    """The conflict counter, with a copy of each part of the gradients it sees kept (tests)."""

    def __init__(self, counter: ConflictCounter, record: Callable[[torch.Tensor], None]):
        self.counter, self.record = counter, record

    def add(self, grads: torch.Tensor, blocks: tuple[tuple[int, int, int], ...]) -> torch.Tensor:
        self.record(grads.clone())
        return self.counter.add(grads, blocks)

    def finish(self) -> torch.Tensor:
        return self.counter.finish()

    def discard(self) -> None:
        self.counter.discard()


class _FitState:
    """What ``fit`` carries from step to step and epoch to epoch besides the model and the
    optimiser: the step and epoch rows, and the best epoch so far."""

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []
        self.steps: list[dict[str, float]] = []
        self.best_score: float | None = None
        self.best_epoch = -1
        self.best: dict[str, float] = {}
        self.best_state: dict[str, torch.Tensor] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "steps": self.steps,
                "best_score": self.best_score,
                "best_epoch": self.best_epoch, "best": self.best, "best_state": self.best_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history, self.steps = list(state["history"]), list(state["steps"])
        self.best_score, self.best_epoch = state["best_score"], int(state["best_epoch"])
        self.best, self.best_state = dict(state["best"]), state["best_state"]


def save_checkpoint(module: nn.Module, path: Path) -> None:
    """The module's weights as safetensors (tied tensors once), written atomically into the
    working folder ``path.parent`` (made or checked for reconfx's files only) and recorded in
    its ledger."""
    folder = outdir.working_folder(path.parent.parent, path.parent.name)
    replace_file(path, lambda p: save_weights(module, p))
    outdir.record(folder, path.name)
