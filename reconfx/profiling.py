"""The profiling pass: per-task gradients of every candidate layer, and Recon's conflict counts.

Each step computes every task's gradient and writes the candidate layers' parts straight into
its row of a preallocated T×P buffer, which :class:`~reconfx.conflicts.ConflictCounter` turns
into statistics; the result is written to the graph's node metadata, ``conflicts.json`` and
``conflicts.png``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from reconfx.conflicts import BINS, ConflictCounter
from reconfx.facts import Conflict, facts, note
from reconfx.graph import DualGraphModule
from reconfx.layers import Layer
from reconfx.spec import ScheduleSpec, TrainSpec
from reconfx.train.aggregators import aggregator
from reconfx.train.loop import fit
from reconfx.train.resume import Batches, Checkpoint
from reconfx.train.step import block_layout

__all__ = [
    "annotate_scores", "chart", "Profile", "profile", "rebranched", "restore_profile", "Scores",
    "scores_in", "scores_of", "strong_shares"
]


@dataclass(frozen=True)
class Profile:
    """What the pass measured, per candidate layer (in graph order)."""

    layers: list[Layer]
    tasks: list[str]
    threshold: float
    steps: int
    counter: ConflictCounter
    rows: list[dict[str, float]] = field(default_factory=list)  # each step's lr and task losses

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


def profile(module: DualGraphModule, layers: list[Layer], *, tasks: list[str],
            loss_fns: list[Callable], batches: Batches, steps: int, threshold: float,
            settings: TrainSpec, aggregate: Callable[[torch.Tensor], torch.Tensor] | None = None,
            progress: bool = False, checkpoint: Checkpoint | None = None,
            record: Callable[[torch.Tensor], None] | None = None) -> Profile:
    """Joint training of ``module`` for ``steps`` steps with ``aggregate`` (default EW: the
    shared update is the sum of the task gradients, the gradient of the summed losses), counting
    conflicts of the shared layers on every step: the training loop
    (:func:`reconfx.train.loop.fit`) bounded by steps, with ``settings``' optimiser, seed and
    precision at a constant learning rate, and no validation.

    ``record`` (tests) receives a copy of each step's T×P matrix. With ``checkpoint``, the state
    is saved every ``checkpoint.every`` steps and a state loaded from it (phase ``profiling``)
    is continued.
    """
    candidates = [layer for layer in layers if layer.shared]
    constant = settings.model_copy(update={"schedule": ScheduleSpec(), "conflict_every": 1,
                                           "keep": "last", "early_stopping": None})
    fitted = fit(module, shared=candidates, tasks=tasks, loss_fns=loss_fns, metrics=[],
                 aggregate=aggregate or aggregator("ew", len(tasks)), batches=batches,
                 val_data=None, settings=constant, progress=progress, threshold=threshold,
                 resume=checkpoint, steps=steps, phase="profiling", record=record)
    assert fitted.conflicts is not None  # (a threshold was given)
    return Profile(candidates, tasks, threshold, steps, fitted.conflicts, fitted.steps)


def restore_profile(module: DualGraphModule, layers: list[Layer], tasks: list[str],
                    threshold: float, counter_state: dict) -> Profile:
    """The :class:`Profile` of a finished pass, rebuilt from its saved counters (a resumed
    ``run`` that had finished profiling)."""
    candidates = [layer for layer in layers if layer.shared]
    counter = ConflictCounter(block_layout(module, candidates).blocks, len(tasks), threshold)
    counter.load_state_dict(counter_state)
    return Profile(candidates, tasks, threshold, counter.steps, counter)


def annotate_scores(module: DualGraphModule, layers: list[Layer], scores: Scores) -> None:
    """Write each layer's conflict score and valid observations into
    :class:`~reconfx.facts.NodeFacts` of its nodes, where selection and the emitter read them
    (:func:`scores_in`); the scores come from a profile or an earlier one's conflicts.json."""
    by_target = {p: layer.name for layer in layers for p in layer.paths if layer.name in scores}
    for _mode, graph in module.graphs():
        for node in graph.nodes:
            name = by_target.get(str(node.target)) if node.op in ("call_module",
                                                                   "get_attr") else None
            if name is not None:
                note(node, conflict=Conflict(scores[name], scores.valid.get(name)))


def scores_in(module: DualGraphModule, layers: list[Layer]) -> Scores | None:
    """The conflict scores :func:`annotate_scores` wrote on the layers' nodes, None when it wrote
    none."""
    found: dict[str, Conflict] = {}
    paths = {p: layer.name for layer in layers for p in layer.paths}
    for _mode, graph in module.graphs():
        for node in graph.nodes:
            conflict = facts(node).conflict
            if conflict is not None and str(node.target) in paths:
                found.setdefault(paths[str(node.target)], conflict)
    if not found:
        return None
    return Scores({name: c.score for name, c in found.items()},
                  valid={name: c.valid for name, c in found.items() if c.valid is not None})


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


