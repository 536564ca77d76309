"""Task rows: the branched model with its task streams carried as one tensor.

The compiled graph runs every op downstream of a branch point once per task stream (one clone
per task, :mod:`reconfx.rewrite`). The same function can be written with the streams as one
tensor whose rows are the tasks' batches one after another, in task order: a shared layer runs
once on all rows, a per-task layer is a :class:`PerTask` that runs task t's module on rows t,
and the model's own code runs unchanged between them. Where a shared value enters the streams it
is repeated once per task (``torch.cat([x, x])``); where a task's own part begins (its head),
the task's rows are taken (``x.unflatten(0, (2, -1)).unbind()``).

``model.py`` is written this way where the result computes what the compiled model computes:
:func:`task_rows` checks that on every example, in both modes, with every weight perturbed (so
that the tasks' copies differ and a value mixing rows of different tasks shows). Blocks that
hold per-task layers then keep their own class, per-task layers swapped in, and no region is
written twice. It does not hold where a shared op depends on the whole batch in the current mode
(a BatchNorm with shared statistics in training), where several random ops follow the branch
point in training (on rows each draws for all tasks in turn; per stream each task draws through
all of them), where a size read off a shared value that is not a multiple of the batch reaches
the streams, or where the graph reads a branched tensor directly; the
compiled graph's form is written there.
"""

from __future__ import annotations

import contextlib
import copy
import operator
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import fx, nn

from reconfx.batching import batch_kind, grown_example
from reconfx.calls import called_at, under
from reconfx.checks import perturbed
from reconfx.errors import unexpected
from reconfx.facts import facts, note
from reconfx.graph import DualGraphModule, named_tensors, node_tasks, record, resolve, task_outputs
from reconfx.modes import (
    ATOL,
    compare,
    kept_masks,
    magnitude,
    preserved,
    run,
    same_outputs,
    silenced,
)
from reconfx.rewrite import Branched, variant_nodes

__all__ = ["one_task", "PerTask", "shares_parameters", "task_rows", "unswapped", "whole_copies"]


