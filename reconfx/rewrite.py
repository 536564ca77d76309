"""The branching pass: everything from the selected layers on runs as one stream per task.

A node is task-variant if it uses a branched layer or any of its inputs is task-variant. Each
task-variant node is cloned once per task whose output depends on it; clones use that task's copy
of each branched layer and share every other module (docs/design.md, "Branching"). A branched
module at path ``p`` becomes a container of per-task copies, ``p.<task>``, each an exact copy of
the original weights. With ``norm_stats: per_task``, a shared normalisation module that only sees
task streams gets one set of running buffers per task while its affine parameters stay shared.

>>> branched = branch(traced.module, [layers[3]], ["left", "right"])     # doctest: +SKIP
>>> branched.module.layer1[0].conv1.left                                 # doctest: +SKIP
Conv2d(16, 16, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False)
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from reconfx.facts import facts, note
from reconfx.graph import (
    DualGraphModule,
    named_tensors,
    node_tasks,
    prune,
    resolve,
    targets,
    task_outputs,
)
from reconfx.kinds import has_running_stats
from reconfx.layers import Layer

__all__ = [
    "branch", "Branched", "variant_nodes"
]


@dataclass(frozen=True)
class Branched:
    """The compiled model and what the pass did to it."""

    module: DualGraphModule
    layers: list[Layer]
    tasks: list[str]
    copies: dict[str, dict[str, list[str]]]  # layer -> task -> parameter names of its copy
    per_task_norms: list[str] = field(default_factory=list)
    shared_norms: list[str] = field(default_factory=list)  # also called before a branch point

    @property
    def added_params(self) -> int:
        return (len(self.tasks) - 1) * sum(layer.num_params for layer in self.layers)

    @property
    def containers(self) -> set[str]:
        """Paths of the modules replaced by per-task containers (``<path>.<task>``)."""
        return {p for layer in self.layers for p in layer.paths} | set(self.per_task_norms)

    def original_name(self, name: str) -> str:
        """The original model's name of a compiled tensor (``fc.left.weight`` -> ``fc.weight``)."""
        for path in self.containers:
            if name.startswith(path + "."):
                task, _, rest = name[len(path) + 1:].partition(".")
                if task in self.tasks:
                    return f"{path}.{rest}" if rest else path
        return name


def variant_nodes(graph: fx.Graph, modules: set[str], params: set[str]) -> set[fx.Node]:
    """The task-variant nodes: those that call a module of ``modules``, read a tensor of
    ``params`` or of one of ``modules``, or take a task-variant input."""
    variant: set[fx.Node] = set()
    for node in graph.nodes:
        if (node.op == "call_module" and node.target in modules) or (
            node.op == "get_attr" and (node.target in params or _owner(node, modules))
        ) or any(arg in variant for arg in node.all_input_nodes):
            variant.add(node)
    return variant


def _owner(node: fx.Node, modules: set[str]) -> str | None:
    """The module of ``modules`` whose tensor a ``get_attr`` reads (``fc.weight`` used directly
    as well as through calls of ``fc``), else None."""
    return _owner_of(str(node.target), modules) if node.op == "get_attr" else None


def _owner_of(target: str, modules: set[str]) -> str | None:
    return next((m for m in modules if target.startswith(m + ".")), None)


def _task_target(node: fx.Node, per_task: set[str], branched_params: set[str], task: str
                 ) -> str | None:
    """What a task's clone of ``node`` calls or reads: the task's copy of a branched module or
    parameter (``fc.<task>``, ``fc.<task>.weight``); None when it keeps its target."""
    if node.op in ("call_module", "get_attr") and (
            node.target in per_task or node.target in branched_params):
        return f"{node.target}.{task}"
    owner = _owner(node, per_task)
    return None if owner is None else f"{owner}.{task}{str(node.target)[len(owner):]}"


