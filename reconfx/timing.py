"""Side-by-side timing (DESIGN.md §8: ratios from one run; absolute times drift on shared
machines, so the things compared are timed alternately and each reports its median)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch


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