class PerTask(nn.ModuleDict):
    """One module per task, keyed by task name, for a layer on the task streams: the streams
    travel as one tensor whose rows are the tasks' batches one after another (in this dict's
    order), and each task's module runs on that task's rows of every tensor it is given."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        def rows(value: Any, t: int) -> Any:  # task t's rows of a tensor; anything else as is
            if isinstance(value, torch.Tensor):  # (unflatten: exporters keep the batch dynamic)
                return value.unflatten(0, (len(self), -1))[t]
            return value

        outputs = [module(*(rows(a, t) for a in args), **{k: rows(v, t) for k, v in kwargs.items()})
                   for t, module in enumerate(self.values())]
        if isinstance(outputs[0], tuple):  # (a tuple of results: each joined again)
            return tuple(torch.cat(items) if isinstance(items[0], torch.Tensor) else items[0]
                         for items in zip(*outputs, strict=True))
        return torch.cat(outputs)


def _per_task_inside(module: nn.Module) -> list[tuple[str, PerTask]]:
    """(relative path, module) of each outermost :class:`PerTask` below ``module``."""
    found: list[tuple[str, PerTask]] = []
    for name, sub in module.named_modules():  # (parents before their children)
        if name and _is_per_task(sub) and not any(
                name.startswith(f"{outer}.") for outer, _sub in found):
            found.append((name, sub))
    return found


def shares_parameters(per_task: nn.ModuleDict) -> bool:
    """Every task's module holds the same Parameter objects (a shared norm with per-task
    running statistics), and there is at least one."""
    copies = [list(m.parameters()) for m in per_task.values()]
    return bool(copies[0]) and all(
        len(c) == len(copies[0]) and all(a is b for a, b in zip(c, copies[0], strict=True))
        for c in copies[1:])


@contextlib.contextmanager
def unswapped(module: Any) -> Iterator[list[tuple[str, PerTask]]]:
    """Inside, each :class:`PerTask` below ``module`` is replaced by its first task's module, as
    the model was built before the swap (for finding its constructor); yields (relative path,
    the :class:`PerTask`) for each, outermost first. Each is put back on exit."""
    found = _per_task_inside(module) if isinstance(module, nn.Module) else []
    for name, sub in found:
        module.set_submodule(name, next(iter(sub.values())))
    try:
        yield found
    finally:
        for name, sub in found:
            module.set_submodule(name, sub)


def task_rows(branched: Branched, *, traced: DualGraphModule, model: nn.Module,
              examples: Sequence[dict[str, torch.Tensor]], batch_inputs: Sequence[str]
              ) -> tuple[DualGraphModule, nn.Module] | None:
    """The compiled model ``branched`` (:class:`reconfx.rewrite.Branched`, branched from
    ``traced``, the graph module of ``model``) in task-rows form: (the graph module, ``model``
    with its per-task layers swapped in, both holding the compiled tensors), or None where that
    form does not compute what the compiled model does. ``batch_inputs`` are the inputs whose
    axis 0 is the batch."""
    try:
        return _task_rows(branched, traced=traced, model=model, examples=examples,
                          batch_inputs=batch_inputs)
    except Exception as exc:  # (a form that does not hold returns None, not an error)
        unexpected(exc)
        return None


def whole_copies(module: DualGraphModule, *, reference: nn.Module,
                 examples: Sequence[dict[str, torch.Tensor]]) -> DualGraphModule:
    """``module`` (task rows, its calls collapsed) with each submodule it calls whole, or that
    lies inside one, all of whose tensors lie in per-task layers made one :class:`PerTask` of
    whole copies, each holding one task's layers (``layer4 = PerTask({task: nn.Sequential(...)
    ...})``, ``layers[3].mlp = PerTask({task: LlamaMLP(CONFIG) ...})`` rather than a
    ``PerTask`` per layer inside it): each task's rows go through that task's layers either
    way. Kept only where the result still gives ``reference``'s outputs on ``examples`` (within
    :data:`ATOL`), else every such submodule is put back."""
    calls = {str(n.target) for _m, g in module.graphs() for n in g.nodes
             if n.op == "call_module"}
    called = sorted({f"{path}.{name}".rstrip(".") for path in calls
                     for name, _sub in resolve(module, path).named_modules()},
                    key=lambda p: p.count("."))
    replaced: list[tuple[str, nn.Module]] = []
    for path in called:
        if any(path.startswith(f"{d}.") for d, _sub in replaced):
            continue
        sub = resolve(module, path)
        if isinstance(sub, PerTask):
            continue
        swaps = _per_task_inside(sub)
        if not swaps:
            continue
        tasks = [tuple(per_task) for _name, per_task in swaps]
        inside = {id(t) for _name, per_task in swaps for _n, t in named_tensors(per_task)}
        if len(set(tasks)) != 1 or any(id(t) not in inside for _n, t in named_tensors(sub)):
            continue
        held = [{id(t) for _n, per_task in swaps for _m, t in named_tensors(per_task[task])}
                for task in tasks[0]]
        if path not in calls and len(set().union(*held)) < sum(map(len, held)):
            # (copies sharing a tensor, per-task statistics of a shared norm: model.py swaps
            # them in by the layer, where each sharing is written)
            continue
        copies = {}
        for task in tasks[0]:
            memo: dict[int, Any] = {id(per_task): per_task[task] for _n, per_task in swaps}
            copies[task] = copy.deepcopy(sub, memo)
        module.set_submodule(path, PerTask(copies))
        replaced.append((path, sub))
    with kept_masks():  # (``module`` on rows draws its dropout masks as _same_function says)
        same = not replaced or same_outputs(reference, module, examples, ATOL)
    if not same:
        for path, sub in replaced:
            module.set_submodule(path, sub)
    return module


def _module_at(model: nn.Module, path: str) -> bool:
    try:
        return isinstance(model.get_submodule(path), nn.Module)
    except AttributeError:
        return False


def _task_rows(branched: Branched, *, traced: DualGraphModule, model: nn.Module,
               examples: Sequence[dict[str, torch.Tensor]], batch_inputs: Sequence[str]
               ) -> tuple[DualGraphModule, nn.Module] | None:
    if len(branched.tasks) < 2 or not batch_inputs:
        return None
    # The per-task layers swapped in as they are (a module whose tensors the graph reads
    # directly swapped in whole), else each inside the outermost module all of whose state is
    # branched (BERT's embeddings, whose position table is looked up without a batch axis).
    inner, outer = _units(branched, model), _units(branched, model, outermost=True)
    for units in [inner, outer] if outer != inner else [inner]:
        if units is not None:
            found = _rows_with(units, branched, traced=traced, model=model, examples=examples,
                               batch_inputs=batch_inputs)
            if found is not None:
                return found
    return None


def _rows_with(units: dict[str, list[str]], branched: Branched, *, traced: DualGraphModule,
               model: nn.Module, examples: Sequence[dict[str, torch.Tensor]],
               batch_inputs: Sequence[str]) -> tuple[DualGraphModule, nn.Module] | None:
    tasks = list(branched.tasks)
    compiled = branched.module
    containers = {c for c in branched.containers if not any(under(c, u) for u in units)}
    eager = _swapped(model, compiled, containers, tasks, units)
    if eager is None:
        return None
    if units:  # (their calls in the graph, where a per-task copy can be swapped in)
        traced = called_at(traced, model, set(units), examples)
        if traced is None:
            return None
        containers |= set(units)
    example = examples[0]
    grown = grown_example(example, batch_inputs)
    batch = (len(example[batch_inputs[0]]), len(grown[batch_inputs[0]]))
    points = {p: layer.name for layer in branched.layers for p in layer.paths}
    points.update({u: min((layer for layer in branched.layers
                           if any(under(p, u) for p in layer.paths)), key=lambda la: la.order).name
                   for u in units})
    values = {}
    with preserved(traced):  # (its training flags and running statistics)
        for mode, graph in traced.graphs():
            traced.train(mode == "train")
            values[mode] = [record(traced, graph, ex) for ex in (example, grown)]
    # First with each block the streams start inside run whole on the rows (model.py calls it
    # by its own class; its part before the branch point runs once per task), else with the
    # streams starting where the branched layers are.
    at_layers = {mode: variant_nodes(graph, containers, set()) for mode, graph in traced.graphs()}
    whole = {mode: _with_blocks(graph, at_layers[mode]) for mode, graph in traced.graphs()}
    for variant in [whole, at_layers] if whole != at_layers else [at_layers]:
        graphs = {mode: _rows_graph(graph, variant=variant[mode], containers=containers,
                                    points=points, tasks=tasks, values=values[mode], batch=batch)
                  for mode, graph in traced.graphs()}
        if any(g is None for g in graphs.values()):
            continue
        objs = {str(n.target): _resolved(str(n.target), eager, traced) for g in graphs.values()
                for n in g.nodes if n.op in ("call_module", "get_attr")}
        try:
            rows = DualGraphModule(objs, graphs["train"], graphs.get("eval", graphs["train"]),
                                   type(compiled).__name__)
        except AttributeError:
            continue
        rows.train(compiled.training)
        if _same_function(compiled, rows, examples):
            return rows, eager
    return None


def _with_blocks(graph: fx.Graph, variant: set[fx.Node]) -> set[fx.Node]:
    """The nodes that run on task rows when ``variant`` (those the branched layers reach) do
    and, with them, every node of each innermost block (an item of a ``ModuleList`` or
    ``nn.Sequential``, as the module calls recorded on the nodes name it) that some of them lie
    in and some not, so the block is called whole on the rows. (Innermost: a wrapper
    ``nn.Sequential(backbone, head)`` does not make the whole backbone run once per task.)"""
    members: dict[str, tuple[str, list[fx.Node]]] = {}
    for node in graph.nodes:
        for key, (_index, call) in facts(node).sites.items():
            if call.path.rpartition(".")[2].isdigit() and node.op != "get_attr":
                members.setdefault(key, (call.path, []))[1].append(node)
    partial = {key: (path, nodes) for key, (path, nodes) in members.items()
               if variant.intersection(nodes) and not variant.issuperset(nodes)}
    paths = [path for path, _nodes in partial.values()]
    seeds = {n for path, nodes in partial.values()
             if not any(p.startswith(f"{path}.") for p in paths) for n in nodes}
    if not seeds:
        return variant
    grown: set[fx.Node] = set()
    for node in graph.nodes:
        if node in seeds or node in variant or any(a in grown for a in node.all_input_nodes):
            grown.add(node)
    return grown


def _resolved(target: str, eager: nn.Module, traced: nn.Module) -> Any:
    """What ``target`` names in ``eager``, else in ``traced`` (a constant the tracer lifted out
    of the model's code, ``lifted_tensor_0``, which the model itself does not hold)."""
    try:
        return resolve(eager, target)
    except AttributeError:
        return resolve(traced, target)


def _units(branched: Branched, model: nn.Module, outermost: bool = False
           ) -> dict[str, list[str]] | None:
    """The submodules to swap in whole as per-task copies, each -> the branched paths inside
    it: those whose tensors the graph reads directly where they are branched (a ``Conv1D``, an
    RMS norm, a ViT's embeddings with its class token, as ``torch.export`` inlines them), and
    with ``outermost`` the outermost module around each branched layer all of whose state is
    branched. None where a tensor read directly lies in a module that also holds a shared one
    (no module to swap)."""
    params = {p for layer in branched.layers for p in layer.params}
    containers = branched.containers
    units: dict[str, list[str]] = {}
    for path in sorted(containers if outermost else params):
        owner = path if outermost and path not in params else path.rpartition(".")[0]
        if not _module_at(model, owner) or not _covered(model, owner, containers):
            if path in params:
                return None
            continue
        while outermost and "." in owner and _covered(model, owner.rpartition(".")[0],
                                                      containers):
            owner = owner.rpartition(".")[0]
        if outermost and owner == path:
            continue  # (a branched module with no module around it to swap in whole)
        units.setdefault(owner, []).append(path)
    for unit in list(units):  # (the outermost of nested ones)
        if any(u != unit and under(unit, u) for u in units):
            del units[unit]
    for unit in units:
        units[unit] = sorted(c for c in containers if under(c, unit))
    return units


def _covered(model: nn.Module, path: str, containers: set[str]) -> bool:
    """Every parameter and floating buffer of the module at ``path`` lies in a branched layer
    (an integer buffer, such as a table of position ids, is the copies' in common)."""
    return all(any(under(f"{path}.{n}", c) for c in containers)
               for n, t in named_tensors(model.get_submodule(path)) if t.is_floating_point())


def _swapped(model: nn.Module, compiled: nn.Module, containers: set[str], tasks: list[str],
             units: dict[str, list[str]]) -> nn.Module | None:
    """A copy of ``model`` holding ``compiled``'s tensors, each per-task container of the
    compiled model swapped in as a :class:`PerTask` at its path, and each of ``units`` (see
    :func:`_units`) as a :class:`PerTask` of whole copies of the module holding the task's
    copies of its tensors; None where a container lacks a task's copy (a layer only some tasks
    use: its rows would not be every task's)."""
    holders = {path: resolve(compiled, path) for path in sorted(containers)}
    holders.update({c: resolve(compiled, c) for inside in units.values() for c in inside})
    if any(set(h._modules) != set(tasks) and set(h._parameters) != set(tasks)
           for h in holders.values()):
        return None
    own = dict(named_tensors(compiled))
    memo = {id(t): own[name] for name, t in named_tensors(model) if name in own}
    for _name, t in named_tensors(model):
        memo.setdefault(id(t), t)  # (a branched layer's own tensors: replaced below)
    swapped = copy.deepcopy(model, memo)
    for path in containers:
        swapped.set_submodule(path, PerTask({t: holders[path]._modules[t] for t in tasks}))
    for unit, inside in units.items():
        copies = {}
        for task in tasks:
            tensors = {}
            for name, t in named_tensors(model.get_submodule(unit)):
                full = f"{unit}.{name}"
                at = next((c for c in inside if under(full, c)), None)
                tensors[id(t)] = own.get(full, t) if at is None else \
                    own[f"{at}.{task}{full[len(at):]}"]
            copies[task] = copy.deepcopy(model.get_submodule(unit), tensors)
        swapped.set_submodule(unit, PerTask(copies))
    return swapped


def _rows_graph(graph: fx.Graph, *, variant: set[fx.Node], containers: set[str],
                points: dict[str, str], tasks: list[str], values: list[dict[fx.Node, Any]],
                batch: tuple[int, int]) -> fx.Graph | None:
    """``graph`` (unbranched) with its task-variant part run on task rows; None where a shared
    value reaching the streams is neither a batch of rows, a size proportional to the batch,
    nor a value that does not depend on the batch. ``values`` are every node's values at the
    batch sizes ``batch``; ``points``: each branched module's layer name (for the comment at
    the branch point)."""
    if any(n.op == "get_attr" for n in variant):
        return None
    pending = list(dict.fromkeys(points[str(n.target)] for n in graph.nodes  # (comments)
                                 if n.op == "call_module" and str(n.target) in points))
    tasks_of = node_tasks(graph)
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    forks: dict[fx.Node, fx.Node] = {}
    picks: dict[fx.Node, list[fx.Node]] = {}

    def own_task(node: fx.Node) -> str | None:
        needed = tasks_of[node]
        return next(iter(needed)) if len(needed) == 1 else None

    def fork(node: fx.Node, point: str | None) -> fx.Node | None:
        if node not in forks:
            before, after = values[0].get(node), values[1].get(node)
            kind = batch_kind(before, after)
            if kind == "static":
                return env[node]
            if kind == "int" and before * batch[1] == after * batch[0]:
                # a size proportional to the batch (batch, batch * heads): T times larger
                joined = new.call_function(operator.mul, (env[node], len(tasks)))
            elif kind == "batched":
                joined = new.call_function(torch.cat, ([env[node]] * len(tasks),))
            else:
                return None
            note(joined, streams=True, branch_point=point)  # (model.py names it after its input)
            forks[node] = joined
        return forks[node]

    def pick(node: fx.Node, task: str) -> fx.Node:
        if node not in picks:  # ``x.unflatten(0, (T, -1)).unbind()``: one item per task
            base = facts(node).name or node.name
            by_task = new.call_method("unflatten", (env[node], 0, (len(tasks), -1)))
            note(by_task, name=f"{base}_by_task")
            parts = new.call_method("unbind", (by_task,))
            note(parts, name=base, items=len(tasks))
            picks[node] = []
            for i, t in enumerate(tasks):
                item = new.call_function(operator.getitem, (parts, i))
                note(item, name=f"{base}_{t}", task=t)
                picks[node].append(item)
        return picks[node][tasks.index(task)]

    for node in graph.nodes:
        if node.op == "output":
            result = {t: pick(n, t) if n in variant and own_task(n) is None else env[n]
                      for t, n in task_outputs(graph).items()}
            new.output(result)
            continue
        if node not in variant:
            env[node] = new.node_copy(node, env.__getitem__)
            continue
        task = own_task(node)
        if task is not None:  # the task's own part: its rows of each stream value
            copied = new.node_copy(node, lambda n, t=task: pick(n, t) if n in variant and
                                   own_task(n) is None else env[n])
            if str(node.target) in containers:
                copied.target = f"{node.target}.{task}"
            env[node] = copied
            note(copied, facts(node), task=task)
            continue
        starts = not any(a in variant for a in node.all_input_nodes)
        point = points.get(str(node.target)) if starts else None
        if starts and point is None and pending:  # (a block run whole: its branched layer's)
            point = pending[0]
        if point in pending:
            pending.remove(point)
        mapped: dict[fx.Node, fx.Node] = {}
        for a in node.all_input_nodes:
            if a in variant:
                mapped[a] = env[a]
            else:
                joined = fork(a, point)
                if joined is None:
                    return None
                mapped[a] = joined
        env[node] = new.node_copy(node, mapped.__getitem__)
    new.lint()
    return new


def _same_function(compiled: DualGraphModule, rows: DualGraphModule,
                   examples: Sequence[dict[str, torch.Tensor]]) -> bool:
    """Whether ``rows`` computes what ``compiled`` does on every example in both modes (within
    :data:`ATOL`, stream batching's tolerance), and with every weight perturbed (within ATOL
    times the outputs' magnitude, as I4 compares; both hold the same tensors, so one
    perturbation serves both), leaving the same running statistics after a train-mode forward
    (a shared norm of a block run whole on the rows would count each row T times). Dropout
    masks keep every element (:func:`reconfx.modes.kept_masks`): the rows draw theirs in one
    call per op, the compiled model in one per task stream."""
    with kept_masks():
        return _same_in_both_modes(compiled, rows, examples)


def _same_in_both_modes(compiled: DualGraphModule, rows: DualGraphModule,
                        examples: Sequence[dict[str, torch.Tensor]]) -> bool:
    if not same_outputs(compiled, rows, examples, ATOL) or not _same_statistics(
            compiled, rows, examples[0]):
        return False
    with preserved(compiled, rows):
        with perturbed(compiled):
            for training in (False, True):
                want = run(compiled, examples[0], training)
                with silenced():
                    got = run(rows, examples[0], training)
                if compare(want, got, ATOL * magnitude(want)):
                    return False
    return True


def _same_statistics(compiled: DualGraphModule, rows: DualGraphModule,
                     example: dict[str, torch.Tensor]) -> bool:
    """Whether one train-mode forward of ``rows`` leaves the floating buffers (running
    statistics) one of ``compiled`` leaves; both hold the same buffers."""
    after = []
    for module in (compiled, rows):
        with preserved(compiled, rows):
            module.train()
            torch.manual_seed(0)
            with torch.no_grad(), silenced():
                module(**example)
            after.append({n: b.clone() for n, b in compiled.named_buffers()
                          if b.is_floating_point()})
    return all(torch.allclose(after[0][n], after[1][n], rtol=0.0, atol=ATOL) for n in after[0])


def _is_per_task(module: nn.Module) -> bool:
    """A :class:`PerTask`, also model.py's own copy of the class."""
    return isinstance(module, nn.ModuleDict) and type(module).__name__ == "PerTask"


def one_task(model: nn.Module, task: str, examples: Sequence[dict[str, torch.Tensor]]
             ) -> nn.Module:
    """``model`` (a ``model.py`` class on task rows, reloaded) reduced to ``task``'s stream: its
    forward with every shared value entering the streams passed on once instead of once per
    task, each :class:`PerTask` replaced by ``task``'s module (inside a module called whole as
    well), ``task``'s rows taken as the whole value, and only ``task``'s output returned; so an
    export of one task holds that task's copies and nothing of the others'. ``model`` itself
    where it has no per-task layer, where its forward cannot be traced with every submodule
    kept whole, or where the result differs from ``model``'s output for ``task`` on
    ``examples`` (a pattern taken for the streams' that is the model's own)."""
    found = [m for m in model.modules() if _is_per_task(m)]
    if not found:
        return model
    order = list(found[0])
    try:
        reduced = _one_task(model, task, order)
    except Exception as exc:  # (a forward fx cannot trace: the whole model is exported)
        unexpected(exc)
        return model
    was = model.training
    with preserved(model, reduced), torch.no_grad():
        try:
            for example in examples:
                want = run(model, example, False)[task]
                if compare({task: want}, run(reduced, example, False), ATOL):
                    return model.train(was)
        except Exception as exc:  # (as above)
            unexpected(exc)
            return model.train(was)
    return reduced.train(was)


def _one_task(model: nn.Module, task: str, order: list[str]) -> fx.GraphModule:
    tracer = fx.Tracer()
    tracer.is_leaf_module = lambda _module, _name: True  # (the top-level forward only)
    graph = tracer.trace(model)
    streams = len(order)
    objs: dict[str, Any] = {}
    for node in list(graph.nodes):
        if node.op in ("call_module", "get_attr"):
            objs[str(node.target)] = _task_view(resolve(model, str(node.target)), task)
        elif node.target is torch.cat and _repeated(node.args[0], streams):
            node.replace_all_uses_with(node.args[0][0])  # x once per task -> x
        elif node.target is operator.mul and len(node.args) == 2 and node.args[1] == streams \
                and isinstance(node.args[0], fx.Node) and node.args[0].op == "call_method" \
                and node.args[0].target == "size":
            node.replace_all_uses_with(node.args[0])  # a batch size times the tasks
        elif node.op == "call_method" and node.target == "unbind" and _by_task(node.args[0],
                                                                               streams):
            for user in list(node.users):
                if user.target is operator.getitem and user.args[1] == order.index(task):
                    user.replace_all_uses_with(node.args[0].args[0])  # the task's rows: all
        elif node.op == "output":
            result = node.args[0]
            node.args = ({task: result[task]},)
    fx.GraphModule(objs, graph).graph.eliminate_dead_code()  # (the other tasks' streams)
    graph.lint()
    used = {str(n.target) for n in graph.nodes if n.op in ("call_module", "get_attr")}
    return fx.GraphModule({k: v for k, v in objs.items() if k in used}, graph,
                          type(model).__name__)


def _task_view(obj: Any, task: str) -> Any:
    """``obj`` with each :class:`PerTask` in it (or itself) replaced by ``task``'s module, its
    tensors shared."""
    if not isinstance(obj, nn.Module):
        return obj
    if _is_per_task(obj):
        return obj[task]
    inside = _per_task_inside(obj)
    if not inside:
        return obj
    memo: dict[int, Any] = {id(t): t for _n, t in named_tensors(obj)}
    memo.update({id(m): m[task] for _name, m in inside})
    return copy.deepcopy(obj, memo)


def _repeated(items: Any, streams: int) -> bool:
    return isinstance(items, list | tuple) and len(items) == streams and isinstance(
        items[0], fx.Node) and all(i is items[0] for i in items)


def _by_task(node: Any, streams: int) -> bool:
    """``x.unflatten(0, (T, -1))``: the streams' rows by task."""
    return isinstance(node, fx.Node) and node.op == "call_method" and \
        node.target == "unflatten" and tuple(node.args[1:]) == (0, (streams, -1))
