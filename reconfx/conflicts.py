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

    A step whose gradients come in parts (the gradient buffer's cap, see
    :class:`~reconfx.train.step.GradientBuffer`) is :meth:`add` per part, then :meth:`finish`;
    the counts are those of the whole matrix, since a layer's Gram matrix is the sum of its
    columns' parts.
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
        self._owners: dict[tuple, tuple[int, torch.Tensor]] = {}  # layout -> c, chunk -> layer
        self._grams: torch.Tensor | None = None  # this step's Gram matrices so far, per layer

    def _layout(self, width: int, blocks: tuple[tuple[int, int, int], ...],
                device: torch.device) -> tuple[int, torch.Tensor]:
        key = (width, blocks)
        if key not in self._owners:
            c = math.gcd(CHUNK, width, *(a for _i, a, _b in blocks))
            owner = torch.full((width // c,), len(self.blocks), dtype=torch.long)
            for index, a, b in blocks:
                owner[a // c:-(-b // c)] = index
            self._owners[key] = (c, owner.to(device))
        return self._owners[key]

    def update(self, grads: torch.Tensor) -> torch.Tensor:
        """One step: ``grads`` is the T×P per-task gradient matrix. Returns each task's squared
        gradient norm over all layers (non-finite when any of its entries is), on the device."""
        self.add(grads)
        return self.finish()

    def add(self, grads: torch.Tensor,
            blocks: tuple[tuple[int, int, int], ...] | None = None) -> torch.Tensor:
        """Part of a step's gradients: ``grads`` holds the columns of some layers, or of some of a
        layer's parameters (``blocks``: (layer index, first column, end) in ``grads``, each start
        aligned as the class says; default: the whole matrix as ``blocks`` lays it out). Their
        T×T Gram matrices are added to the step's; :meth:`finish` counts the step once every
        part is in. Returns each task's squared gradient norm over these columns."""
        tasks, width = grads.shape
        if blocks is None:
            blocks = tuple((i, a, b) for i, (a, b) in enumerate(self.blocks))
        c, owner = self._layout(width, blocks, grads.device)
        chunks = grads.float().view(tasks, width // c, c).transpose(0, 1)
        if self._grams is None:
            self._grams = torch.zeros(len(self.blocks) + 1, tasks, tasks, device=grads.device)
        grams = torch.bmm(chunks, chunks.transpose(1, 2))
        self._grams.index_add_(0, owner, grams)
        return grams.diagonal(dim1=1, dim2=2).sum(0)  # (the padding's chunks add zeros)

    def finish(self) -> torch.Tensor:
        """Count the step whose parts :meth:`add` received. Returns each task's squared gradient
        norm over all layers (non-finite when any of its entries is), on the device."""
        assert self._grams is not None, "finish() before add()"
        gram, self._grams = self._grams[:-1], None
        norms = gram.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()
        self.reached += (norms > 0).long()
        valid = (norms[:, :, None] > 0) & (norms[:, None, :] > 0) & self.pairs
        cos = gram / (norms[:, :, None] * norms[:, None, :]).clamp_min(torch.finfo(gram.dtype).tiny)
        self.conflicts += (valid & (cos < self.threshold)).long()
        self.strong += (valid & (cos <= STRONG)).long()
        self.valid += valid.long()
        self.cos_sum += torch.where(valid, cos, 0).double()
        bins = ((cos.clamp(-1, 1) + 1) * (BINS / 2)).long().clamp_(0, BINS - 1)
        rows = torch.arange(len(self.blocks), device=gram.device)[:, None, None] * BINS
        self.hist.view(-1).scatter_add_(0, (rows + bins).view(-1), valid.long().view(-1))
        self.steps += 1
        return gram.diagonal(dim1=1, dim2=2).sum(0)

    def discard(self) -> None:
        """Forget the parts of a step that is skipped (an fp16 overflow)."""
        self._grams = None

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
