"""One multi-task step: every task's gradient, written straight into its row of a preallocated
T×P matrix for the shared layers; the shared layers get the aggregated gradient, every other
parameter (heads, branched copies) the sum of the gradients it receives (its own task's)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from reconfx import memory
from reconfx.distributed import World
from reconfx.errors import ModelError, SpecError, TrainingError
from reconfx.graph import resolve
from reconfx.layers import Layer
from reconfx.train.health import locate_gradient, locate_loss
from reconfx.train.objectives import unreadable
from reconfx.train.precision import LossScaler, autocast
from reconfx.train.sparse import SparseMask

__all__ = [
    "block_layout", "check_cap", "check_memory", "CHUNK", "GradientBuffer", "gradient_bytes",
    "layer_parameters", "Layout", "MultiTaskStep", "Observer", "Part", "to_device"
]

CHUNK = 1024  # GradientBuffer aligns every layer's block to this many columns


def layer_parameters(module: nn.Module, layer: Layer) -> list[nn.Parameter]:
    """The distinct trainable parameters of a layer (tied ones once), in a fixed order."""
    found: dict[int, nn.Parameter] = {}
    for path in layer.modules:
        for p in module.get_submodule(path).parameters():
            found.setdefault(id(p), p)
    for target in layer.params:
        p = resolve(module, target)
        found.setdefault(id(p), p)
    return [p for p in found.values() if p.requires_grad]


@dataclass
class Layout:
    """Where each layer's parameters sit in a row of the T×P buffer: ``spans`` per parameter,
    ``blocks`` per layer, each block starting at a multiple of the alignment."""

    params: list[nn.Parameter]
    spans: list[tuple[int, int]]
    blocks: list[tuple[int, int]]
    width: int


def block_layout(module: nn.Module, layers: list[Layer], align: int = CHUNK) -> Layout:
    layout = Layout([], [], [], 0)
    offset = 0
    for layer in layers:
        offset = -(-offset // align) * align
        start = offset
        for p in layer_parameters(module, layer):
            layout.params.append(p)
            layout.spans.append((offset, offset + p.numel()))
            offset += p.numel()
        layout.blocks.append((start, offset))
    layout.width = -(-offset // align) * align
    return layout


@dataclass(frozen=True)
class Part:
    """Shared parameters whose per-task gradients are taken together, in one pass of backward
    calls: ``spans`` their columns in the buffer's rows, ``blocks`` (layer index, first column,
    end) what :meth:`~reconfx.conflicts.ConflictCounter.add` needs, ``width`` the columns used."""

    params: list[nn.Parameter]
    spans: list[tuple[int, int]]
    blocks: tuple[tuple[int, int, int], ...]
    width: int


def gradient_bytes(tasks: int, width: int) -> int:
    """The bytes of a float32 T×P gradient matrix."""
    return tasks * width * 4


class GradientBuffer:
    """A T×P matrix whose column blocks are the given layers' parameters, in order. Each block
    starts at a multiple of ``align`` columns; the padding between blocks stays zero, so it adds
    nothing to inner products (the aggregators' and the conflict statistics') and is never
    scattered to a parameter.

    Above ``cap`` bytes the layers are taken in parts (:attr:`parts`): the matrix holds one part
    at a time, at most ``cap`` bytes unless one parameter alone needs more, and each part's
    gradients come from their own backward calls. Whole: one part, the full layout."""

    def __init__(self, module: nn.Module, layers: list[Layer], tasks: int, align: int = CHUNK,
                 cap: int | None = None):
        layout = block_layout(module, layers, align)
        self.params, self.blocks = layout.params, layout.blocks
        limit = layout.width if cap is None else max(cap // gradient_bytes(tasks, 1), 1)
        self.parts = _parts([layer_parameters(module, x) for x in layers], limit, align)
        device = self.params[0].device if self.params else torch.device("cpu")
        self.matrix = torch.zeros(tasks, max((p.width for p in self.parts), default=0),
                                  device=device)

    def rows(self, part: Part) -> torch.Tensor:
        """The matrix's columns for ``part``; taken in parts, zeroed first (the padding of one
        part may hold another part's gradients)."""
        if len(self.parts) > 1:
            self.matrix.zero_()
        return self.matrix[:, :part.width]

    def write(self, task: int, part: Part, grads: tuple[torch.Tensor | None, ...]) -> None:
        row = self.matrix[task]
        for (a, b), g in zip(part.spans, grads, strict=True):
            if g is None:
                row[a:b].zero_()
            else:
                row[a:b].copy_(g.reshape(-1))

    def scatter(self, part: Part, vector: torch.Tensor) -> None:
        """Set each of ``part``'s parameters' ``.grad`` from its columns of ``vector`` (the
        aggregated gradient), in the parameter's dtype."""
        for (a, b), p in zip(part.spans, part.params, strict=True):
            p.grad = vector[a:b].view_as(p).to(p.dtype, copy=True)


