"""The profiling pass: per-task gradients of every candidate layer, and Recon's conflict counts.

Each step computes every task's gradient and writes the candidate layers' parts straight into
its row of a preallocated T×P buffer. :class:`ConflictCounter` turns that buffer into statistics
without leaving the device: per layer, one T×T Gram matrix of the layer's column block (a
matmul), cosines from it, and fixed-size counters per task pair: S-conflicts (cos < S, strict),
valid observations (both gradients non-zero; a zero or absent gradient is neither conflict nor
agreement), strong conflicts (cos ≤ −0.01), the cosine sum and a histogram. Memory does not
grow with the number of steps and nothing is copied to the host inside a step.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from reconfx.errors import SpecError
from reconfx.graph import DualGraphModule, resolve
from reconfx.layers import Layer

BINS = 20  # cosine histogram over [-1, 1]
STRONG = -0.01  # "strongly conflicting": cos in (-0.01, -1] as in Recon's analysis


def layer_parameters(module: nn.Module, layer: Layer) -> list[nn.Parameter]:
    """The distinct parameters of a layer (tied ones once), in a fixed order."""
    found: dict[int, nn.Parameter] = {}
    for path in layer.modules:
        for p in module.get_submodule(path).parameters():
            found.setdefault(id(p), p)
    for target in layer.params:
        p = resolve(module, target)
        found.setdefault(id(p), p)
    return [p for p in found.values() if p.requires_grad]


class GradientBuffer:
    """A T×P matrix whose column blocks are the candidate layers' parameters."""

    def __init__(self, module: nn.Module, layers: list[Layer], tasks: int):
        self.params: list[nn.Parameter] = []
        self.blocks: list[tuple[int, int]] = []
        offset = 0
        for layer in layers:
            start = offset
            for p in layer_parameters(module, layer):
                self.params.append(p)
                offset += p.numel()
            self.blocks.append((start, offset))
        device = self.params[0].device if self.params else torch.device("cpu")
        self.matrix = torch.zeros(tasks, offset, device=device)
        self._spans = []
        start = 0
        for p in self.params:
            self._spans.append((start, start + p.numel()))
            start += p.numel()

    def write(self, task: int, grads: list[torch.Tensor | None]) -> None:
        row = self.matrix[task]
        for (a, b), g in zip(self._spans, grads, strict=True):
            if g is None:
                row[a:b].zero_()
            else:
                row[a:b].copy_(g.reshape(-1))

    def scatter(self, vector: torch.Tensor) -> None:
        """Set each parameter's ``.grad`` from one P-vector (the aggregated gradient)."""
        for (a, b), p in zip(self._spans, self.params, strict=True):
            p.grad = vector[a:b].view_as(p).clone()


class ConflictCounter:
    """Fixed-size per-layer, per-pair counters updated from the T×P gradient matrix."""

    def __init__(self, blocks: list[tuple[int, int]], tasks: int, threshold: float,
                 device: torch.device | str = "cpu"):
        self.blocks = blocks
        self.threshold = threshold
        layers = len(blocks)
        pairs = torch.triu(torch.ones(tasks, tasks, dtype=torch.bool, device=device), 1)
        self.pairs = pairs
        self.conflicts = torch.zeros(layers, tasks, tasks, dtype=torch.int64, device=device)
        self.valid = torch.zeros_like(self.conflicts)
        self.strong = torch.zeros_like(self.conflicts)
        self.cos_sum = torch.zeros(layers, tasks, tasks, dtype=torch.float64, device=device)
        self.hist = torch.zeros(layers, BINS, dtype=torch.int64, device=device)
        self.steps = 0

    def update(self, grads: torch.Tensor) -> None:
        """One step: ``grads`` is the T×P per-task gradient matrix."""
        for index, (a, b) in enumerate(self.blocks):
            block = grads[:, a:b].float()
            gram = block @ block.T
            norms = gram.diagonal().clamp_min(0).sqrt()
            valid = (norms[:, None] > 0) & (norms[None, :] > 0) & self.pairs
            cos = gram / (norms[:, None] * norms[None, :]).clamp_min(torch.finfo(gram.dtype).tiny)
            self.conflicts[index] += (valid & (cos < self.threshold)).long()
            self.strong[index] += (valid & (cos <= STRONG)).long()
            self.valid[index] += valid.long()
            self.cos_sum[index] += torch.where(valid, cos, 0).double()
            bins = ((cos.clamp(-1, 1) + 1) * (BINS / 2)).long().clamp_(0, BINS - 1)
            self.hist[index].scatter_add_(0, bins[valid], torch.ones_like(bins[valid]))
        self.steps += 1

    def scores(self) -> list[int]:
        return self.conflicts.sum((1, 2)).tolist()