def scores_of(data: Any) -> Scores:
    """The scores a ``conflicts.json`` holds (parsed); ValueError when it is not such a file."""
    try:
        rows = data["layers"]
        return Scores(((str(row["name"]), int(row["score"])) for row in rows),
                      valid={str(row["name"]): int(row["valid_pairs"]) for row in rows
                             if "valid_pairs" in row})
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError("no list of layers with names and scores") from exc


def strong_shares(result: Profile, counter: ConflictCounter, shared: list[str]) -> dict | None:
    """The share of strongly conflicting gradient pairs (cos <= -0.01) in the layers that stay
    shared after branching (``shared``, as ``counter`` orders them): while profiling the
    unbranched model and while training the branched one; None when either saw none."""
    names = set(shared)
    rows = [i for i, layer in enumerate(result.layers) if layer.name in names]
    valid = int(result.counter.valid[rows].sum())
    after_valid = int(counter.valid.sum())
    if not valid or not after_valid:
        return None
    return {"layers": len(shared), "profile_steps": result.steps, "train_steps": counter.steps,
            "before": int(result.counter.strong[rows].sum()) / valid,
            "after": int(counter.strong.sum()) / after_valid}


def rebranched(data: dict, branched: set[str]) -> dict:
    """A ``conflicts.json``'s content with ``branched`` as its layers' flags (``compile``
    selecting other layers from an earlier profile; the shares after an earlier branching no
    longer apply)."""
    layers = [{**row, "branched": row["name"] in branched} for row in data["layers"]]
    return {k: v for k, v in data.items() if k != "after_branching"} | {"layers": layers}


def chart(data: dict, path: Path) -> None:
    """conflicts.png from a ``conflicts.json``'s content: per shared layer (graph order) the
    share of valid observations in which two tasks' gradients conflict (cos < S), one panel per
    task pair (a heatmap beyond three pairs), branched layers in red; beside it, with
    ``after_branching``, the strong-conflict share before and after branching."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows, after = data["layers"], data.get("after_branching")
    names = [row["name"] for row in rows]
    branched = [bool(row.get("branched")) for row in rows]
    pairs = list(rows[0]["pairs"]) if rows else []
    share = [[100 * row["pairs"][p]["conflicts"] / row["pairs"][p]["valid"]
              if row["pairs"][p]["valid"] else math.nan for row in rows] for p in pairs]
    heatmap = len(pairs) > 3
    panels = 1 if heatmap else max(len(pairs), 1)
    width = max(7.0, min(40.0, 0.3 * len(names) + 2.5)) + (3.0 if after else 0.0)
    fig = plt.figure(figsize=(width, 2.6 * panels + 2.2), layout="constrained")
    grid = fig.add_gridspec(panels, 2 if after else 1,
                            width_ratios=[width - 3.0, 3.0] if after else [1])
    axes = [fig.add_subplot(grid[i, 0]) for i in range(panels)]
    red, blue = "tab:red", "tab:blue"
    if heatmap:
        image = axes[0].imshow(share, aspect="auto", cmap="Reds", vmin=0, vmax=100)
        axes[0].set_yticks(range(len(pairs)), pairs, fontsize=8)
        fig.colorbar(image, ax=axes[0], label=f"conflict share (%, cos < {data['threshold']})")
    else:
        for ax, pair, values in zip(axes, pairs, share, strict=True):
            ax.bar(range(len(names)), values, color=[red if b else blue for b in branched])
            ax.set_ylim(0, 125)  # (room for the legend above the bars)
            ax.set_yticks(range(0, 101, 20))
            ax.set_ylabel(f"% of observations\nwith cos < {data['threshold']}", fontsize=8)
            ax.set_title(f"tasks {pair}", fontsize=9, loc="left")
    for ax in axes:
        ax.set_xticks(range(len(names)), names if ax is axes[-1] else [], rotation=90,
                      fontsize=8)
    for label, is_branched in zip(axes[-1].get_xticklabels(), branched, strict=True):
        label.set_color(red if is_branched else "black")
    if heatmap:
        axes[-1].set_xlabel("shared layers in graph order; red names: branched (one copy per "
                            "task)", fontsize=8)
    else:
        axes[0].legend(handles=[Patch(color=red, label="branched (one copy per task)"),
                                Patch(color=blue, label="shared")], fontsize=8,
                       loc="upper right", ncols=2)
    fig.suptitle(f"Gradient conflicts per shared layer over {data['steps']} profiling steps",
                 fontsize=11)
    if after:
        side = fig.add_subplot(grid[:, 1])
        values = [100 * after["before"], 100 * after["after"]]
        side.bar([0, 1], values, color=["tab:gray", red])
        side.set_xticks([0, 1], ["profiling\n(unbranched)", "training\n(branched)"], fontsize=8)
        for x, value in enumerate(values):
            side.text(x, value, f"{value:.1f}%", ha="center", va="bottom", fontsize=8)
        side.set_ylim(0, max(values + [1.0]) * 1.25)
        side.set_title(f"strong conflicts (cos <= -0.01)\nin the {after['layers']} layers "
                       "left shared", fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)
