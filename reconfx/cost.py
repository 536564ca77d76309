"""What a selection costs before it is made.

Branching runs every shared op downstream of a branched layer once per task that uses it
instead of once. So the FLOP increase of a selection is exact from one count per node of the
unbranched graph: the sum, over the ops reachable from the selected layers, of (tasks using the
op - 1) x the op's FLOPs. One eval-mode forward on the example inputs counts them; stream
batching changes when the copies run, not how many FLOPs they take.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode

from reconfx.graph import DualGraphModule, node_tasks, task_outputs
from reconfx.layers import Layer
from reconfx.modes import preserved
from reconfx.tables import table
from reconfx.timing import Ratio, interleaved_ratio

__all__ = [
    "Cost", "CostModel", "flops", "latency", "Selection", "selection_lines"
]


class _Counting(fx.Interpreter):
    def __init__(self, module: DualGraphModule, graph: fx.Graph):
        super().__init__(module, graph=graph)
        self.flops: dict[fx.Node, int] = {}

    def run_node(self, n: fx.Node) -> Any:
        with FlopCounterMode(display=False) as counter:
            result = super().run_node(n)
        self.flops[n] = int(counter.get_total_flops())
        return result


@dataclass
class CostModel:
    """Per-node FLOPs of the unbranched eval graph and how many tasks use each node."""

    flops: dict[fx.Node, int]
    uses: dict[fx.Node, int]
    nodes: dict[str, list[fx.Node]]  # target (module or parameter path) -> the nodes using it
    total: int
    tasks: int

    @classmethod
    def measure(cls, module: DualGraphModule, example: dict[str, torch.Tensor]) -> CostModel:
        graph = module.eval_graph
        counting = _Counting(module, graph)
        with preserved(module), torch.enable_grad():  # (see flops below)
            module.eval()
            counting.run(*(example[str(n.target)] for n in graph.nodes if n.op == "placeholder"))
        nodes: dict[str, list[fx.Node]] = {}
        for node in graph.nodes:
            if node.op in ("call_module", "get_attr"):
                nodes.setdefault(str(node.target), []).append(node)
        return cls(counting.flops, {n: len(t) for n, t in node_tasks(graph).items()}, nodes,
                   sum(counting.flops.values()), len(task_outputs(graph)))

    def extra_flops(self, layers: Iterable[Layer]) -> int:
        """FLOPs the branched model runs on top of the original's, with ``layers`` branched."""
        return sum(self.added(n) for n in self.reach(layers))

    def reach(self, layers: Iterable[Layer]) -> set[fx.Node]:
        """The nodes that run once per task with ``layers`` branched: theirs and every node
        downstream."""
        start = [n for layer in layers for p in layer.paths for n in self.nodes.get(p, [])]
        seen: set[fx.Node] = set()
        while start:
            node = start.pop()
            if node not in seen:
                seen.add(node)
                start.extend(node.users)
        return seen

    def added(self, node: fx.Node) -> int:
        """The FLOPs ``node`` adds when it runs once per task its output reaches."""
        return max(self.uses.get(node, 1) - 1, 0) * self.flops.get(node, 0)

    def responsible(self, layers: list[Layer]) -> Layer | None:
        """The selected layer whose own branching costs the most FLOPs (the earliest one, where
        one branch point's cost contains the others')."""
        return max(layers, key=lambda layer: (self.extra_flops([layer]), -layer.order),
                   default=None)


