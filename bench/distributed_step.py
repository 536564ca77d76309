"""Data-parallel cost, measured side by side in one run.

1. Communication volume per profiling/training step (computed from the real buffer layouts):
   what each rank all-reduces (the T×P per-task gradient buffer, aligned to 1,024 columns per
   layer, plus one flat bucket of losses and the other parameters' gradients) against plain
   data parallelism (one gradient per parameter), for a ResNet-18-sized CNN and a
   BERT-small-sized transformer at T = 2, 4, 8. With a ring all-reduce each rank sends and
   receives 2 (W - 1) / W times that volume.
2. Step time of ``MultiTaskStep`` (forward, T backward passes, all-reduce, statistics-free
   aggregation, optimiser step) on a fixed global batch: one process with 2 threads vs two
   gloo processes with 1 thread each (this machine has 2 cores), median of ``--repeats`` steps
   after 2 warm-up steps, steps started together (barrier) and timed on rank 0.

Run: ``.venv/bin/python bench/distributed_step.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from profile_overhead import bert_small, resnet18  # noqa: E402

from reconfx import distributed  # noqa: E402
from reconfx.layers import inventory  # noqa: E402
from reconfx.tracing import trace  # noqa: E402
from reconfx.train.aggregators import aggregator  # noqa: E402
from reconfx.train.step import MultiTaskStep, block_layout  # noqa: E402
from reconfx.zoo import SmallResNet  # noqa: E402

MODELS = {"ResNet-18-sized": resnet18, "BERT-small-sized": bert_small}


def traced(build, tasks: int):
    names = [f"t{i}" for i in range(tasks)]
    model, example, targets = build(names)
    module = trace(model, example, task_paths={t: t for t in names}, tier="auto").module.train()
    return module, names, example, targets


def volume(build, tasks: int) -> dict[str, float]:
    module, names, _example, _targets = traced(build, tasks)
    shared = [x for x in inventory(module, names) if x.shared]
    layout = block_layout(module, shared)
    in_buffer = {id(p) for p in layout.params}
    others = sum(p.numel() for p in module.parameters() if id(p) not in in_buffer)
    total = sum(p.numel() for p in module.parameters())
    floats = tasks * layout.width + others + tasks
    return {"shared": sum(p.numel() for p in layout.params), "total": total,
            "bytes": 4.0 * floats, "ddp": 4.0 * total}


def multidigits_resnet(tasks: list[str], batch: int):
    model = SmallResNet(num_classes=10, tasks=tasks)
    example = {"image": torch.randn(batch, 1, 12, 12)}
    targets = {t: torch.randint(0, 10, (batch,)) for t in tasks}
    return model, example, targets


def worker(rank: int, size: int, port: int, batch: int, tasks: int, repeats: int,
           out: str) -> None:
    if size > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, 2 // size))
    w = distributed.init("gloo", 120.0, "cpu") if size > 1 else distributed.World()
    torch.manual_seed(0)
    names = [f"t{i}" for i in range(tasks)]
    model, example, targets = multidigits_resnet(names, batch)
    module = trace(model, {"image": example["image"][:4]}, task_paths={t: t for t in names},
                   tier="fx").module.train()
    shared = [x for x in inventory(module, names) if x.shared]
    step = MultiTaskStep(module, shared, tasks=names, loss_fns=[F.cross_entropy] * tasks,
                         aggregate=aggregator("pcgrad", tasks),
                         optimizer=torch.optim.Adam(module.parameters()), world=w)
    start, stop = w.shard(batch)
    inputs = {"image": example["image"][start:stop]}
    mine = {t: y[start:stop] for t, y in targets.items()}
    times = []
    for index in range(repeats + 2):
        w.barrier()
        begin = time.perf_counter()
        step(inputs, mine, share=(stop - start) / batch)
        w.barrier()
        if index >= 2:
            times.append(time.perf_counter() - begin)
    if w.main:
        Path(out).write_text(json.dumps(statistics.median(times)))
    distributed.finish()


def timed(size: int, batch: int, tasks: int, repeats: int) -> float:
    with tempfile.TemporaryDirectory() as folder:
        out = str(Path(folder) / "t.json")
        if size == 1:
            worker(0, 1, 0, batch, tasks, repeats, out)
        else:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            torch.multiprocessing.start_processes(worker, (size, port, batch, tasks, repeats,
                                                           out), nprocs=size,
                                                  start_method="spawn")
        return float(json.loads(Path(out).read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, median of {args.repeats} steps")
    print("\n| model | T | shared params | all params | all-reduced per step MB | plain data "
          "parallel MB | ratio |")
    print("|---|---|---|---|---|---|---|")
    for name, build in MODELS.items():
        for tasks in (2, 4, 8):
            v = volume(build, tasks)
            print(f"| {name} | {tasks} | {v['shared'] / 1e6:.1f}M | {v['total'] / 1e6:.1f}M | "
                  f"{v['bytes'] / 2**20:.0f} | {v['ddp'] / 2**20:.0f} | "
                  f"{v['bytes'] / v['ddp']:.1f}x |", flush=True)
    print("\n| model | T | global batch | 1 process x 2 threads ms | 2 processes x 1 thread ms "
          "| 2 / 1 |")
    print("|---|---|---|---|---|---|")
    for tasks in (2, 4):
        for batch in (128, 512):
            one = timed(1, batch, tasks, args.repeats)
            two = timed(2, batch, tasks, args.repeats)
            print(f"| MultiDigits ResNet | {tasks} | {batch} | {1e3 * one:.1f} | "
                  f"{1e3 * two:.1f} | {two / one:.2f} |", flush=True)


if __name__ == "__main__":
    main()
