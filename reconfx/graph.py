"""The graph form every pass works on: a GraphModule with one graph per training mode.

Tracing bakes in Python glue that reads ``self.training`` (an attention ``dropout_p``, a
``x * 0.5 if self.training else x``). Like torchvision's feature extractor, we keep the train
and the eval graph and switch on ``.train()``/``.eval()``; when both are the same (the common case)
one ``fx.Graph`` object serves both and switching costs nothing. The graph's placeholders are the
spec's inputs, in order; its output is a dict ``{task: tensor}`` in task order.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable, Collection, Container, Hashable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch
from torch import fx, nn

from reconfx.aten import plain_calls

__all__ = [
    "batched_streams", "Bound", "collapse", "CONTEXT_SWITCHES", "DualGraphModule", "in_place",
    "listing", "mutates", "named_tensors", "node_tasks", "output_node", "prune", "record",
    "region_call", "REGIONS", "reorder", "resolve", "same_graph", "targets", "task_outputs",
    "to_networkx", "TwoModes", "unique_parameters", "unit_order"
]


class TwoModes:
    """A module running ``train_graph`` in train mode and ``eval_graph`` in eval mode (one
    object when they are the same)."""

    train_graph: fx.Graph
    eval_graph: fx.Graph

    @property
    def dual(self) -> bool:
        return self.train_graph is not self.eval_graph

    def graphs(self) -> Iterator[tuple[str, fx.Graph]]:
        yield "train", self.train_graph
        if self.dual:
            yield "eval", self.eval_graph


class Bound(nn.Module):
    """A submodule whose code reads other submodules of the graph module it is installed in
    (a stream-batching region's body): that module binds it to itself."""

    def __init__(self) -> None:
        super().__init__()
        object.__setattr__(self, "_root", None)  # (not a submodule: that would be a cycle)

    def bind(self, root: nn.Module) -> None:
        object.__setattr__(self, "_root", root)


class DualGraphModule(TwoModes, fx.GraphModule):
    """A GraphModule holding a train graph and an eval graph over one set of submodules."""

    def __init__(self, root: nn.Module | dict[str, Any], train_graph: fx.Graph,
                 eval_graph: fx.Graph, class_name: str = "GraphModule"):
        super().__init__(root, train_graph, class_name)
        if eval_graph is not train_graph:
            for node in eval_graph.nodes:
                if node.op in ("get_attr", "call_module"):
                    _install(root, self, node.target)
        self.train_graph = train_graph
        self.eval_graph = eval_graph
        for sub in self.modules():
            if isinstance(sub, Bound):
                sub.bind(self)
        self.train(self.training)

    def __deepcopy__(self, memo: dict) -> DualGraphModule:
        """A copy with its own submodules and graphs (fx.GraphModule's own deepcopy would keep
        only the current graph)."""
        result = type(self).__new__(type(self))
        memo[id(self)] = result
        body = fx.graph_module._CodeOnlyModule(copy.deepcopy(self.__dict__, memo))
        result.__init__(body, body.__dict__["train_graph"], body.__dict__["eval_graph"],
                        type(self).__name__)
        return result

    def recompile(self) -> fx.graph.PythonCode:
        """fx's recompile, with aten calls generated in their plain spellings (they run faster;
        the graph itself keeps the aten ops)."""
        with plain_calls(self._graph):
            return super().recompile()

    def train(self, mode: bool = True) -> DualGraphModule:
        super().train(mode)
        graph = self.train_graph if mode else self.eval_graph
        if "train_graph" in self.__dict__ and self.graph is not graph:
            self.graph = graph  # the setter recompiles forward
        return self


def _install(root: nn.Module | dict[str, Any], gm: fx.GraphModule, target: str) -> None:
    if isinstance(root, dict):
        fx.graph_module._assign_attr(root[target], gm, target)
    else:
        fx.graph_module._copy_attr(root, gm, target)


REGIONS = "stream_regions"  # where stream batching (reconfx.batching) puts its region modules


def region_call(node: fx.Node) -> bool:
    """A call of a stream-batching region (reconfx.batching)."""
    return node.op == "call_module" and str(node.target).startswith(REGIONS + ".")


def batched_streams(graph: fx.Graph) -> bool:
    """The graph runs some task streams through shared layers together (reconfx.batching)."""
    return any(region_call(n) for n in graph.nodes)


def targets(module: fx.GraphModule) -> dict[str, Any]:
    """Every submodule, parameter or buffer a graph of ``module`` calls or reads, by target."""
    graphs = module.graphs() if isinstance(module, DualGraphModule) else [("", module.graph)]
    return {str(n.target): resolve(module, str(n.target)) for _mode, graph in graphs
            for n in graph.nodes if n.op in ("call_module", "get_attr")}


def resolve(module: nn.Module, target: str) -> Any:
    """The submodule, parameter or buffer at a dotted ``get_attr``/``call_module`` target."""
    obj: Any = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def listing(graph: fx.Graph) -> list[str]:
    """The graph one line per node, ``name = target(args)`` (for docs/passes.md and tests;
    fx's own ``print_tabular`` needs the tabulate package and shows less compactly)."""
    lines = []
    for node in graph.nodes:
        if node.op == "placeholder":
            lines.append(f"{node.name} = input")
        elif node.op == "output":
            lines.append(f"return {node.args[0]}")
        else:
            target = node.target if node.op != "call_function" else getattr(
                node.target, "__name__", str(node.target))
            args = [*map(str, node.args), *(f"{k}={v}" for k, v in node.kwargs.items())]
            lines.append(f"{node.name} = {target}({', '.join(args)})")
    return lines


def output_node(graph: fx.Graph) -> fx.Node:
    return next(n for n in reversed(graph.nodes) if n.op == "output")


def task_outputs(graph: fx.Graph) -> dict[str, fx.Node]:
    """The ``{task: node}`` dict the normalised graph returns."""
    return dict(output_node(graph).args[0])


def to_networkx(graph: fx.Graph) -> nx.DiGraph:
    g = nx.DiGraph()
    for node in graph.nodes:
        g.add_node(node)
        for user in node.users:
            g.add_edge(node, user)
    return g


def unit_order(graph: fx.Graph, unit: Callable[[fx.Node], Hashable],
               key: Callable[[Hashable], Any]) -> list[Hashable] | None:
    """The units of ``graph`` (``unit(node)`` groups nodes; a node may be its own unit) in a
    topological order of the dataflow between them, the smallest ``key`` first among the units
    ready; None when units depend on each other both ways (a unit is not convex)."""
    dag = nx.DiGraph()
    for n in graph.nodes:
        dag.add_node(unit(n))
        for user in n.users:
            if unit(user) != unit(n):
                dag.add_edge(unit(n), unit(user))
    try:
        return list(nx.lexicographical_topological_sort(dag, key=key))
    except nx.NetworkXUnfeasible:
        return None


def reorder(graph: fx.Graph, unit: Callable[[fx.Node], Hashable],
            key: Callable[[Hashable], Any]) -> bool:
    """Put ``graph``'s nodes in :func:`unit_order` (a unit's nodes together, in their order),
    placeholders first; False (and ``graph`` unchanged) when there is no such order."""
    nodes = list(graph.nodes)
    order = unit_order(graph, unit, key)
    if order is None:
        return False
    members: dict[Hashable, list[fx.Node]] = {}
    for n in nodes:
        members.setdefault(unit(n), []).append(n)
    output = output_node(graph)
    for u in order:
        for n in members[u]:
            if n.op not in ("placeholder", "output"):
                output.prepend(n)
    graph.lint()
    return True


@dataclass(frozen=True)
class _Part:
    """A partition's unit in :func:`collapse`'s ordering."""

    key: Hashable


Env = Callable[[fx.Node], fx.Node]  # a node of the old graph -> its value in the new one


def collapse(graph: fx.Graph, partitions: Mapping[Hashable, Collection[fx.Node]],
             call: Callable[[fx.Graph, Hashable, Env], Mapping[fx.Node, fx.Node]],
             copy: Callable[[fx.Graph, fx.Node, Env], fx.Node | None] | None = None) -> fx.Graph:
    """A new graph in which each partition (a set of ``graph``'s nodes) is one call and every
    other node is copied, in a topological order of the dataflow that keeps ``graph``'s order
    wherever it can: each unit as early as its inputs allow, ties by first appearance;
    placeholders first, the output last. ``call(new, key, env)`` writes partition ``key``'s call
    into ``new`` (its inputs' new values read through ``env``) and returns the new node that
    stands for each of its nodes read outside it; ``copy(new, node, env)`` writes any other
    node (default: ``new.node_copy``), returning None to drop it. The one mechanism behind
    tier 2's re-lifting of module calls, stream batching's regions and the emitter's calls of
    whole submodules (:mod:`reconfx.calls`); raises ValueError when
    a partition is not convex (an input of it depends on it). With ``fc2`` and ``fc3`` one
    partition ``block`` (tests/test_passes.py checks both listings)::

        Before:                  After:
        x = input                x = input
        fc1 = fc1(x)             fc1 = fc1(x)
        relu = relu(fc1)         relu = relu(fc1)
        fc2 = fc2(relu)          block = block(relu)
        fc3 = fc3(fc2)           a = a(block)
        a = a(fc3)               b = b(block)
        b = b(fc3)               return {'a': a, 'b': b}
        return {'a': a, 'b': b}
    """
    part_of = {n: _Part(key) for key, ns in partitions.items() for n in ns}

    def unit(n: fx.Node) -> Hashable:
        return part_of.get(n, n)

    first: dict[Hashable, int] = {}
    for i, n in enumerate(graph.nodes):
        first.setdefault(unit(n), i)
    order = unit_order(graph, unit, first.__getitem__)
    if order is None:
        raise ValueError("collapse: a partition is not convex (one of its inputs depends on it)")
    rank = {"placeholder": 0, "output": 2}
    order.sort(key=lambda u: 1 if isinstance(u, _Part) else rank.get(u.op, 1))  # (stable)
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for u in order:
        if isinstance(u, _Part):
            env.update(call(new, u.key, env.__getitem__))
        elif (made := (copy or _node_copy)(new, u, env.__getitem__)) is not None:
            env[u] = made
    new.lint()
    return new


def _node_copy(new: fx.Graph, node: fx.Node, env: Env) -> fx.Node:
    return new.node_copy(node, env)


def node_tasks(graph: fx.Graph) -> dict[fx.Node, frozenset[str]]:
    """For every node, the tasks whose output depends on it (reachability in the dataflow DAG)."""
    dag = to_networkx(graph)
    needed: dict[fx.Node, set[str]] = {n: set() for n in graph.nodes}
    for task, out in task_outputs(graph).items():
        if isinstance(out, fx.Node):
            for node in nx.ancestors(dag, out) | {out}:
                needed[node].add(task)
    # An in-place op whose result nothing uses is needed wherever the tensor it mutates is.
    for node in graph.nodes:
        target = node.args[0] if node.args else None
        if mutates(node) and not needed[node] and isinstance(target, fx.Node):
            for upstream in nx.ancestors(dag, node) | {node}:
                needed[upstream] |= needed[target]
    return {n: frozenset(t) for n, t in needed.items()}


# Calls that switch grad mode or autocast for the ops after them (tier 2 writes the enter and
# exit of ``torch.no_grad()``/``torch.autocast()`` blocks as these); no pass moves ops across them.
CONTEXT_SWITCHES = frozenset({torch._C._set_grad_enabled, torch.amp.autocast_mode._enter_autocast,
                              torch.amp.autocast_mode._exit_autocast})


def mutates(node: fx.Node) -> bool:
    """In-place ops (``x.mul_(2)``, ``x += y``, mutating aten ops): their effect is the point,
    whether or not anything uses their result."""
    if node.op == "call_method":
        return str(node.target).endswith("_") and not str(node.target).endswith("__")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return node.is_impure() or (name.endswith("_") and not name.endswith("__")) or (
            name.startswith("i") and getattr(operator, name, None) is node.target)
    return False


def in_place(node: fx.Node) -> bool:
    """An op that changes a tensor in place (random ops, which ``mutates`` also counts, only
    change the generator's state)."""
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target._schema.is_mutable
    name = str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", "")
    return mutates(node) and (name.endswith("_") and not name.endswith("__")
                              or getattr(operator, name, None) is node.target)


def prune(graph: fx.Graph) -> None:
    """Remove nodes nothing uses, keeping in-place ops (fx's own pass needs an owning module
    for call_module nodes and drops in-place method calls). A random op nothing uses is kept
    only where a random op that is kept follows it (its draws move the generator that one
    reads): an encoder–decoder tapped at its encoder's output loses its decoder, dropout and
    all."""
    later_random = False
    for node in reversed(list(graph.nodes)):
        random = _random(node)
        keep = node.users or node.op in ("placeholder", "output") or (
            mutates(node) and (later_random or not random))
        if keep:
            later_random = later_random or random
            continue
        graph.erase_node(node)


def _random(node: fx.Node) -> bool:
    """An aten op that draws from the random generator and changes nothing else."""
    target = node.target
    return (node.op == "call_function" and isinstance(target, torch._ops.OpOverload)
            and torch.Tag.nondeterministic_seeded in target.tags
            and not target._schema.is_mutable)


def same_graph(a: fx.Graph, b: fx.Graph) -> bool:
    """Two graphs compute the same thing (compared through their generated code)."""
    return a.python_code("self").src == b.python_code("self").src


def named_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer of ``module`` under each of its names (a tied tensor once per
    name)."""
    return [*module.named_parameters(remove_duplicate=False),
            *module.named_buffers(remove_duplicate=False)]


def unique_parameters(module: nn.Module) -> int:
    """Parameter count with tied parameters counted once."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def record(module: nn.Module, graph: fx.Graph, example: dict[str, Any],
           keep: Container[fx.Node] | None = None) -> dict[fx.Node, Any]:
    """Run ``graph`` on ``example`` (by placeholder name, under ``torch.no_grad``) and return
    the value of every node, or of the nodes in ``keep``."""
    values: dict[fx.Node, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if keep is None or n in keep:
                values[n] = out
            return out

    names = [str(n.target) for n in graph.nodes if n.op == "placeholder"]
    with torch.no_grad():
        Recorder(module, graph=graph).run(*(example[name] for name in names))
    return values