def branch(traced: DualGraphModule, layers: list[Layer], tasks: list[str],
           norm_stats: str = "per_task") -> Branched:
    """Branch ``layers`` (from :func:`reconfx.layers.inventory`) into per-task copies. On
    docs/passes.md's two-head model with ``fc2`` chosen (listings by
    :func:`reconfx.graph.listing`; tests/test_passes.py checks both)::

        Before:                          After:
        x = input                        x = input
        fc1 = fc1(x)                     fc1 = fc1(x)
        relu = relu(fc1)                 relu = relu(fc1)
        fc2 = fc2(relu)                  fc2 = fc2.a(relu)
        fc3 = fc3(fc2)                   fc2_1 = fc2.b(relu)
        a = a(fc3)                       fc3 = fc3(fc2)
        b = b(fc3)                       fc3_1 = fc3(fc2_1)
        return {'a': a, 'b': b}          a = a(fc3)
                                         b = b(fc3_1)
                                         return {'a': a, 'b': b}
    """
    # One deepcopy over everything the graphs reference keeps ties between modules; the
    # tensors stay shared with ``traced`` (a second copy of a large model's weights would not
    # fit beside it), and only the branched layers' tensors are copied, once per task, below.
    referenced = targets(traced)
    objs = copy.deepcopy(referenced, {id(t): t for t in _tensors(referenced.values())})
    branched_modules = {m for layer in layers for m in layer.modules}
    branched_params = {p for layer in layers for p in layer.params}
    for layer in layers:
        members = {path: objs.pop(path) for path in layer.paths}
        # tensors of a branched module the graph also reads directly: each task reads its copy's
        inner = {t: owner for t in list(objs) if (owner := _owner_of(t, set(layer.modules)))}
        for target in inner:
            del objs[target]
        for task in layer.tasks:
            for path, obj in copy.deepcopy(members).items():
                objs[f"{path}.{task}"] = obj
            for target, owner in inner.items():
                rest = target[len(owner) + 1:]
                objs[f"{owner}.{task}.{rest}"] = resolve(objs[f"{owner}.{task}"], rest)

    graphs = dict(traced.graphs())
    variant = {mode: variant_nodes(g, branched_modules, branched_params)
               for mode, g in graphs.items()}
    tasks_of = {mode: node_tasks(g) for mode, g in graphs.items()}
    per_task_norms, shared_norms = [], []
    if norm_stats == "per_task":
        per_task_norms, shared_norms = _norms_seeing_streams(graphs, variant, tasks_of, objs,
                                                             branched_modules)
        for path in per_task_norms:
            norm = objs.pop(path)
            users = set().union(*(tasks_of[m][n] for m, g in graphs.items() for n in g.nodes
                                  if n.op == "call_module" and n.target == path))
            for task in (t for t in tasks if t in users):
                # Share the affine parameters, copy the running buffers.
                memo = {id(p): p for p in norm.parameters()}
                objs[f"{path}.{task}"] = copy.deepcopy(norm, memo)
    per_task = branched_modules | set(per_task_norms)
    points = {m: layer.name for layer in layers for m in layer.paths}
    new_graphs = {mode: _rewrite(g, variant[mode], tasks_of=tasks_of[mode], per_task=per_task,
                                 branched_params=branched_params, points=points,
                                 task_order=tasks)
                  for mode, g in graphs.items()}
    train_graph = new_graphs["train"]
    eval_graph = new_graphs.get("eval", train_graph)
    module = DualGraphModule(objs, train_graph, eval_graph, type(traced).__name__)
    module.train(traced.training)
    copies = _copy_names(module, layers)
    return Branched(module, layers, tasks, copies, per_task_norms, shared_norms)


def _tensors(objs: Any) -> list[torch.Tensor]:
    """The tensors among ``objs`` and those their modules hold (each under every name)."""
    found: list[torch.Tensor] = []
    for obj in objs:
        if isinstance(obj, torch.Tensor):
            found.append(obj)
        elif isinstance(obj, nn.Module):
            found += [t for _name, t in named_tensors(obj)]
    return found