def _parts(layers: list[list[nn.Parameter]], limit: int, align: int) -> list[Part]:
    """The layers' parameters cut into parts of at most ``limit`` columns (a parameter larger
    than that alone in its own), in order; a layer may continue into the next part. In a part,
    each layer's columns start at a multiple of ``align``, as :func:`block_layout` lays out the
    whole (a ``limit`` of its width gives that one part)."""
    parts: list[Part] = []
    params: list[nn.Parameter] = []
    spans: list[tuple[int, int]] = []
    blocks: list[tuple[int, int, int]] = []
    offset = 0

    def close() -> None:
        nonlocal params, spans, blocks, offset
        parts.append(Part(params, spans, tuple(blocks), -(-offset // align) * align))
        params, spans, blocks, offset = [], [], [], 0

    for index, layer in enumerate(layers):
        start = None
        for p in layer:
            a = offset if start is not None else -(-offset // align) * align
            if params and a + p.numel() > limit:
                if start is not None:
                    blocks.append((index, start, offset))
                close()
                a, start = 0, None
            start = a if start is None else start
            params.append(p)
            spans.append((a, a + p.numel()))
            offset = a + p.numel()
        if start is not None:
            blocks.append((index, start, offset))
    if params or not parts:  # (no shared parameter: one empty part, whose calls take the rest)
        close()
    return parts


class Observer(Protocol):
    """What reads a step's per-task gradients part by part: the conflict counter."""

    def add(self, grads: torch.Tensor, blocks: tuple[tuple[int, int, int], ...]) -> torch.Tensor:
        ...  # (returns each task's squared gradient norm over these columns)

    def finish(self) -> torch.Tensor:
        ...

    def discard(self) -> None:
        ...


def check_cap(width: int, shared: list[Layer], tasks: int, aggregate: Callable,
              cap: int | None) -> None:
    """Before anything is allocated: an aggregator that combines the whole T×P matrix at once
    (every one but ``ew`` and ``mean``) cannot take the layers in parts, so a matrix above the
    cap stops the run with the size it needs and the settings that change it. ``width``: the
    shared layers' columns (:func:`block_layout`)."""
    if cap is None or getattr(aggregate, "linear", False):
        return
    need = gradient_bytes(tasks, width)
    if need > cap:
        name = getattr(aggregate, "name", "") or "this one"
        raise SpecError(
            f"the per-task gradient matrix needs {need / 1e9:.2f} GB ({tasks} tasks x "
            f"{width:,} parameters of {len(shared)} shared layers, float32), above the cap of "
            f"{cap / 1e9:.2f} GB, and aggregator '{name}' combines the whole matrix at once, so "
            "it cannot take the layers in parts", where="train.gradient_memory_gb",
            fix=f"set train.gradient_memory_gb to {-(-need // 10**8) / 10:.1f} (with that much "
                "memory free), use aggregator ew or mean (taken in parts), or narrow the layers "
                "(select.include / select.exclude)")


def check_memory(module: nn.Module, width: int, *, tasks: int,
                 optimizer: torch.optim.Optimizer, cap: int | None, device: torch.device) -> None:
    """Before anything is allocated: what training adds to the model's weights (a gradient per
    trainable parameter, the optimiser's state, the per-task gradient matrix up to its cap)
    against the memory ``device`` has free; a run that cannot fit stops with the sizes and the
    settings that shrink them. ``width``: the shared layers' columns (:func:`block_layout`)."""
    params = [p for p in module.parameters() if p.requires_grad]
    size = sum(p.numel() * p.element_size() for p in params)
    states = _states(optimizer)
    matrix = gradient_bytes(tasks, width)
    matrix = matrix if cap is None else min(matrix, cap)
    need = size * (1 + states) + matrix
    free = memory.available(device)
    if free is not None and need > free:
        raise TrainingError(
            f"training needs about {need / 1e9:.1f} GB beside the model's weights and "
            f"{free / 1e9:.1f} GB is free on {device}: gradients {size / 1e9:.1f} GB, the "
            f"optimiser's state {states * size / 1e9:.1f} GB ({states} per parameter), the "
            f"per-task gradient matrix {matrix / 1e9:.1f} GB",
            fix="free memory, set train.optimizer: sgd (one state per parameter instead of "
                "adam's two), lower train.gradient_memory_gb, or keep the weights in bf16")


def _states(optimizer: torch.optim.Optimizer) -> int:
    """Tensors of a parameter's size the optimiser keeps per parameter."""
    if isinstance(optimizer, torch.optim.SGD):
        return int(any(g.get("momentum", 0) for g in optimizer.param_groups))
    return 2  # Adam, AdamW and the like: two moments


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class MultiTaskStep:
    """Forward, per-task gradients, aggregation and the optimiser step of one batch, on the
    module's device, in ``precision`` (fp32, or bf16/fp16 autocast; see
    :mod:`reconfx.train.precision`).

    Each step copies one vector to the host before the optimiser step (the losses and the
    gradients' health, see :mod:`reconfx.train.health`); a non-finite entry raises
    :class:`~reconfx.errors.TrainingError` naming the task and the layer, with nothing updated.
    """

    def __init__(self, module: nn.Module, shared: list[Layer], *, tasks: list[str],
                 loss_fns: list[Callable], aggregate: Callable[[torch.Tensor], torch.Tensor],
                 optimizer: torch.optim.Optimizer, sparse: SparseMask | None = None,
                 precision: str = "fp32", world: World | None = None, cap: int | None = None):
        self.module, self.tasks, self.loss_fns = module, tasks, loss_fns
        self.world = world or World()
        self.aggregate, self.optimizer, self.sparse = aggregate, optimizer, sparse
        first = next(module.parameters(), None)
        self.device = first.device if first is not None else torch.device("cpu")
        width = block_layout(module, shared).width
        check_cap(width, shared, len(tasks), aggregate, cap)
        check_memory(module, width, tasks=len(tasks), optimizer=optimizer, cap=cap,
                     device=self.device)
        self.buffer = GradientBuffer(module, shared, len(tasks), cap=cap)
        in_buffer = {id(p) for p in self.buffer.params}
        self.others = [p for p in module.parameters() if p.requires_grad and id(p) not in in_buffer]
        self.precision = precision
        self.scaler = LossScaler(self.device, precision == "fp16")
        self.values: list[float] = []  # the last step's losses, on the host
        self._shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}

    def losses(self, inputs: dict, targets: dict) -> torch.Tensor:
        inputs, targets = to_device(inputs, self.device), to_device(targets, self.device)
        with autocast(self.device, self.precision):
            outputs = self.module(**inputs)
            return torch.stack([self._loss(t, fn, inputs, outputs, targets)
                                for t, fn in zip(self.tasks, self.loss_fns, strict=True)])

    def _loss(self, task: str, fn: Callable, inputs: dict, outputs: dict,
              targets: dict) -> torch.Tensor:
        """One task's loss; a missing target, an output whose shape changed between batches of
        same-shaped inputs, or a loss function that rejects the pair is a ModelError."""
        if task not in targets:
            raise ModelError(f"the data set's targets have no entry for task '{task}' (keys: "
                             f"{', '.join(map(str, targets)) or 'none'})",
                             where="data.factory", fix="return targets keyed by task name")
        output, target = outputs[task], targets[task]
        seen = (tuple(v.shape[1:] for v in inputs.values()), tuple(output.shape[1:]))
        before = self._shapes.setdefault(task, seen)
        if before[0] == seen[0] and before[1] != seen[1]:
            raise ModelError(f"the output of task '{task}' changed shape between batches of "
                             f"same-shaped inputs: {_shape(before[1])} then {_shape(seen[1])}",
                             where="model", fix="make the output's shape depend only on the "
                             "input shapes")
        try:
            return fn(output, target).float()
        except (RuntimeError, ValueError, IndexError) as exc:
            raise unreadable(f"the loss of task '{task}' cannot compare", output=output,
                             target=target, exc=exc, where=f"tasks[{self.tasks.index(task)}].loss",
                             fix="match the task's loss to its output and targets") from exc

    def __call__(self, inputs: dict, targets: dict, observe: Observer | None = None,
                 share: float = 1.0) -> torch.Tensor:
        """One training step; ``observe`` (the conflict counter) sees the T×P matrix, part by
        part, before aggregation. Without ``observe`` a linear aggregator's step takes one
        backward pass of the summed losses per part. With several ranks, ``share`` is this
        rank's fraction of the global batch: the losses and gradients are all-reduced with that
        weight before anything reads them (:mod:`reconfx.distributed`). Returns the detached
        loss vector (global); ``self.values`` holds it on the host.

        Each part (one unless the buffer is capped) costs one backward call per task, and one
        copy of a health vector to the host; the heads' and branched copies' gradients come
        with the first part's calls."""
        rng = torch.get_rng_state()  # to re-run this batch's forward if it goes non-finite
        losses = self.losses(inputs, targets)
        self.optimizer.zero_grad(set_to_none=True)
        others = self.others
        other_grads = [torch.zeros_like(p) for p in others]
        scaled = self.scaler.scaled(losses)
        # Per-task gradients when something reads them; a linear aggregator's result (their
        # sum) otherwise comes from one backward pass of the summed losses, in row 0.
        per_task = observe is not None or not getattr(self.aggregate, "linear", False)
        objectives = list(scaled) if per_task else [scaled.sum()]
        names = self.tasks if per_task else [" + ".join(self.tasks)]
        local, losses = losses.detach(), losses.detach().clone()
        parts = self.buffer.parts
        for i, part in enumerate(parts):
            first, last = i == 0, i == len(parts) - 1
            matrix = self.buffer.rows(part)[:len(objectives)]
            for t, objective in enumerate(objectives):
                grads = torch.autograd.grad(
                    objective, part.params + (others if first else []),
                    retain_graph=not last or t < len(objectives) - 1, allow_unused=True)
                self.buffer.write(t, part, grads[:len(part.params)])
                for acc, g in zip(other_grads if first else [], grads[len(part.params):],
                                  strict=True):
                    if g is not None:
                        acc += g
            rest = other_grads if first else []
            self.world.reduce_(matrix, [losses, *rest] if first else [], share)
            if self.scaler.unscale([matrix, *rest], last=last):
                # fp16 overflow: the scale is halved and the step skipped, unless the loss
                # itself is not finite (then no scale helps)
                if observe is not None:
                    observe.discard()
                self.values = losses.tolist()
                if not all(map(math.isfinite, self.values)):
                    raise self._loss_fault(inputs, targets, rng, local)
                return losses
            norms = observe.add(matrix, part.blocks) if observe is not None else matrix.sum(1)
            self._check(losses if first else None, norms, other_grads=rest, part=part,
                        matrix=matrix, names=names,
                        loss_fault=lambda: self._loss_fault(inputs, targets, rng, local))
            if part.params:
                self.buffer.scatter(part, self.aggregate(matrix) if per_task else matrix[0])
        if observe is not None:
            observe.finish()
        for p, g in zip(others, other_grads, strict=True):
            p.grad = g
        if self.sparse is not None:
            self.sparse.before_step()
        self.optimizer.step()
        if self.sparse is not None:
            self.sparse.after_step()
        self.world.broadcast_buffers(self.module)
        return losses

    def _check(self, losses: torch.Tensor | None, norms: torch.Tensor, *,
               other_grads: list[torch.Tensor], part: Part, matrix: torch.Tensor,
               names: list[str], loss_fault: Callable[[], Exception]) -> None:
        """One copy to the host per part: the losses (first part), the rows' squared norms and
        the other gradients' norm; a non-finite entry raises, naming the task and the layer."""
        rest = (torch.stack(torch._foreach_norm(other_grads)).sum() if other_grads
                else norms.new_zeros(()))
        head = [losses] if losses is not None else []
        health = torch.cat([*head, norms.float(), rest.reshape(1).float()]).tolist()
        if losses is not None:
            self.values = health[:len(self.tasks)]
            if not all(map(math.isfinite, self.values)):
                raise loss_fault()
        if not all(map(math.isfinite, health)):
            raise self._gradient_fault(other_grads, part, matrix, names)

    def _loss_fault(self, inputs: dict, targets: dict, rng: torch.Tensor,
                    local: torch.Tensor) -> Exception:
        if self.world.active and all(map(math.isfinite, local.tolist())):
            return TrainingError(f"rank {self.world.rank}: the global losses are not finite "
                                 f"({', '.join(f'{v:.4g}' for v in self.values)}) while this "
                                 "rank's shard gives finite ones: see the other ranks' errors")
        return locate_loss(self.module, to_device(inputs, self.device),
                           targets=to_device(targets, self.device), tasks=self.tasks,
                           losses=self.values, rng=rng,
                           context=lambda: autocast(self.device, self.precision))

    def _gradient_fault(self, other_grads: list[torch.Tensor], part: Part, matrix: torch.Tensor,
                        tasks: list[str]) -> Exception:
        """The first non-finite gradient entry named: the row of ``matrix`` (``part``'s columns,
        one row per name in ``tasks``) and the parameter."""
        named = {id(p): n for n, p in self.module.named_parameters()}
        rows = ((task, [(p, matrix[t, a:b]) for (a, b), p in zip(part.spans, part.params,
                                                                   strict=True)])
                for t, task in enumerate(tasks))
        return locate_gradient(named, rows, list(zip(self.others, other_grads, strict=True)),
                               self.values)


def _shape(shape: tuple[int, ...]) -> str:
    return "(batch" + "".join(f", {n}" for n in shape) + ")"
