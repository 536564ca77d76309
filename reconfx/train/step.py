"""One multi-task step: every task's gradient, written straight into its row of a preallocated
T×P matrix for the shared layers; the shared layers get the aggregated gradient, every other
parameter (heads, branched copies) the sum of the gradients it receives (its own task's)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from reconfx.graph import resolve
from reconfx.layers import Layer
from reconfx.train.precision import LossScaler, autocast
from reconfx.train.sparse import SparseMask

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


class GradientBuffer:
    """A T×P matrix whose column blocks are the given layers' parameters, in order. Each block
    starts at a multiple of ``align`` columns; the padding between blocks stays zero, so it adds
    nothing to inner products (the aggregators' and the conflict statistics') and is never
    scattered to a parameter."""

    def __init__(self, module: nn.Module, layers: list[Layer], tasks: int, align: int = CHUNK):
        self.params: list[nn.Parameter] = []
        self.blocks: list[tuple[int, int]] = []
        self.spans: list[tuple[int, int]] = []
        offset = 0
        for layer in layers:
            offset = -(-offset // align) * align
            start = offset
            for p in layer_parameters(module, layer):
                self.params.append(p)
                self.spans.append((offset, offset + p.numel()))
                offset += p.numel()
            self.blocks.append((start, offset))
        offset = -(-offset // align) * align
        device = self.params[0].device if self.params else torch.device("cpu")
        self.matrix = torch.zeros(tasks, offset, device=device)

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
    :mod:`reconfx.train.precision`)."""

    def __init__(self, module: nn.Module, shared: list[Layer], tasks: list[str],
                 loss_fns: list[Callable], aggregate: Callable[[torch.Tensor], torch.Tensor],
                 optimizer: torch.optim.Optimizer, sparse: SparseMask | None = None,
                 precision: str = "fp32"):
        self.module, self.tasks, self.loss_fns = module, tasks, loss_fns
        self.aggregate, self.optimizer, self.sparse = aggregate, optimizer, sparse
        self.buffer = GradientBuffer(module, shared, len(tasks))
        in_buffer = {id(p) for p in self.buffer.params}
        self.others = [p for p in module.parameters() if p.requires_grad and id(p) not in in_buffer]
        first = next(module.parameters(), None)
        self.device = first.device if first is not None else torch.device("cpu")
        self.precision = precision
        self.scaler = LossScaler(self.device, precision == "fp16")

    def losses(self, inputs: dict, targets: dict) -> torch.Tensor:
        inputs, targets = to_device(inputs, self.device), to_device(targets, self.device)
        with autocast(self.device, self.precision):
            outputs = self.module(**inputs)
            return torch.stack([fn(outputs[t], targets[t]).float()
                                for t, fn in zip(self.tasks, self.loss_fns, strict=True)])

    def __call__(self, inputs: dict, targets: dict,
                 observe: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """One training step; ``observe`` sees the T×P matrix before aggregation. Returns the
        detached loss vector (the one value a caller may copy to the host)."""
        losses = self.losses(inputs, targets)
        self.optimizer.zero_grad(set_to_none=True)
        shared, others = self.buffer.params, self.others
        other_grads = [torch.zeros_like(p) for p in others]
        scaled = self.scaler.scaled(losses)
        for t in range(len(self.tasks)):
            grads = torch.autograd.grad(scaled[t], shared + others,
                                        retain_graph=t < len(self.tasks) - 1, allow_unused=True)
            self.buffer.write(t, grads[:len(shared)])
            for acc, g in zip(other_grads, grads[len(shared):], strict=True):
                if g is not None:
                    acc += g
        if self.scaler.unscale([self.buffer.matrix, *other_grads]):
            return losses.detach()  # fp16 overflow: the scale is halved, the step skipped
        if observe is not None:
            observe(self.buffer.matrix)
        if shared:
            self.buffer.scatter(self.aggregate(self.buffer.matrix))
        for p, g in zip(others, other_grads, strict=True):
            p.grad = g
        if self.sparse is not None:
            self.sparse.before_step()
        self.optimizer.step()
        if self.sparse is not None:
            self.sparse.after_step()
        return losses.detach()