def _norms_seeing_streams(graphs: dict[str, fx.Graph], variant: dict[str, set[fx.Node]],
                          tasks_of: dict[str, dict[fx.Node, frozenset[str]]],
                          objs: dict[str, Any], branched: set[str]) -> tuple[list[str], list[str]]:
    """Norm modules with running statistics whose every call sees task streams of several
    tasks; those also called on the shared stream keep one set of statistics."""
    calls: dict[str, list[tuple[bool, frozenset[str]]]] = {}
    for mode, graph in graphs.items():
        for node in graph.nodes:
            if node.op == "call_module" and node.target not in branched and has_running_stats(
                    objs[str(node.target)]):
                calls.setdefault(str(node.target), []).append(
                    (node in variant[mode], tasks_of[mode][node]))
    per_task, shared = [], []
    for path, sites in calls.items():
        seen = frozenset().union(*(t for _, t in sites))
        if any(v for v, _ in sites) and len(seen) > 1:
            (per_task if all(v for v, _ in sites) else shared).append(path)
    return per_task, shared


def _rewrite(graph: fx.Graph, variant: set[fx.Node], *,
             tasks_of: dict[fx.Node, frozenset[str]],
             per_task: set[str], branched_params: set[str], points: dict[str, str],
             task_order: list[str]) -> fx.Graph:
    new = fx.Graph()
    env: dict[tuple[fx.Node, str | None], fx.Node] = {}
    outputs = task_outputs(graph)
    for node in graph.nodes:
        if node.op == "output":
            new.output({t: env[(n, t if n in variant else None)] for t, n in outputs.items()})
            continue
        if node not in variant:
            env[(node, None)] = new.node_copy(node, lambda n: env[(n, None)])
            continue
        starts = not any(arg in variant for arg in node.all_input_nodes)
        shared_target = _mutates_shared_input(node, variant)
        for task in (t for t in task_order if t in tasks_of[node]):
            clone = new.node_copy(
                node, lambda n, t=task: env[(n, t if n in variant else None)])
            if shared_target:
                # Each stream would otherwise mutate the tensor all streams share.
                clone.target = shared_target
            clone.target = _task_target(node, per_task, branched_params, task) or clone.target
            point = points.get(str(node.target)) or points.get(_owner(node, set(points)) or "")
            note(clone, facts(node), task=task, origin=node.name,
                 branch_point=point if starts and point else facts(node).branch_point)
            env[(node, task)] = clone
    prune(new)
    new.lint()
    return new


_OUT_OF_PLACE = {operator.iadd: operator.add, operator.isub: operator.sub,
                 operator.imul: operator.mul, operator.itruediv: operator.truediv}


def _mutates_shared_input(node: fx.Node, variant: set[fx.Node]) -> Any:
    """The out-of-place form of an augmented assignment (``shared += branch``) whose target is
    shared by all streams while the op itself runs per task; else None. Python rebinds the
    name to the result, so later uses read the op's result and out-of-place is exact. (An
    in-place method whose result is discarded, ``shared.add_(branch)``, is left as it is: if it
    changes what the streams compute, the I1 check fails and says so.)"""
    first = node.args[0] if node.args else None
    if not isinstance(first, fx.Node) or first in variant:
        return None
    if node.op == "call_function" and node.target in _OUT_OF_PLACE:
        return _OUT_OF_PLACE[node.target]
    target = node.target
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "aten":
        # torch.export's graphs keep in-place aten ops; later uses read the op's result.
        name = target.overloadpacket.__name__
        if name.endswith("_") and not name.startswith("_"):
            packet = getattr(torch.ops.aten, name[:-1], None)
            return getattr(packet, target._overloadname, None) if packet else None
    return None


def _copy_names(module: nn.Module, layers: list[Layer]) -> dict[str, dict[str, list[str]]]:
    names = [n for n, _ in module.named_parameters(remove_duplicate=False)]
    copies: dict[str, dict[str, list[str]]] = {}
    for layer in layers:
        per_task = copies.setdefault(layer.name, {})
        for task in layer.tasks:
            prefixes = [f"{m}.{task}." for m in layer.modules]
            exact = {f"{p}.{task}" for p in layer.params}
            per_task[task] = [n for n in names if n in exact or n.startswith(tuple(prefixes))]
    return copies
