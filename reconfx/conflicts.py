"""Recon's conflict statistics: pure statistics over per-task gradients, no training.

:class:`ConflictCounter` turns the T×P per-task gradient matrix of a step into statistics
without leaving the device: per layer, the T×T Gram matrix of the layer's column block (one
batched matmul over fixed-size column chunks for all layers), cosines from it, and fixed-size
counters per task pair: S-conflicts (cos < S, strict), valid observations (both gradients
non-zero; a zero or absent gradient is neither conflict nor agreement), strong conflicts
(cos ≤ −0.01), the cosine sum and a histogram. Memory does not grow with the number of steps and
nothing is copied to the host inside a step. The profiling pass (:mod:`reconfx.profiling`) and
training (:mod:`reconfx.train.loop`) both feed it.
"""

from __future__ import annotations

import math

import torch

from reconfx.train.step import CHUNK

__all__ = [
    "BINS", "ConflictCounter", "STATE", "STRONG"
]

BINS = 20  # cosine histogram over [-1, 1]
STRONG = -0.01  # "strongly conflicting": cos in (-0.01, -1] as in Recon's analysis
STATE = ("pairs", "conflicts", "valid", "strong", "cos_sum", "hist", "reached")


class ConflictCounter:
    """Fixed-size per-layer, per-pair counters updated from the T×P gradient matrix.

    ``blocks`` are the layers' column ranges; columns outside every block must be zero (the
    padding :class:`~reconfx.train.step.GradientBuffer` leaves so that each layer starts at a
    multiple of ``CHUNK``). Each step cuts the matrix into chunks of ``c`` columns (``c`` divides
    every block start and the width: ``CHUNK`` for an aligned buffer), takes all chunks' T×T Gram
    matrices in one batched matmul, sums them per layer with one ``index_add_`` and updates every
    layer's counters at once: a fixed number of tensor operations per step, however many layers,
    and float32 sums over short chunks rather than one long dot product per layer.
    """

    def __init__(self, blocks: list[tuple[int, int]], tasks: int, threshold: float,
                 device: torch.device | str = "cpu"):
        self.blocks = blocks
        self.threshold = threshold
        layers = len(blocks)
        self.pairs = torch.triu(torch.ones(tasks, tasks, dtype=torch.bool, device=device), 1)
        self.conflicts = torch.zeros(layers, tasks, tasks, dtype=torch.int64, device=device)
        self.valid = torch.zeros_like(self.conflicts)
        self.strong = torch.zeros_like(self.conflicts)
        self.cos_sum = torch.zeros(layers, tasks, tasks, dtype=torch.float64, device=device)
        self.hist = torch.zeros(layers, BINS, dtype=torch.int64, device=device)
        self.reached = torch.zeros(layers, tasks, dtype=torch.int64, device=device)
        self.steps = 0
        self._chunks: tuple[int, int, torch.Tensor] | None = None  # width, c, chunk -> layer

    def _layout(self, width: int, device: torch.device) -> tuple[int, torch.Tensor]:
        if self._chunks is None or self._chunks[0] != width:
            c = math.gcd(CHUNK, width, *(a for a, _b in self.blocks))
            owner = torch.full((width // c,), len(self.blocks), dtype=torch.long)
            for index, (a, b) in enumerate(self.blocks):
                owner[a // c:-(-b // c)] = index
            self._chunks = (width, c, owner.to(device))
        return self._chunks[1], self._chunks[2]

    def update(self, grads: torch.Tensor) -> torch.Tensor:
        """One step: ``grads`` is the T×P per-task gradient matrix. Returns each task's squared
        gradient norm over all layers (non-finite when any of its entries is), on the device."""
        tasks, width = grads.shape
        c, owner = self._layout(width, grads.device)
        chunks = grads.float().view(tasks, width // c, c).transpose(0, 1)
        grams = torch.zeros(len(self.blocks) + 1, tasks, tasks, device=grads.device)
        grams.index_add_(0, owner, torch.bmm(chunks, chunks.transpose(1, 2)))
        gram = grams[:-1]
        norms = gram.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()
        self.reached += (norms > 0).long()
        valid = (norms[:, :, None] > 0) & (norms[:, None, :] > 0) & self.pairs
        cos = gram / (norms[:, :, None] * norms[:, None, :]).clamp_min(torch.finfo(gram.dtype).tiny)
        self.conflicts += (valid & (cos < self.threshold)).long()
        self.strong += (valid & (cos <= STRONG)).long()
        self.valid += valid.long()
        self.cos_sum += torch.where(valid, cos, 0).double()
        bins = ((cos.clamp(-1, 1) + 1) * (BINS / 2)).long().clamp_(0, BINS - 1)
        rows = torch.arange(len(self.blocks), device=grads.device)[:, None, None] * BINS
        self.hist.view(-1).scatter_add_(0, (rows + bins).view(-1), valid.long().view(-1))
        self.steps += 1
        return gram.diagonal(dim1=1, dim2=2).sum(0)

    def scores(self) -> list[int]:
        return self.conflicts.sum((1, 2)).tolist()

    def to(self, device: torch.device | str) -> None:
        for name in STATE:
            setattr(self, name, getattr(self, name).to(device))

    def state_dict(self) -> dict:
        return {"steps": self.steps, **{name: getattr(self, name) for name in STATE}}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        for name in STATE:
            getattr(self, name).copy_(state[name])