@dataclass
class Profile:
    """What the pass measured, per candidate layer (in graph order)."""

    layers: list[Layer]
    tasks: list[str]
    threshold: float
    steps: int
    counter: ConflictCounter

    def scores(self) -> dict[str, int]:
        return dict(zip((x.name for x in self.layers), self.counter.scores(), strict=True))

    def to_json(self, branched: set[str] | None = None) -> dict:
        c = self.counter
        rows = []
        for i, layer in enumerate(self.layers):
            valid = int(c.valid[i].sum())
            rows.append({
                "name": layer.name, "type": layer.type, "params": layer.num_params,
                "paths": list(layer.paths), "score": int(c.conflicts[i].sum()),
                "valid_pairs": valid,
                "mean_cos": float(c.cos_sum[i].sum()) / valid if valid else None,
                "strong_share": int(c.strong[i].sum()) / valid if valid else None,
                "histogram": c.hist[i].tolist(),
                "pairs": {f"{self.tasks[a]}/{self.tasks[b]}": {
                    "conflicts": int(c.conflicts[i, a, b]), "valid": int(c.valid[i, a, b])}
                    for a in range(len(self.tasks)) for b in range(a + 1, len(self.tasks))},
                "branched": layer.name in (branched or set()),
            })
        return {"threshold": self.threshold, "steps": self.steps, "tasks": self.tasks,
                "histogram_bins": [-1 + 2 * k / BINS for k in range(BINS + 1)],
                "layers": rows}


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cross_entropy": lambda out, y: F.cross_entropy(out.flatten(0, -2) if out.dim() > 2 else out,
                                                    y.flatten() if out.dim() > 2 else y),
    "mse": lambda out, y: F.mse_loss(out, y.to(out.dtype).view_as(out)),
    "l1": lambda out, y: F.l1_loss(out, y.to(out.dtype).view_as(out)),
    "bce": lambda out, y: F.binary_cross_entropy_with_logits(out, y.to(out.dtype).view_as(out)),
}


def loss_functions(tasks: list, where: str) -> list[Callable]:
    fns = []
    for i, task in enumerate(tasks):
        if task.loss is None:
            raise SpecError("profiling needs a loss for every task",
                            where=f"{where}: tasks[{i}].loss", fix=f"one of {', '.join(LOSSES)}")
        if task.loss not in LOSSES:
            raise SpecError(f"unknown loss '{task.loss}'", where=f"{where}: tasks[{i}].loss",
                            fix=f"one of {', '.join(LOSSES)}")
        fns.append(LOSSES[task.loss])
    return fns


def make_optimizer(params: list[nn.Parameter], name: str, lr: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    return cls(params, lr=lr, weight_decay=weight_decay)


def profile(module: DualGraphModule, layers: list[Layer], tasks: list[str],
            loss_fns: list[Callable], batches: Iterator[tuple[dict, dict]], steps: int,
            threshold: float, optimizer: torch.optim.Optimizer,
            on_step: Callable[[int, torch.Tensor], None] | None = None,
            record: Callable[[torch.Tensor], None] | None = None) -> Profile:
    """Joint training for ``steps`` steps with equal weights (EW: the shared update is the sum of
    the task gradients, i.e. the gradient of the summed losses), counting conflicts on the way.

    ``record`` (tests) receives each step's T×P matrix; ``on_step`` the step's loss vector.
    """
    candidates = [layer for layer in layers if layer.shared]
    buffer = GradientBuffer(module, candidates, len(tasks))
    counter = ConflictCounter(buffer.blocks, len(tasks), threshold, buffer.matrix.device)
    in_buffer = {id(p) for p in buffer.params}
    others = [p for p in module.parameters() if p.requires_grad and id(p) not in in_buffer]
    module.train()
    for step in range(steps):
        inputs, targets = next(batches)
        outputs = module(**inputs)
        losses = torch.stack([fn(outputs[t], targets[t]) for t, fn in zip(tasks, loss_fns,
                                                                             strict=True)])
        optimizer.zero_grad(set_to_none=True)
        other_grads = [torch.zeros_like(p) for p in others]
        for t in range(len(tasks)):
            grads = torch.autograd.grad(losses[t], buffer.params + others,
                                        retain_graph=t < len(tasks) - 1, allow_unused=True)
            buffer.write(t, list(grads[:len(buffer.params)]))
            for acc, g in zip(other_grads, grads[len(buffer.params):], strict=True):
                if g is not None:
                    acc += g
        if record is not None:
            record(buffer.matrix.clone())
        counter.update(buffer.matrix)
        buffer.scatter(buffer.matrix.sum(0))
        for p, g in zip(others, other_grads, strict=True):
            p.grad = g
        optimizer.step()
        if on_step is not None:
            on_step(step, losses.detach())
    return Profile(candidates, tasks, threshold, steps, counter)


def annotate(module: DualGraphModule, result: Profile) -> None:
    """Write each layer's statistics into ``node.meta["reconfx"]["conflict"]`` of its nodes."""
    data = {row["name"]: {k: row[k] for k in ("score", "valid_pairs", "mean_cos",
                                              "strong_share")}
            for row in result.to_json()["layers"]}
    by_target = {p: layer.name for layer in result.layers for p in layer.paths}
    for _mode, graph in module.graphs():
        for node in graph.nodes:
            name = by_target.get(str(node.target)) if node.op in ("call_module",
                                                                   "get_attr") else None
            if name is not None:
                node.meta.setdefault("reconfx", {})["conflict"] = data[name]


def load_scores(path: Path) -> dict[str, int]:
    data = json.loads(path.read_text())
    return {row["name"]: int(row["score"]) for row in data["layers"]}


def chart(result: Profile, branched: set[str], path: Path) -> None:
    """conflicts.png: per-layer S-conflict count in graph order, branched layers highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [x.name for x in result.layers]
    scores = result.counter.scores()
    colors = ["tab:red" if n in branched else "tab:blue" for n in names]
    width = max(6.0, min(40.0, 0.22 * len(names)))
    fig, ax = plt.subplots(figsize=(width, 4.0))
    ax.bar(range(len(names)), scores, color=colors)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    pairs = math.comb(len(result.tasks), 2)
    ax.set_ylabel(f"conflicts (cos < {result.threshold})")
    ax.set_title(f"conflict score per shared layer over {result.steps} steps x {pairs} task "
                 "pair(s); red: branched")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
