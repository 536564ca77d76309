"""The profiling pass: per-task gradients of every candidate layer, and Recon's conflict counts.

Each step computes every task's gradient and writes the candidate layers' parts straight into
its row of a preallocated T×P buffer, which :class:`~reconfx.conflicts.ConflictCounter` turns
into statistics; the result is written to the graph's node metadata, ``conflicts.json`` and
``conflicts.png``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from reconfx.conflicts import BINS, ConflictCounter
from reconfx.errors import TrainingError
from reconfx.graph import DualGraphModule
from reconfx.layers import Layer
from reconfx.train.aggregators import aggregator
from reconfx.train.resume import Batches, Checkpoint, restore, snapshot
from reconfx.train.step import MultiTaskStep, block_layout


@dataclass
class Profile:
    """What the pass measured, per candidate layer (in graph order)."""

    layers: list[Layer]
    tasks: list[str]
    threshold: float
    steps: int
    counter: ConflictCounter

    def scores(self) -> Scores:
        names = [x.name for x in self.layers]
        valid = self.counter.valid.sum((1, 2)).tolist()
        return Scores(zip(names, self.counter.scores(), strict=True),
                      valid=dict(zip(names, map(int, valid), strict=True)))

    def unreached(self, index: int) -> list[str]:
        """Tasks whose gradient never reached layer ``index`` (zero or absent at every step):
        the graph says the task uses the layer, but its loss does not depend on it (detached,
        multiplied by zero, dead activations). Such a layer scores no conflicts with them."""
        if not self.steps:
            return []
        return [t for t, n in zip(self.tasks, self.counter.reached[index].tolist(), strict=True)
                if n == 0]

    def warnings(self) -> list[str]:
        found: dict[str, list[str]] = {}
        for i, layer in enumerate(self.layers):
            for task in self.unreached(i):
                found.setdefault(task, []).append(layer.name)
        return [f"task '{task}' sent no gradient to {len(names)} shared layer(s) in "
                f"{self.steps} profiling steps: {', '.join(names[:6])}"
                f"{' ...' if len(names) > 6 else ''} (its loss does not depend on them: "
                "detached, multiplied by zero or dead activations; they score no conflicts "
                "with it)" for task, names in found.items()]

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
                "tasks_without_gradient": self.unreached(i),
                "branched": layer.name in (branched or set()),
            })
        return {"threshold": self.threshold, "steps": self.steps, "tasks": self.tasks,
                "histogram_bins": [-1 + 2 * k / BINS for k in range(BINS + 1)],
                "layers": rows}


def profile(module: DualGraphModule, layers: list[Layer], tasks: list[str],
            loss_fns: list[Callable], batches: Batches, steps: int,
            threshold: float, optimizer: torch.optim.Optimizer,
            on_step: Callable[[int, list[float]], None] | None = None,
            record: Callable[[torch.Tensor], None] | None = None,
            aggregate: Callable[[torch.Tensor], torch.Tensor] | None = None,
            precision: str = "fp32", checkpoint: Checkpoint | None = None) -> Profile:
    """Joint training for ``steps`` steps with ``aggregate`` (default EW: the shared update is the
    sum of the task gradients, the gradient of the summed losses), counting conflicts on the way.

    ``record`` (tests) receives a copy of each step's T×P matrix; ``on_step`` the step number
    and the losses. With ``checkpoint``, the state is saved every ``checkpoint.every`` steps and
    a state loaded from it (phase ``profile``) is continued.
    """
    candidates = [layer for layer in layers if layer.shared]
    step = MultiTaskStep(module, candidates, tasks, loss_fns,
                         aggregate or aggregator("ew", len(tasks)), optimizer,
                         precision=precision, world=batches.world)
    counter = ConflictCounter(step.buffer.blocks, len(tasks), threshold,
                              step.buffer.matrix.device)

    def observe(matrix: torch.Tensor) -> torch.Tensor:
        if record is not None:
            record(matrix.clone())
        return counter.update(matrix)

    parts = {"model": module, "optimizer": optimizer, "counter": counter, "data": batches,
             "scaler": step.scaler}
    state = checkpoint.phase("profile") if checkpoint is not None else None
    first = restore(parts, state) if state is not None else 0
    module.train()
    stream = batches.forever()
    for index in range(first, steps):
        inputs, targets = next(stream)
        try:
            step(inputs, targets, observe, batches.share)
        except TrainingError as exc:
            raise exc.at(f"profiling step {index + 1} of {steps}") from None
        if on_step is not None:
            on_step(index, step.values)
        if checkpoint is not None and checkpoint.due(index + 1) and index + 1 < steps \
                and batches.world.main:
            checkpoint.save("profile", snapshot(parts, index + 1))
    return Profile(candidates, tasks, threshold, steps, counter)


def restore_profile(module: DualGraphModule, layers: list[Layer], tasks: list[str],
                    threshold: float, counter_state: dict) -> Profile:
    """The :class:`Profile` of a finished pass, rebuilt from its saved counters (a resumed
    ``run`` that had finished profiling)."""
    candidates = [layer for layer in layers if layer.shared]
    counter = ConflictCounter(block_layout(module, candidates).blocks, len(tasks), threshold)
    counter.load_state_dict(counter_state)
    return Profile(candidates, tasks, threshold, counter.steps, counter)


def annotate(module: DualGraphModule, layers: list[Layer], scores: Scores) -> None:
    """Write each layer's conflict score and valid observations into
    ``node.meta["reconfx"]["conflict"]`` of its nodes, where selection and the emitter read them
    (:func:`scores_in`); the scores come from a profile or an earlier one's conflicts.json."""
    by_target = {p: layer.name for layer in layers for p in layer.paths if layer.name in scores}
    for _mode, graph in module.graphs():
        for node in graph.nodes:
            name = by_target.get(str(node.target)) if node.op in ("call_module",
                                                                   "get_attr") else None
            if name is not None:
                node.meta.setdefault("reconfx", {})["conflict"] = {
                    "score": scores[name], "valid": scores.valid.get(name)}


