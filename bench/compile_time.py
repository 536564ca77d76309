"""Compile time of reconfx's passes: trace (with the module-call annotation) + branch + Python
emit (with untouched submodules collapsed into calls and generated classes).

* a ResNet-50-sized CNN (bottleneck blocks, 23.5M parameters, 108 layers) through tier 1 (fx),
  target <= 3 s excluding model construction;
* a BERT-base-sized transformer (hidden 768, 12 layers, random weights) through tier 2
  (torch.export), target: reconfx's own work adds <= 50% on top of torch.export, timed in the
  same run. Tier 2 exports twice (train and eval mode, to catch glue that reads
  ``self.training``), so the table also gives one plain ``torch.export.export`` call alone;
* both at 1x, 2x and 4x the depth, to show time grows linearly.

Each figure is the median of ``--repeats`` runs. Run: ``.venv/bin/python bench/compile_time.py``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager

import torch

from reconfx import calls
from reconfx.emit.python import emit_python
from reconfx.layers import inventory, match_layers
from reconfx.rewrite import branch
from reconfx.tracing import trace
from reconfx.zoo import BottleneckResNet, hf_model

TASKS = ["left", "right"]


class Clock:
    """Accumulates wall time per phase; torch.export calls are timed by wrapping the function."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - start


@contextmanager
def timed_export(clock: Clock):
    original = torch.export.export

    def export(*args, **kwargs):
        with clock.phase("torch.export"):
            return original(*args, **kwargs)

    torch.export.export = export
    try:
        yield
    finally:
        torch.export.export = original


def compile_once(model: torch.nn.Module, example: dict[str, torch.Tensor],
                 paths: dict[str, str], dynamic: dict[str, list[int]], tier: str,
                 pattern: list[str]) -> Clock:
    clock = Clock()
    with timed_export(clock), clock.phase("total"):
        traced = trace(model, example, task_paths=paths, dynamic=dynamic, tier=tier)
        calls.annotate_calls(traced.module, model, example)
        layers = inventory(traced.module, TASKS)
        chosen, _ = match_layers([x for x in layers if x.shared], pattern)
        branched = branch(traced.module, chosen, TASKS)
        containers = branched.containers
        calls.contiguous_streams(branched.module, containers)
        emitted = calls.collapse_calls(branched.module, model, containers, [example])
        emit_python(emitted, "Bench", doc="Benchmark model.", task_containers=containers)
        streams = [p for p, m in emitted.named_modules() if isinstance(m, calls.TaskStream)]
        inlined = {c for c in containers if not any(calls.under(c, p) for p in streams)}
        emit_python(calls.collapse_calls(traced.module, model, inlined, [example], streams),
                    "Bench",
                    doc="Benchmark model.")
    return clock


def export_alone(model: torch.nn.Module, example: dict[str, torch.Tensor],
                 dynamic: dict[str, list[int]]) -> Clock:
    from torch.export import Dim

    clock = Clock()
    shapes = {k: {axis: Dim.AUTO for axis in axes} for k, axes in dynamic.items()}
    with clock.phase("export alone"):
        torch.export.export(model, (), example, dynamic_shapes=shapes, strict=False)
    return clock


def median_clock(run: Callable[[], Clock], repeats: int) -> dict[str, float]:
    clocks = [run() for _ in range(repeats)]
    return {k: statistics.median(c.phases.get(k, 0.0) for c in clocks)
            for k in clocks[0].phases}


def resnet_case(factor: int, repeats: int) -> dict[str, float]:
    model = BottleneckResNet(tasks=TASKS, depth_factor=factor).eval()
    example = {"image": torch.randn(2, 3, 64, 64)}
    return median_clock(lambda: compile_once(model, example, {t: t for t in TASKS},
                                             {"image": [0]}, "fx", ["layer4.*"]), repeats)


def bert_case(factor: int, repeats: int) -> dict[str, float]:
    from reconfx.heads import HeadSpec, attach_heads

    backbone = hf_model("BertModel", dict(hidden_size=768, num_hidden_layers=12 * factor,
                                          num_attention_heads=12, intermediate_size=3072))
    example = {"input_ids": torch.randint(0, 30522, (2, 16))}
    heads = {t: HeadSpec(out_features=2, pool="mean") for t in TASKS}
    model = attach_heads(backbone, "last_hidden_state", heads=heads, example=example,
                         where="bench").eval()
    last = 12 * factor - 1
    dynamic = {"input_ids": [0, 1]}
    times = median_clock(lambda: compile_once(model, example, {t: t for t in TASKS}, dynamic,
                                              "export", [f"backbone.encoder.layer.{last}.*"]),
                         repeats)
    return times | median_clock(lambda: export_alone(model, example, dynamic), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--factors", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    print("\n| model | depth | compile s | in torch.export s | reconfx's own s | own / export "
          "| one export alone s | compile / one export |")
    print("|---|---|---|---|---|---|---|---|")
    for name, case in (("ResNet-50-sized, tier 1", resnet_case),
                       ("BERT-base-sized, tier 2", bert_case)):
        for factor in args.factors:
            t = case(factor, args.repeats)
            export = t.get("torch.export", 0.0)
            own = t["total"] - export
            ratio = f"{100 * own / export:.0f}%" if export else "n/a"
            alone = t.get("export alone")
            versus = f"{t['total'] / alone:.2f}x" if alone else "n/a"
            print(f"| {name} | {factor}x | {t['total']:.2f} | {export:.2f} | {own:.2f} | "
                  f"{ratio} | {f'{alone:.2f}' if alone else 'n/a'} | {versus} |", flush=True)


if __name__ == "__main__":
    main()
