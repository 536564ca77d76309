"""Cost of the profiling statistics, measured side by side in one run.

For a ResNet-18-sized CNN and a BERT-small-sized transformer with T = 2, 4, 8 task heads:

* ``grads``: one step's per-task gradients (forward + T backward passes through the shared graph,
  each task's gradient written into its row of the preallocated T×P buffer);
* ``plain``: forward + T plain ``loss_t.backward()`` (what any per-task method pays at least);
* ``stats``: ``ConflictCounter.update`` on the buffer (per-layer Gram matrices, counters);
* ``loop``: the official code's way, per layer and per task pair, cosine with ``.item()``;
* ``check``: the step's NaN/inf check (one host copy of the losses, each task's squared gradient
  norm and the other gradients' norm), with the norms taken from the statistics (profiling and
  training, which count conflicts) and computed alone (a sum per buffer row).

Reported: stats / grads (target <= 5%), loop / stats (target >= 3x at T >= 4),
grads / plain (target <= 1.1x), and the process's resident memory after 200 and after 2,000
counter updates (flat). Median of ``--repeats``.
Run: ``.venv/bin/python bench/profile_overhead.py``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

from reconfx.conflicts import ConflictCounter
from reconfx.heads import HeadSpec, attach_heads
from reconfx.layers import inventory
from reconfx.tracing import trace
from reconfx.train.step import GradientBuffer
from reconfx.zoo import SmallResNet, hf_model


def resnet18(tasks: list[str]):
    model = SmallResNet(num_classes=10, tasks=tasks, in_channels=3, width=64,
                        blocks=(2, 2, 2, 2))
    example = {"image": torch.randn(16, 3, 32, 32)}
    targets = {t: torch.randint(0, 10, (16,)) for t in tasks}
    return model, example, targets


def bert_small(tasks: list[str]):
    backbone = hf_model("BertModel", dict(hidden_size=512, num_hidden_layers=4,
                                          num_attention_heads=8, intermediate_size=2048,
                                          hidden_dropout_prob=0.0,
                                          attention_probs_dropout_prob=0.0))
    example = {"input_ids": torch.randint(0, 30522, (8, 32))}
    heads = {t: HeadSpec(out_features=10, pool="mean") for t in tasks}
    model = attach_heads(backbone, "last_hidden_state", heads=heads, example=example, where="bench")
    targets = {t: torch.randint(0, 10, (8,)) for t in tasks}
    return model, example, targets


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def loop_stats(matrix: torch.Tensor, blocks: list[tuple[int, int]], threshold: float,
               counts: list[list[int]]) -> None:
    """Per layer, per pair, with a host sync per cosine, like the official Recon code."""
    tasks = matrix.shape[0]
    for index, (a, b) in enumerate(blocks):
        for i in range(tasks):
            for j in range(i + 1, tasks):
                cos = F.cosine_similarity(matrix[i, a:b], matrix[j, a:b], dim=0).item()
                if cos < threshold:
                    counts[index][i * tasks + j] += 1


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def case(build, tasks: int, repeats: int) -> dict[str, float]:
    names = [f"t{i}" for i in range(tasks)]
    model, example, targets = build(names)
    traced = trace(model, example, task_paths={t: t for t in names}, tier="auto").module.train()
    shared = [x for x in inventory(traced, names) if x.shared]
    buffer = GradientBuffer(traced, shared, tasks)
    counter = ConflictCounter(buffer.blocks, tasks, -0.1)
    params = buffer.params

    def losses():
        out = traced(**example)
        return [F.cross_entropy(out[t], targets[t]) for t in names]

    def grads():
        ls = losses()
        for t in range(tasks):
            buffer.write(t, torch.autograd.grad(ls[t], params, retain_graph=t < tasks - 1,
                                                allow_unused=True))

    def plain():
        ls = losses()
        for t in range(tasks):
            ls[t].backward(retain_graph=t < tasks - 1)
        traced.zero_grad(set_to_none=True)

    counts = [[0] * tasks * tasks for _ in buffer.blocks]
    grads()
    in_buffer = {id(p) for p in params}
    other_grads = [torch.randn_like(p) for p in traced.parameters() if id(p) not in in_buffer]
    loss_vector = torch.rand(tasks)

    def check(norms):
        """MultiTaskStep's finiteness check: one host copy of losses + gradient norms."""
        rest = torch.stack(torch._foreach_norm(other_grads)).sum()
        health = torch.cat([loss_vector, norms(), rest.reshape(1)]).tolist()
        assert all(map(math.isfinite, health))

    norms = counter.update(buffer.matrix)
    result = {
        "grads": timed(grads, repeats),
        "plain": timed(plain, repeats),
        "stats": timed(lambda: counter.update(buffer.matrix), repeats),
        "loop": timed(lambda: loop_stats(buffer.matrix, buffer.blocks, -0.1, counts), repeats),
        "check": timed(lambda: check(lambda: norms), repeats),  # norms come from the stats
        "check_alone": timed(lambda: check(lambda: buffer.matrix.sum(1)), repeats),
        "params": float(buffer.matrix.shape[1]),
        "layers": float(len(buffer.blocks)),
    }
    for _ in range(200):
        counter.update(buffer.matrix)
    result["rss_200"] = rss_mb()
    for _ in range(1800):
        counter.update(buffer.matrix)
    result["rss_2000"] = rss_mb()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 4, 8])
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of "
          f"{args.repeats}")
    print("\n| model | T | shared layers | shared params | grads ms | stats ms | stats / grads "
          "| loop ms | loop / stats | grads / plain | NaN check / grads (with stats, without) "
          "| RSS after 200 / 2,000 updates MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, build in (("ResNet-18-sized", resnet18), ("BERT-small-sized", bert_small)):
        for tasks in args.tasks:
            r = case(build, tasks, args.repeats)
            print(f"| {name} | {tasks} | {r['layers']:.0f} | {r['params'] / 1e6:.1f}M | "
                  f"{1e3 * r['grads']:.1f} | {1e3 * r['stats']:.2f} | "
                  f"{100 * r['stats'] / r['grads']:.1f}% | {1e3 * r['loop']:.1f} | "
                  f"{r['loop'] / r['stats']:.1f}x | {r['grads'] / r['plain']:.2f}x | "
                  f"{100 * r['check'] / r['grads']:.2f}%, "
                  f"{100 * r['check_alone'] / r['grads']:.2f}% | "
                  f"{r['rss_200']:.0f} / {r['rss_2000']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
