"""Side-by-side timing (ratios from one run; absolute times drift on shared
machines, so the things compared are timed alternately and each reports its median)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "alternating_medians", "interleaved_ratio", "Ratio"
]


def alternating_medians(calls: Sequence[Callable[[], object]], repeats: int,
                        cuda: bool = False) -> list[float]:
    """Median seconds of each of ``calls``, run one after the other ``repeats`` times after a
    warm-up round; with ``cuda`` the device is synchronised around each call."""
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    samples: list[list[float]] = [[] for _ in calls]
    for round_ in range(repeats + 1):  # round 0 warms up
        for call, times in zip(calls, samples, strict=True):
            sync()
            start = time.perf_counter()
            call()
            sync()
            if round_:
                times.append(time.perf_counter() - start)
    return [statistics.median(t) for t in samples]


@dataclass(frozen=True)
class Ratio:
    """How much longer ``b`` takes than ``a``: the median of the per-round ratios and their
    quartiles over ``rounds`` interleaved rounds, with each side's median time per call."""

    a_ms: float
    b_ms: float
    median: float
    low: float  # first quartile of the per-round ratios
    high: float  # third quartile
    rounds: int

    @property
    def clear(self) -> bool:
        """The spread of the ratio is narrower than its distance from 1: a measured effect,
        not this machine's noise."""
        return self.high - self.low < abs(self.median - 1)


def interleaved_ratio(a: Callable[[], object], b: Callable[[], object], *, rounds: int = 15,
                      cuda: bool = False, block_s: float = 0.005, budget_s: float = 20.0,
                      clock: Callable[[], float] = time.perf_counter) -> Ratio:
    """Time ``a`` and ``b`` in ``rounds`` rounds, each a block of calls of one then of the other
    (which goes first alternates), after a warm-up call of each; a block holds as many calls as
    take about ``block_s`` (at least one). A slow phase of the machine then slows both sides of
    a round alike, and the quartiles of the per-round ratios say how far the ratio can be
    trusted. Calls so slow that ``rounds`` rounds would take over ``budget_s`` get fewer rounds
    (at least 3): a billion-parameter model's forward pass takes seconds on a CPU."""
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def block(call: Callable[[], object], number: int) -> float:
        sync()
        start = clock()
        for _ in range(number):
            call()
        sync()
        return (clock() - start) / number

    warm_a, warm_b = block(a, 1), block(b, 1)  # (warm-up)
    first = max(warm_a, warm_b, 1e-9)
    number = max(1, int(block_s / first))
    rounds = min(rounds, max(3, int(budget_s // max(warm_a + warm_b, 1e-9))))
    times_a, times_b = [], []
    for round_ in range(rounds):
        if round_ % 2:
            times_b.append(block(b, number))
            times_a.append(block(a, number))
        else:
            times_a.append(block(a, number))
            times_b.append(block(b, number))
    ratios = [tb / max(ta, 1e-12) for ta, tb in zip(times_a, times_b, strict=True)]
    low, median, high = statistics.quantiles(ratios, n=4) if rounds > 1 else ratios * 3
    return Ratio(1e3 * statistics.median(times_a), 1e3 * statistics.median(times_b),
                 statistics.median(ratios), low, high, rounds)
