"""Grouped operations for task-specific copies: would running them as one call pay here?

A branched layer becomes T copies of the same structure. At a branch point they all read one
shared input, so they can run as one call of a layer T times wider (weights concatenated along
the output features or channels, the result split per task); after it, each copy reads its own
stream, and the T calls can run as one batched matrix product on the streams stacked (weights
stacked). This bench times, for the branched layer of each ``bench/stream_batching.py`` model on
its real input there (``reconfx.tuning.captured_inputs``) and for the stack model's heads:

* T calls, one per copy (what compiled models run);
* one grouped call, the weights concatenated (or stacked) in the call, as a compiled model must
  do to stay exact when weights change between calls (training, ``load_state_dict``);
* one grouped call on weights concatenated ahead, outside the timed call: the upper bound of
  grouping (it would keep a second copy of the weights and need invalidating on every update).

Eval mode, ``torch.no_grad``, the three called alternately, median of ``--repeats`` after a
warm-up; outputs checked equal (atol 1e-5) first.

Run: ``.venv/bin/python bench/grouped_copies.py``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from handwritten import side_by_side  # noqa: E402
from stream_batching import MODELS  # noqa: E402

from reconfx.tuning import captured_inputs  # noqa: E402


def wide(copies: list[nn.Module], weight: torch.Tensor, bias: torch.Tensor | None,
         x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The copies as one layer T times wider on a shared input, split per copy."""
    first = copies[0]
    if isinstance(first, nn.Linear):
        return F.linear(x, weight, bias).split(first.out_features, -1)
    return first._conv_forward(x, weight, bias).split(first.out_channels, 1)


def concatenated(copies: list[nn.Module]) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = torch.cat([c.weight for c in copies])
    bias = None if copies[0].bias is None else torch.cat([c.bias for c in copies])
    return weight, bias


def shared_input(copies: list[nn.Module], x: torch.Tensor) -> list[Callable[[], object]]:
    ahead = concatenated(copies)
    return [lambda: [c(x) for c in copies],
            lambda: wide(copies, *concatenated(copies), x),
            lambda: wide(copies, *ahead, x)]


def stacked(copies: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.stack([c.weight for c in copies]).transpose(1, 2),
            torch.stack([c.bias for c in copies]).unsqueeze(1))


def per_stream(copies: list[nn.Linear], xs: list[torch.Tensor]) -> list[Callable[[], object]]:
    """Linear copies on their own streams: T calls, or one ``baddbmm`` on the streams stacked."""
    ahead = stacked(copies)

    def grouped(weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.baddbmm(bias, torch.stack(xs), weight).unbind(0)
    return [lambda: [c(x) for c, x in zip(copies, xs, strict=True)],
            lambda: grouped(*stacked(copies)), lambda: grouped(*ahead)]


def check(fns: list[Callable[[], object]]) -> None:
    with torch.no_grad():
        want, *others = [fn() for fn in fns]
        for got in others:
            for a, b in zip(want, got, strict=True):
                torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def timed(fns: list[Callable[[], object]], repeats: int) -> tuple[float, ...]:
    check(fns)

    def quiet(fn: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                fn()
        return run
    return side_by_side(*(quiet(fn) for fn in fns), repeats=repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 128])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of "
          f"{args.repeats}")
    print("\n| layer | T | batch | weights KiB (all copies) | us T calls / grouped / grouped, "
          "weights joined ahead | speed-up grouped | speed-up ahead |\n|---|---|---|---|---|---|"
          "---|")
    for key in args.models:
        _name, build = MODELS[key]
        for t in args.tasks:
            tasks = [f"t{i}" for i in range(t)]
            torch.manual_seed(0)
            model, make, _tier, _dynamic, patterns = build(tasks)
            layer = model.get_submodule(patterns[0])
            copies = [layer] + [_perturbed(layer) for _ in tasks[1:]]
            rows = [(f"{key}: `{patterns[0]}` ({_shape(layer)})", copies, None)]
            if key == "stack":
                heads = [model.heads[task] for task in tasks]
                rows.append((f"{key}: heads ({_shape(heads[0])}, own streams)", heads, heads))
            for label, mods, own in rows:
                kib = sum(p.numel() * p.element_size() for m in mods for p in m.parameters())
                for batch in args.batches:
                    inputs = make(batch)
                    if own is None:
                        fns = shared_input(mods, captured_inputs(model, [layer], inputs)[layer][0])
                    else:
                        feature = captured_inputs(model, [own[0]], inputs)[own[0]][0]
                        fns = per_stream(mods, [feature + 0.01 * i for i in range(t)])
                    a, b, c = timed(fns, args.repeats)
                    print(f"| {label} | {t} | {batch} | {kib / 1024:.0f} | {1e6 * a:.0f} / "
                          f"{1e6 * b:.0f} / {1e6 * c:.0f} | {a / b:.2f}x | {a / c:.2f}x |",
                          flush=True)


def _perturbed(layer: nn.Module) -> nn.Module:
    """A copy with its own weights (task-specific copies drift apart in training)."""
    other = copy.deepcopy(layer)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return other


def _shape(layer: nn.Module) -> str:
    if isinstance(layer, nn.Linear):
        return f"Linear {layer.in_features}→{layer.out_features}"
    kernel = "×".join(map(str, layer.kernel_size))
    stride = "/" + "×".join(map(str, layer.stride)) if set(layer.stride) != {1} else ""
    return f"{type(layer).__name__} {layer.in_channels}→{layer.out_channels} {kernel}{stride}"


if __name__ == "__main__":
    main()
