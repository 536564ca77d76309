"""Sampled conflict statistics: EW training steps with ``train.conflict_every`` against a plain
summed-loss step, side by side in one run.

The model is the Recon paper's Multi-Fashion+MNIST ResNet-18 (``reconfx.zoo.resnet18``, 36×36
one-channel images, two 10-class heads), every layer shared, SGD with momentum 0.9. One block
of ``--steps`` training steps (default 10, one sampling cycle) is timed for each of:

* ``plain``: hand-written PyTorch: forward, the two cross-entropy losses summed, one backward
  pass, the optimiser step;
* ``every N``: reconfx's step (:class:`reconfx.train.step.MultiTaskStep`) with EW, conflict
  statistics counted (:class:`reconfx.conflicts.ConflictCounter`) on the first of every N steps,
  one backward pass of the summed losses on the others, for each N of ``--every``.

The blocks run alternately (which goes first rotates), ``--repeats`` rounds after one warm-up
block each; a variant's figure is the median over rounds of its block time over the ``plain``
block of the same round. Inputs are random images (the step's cost does not depend on the
pixels). Run: ``.venv/bin/python bench/conflict_sampling.py [--batch 256] [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from reconfx.conflicts import ConflictCounter
from reconfx.layers import inventory
from reconfx.tracing import trace
from reconfx.train.aggregators import aggregator
from reconfx.train.step import MultiTaskStep
from reconfx.zoo import resnet18

TASKS = ["left", "right"]


def plain_block(model: nn.Module, optimizer: torch.optim.Optimizer, batch: tuple,
                steps: int) -> None:
    inputs, targets = batch
    for _ in range(steps):
        outputs = model(**inputs)
        loss = sum(nn.functional.cross_entropy(outputs[t], targets[t]) for t in TASKS)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def reconfx_block(step: MultiTaskStep, counter: ConflictCounter, batch: tuple, every: int,
                  steps: int) -> None:
    for i in range(steps):
        step(*batch, counter if i % every == 0 else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--every", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    example = {"image": torch.rand(args.batch, 1, 36, 36)}
    batch = (example, {t: torch.randint(0, 10, (args.batch,)) for t in TASKS})
    losses = [nn.functional.cross_entropy] * len(TASKS)
    plain = resnet18()
    runs = {"plain": lambda: plain_block(plain, torch.optim.SGD(
        plain.parameters(), lr=1e-3, momentum=0.9), batch, args.steps)}
    for every in args.every:
        module = trace(resnet18(), {"image": example["image"][:4]},
                       task_paths={t: t for t in TASKS}).module
        shared = [layer for layer in inventory(module, TASKS) if layer.shared]
        step = MultiTaskStep(module, shared, tasks=TASKS, loss_fns=losses,
                             aggregate=aggregator("ew", len(TASKS)),
                             optimizer=torch.optim.SGD(module.parameters(), lr=1e-3, momentum=0.9))
        counter = ConflictCounter(step.buffer.blocks, len(TASKS), -0.1)
        runs[f"every {every}"] = (lambda step=step, counter=counter, every=every:
                                  reconfx_block(step, counter, batch, every, args.steps))
    names = list(runs)
    for name in names:
        runs[name]()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(args.repeats):
        order = names[round_ % len(names):] + names[:round_ % len(names)]
        for name in order:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    print(f"ResNet-18, batch {args.batch}, {args.steps} steps per block, {args.repeats} "
          f"rounds, {args.threads} threads")
    print("| variant | ms per step (median) | × plain (median of rounds) |")
    print("|---|---|---|")
    for name in names:
        ratios = [t / p for t, p in zip(times[name], times["plain"], strict=True)]
        per_step = 1e3 * statistics.median(times[name]) / args.steps
        print(f"| {name} | {per_step:.0f} | {statistics.median(ratios):.2f} |")


if __name__ == "__main__":
    main()
