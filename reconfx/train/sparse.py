"""Sparse training (Zhang et al., arXiv 2411.18615): one fixed mask, chosen before training and
shared by all tasks, on the shared encoder only (heads train fully). For each output neuron of a
weight matrix or convolution kernel (its first axis), only its K input connections of largest
magnitude stay trainable; everything else is frozen. One-dimensional parameters (biases,
normalisation affines) stay trainable.

Frozen entries never move, whatever the aggregator or the optimiser: their gradient is zeroed
before the optimiser sees it (so momentum and Adam's moments stay zero there) and their values
are restored after each step (so weight decay, which acts on the parameters themselves, does
not move them either).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = [
    "neuron_masks", "SparseMask"
]


def neuron_masks(params: list[nn.Parameter], per_neuron_k: int | None = None,
                 fraction: float | None = None) -> dict[int, torch.Tensor]:
    """``id(param) -> bool mask`` (True = trainable) for every parameter with two or more axes:
    each output neuron keeps its ``per_neuron_k`` (or ``ceil(fraction × fan-in)``) largest-
    magnitude inputs."""
    masks = {}
    for p in params:
        if p.dim() < 2:
            continue
        rows = p.detach().reshape(p.shape[0], -1).abs()
        fan_in = rows.shape[1]
        k = per_neuron_k if per_neuron_k is not None else math.ceil(fraction * fan_in)
        k = max(1, min(k, fan_in))
        keep = torch.zeros_like(rows, dtype=torch.bool)
        keep.scatter_(1, rows.topk(k, dim=1).indices, True)
        masks[id(p)] = keep.reshape(p.shape)
    return masks


class SparseMask:
    """Applies fixed masks around an optimiser step."""

    def __init__(self, params: list[nn.Parameter], masks: dict[int, torch.Tensor]):
        self.entries = [(p, masks[id(p)], p.detach().clone()) for p in params if id(p) in masks]

    @property
    def trainable_fraction(self) -> float:
        total = sum(m.numel() for _, m, _ in self.entries)
        return sum(int(m.sum()) for _, m, _ in self.entries) / total if total else 1.0

    def before_step(self) -> None:
        for p, mask, _frozen in self.entries:
            if p.grad is not None:
                p.grad.mul_(mask)

    @torch.no_grad()
    def after_step(self) -> None:
        for p, mask, frozen in self.entries:
            p.copy_(torch.where(mask, p, frozen))
