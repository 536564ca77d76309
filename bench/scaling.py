"""How compile time, forward latency and parameter count grow with K and T.

For a ResNet-50-sized CNN (tier 1, fx) and a BERT-base-sized transformer (tier 2,
torch.export; hidden 768, 12 layers, random weights), T = 2, 4, 8 task heads and K = 0, 25%,
50% and 100% of the shared layers branched (the deepest ones in graph order, where Recon finds
the most conflict; K = 0 is the traced model itself):

* compile s: trace + inventory + branch + Python emit of model.py and original.py (median of
  ``--repeats``);
* forward ms: eager forward of the compiled model in eval mode (``torch.no_grad``), ResNet at
  batch 8 × 3 × 64 × 64, BERT at batch 8 × 32 tokens (median of ``--repeats`` after a warm-up);
* params: unique parameters of the compiled model, and its ratio to the original.

Run: ``.venv/bin/python bench/scaling.py``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from reconfx.emit.python import emit_python
from reconfx.graph import unique_parameters
from reconfx.heads import HeadSpec, attach_heads
from reconfx.layers import inventory
from reconfx.rewrite import branch
from reconfx.tracing import trace
from reconfx.zoo import BottleneckResNet, hf_model

FRACTIONS = (0.0, 0.25, 0.5, 1.0)


def resnet(tasks: list[str]):
    model = BottleneckResNet(tasks=tasks).eval()
    return model, {"image": torch.randn(8, 3, 64, 64)}, {"image": [0]}, "fx"


def bert(tasks: list[str]):
    backbone = hf_model("BertModel", dict(hidden_size=768, num_hidden_layers=12,
                                          num_attention_heads=12, intermediate_size=3072))
    example = {"input_ids": torch.randint(0, 30522, (8, 32))}
    heads = {t: HeadSpec(out_features=2, pool="mean") for t in tasks}
    model = attach_heads(backbone, "last_hidden_state", heads=heads, example=example,
                         where="bench").eval()
    return model, example, {"input_ids": [0, 1]}, "export"


def compile_k(model, example, dynamic, tier, tasks, fraction):
    start = time.perf_counter()
    traced = trace(model, example, task_paths={t: t for t in tasks}, dynamic=dynamic, tier=tier)
    shared = [x for x in inventory(traced.module, tasks) if x.shared]
    k = math.ceil(fraction * len(shared))
    chosen = shared[len(shared) - k:] if k else []
    branched = branch(traced.module, chosen, tasks)
    containers = {p for x in chosen for p in x.paths} | set(branched.per_task_norms)
    emit_python(branched.module, "Bench", doc="Benchmark model.", task_containers=containers)
    emit_python(traced.module, "Bench", doc="Benchmark model.")
    return time.perf_counter() - start, branched.module.eval(), k, len(shared)


def latency(module, example, repeats):
    with torch.no_grad():
        module(**example)
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            module(**example)
            samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of "
          f"{args.repeats}")
    print("\n| model | T | K | compile s | forward ms | params | params / original |")
    print("|---|---|---|---|---|---|---|")
    for name, build in (("ResNet-50-sized", resnet), ("BERT-base-sized", bert)):
        for t in (2, 4, 8):
            tasks = [f"t{i}" for i in range(t)]
            torch.manual_seed(0)
            model, example, dynamic, tier = build(tasks)
            original = None
            for fraction in FRACTIONS:
                runs = [compile_k(model, example, dynamic, tier, tasks, fraction)
                        for _ in range(args.repeats)]
                seconds = statistics.median(r[0] for r in runs)
                module, k, shared = runs[-1][1], runs[-1][2], runs[-1][3]
                del runs
                params = unique_parameters(module)
                original = original or params
                ms = 1e3 * latency(module, example, args.repeats)
                print(f"| {name} | {t} | {k}/{shared} ({100 * fraction:.0f}%) | {seconds:.2f} | "
                      f"{ms:.1f} | {params / 1e6:.1f}M | {params / original:.2f}x |",
                      flush=True)
                del module


if __name__ == "__main__":
    main()