@dataclass
class Selection:
    """The chosen layers with their scores and what branching them costs, for the terminal,
    the report and the early-branching warning."""

    layers: list[Layer]
    scores: dict[str, int] | None
    params: int  # the original's
    added_params: int
    flops: int  # the original's, per forward on the example inputs
    added_flops: int
    per_task_share: float  # of the original's FLOPs, what runs once per task after branching
    responsible: Layer | None
    budget: tuple[str, ...] = ()  # a budget policy's purchase (selection.budget_lines)

    @classmethod
    def of(cls, layers: list[Layer], scores: dict[str, int] | None, cost: CostModel,
           params: int, budget: tuple[str, ...] = ()) -> Selection:
        added = cost.extra_flops(layers)
        share = added / ((cost.tasks - 1) * cost.total) if cost.total and cost.tasks > 1 else 0.0
        return cls(layers, scores, params, (cost.tasks - 1) * sum(x.num_params for x in layers),
                   cost.total, added, share, cost.responsible(layers), budget)

    def score(self, layer: Layer) -> str:
        describe = getattr(self.scores, "describe", None)
        if describe is not None:
            return describe(layer.name)
        return str(self.scores[layer.name]) if self.scores and layer.name in self.scores else "–"

    def rows(self) -> list[list[str]]:
        return [[f"`{x.name}`", x.type, self.score(x), f"{x.num_params:,}", ", ".join(x.tasks)]
                for x in self.layers]

    HEADERS = ["layer", "type", "conflicts / observations", "params per copy", "tasks"]

    def summary(self) -> str:
        return (f"+{self.added_params:,} parameters (+{_percent(self.added_params, self.params)}"
                f"), +{self.added_flops:,} FLOPs per forward "
                f"(+{_percent(self.added_flops, self.flops)}); "
                f"{100 * self.per_task_share:.0f}% of the model runs once per task")

    def warning(self) -> str | None:
        """Where most of the network runs once per task, which layer makes it so; where a
        budget bought no layer, what the cheapest left out would have cost."""
        if self.budget and not self.layers:
            cheapest = f"; {self.budget[1]}" if len(self.budget) > 1 else ""
            return (f"{self.budget[0].partition(' bought')[0]} bought no layer, so nothing is "
                    f"branched{cheapest}: raise the budget, or narrow the candidates with "
                    "select.include/exclude")
        if self.per_task_share <= 0.5 or self.responsible is None:
            return None
        return (f"branching at '{self.responsible.name}' makes "
                f"{100 * self.per_task_share:.0f}% of the model's FLOPs run once per task "
                f"(+{_percent(self.added_flops, self.flops)} FLOPs for "
                f"+{_percent(self.added_params, self.params)} parameters): select later layers, "
                "or bound the cost with select.flops_budget")


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "n/a"


def selection_lines(selection: Selection, limit: int = 8) -> list[str]:
    """The terminal's short table of the chosen layers and the selection's cost."""

    if not selection.layers:
        return ["selected no layer", *(f"  {line}" for line in selection.budget)]
    rows = [[r[0].strip("`"), r[1], r[2], r[3]] for r in selection.rows()]
    shown = rows[:limit] + ([[f"... {len(rows) - limit} more", "", "", ""]]
                            if len(rows) > limit else [])
    return [f"selected {len(rows)} layer(s):",
            *("  " + line.rstrip() for line in table(Selection.HEADERS[:4], shown).splitlines()),
            f"  cost: {selection.summary()}", *(f"  {line}" for line in selection.budget)]


# -- measured on the built models ------------------------------------------------------------
@dataclass(frozen=True)
class Cost:
    """A model's parameters (tied ones once) and FLOPs of one eval-mode forward."""

    params: int
    flops: int


def flops(model: nn.Module, example: dict[str, torch.Tensor]) -> int:
    """FLOPs of one eval-mode forward. Counted with autograd on: the counter's module tracker
    hooks every module input that requires grad, and under ``torch.no_grad`` a view of a
    parameter handed to a submodule requires grad but has no gradient edge to hook."""
    with preserved(model), torch.enable_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(**example)
    return int(counter.get_total_flops())


def latency(original: nn.Module, compiled: nn.Module, example: dict[str, torch.Tensor],
            rounds: int = 15, budget_s: float = 1.5) -> Ratio:
    """The compiled model's eval-mode forward time over the original's on the example inputs,
    from interleaved rounds (:func:`reconfx.timing.interleaved_ratio`), fewer where they would
    take over ``budget_s`` (a report's figure, not a benchmark: at least 3 rounds, their
    number and quartiles reported with it)."""
    cuda = any(v.is_cuda for v in example.values() if isinstance(v, torch.Tensor))
    with preserved(original, compiled), torch.no_grad():
        original.eval()
        compiled.eval()
        return interleaved_ratio(lambda: original(**example), lambda: compiled(**example),
                                 rounds=rounds, cuda=cuda, budget_s=budget_s)
