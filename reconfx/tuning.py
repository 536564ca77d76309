"""Measured tuning of stream batching (opt-in, ``branch.stream_batching: tuned``).

The default cost rule (:mod:`reconfx.batching`) gives each region a row cap from the sizes of its
largest intermediate value and its weights. Tuning replaces that cap by one chosen from timings on
this machine: at each tuning batch size the model runs once to capture every region's inputs,
then each region alone is timed both ways (all streams joined in one call, each stream on its
own), the two called alternately, median of ``repeats``.
The cap kept is the one whose choices at the tuning batch sizes add up to the least time relative
to the fastest option at each size (the rule's cap wins ties). Timings and choices go into the
report; the result depends on the machine, so it is never the default.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from reconfx.modes import preserved
from reconfx.streams import StreamRegion, regions_of, streams_per_call
from reconfx.timing import alternating_medians

__all__ = [
    "best_rows", "captured_inputs", "per_call_options", "tune", "Tuned"
]


@dataclass
class Tuned:
    """One region's measurements: ``times[batch][k]`` is the median ms of one region call with
    ``k`` streams per call; ``rule_rows`` the cost rule's cap, ``rows`` the cap kept."""

    region: str
    streams: int
    rule_rows: int
    rows: int = 0
    times: dict[int, dict[int, float]] = field(default_factory=dict)

    def choice(self, batch: int, rows: int | None = None) -> int:
        return streams_per_call(self.streams, batch, self.rows if rows is None else rows)


def per_call_options(streams: int) -> list[int]:
    """The streams one call of a region may hold: each on its own, or all joined."""
    return sorted({1, streams})


def tune(module: nn.Module, examples: dict[int, dict[str, torch.Tensor]], repeats: int,
         progress: bool = False) -> list[Tuned]:
    """Time every region of ``module`` at each batch size of ``examples`` (batch -> inputs),
    set each region's row cap to the best measured one and return the measurements."""
    regions = regions_of(module)
    results = [Tuned(r.method, len(r.tasks), r.max_rows) for r in regions]
    options = {(r, b): per_call_options(len(r.tasks)) for r in regions for b in examples}
    total = sum(len(o) for o in options.values())
    with preserved(module), tqdm(total=total, desc="tuning stream batching",
                                 disable=not progress, leave=False) as bar:
        module.eval()
        for batch, example in examples.items():
            captured = captured_inputs(module, regions, example)
            for region, result in zip(regions, results, strict=True):
                ks = options[region, batch]
                medians = _time_options(region, captured[region], batch, ks, repeats)
                result.times[batch] = dict(zip(ks, medians, strict=True))
                bar.update(len(ks))
    for region, result in zip(regions, results, strict=True):
        result.rows = region.max_rows = best_rows(result)
    return results


def captured_inputs(module: nn.Module, submodules: Sequence[nn.Module],
                    example: dict[str, torch.Tensor]) -> dict[nn.Module, tuple]:
    """The arguments each of ``submodules`` (regions, layers) gets when ``module`` runs on
    ``example`` (the last call's, for a submodule called more than once)."""
    captured: dict[nn.Module, tuple] = {}
    hooks = [m.register_forward_pre_hook(lambda m, args: captured.__setitem__(m, args))
             for m in submodules]
    try:
        with torch.no_grad():
            module(**example)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def _time_options(region: StreamRegion, args: tuple, batch: int, options: list[int],
                  repeats: int) -> list[float]:
    """Median ms of one call of ``region`` with each number of streams per call, interleaved."""
    saved = region.max_rows

    def call(k: int) -> Callable[[], object]:
        def run() -> object:
            region.max_rows = k * max(batch, 1)
            return region(*args)
        return run
    cuda = any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)
    try:
        with torch.no_grad():
            seconds = alternating_medians([call(k) for k in options], repeats, cuda)
    finally:
        region.max_rows = saved
    return [1e3 * s for s in seconds]


def best_rows(result: Tuned) -> int:
    """The cap whose choices at the measured batch sizes cost the least relative time."""
    candidates = [result.rule_rows] + sorted({k * max(b, 1) for b, times in result.times.items()
                                              for k in times})

    def cost(rows: int) -> float:
        return sum(times[result.choice(b, rows)] / min(times.values())
                   for b, times in result.times.items())
    return min(candidates, key=cost)  # the first (the rule's cap) wins ties
