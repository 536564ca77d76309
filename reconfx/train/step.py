"""One multi-task step: every task's gradient, written straight into its row of a preallocated
T×P matrix for the shared layers; the shared layers get the aggregated gradient, every other
parameter (heads, branched copies) the sum of the gradients it receives (its own task's)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from reconfx.distributed import World
from reconfx.errors import ModelError, TrainingError
from reconfx.graph import resolve
from reconfx.layers import Layer
from reconfx.train.health import locate_gradient, locate_loss
from reconfx.train.objectives import unreadable
from reconfx.train.precision import LossScaler, autocast
from reconfx.train.sparse import SparseMask

__all__ = [
    "block_layout", "CHUNK", "GradientBuffer", "layer_parameters", "Layout", "MultiTaskStep",
    "to_device"
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


class GradientBuffer:
    """A T×P matrix whose column blocks are the given layers' parameters, in order. Each block
    starts at a multiple of ``align`` columns; the padding between blocks stays zero, so it adds
    nothing to inner products (the aggregators' and the conflict statistics') and is never
    scattered to a parameter."""

    def __init__(self, module: nn.Module, layers: list[Layer], tasks: int, align: int = CHUNK):
        layout = block_layout(module, layers, align)
        self.params, self.spans, self.blocks = layout.params, layout.spans, layout.blocks
        device = self.params[0].device if self.params else torch.device("cpu")
        self.matrix = torch.zeros(tasks, layout.width, device=device)

    def write(self, task: int, grads: tuple[torch.Tensor | None, ...]) -> None:
        row = self.matrix[task]
        for (a, b), g in zip(self.spans, grads, strict=True):
            if g is None:
                row[a:b].zero_()
            else:
                row[a:b].copy_(g.reshape(-1))

    def scatter(self, vector: torch.Tensor) -> None:
        """Set each parameter's ``.grad`` from one P-vector (the aggregated gradient)."""
        for (a, b), p in zip(self.spans, self.params, strict=True):
            p.grad = vector[a:b].view_as(p).clone()


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

    def __init__(self, module: nn.Module, shared: list[Layer], tasks: list[str],
                 loss_fns: list[Callable], aggregate: Callable[[torch.Tensor], torch.Tensor],
                 optimizer: torch.optim.Optimizer, sparse: SparseMask | None = None,
                 precision: str = "fp32", world: World | None = None):
        self.module, self.tasks, self.loss_fns = module, tasks, loss_fns
        self.world = world or World()
        self.aggregate, self.optimizer, self.sparse = aggregate, optimizer, sparse
        self.buffer = GradientBuffer(module, shared, len(tasks))
        in_buffer = {id(p) for p in self.buffer.params}
        self.others = [p for p in module.parameters() if p.requires_grad and id(p) not in in_buffer]
        first = next(module.parameters(), None)
        self.device = first.device if first is not None else torch.device("cpu")
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
            raise unreadable(f"the loss of task '{task}' cannot compare", output, target, exc,
                             f"tasks[{self.tasks.index(task)}].loss",
                             "match the task's loss to its output and targets") from exc

    def __call__(self, inputs: dict, targets: dict,
                 observe: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
                 share: float = 1.0) -> torch.Tensor:
        """One training step; ``observe`` sees the T×P matrix before aggregation and may return
        each task's squared gradient norm (the conflict counter does). Without ``observe`` a
        linear aggregator's step takes one backward pass of the summed losses. With several ranks,
        ``share`` is this rank's fraction of the global batch: the losses and gradients are
        all-reduced with that weight before anything reads them (:mod:`reconfx.distributed`).
        Returns the detached loss vector (global); ``self.values`` holds it on the host."""
        rng = torch.get_rng_state()  # to re-run this batch's forward if it goes non-finite
        losses = self.losses(inputs, targets)
        self.optimizer.zero_grad(set_to_none=True)
        shared, others = self.buffer.params, self.others
        other_grads = [torch.zeros_like(p) for p in others]
        scaled = self.scaler.scaled(losses)
        # Per-task gradients when something reads them; a linear aggregator's result (their
        # sum) otherwise comes from one backward pass of the summed losses, in row 0.
        per_task = observe is not None or not getattr(self.aggregate, "linear", False)
        matrix = self.buffer.matrix if per_task else self.buffer.matrix[:1]
        objectives = list(scaled) if per_task else [scaled.sum()]
        for t, objective in enumerate(objectives):
            grads = torch.autograd.grad(objective, shared + others,
                                        retain_graph=t < len(objectives) - 1, allow_unused=True)
            self.buffer.write(t, grads[:len(shared)])
            for acc, g in zip(other_grads, grads[len(shared):], strict=True):
                if g is not None:
                    acc += g
        local, losses = losses.detach(), losses.detach().clone()
        self.world.reduce_(matrix, [losses, *other_grads], share)
        if self.scaler.unscale([matrix, *other_grads]):
            # fp16 overflow: the scale is halved and the step skipped, unless the loss itself
            # is not finite (then no scale helps)
            self.values = losses.tolist()
            if not all(map(math.isfinite, self.values)):
                raise self._loss_fault(inputs, targets, rng, local)
            return losses
        norms = observe(matrix) if observe is not None else None
        if norms is None:
            norms = matrix.sum(1)
        rest = (torch.stack(torch._foreach_norm(other_grads)).sum() if other_grads
                else losses.new_zeros(()))
        health = torch.cat([losses, norms.float(), rest.reshape(1).float()]).tolist()
        self.values = health[:len(self.tasks)]
        if not all(map(math.isfinite, health)):
            if not all(map(math.isfinite, self.values)):
                raise self._loss_fault(inputs, targets, rng, local)
            raise self._gradient_fault(other_grads, matrix, self.tasks if per_task else
                                       [" + ".join(self.tasks)])
        if shared:
            self.buffer.scatter(self.aggregate(matrix) if per_task else matrix[0])
        for p, g in zip(others, other_grads, strict=True):
            p.grad = g
        if self.sparse is not None:
            self.sparse.before_step()
        self.optimizer.step()
        if self.sparse is not None:
            self.sparse.after_step()
        self.world.broadcast_buffers(self.module)
        return losses

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

    def _gradient_fault(self, other_grads: list[torch.Tensor], matrix: torch.Tensor,
                        tasks: list[str]) -> Exception:
        """The first non-finite gradient entry named: the row of ``matrix`` (one per name in
        ``tasks``) and the parameter."""
        named = {id(p): n for n, p in self.module.named_parameters()}
        rows = ((task, [(p, matrix[t, a:b]) for (a, b), p in zip(self.buffer.spans,
                                                                   self.buffer.params,
                                                                   strict=True)])
                for t, task in enumerate(tasks))
        return locate_gradient(named, rows, list(zip(self.others, other_grads, strict=True)),
                               self.values)


def _shape(shape: tuple[int, ...]) -> str:
    return "(batch" + "".join(f", {n}" for n in shape) + ")"
