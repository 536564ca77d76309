"""Layer inventory: which parameterised units the graph uses, and which tasks depend on each.

A layer (docs/design.md) is a module called by a ``call_module`` node, with every parameter of its
subtree, or, for parameters the graph reads directly (``get_attr``), the parameters one module
owns directly. Layers that share a ``Parameter`` (a tied embedding and output projection) form one
group: they are branched together and their parameters are counted once.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass

import networkx as nx
from torch import nn

from reconfx.graph import DualGraphModule, batched_streams, node_tasks, resolve

__all__ = [
    "inventory", "is_glob", "Layer", "match_layers", "path_matches"
]


@dataclass(frozen=True)
class Layer:
    """One branchable unit. ``name`` is its first path; ``modules``/``params`` are the call_module
    targets and directly read parameter paths it covers (several when weights are tied)."""

    name: str
    type: str
    modules: tuple[str, ...]
    params: tuple[str, ...]
    num_params: int
    tasks: tuple[str, ...]
    order: int

    @property
    def shared(self) -> bool:
        return len(self.tasks) > 1

    @property
    def paths(self) -> tuple[str, ...]:
        return self.modules + self.params

    def matches(self, pattern: str) -> bool:
        """``pattern`` names one of the layer's paths (see :func:`path_matches`)."""
        return any(path_matches(p, pattern) for p in (self.name, *self.paths))


def is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def path_matches(path: str, pattern: str) -> bool:
    """``pattern`` is ``path``, a glob matching it, or a module holding it (``encoder.layer.5``
    stands for everything under it)."""
    return (path == pattern or fnmatch.fnmatchcase(path, pattern)
            or bool(pattern) and not is_glob(pattern) and path.startswith(pattern + "."))


def _owner(target: str) -> str:
    return target.rpartition(".")[0]


def _inside(path: str, prefix: str) -> bool:
    return prefix == "" or path == prefix or path.startswith(prefix + ".")


def inventory(module: DualGraphModule, task_order: Iterable[str]) -> list[Layer]:
    """Every layer the graphs use, in graph order, with the tasks that depend on it."""
    task_order = list(task_order)
    uses: dict[str, set[str]] = {}  # unit key -> tasks
    first: dict[str, int] = {}
    unit_modules: dict[str, set[str]] = {}
    unit_params: dict[str, set[str]] = {}
    for _mode, graph in module.graphs():
        if batched_streams(graph):
            # Stream batching (eval graph only) joins the streams; the train graph, which runs
            # them one by one, has the same layers and says which tasks use each.
            continue
        tasks_of = node_tasks(graph)
        leaf_calls = {str(n.target) for n in graph.nodes if n.op == "call_module"}
        for index, node in enumerate(graph.nodes):
            if node.op == "call_module":
                target = str(node.target)
                if not any(True for _ in module.get_submodule(target).parameters()):
                    continue
                key = target
                unit_modules.setdefault(key, set()).add(target)
            elif node.op == "get_attr":
                target = str(node.target)
                if not isinstance(resolve(module, target), nn.Parameter):
                    continue
                caller = next((c for c in leaf_calls if _inside(target, c)), None)
                key = caller if caller is not None else f"{_owner(target)}#params"
                if caller is None:
                    unit_params.setdefault(key, set()).add(target)
            else:
                continue
            uses.setdefault(key, set()).update(tasks_of[node])
            first.setdefault(key, index)
    # Tie units that share a Parameter object into one layer.
    ids: dict[str, set[int]] = {}
    for key in uses:
        tensors = [p for m in unit_modules.get(key, ())
                   for p in module.get_submodule(m).parameters()]
        tensors += [resolve(module, t) for t in unit_params.get(key, ())]
        ids[key] = {id(t) for t in tensors}
    ties = nx.Graph()
    ties.add_nodes_from(uses)
    by_param: dict[int, str] = {}
    for key in sorted(uses, key=first.__getitem__):
        for pid in ids[key]:
            if pid in by_param:
                ties.add_edge(by_param[pid], key)
            by_param.setdefault(pid, key)
    numel = _numel_by_id(module)
    layers = []
    for group in nx.connected_components(ties):
        keys = sorted(group, key=first.__getitem__)
        modules = tuple(m for k in keys for m in sorted(unit_modules.get(k, ())))
        params = tuple(p for k in keys for p in sorted(unit_params.get(k, ())))
        all_ids = set().union(*(ids[k] for k in keys))
        tasks = set().union(*(uses[k] for k in keys))
        name = _stem(modules, task_order) or (modules[0] if modules else
                                              (_owner(params[0]) or "root"))
        kind = type(module.get_submodule(modules[0])).__name__ if modules else "parameters"
        layers.append(Layer(name, kind, modules, params, sum(numel[i] for i in all_ids),
                            tuple(t for t in task_order if t in tasks), first[keys[0]]))
    return sorted(layers, key=lambda layer: layer.order)


def _stem(modules: tuple[str, ...], tasks: list[str]) -> str | None:
    """``X`` when the modules are ``X.<task>`` copies of one module for several tasks (a
    normalisation layer given per-task statistics but shared parameters), else None."""
    stems = {m.rpartition(".")[0] for m in modules}
    suffixes = [m.rpartition(".")[2] for m in modules]
    if len(modules) > 1 and len(stems) == 1 and all(x in tasks for x in suffixes):
        return stems.pop()
    return None


def _numel_by_id(module: nn.Module) -> dict[int, int]:
    return {id(p): p.numel() for p in module.parameters()}


def match_layers(layers: list[Layer], patterns: list[str]) -> tuple[list[Layer], list[str]]:
    """Layers matching any pattern (exact path or glob), and the patterns that matched nothing."""
    chosen = [layer for layer in layers if any(layer.matches(p) for p in patterns)]
    unmatched = [p for p in patterns if not any(layer.matches(p) for layer in layers)]
    return chosen, unmatched