def scores_in(module: DualGraphModule, layers: list[Layer]) -> Scores | None:
    """The conflict scores :func:`annotate` wrote on the layers' nodes, None when it wrote none."""
    found: dict[str, dict] = {}
    paths = {p: layer.name for layer in layers for p in layer.paths}
    for _mode, graph in module.graphs():
        for node in graph.nodes:
            conflict = node.meta.get("reconfx", {}).get("conflict")
            if conflict is not None and str(node.target) in paths:
                found.setdefault(paths[str(node.target)], conflict)
    if not found:
        return None
    return Scores({name: c["score"] for name, c in found.items()},
                  valid={name: c["valid"] for name, c in found.items() if c["valid"] is not None})


class Scores(dict):
    """Conflict score by layer name; ``valid``: the observations each score is out of (pairs
    of tasks x steps where both gradients reached the layer)."""

    def __init__(self, *args: Any, valid: dict[str, int] | None = None):
        super().__init__(*args)
        self.valid = valid or {}

    def describe(self, name: str) -> str:
        """``12 / 100`` (conflicts / valid observations), or the score alone."""
        if name not in self:
            return "–"
        return f"{self[name]} / {self.valid[name]}" if name in self.valid else str(self[name])


def load_scores(path: Path) -> Scores:
    data = json.loads(path.read_text())
    return Scores(((row["name"], int(row["score"])) for row in data["layers"]),
                  valid={row["name"]: int(row["valid_pairs"]) for row in data["layers"]
                         if "valid_pairs" in row})


def chart(result: Profile, branched: set[str], path: Path) -> None:
    """conflicts.png: per-layer S-conflict count in graph order, branched layers highlighted."""
    draw_chart([x.name for x in result.layers], result.counter.scores(), result.tasks,
               result.threshold, result.steps, branched, path)


def rebranched(data: dict, branched: set[str]) -> dict:
    """A ``conflicts.json``'s content with ``branched`` as its layers' flags (``compile``
    selecting other layers from an earlier profile)."""
    layers = [{**row, "branched": row["name"] in branched} for row in data["layers"]]
    return {**data, "layers": layers}


def chart_of(data: dict, path: Path) -> None:
    """conflicts.png from a ``conflicts.json``'s content."""
    rows = data["layers"]
    draw_chart([row["name"] for row in rows], [int(row["score"]) for row in rows],
               list(data["tasks"]), float(data["threshold"]), int(data["steps"]),
               {row["name"] for row in rows if row.get("branched")}, path)


def draw_chart(names: list[str], scores: list[int], tasks: list[str], threshold: float,
               steps: int, branched: set[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = ["tab:red" if n in branched else "tab:blue" for n in names]
    width = max(6.0, min(40.0, 0.22 * len(names)))
    fig, ax = plt.subplots(figsize=(width, 4.0))
    ax.bar(range(len(names)), scores, color=colors)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    pairs = math.comb(len(tasks), 2)
    ax.set_ylabel(f"conflicts (cos < {threshold})")
    ax.set_title(f"conflict score per shared layer over {steps} steps x {pairs} task "
                 "pair(s); red: branched")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
