"""Module calls in a traced graph: which stretch of nodes is one call of which submodule, and
with which arguments, so the emitter can write ``self.encoder.layer[0](hidden, mask)`` where
the surgery left a submodule untouched instead of the ops it traced to.

Both tracing tiers record, on every node, the stack of module calls it ran in
(``nn_module_stack``). That says which nodes belong to a call, not how the call was made: which
of the values flowing in is which argument, which constants it was given, and where in its
result (a tensor, a tuple, a model-output mapping) each value flowing out sits.
:func:`annotate_calls` finds that out by running the eager model with hooks on every submodule and
the graph on the same example (from the same random state), and matching the tensors a call
received and returned to the values of the nodes around its stretch: a call is annotated only
when every match is exact and unique. The result is written on the nodes (their
:class:`~reconfx.facts.NodeFacts` ``sites``), so it survives the branching pass, which copies
nodes.

:func:`collapse_calls` then turns each complete call of a submodule that holds no branched layer
into one ``call_module`` node, and keeps the result only where the graph still computes exactly the
same outputs, in both modes, on every example.
"""

from __future__ import annotations

import copy
import functools
import inspect
import itertools
import keyword
import operator
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from reconfx.emit.render import unique_name
from reconfx.errors import unexpected
from reconfx.facts import NodeFacts, facts, note
from reconfx.graph import (
    CONTEXT_SWITCHES,
    DualGraphModule,
    Env,
    TwoModes,
    collapse,
    in_place,
    named_tensors,
    prune,
    reorder,
    resolve,
)
from reconfx.modes import preserved, run, same_outputs
from reconfx.streams import StreamRegion

__all__ = [
    "annotate_calls", "Call", "called_at", "collapse_calls", "contiguous_streams", "MARK", "Ref",
    "TaskCopies", "TaskStream", "under", "without_defaults"
]

_CONSTANTS = (bool, int, float, str, type(None), torch.dtype, torch.device)


@dataclass(frozen=True)
class Ref:
    """The ``index``-th value flowing into a call (see :attr:`Call.inputs`)."""

    index: int


@dataclass(frozen=True)
class Call:
    """How one call of the submodule at ``path`` was made.

    ``inputs[i]`` locates the i-th value flowing in as (member, position): the member node with
    that index reads it as its ``position``-th input node, in the graph and in every copy of
    the call the branching pass makes. ``outside`` counts the values the call is given that no
    member reads (Llama's rotary embedding reads only the dtype of the hidden states it gets):
    ``Ref(len(inputs) + j)`` is the node marked ``feeds[key] == j``. ``args``/``kwargs`` are the
    call's arguments with :class:`Ref` in place of tensors; ``outputs`` maps each member whose
    value is used after the call to where it sits in the call's result (``(0,)``:
    ``result[0]``), or to the :class:`Ref` of the input it passes on unchanged; ``items`` is
    the length of a result that is a plain tuple (None otherwise)."""

    path: str
    key: str
    members: int
    depth: int
    inputs: tuple[tuple[int, int], ...]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    outputs: dict[int, tuple[Any, ...]]
    items: int | None = None
    outside: int = 0


# -- annotate --------------------------------------------------------------------------------------
def annotate_calls(module: DualGraphModule, model: nn.Module, example: dict[str, torch.Tensor]
             ) -> int:
    """Write the calls of ``model``'s submodules found in ``module``'s graphs on their nodes;
    returns how many calls were found (a call must be found in each mode's graph)."""
    leaves = {str(n.target) for _m, g in module.graphs() for n in g.nodes
              if n.op == "call_module"}
    found: dict[str, dict[str, tuple[Call, list[fx.Node]]]] = {}
    with preserved(model, module):
        for mode, graph in module.graphs():
            training = mode == "train"
            calls = _eager_calls(model, example, training)
            values = _graph_values(module, graph, example, training)
            groups = _groups(graph, leaves)
            found[mode] = {}
            for key, (path, depth, members) in groups.items():
                recorded = calls.get(_call_id(key, path))
                if recorded is not None:
                    args, kwargs = without_defaults(model.get_submodule(path), *recorded[:2])
                    matched = _matched(key, path, depth=depth, members=members,
                                       values=values, args=args, kwargs=kwargs,
                                       result=recorded[2])
                    if matched is not None:
                        found[mode][key] = matched
    modes = list(found.values())
    kept = set(modes[0]).intersection(*modes[1:])
    for mode, graph in module.graphs():
        groups = _groups(graph, leaves)
        for key in kept:
            call, outside = found[mode][key]
            for index, node in enumerate(groups[key][2]):
                note(node, sites={**facts(node).sites, key: (index, call)})
            for j, node in enumerate(outside):
                note(node, feeds={**facts(node).feeds, key: j})
    return len(kept)


def _call_id(key: str, path: str) -> tuple[str, int]:
    """(path, how many calls of it came before) for an ``nn_module_stack`` key (``a.b@1``)."""
    match = re.search(r"@(\d+)$", key)
    return path, int(match.group(1)) if match else 0


def without_defaults(sub: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The call's arguments without those equal to the defaults of the forward's signature
    (``layer(hidden)`` for ``layer(hidden, None, None, cache=None)``); positional ones by
    position, the rest by keyword."""
    try:
        signature = inspect.signature(sub.forward)
        bound = signature.bind(*args, **kwargs)
    except (TypeError, ValueError):
        return args, kwargs
    positional: list[Any] = []
    keywords: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        p = signature.parameters[name]
        if p.kind is p.VAR_POSITIONAL:
            positional += list(value)
        elif p.kind is p.VAR_KEYWORD:  # (None: what a callee reading **kwargs gets anyway)
            keywords.update({k: v for k, v in value.items() if v is not None})
        elif p.default is not p.empty and isinstance(value, _CONSTANTS) and (
                type(value) is type(p.default) and value == p.default):
            continue
        elif p.kind is p.KEYWORD_ONLY or keywords or len(positional) != list(
                signature.parameters).index(name):
            keywords[name] = value
        else:
            positional.append(value)
    return tuple(positional), keywords


def _groups(graph: fx.Graph, leaves: set[str]) -> dict[str, tuple[str, int, list[fx.Node]]]:
    """Each non-leaf module call's key -> (path, depth, its nodes in graph order)."""
    groups: dict[str, tuple[str, int, list[fx.Node]]] = {}
    for node in graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        stack = node.meta.get("nn_module_stack") or {}
        for depth, (key, (path, _type)) in enumerate(stack.items()):
            if path and not path.startswith("_empty") and path not in leaves:
                groups.setdefault(key, (path, depth, []))[2].append(node)
    return groups


def _eager_calls(model: nn.Module, example: dict[str, torch.Tensor], training: bool
                 ) -> dict[tuple[str, int], tuple[tuple, dict, Any]]:
    """Every submodule call of one eager forward: (path, call number) -> (args, kwargs,
    result), tensors cloned when seen."""
    calls: dict[tuple[str, int], tuple[tuple, dict, Any]] = {}
    counts: dict[str, int] = {}
    pending: dict[str, list[tuple[tuple, dict]]] = {}
    handles = []

    def before(path: str) -> Any:
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            pending.setdefault(path, []).append((_cloned(args), _cloned(kwargs)))
        return hook

    def after(path: str) -> Any:
        def hook(_m: nn.Module, _args: tuple, _kwargs: dict, result: Any) -> None:
            args, kwargs = pending[path].pop()
            number = counts.get(path, 0)
            counts[path] = number + 1
            calls[(path, number)] = (args, kwargs, _cloned(result))
        return hook

    for path, sub in model.named_modules():
        if path:
            handles.append(sub.register_forward_pre_hook(before(path), with_kwargs=True))
            handles.append(sub.register_forward_hook(after(path), with_kwargs=True))
    try:
        run(model, example, training)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _graph_values(module: DualGraphModule, graph: fx.Graph, example: dict[str, torch.Tensor],
                  training: bool) -> dict[fx.Node, Any]:
    """Every node's value (tensors cloned when computed) in one run of ``graph`` from the
    random state :func:`reconfx.modes.run` starts the eager model from."""
    values: dict[fx.Node, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            values[n] = _cloned(out)
            return out

    names = [str(n.target) for n in graph.nodes if n.op == "placeholder"]

    class Runner(nn.Module):  # (holding the module, so run() sets its mode)
        def __init__(self) -> None:
            super().__init__()
            self.inner = module

        def forward(self, **inputs: torch.Tensor) -> Any:
            return Recorder(module, graph=graph).run(*(inputs[name] for name in names))

    run(Runner(), example, training)
    return values


def _cloned(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple | list):
        return type(value)(_cloned(v) for v in value) if not hasattr(value, "_fields") else value
    if isinstance(value, dict):
        try:  # the same mapping class (a model-output class), else a plain dict
            out = copy.copy(value)
            for k, v in value.items():
                out[k] = _cloned(v)
        except TypeError:
            out = {k: _cloned(v) for k, v in value.items()}
        return out
    return value


def _same(a: Any, b: Any) -> bool:
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
            and a.shape == b.shape and a.device == b.device and torch.equal(a, b))


def _matched(key: str, path: str, *, depth: int, members: list[fx.Node],
             values: dict[fx.Node, Any], args: tuple, kwargs: dict, result: Any
             ) -> tuple[Call, list[fx.Node]] | None:
    """The call's :class:`Call` and the nodes computed before it that it takes without reading
    them, when its arguments and results match the graph's values exactly and uniquely, else
    None."""
    member_set = set(members)
    inputs: list[fx.Node] = []
    located: list[tuple[int, int]] = []
    for index, node in enumerate(members):
        for position, arg in enumerate(node.all_input_nodes):
            if arg not in member_set and arg.op != "get_attr" and arg not in inputs:
                inputs.append(arg)
                located.append((index, position))
    graph = members[0].graph
    before = list(itertools.takewhile(lambda n: n is not members[0], graph.nodes))
    outside: list[fx.Node] = []

    def template(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            hits = [i for i, node in enumerate(inputs) if _same(values.get(node), value)]
            if not hits:  # given but not read: the one node computed earlier that holds it
                earlier = [n for n in before if n.op != "get_attr" and _same(values.get(n), value)]
                if len(earlier) != 1:
                    raise LookupError
                if earlier[0] not in outside:
                    outside.append(earlier[0])
                return Ref(len(inputs) + outside.index(earlier[0]))
            if len(hits) != 1:
                raise LookupError
            return Ref(hits[0])
        if isinstance(value, tuple | list) and not hasattr(value, "_fields"):
            return type(value)(template(v) for v in value)
        if type(value) is dict and all(isinstance(k, str) for k in value):
            return {k: template(v) for k, v in value.items()}
        if isinstance(value, _CONSTANTS):
            return value
        raise LookupError

    try:
        arg_template = template(tuple(args))
        kwarg_template = {}
        for k, v in kwargs.items():
            try:
                kwarg_template[k] = template(v)
            except LookupError:
                if isinstance(v, torch.Tensor) and not any(
                        _same(values.get(node), v) for node in inputs):
                    continue  # a keyword tensor the call's ops never read, found nowhere else
                raise
    except LookupError:
        return None
    # A value flowing in that no argument matches (a mask the trace materialised where the
    # eager call passed None, a size) is one the call computes for itself from its arguments.
    outputs: dict[int, tuple[Any, ...]] = {}
    places = list(_places(result))
    for index, node in enumerate(members):
        if all(user in member_set for user in node.users):
            continue
        hits = [(place, value) for place, value in places if _same(values.get(node), value)]
        passed = [j for j, n in enumerate(inputs) if _same(values.get(n), values.get(node))]
        if not hits and len(passed) == 1:
            # an input passed on unchanged (``x.to(torch.float32)`` of a float32 x: the trace
            # reads it, not the input, after the call too): read after the call as that input
            outputs[index] = Ref(passed[0])
            continue
        if len({id(value) for _place, value in hits}) != 1:
            return None  # nowhere, or equal values in two places: which one is read is unknown
        outputs[index] = hits[0][0]
    items = len(result) if type(result) is tuple else None
    return Call(path, key, len(members), depth, tuple(located), arg_template, kwarg_template,
                outputs, items, len(outside)), outside


def _places(value: Any, at: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """(where, tensor) for each tensor in a call's result: tuple and list items by position,
    mapping items (dicts, model-output classes) by key."""
    if isinstance(value, torch.Tensor):
        yield at, value
    elif isinstance(value, tuple | list):
        for i, item in enumerate(value):
            yield from _places(item, (*at, i))
    elif isinstance(value, dict):
        for k, item in value.items():
            if isinstance(k, str | int):
                yield from _places(item, (*at, k))


# -- collapse --------------------------------------------------------------------------------------
@dataclass
class _Group:
    call: Call
    task: str | None
    nodes: dict[int, fx.Node]  # member index -> node
    kind: str = "whole"  # "stream": a submodule holding branched layers, per task stream;
    # "copies": a submodule all of whose layers are branched, the task's copy of it called whole
    outside: tuple[fx.Node, ...] = ()  # the values it takes that no member reads (Call.outside)


MARK = "<task>"  # in a stream's body targets: the calling task's copy of a branched layer


class TaskStream(TwoModes, nn.Module):
    """A submodule holding branched layers, run for one task stream: ``stream(*inputs, task)``
    runs its body graph (per mode; taken from one task's copy of the call, with :data:`MARK` in
    place of the task in the targets of its branched layers). It shares the submodule's children
    and tensors, so its state keeps the compiled model's names; the emitter writes it as a
    generated class."""

    def __init__(self, view: nn.Module, bodies: dict[str, fx.Graph], kind: str,
                 per_task: bool = True):
        super().__init__()
        for slot in ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set"):
            self.__dict__[slot] = view.__dict__[slot]
        self.train_graph = bodies["train"]
        self.eval_graph = bodies.get("eval", self.train_graph)
        self.kind = kind  # the original submodule's class name
        self.per_task = per_task  # False: the unbranched model's code, called without a task

    def forward(self, *args: Any) -> Any:
        graph = self.train_graph if self.training else self.eval_graph
        return _StreamRun(self, graph, args[-1] if self.per_task else "").run(*args)


class TaskCopies(nn.ModuleDict):
    """A submodule all of whose layers are branched, as one copy of the whole submodule per task
    (keyed by task name), each built by the original's class; the emitter writes it as
    ``nn.ModuleDict({task: Block(...) for task in TASKS})``."""


class _StreamRun(fx.Interpreter):
    def __init__(self, module: nn.Module, graph: fx.Graph, task: str):
        super().__init__(module, graph=graph)
        self.task = task

    def call_module(self, target: Any, args: tuple, kwargs: dict) -> Any:
        return self.fetch_attr(str(target).replace(MARK, self.task))(*args, **kwargs)

    def get_attr(self, target: Any, args: tuple, kwargs: dict) -> Any:
        return self.fetch_attr(str(target).replace(MARK, self.task))


def collapse_calls(module: DualGraphModule, model: nn.Module, *, containers: set[str],
             examples: Sequence[dict[str, torch.Tensor]], opened: Sequence[str] = (),
             buildable: Callable[[nn.Module], bool] = lambda _m: True) -> DualGraphModule:
    """See :func:`_collapse`; ``module`` itself where collapsing fails (the source then writes
    the submodules' ops)."""
    try:
        return _collapse(module, model, containers=containers, examples=examples,
                         opened=opened, buildable=buildable)
    except Exception as exc:  # (a candidate that does not fit returns None, not an error)
        unexpected(exc)
        return module


def _collapse(module: DualGraphModule, model: nn.Module, *, containers: set[str],
              examples: Sequence[dict[str, torch.Tensor]], opened: Sequence[str],
              buildable: Callable[[nn.Module], bool]) -> DualGraphModule:
    """``module`` with each annotated call of a submodule that holds no branched layer as one
    ``call_module`` node (the submodule rebuilt from ``model``'s, with ``module``'s tensors),
    and each task stream through a submodule holding branched layers as one call of a
    :class:`TaskStream`, kept only if it computes exactly what ``module`` does; ``module``
    itself is unchanged. A submodule all of whose layers are branched becomes a
    :class:`TaskCopies`, its task's copy called whole per stream, where the source can build it.
    A submodule is called whole only where ``buildable`` says the source
    can build it (else its own calls and ops are written). The submodules at ``opened`` are
    written as their traced code (a
    class of their own, as :class:`TaskStream` without a task) and those holding them are not
    called whole: ``original.py`` thus mirrors the generated classes of ``model.py``."""
    usable: dict[str, nn.Module | None] = {}
    kinds: dict[str, str | None] = {}

    def kind_of(path: str) -> str | None:
        if path not in kinds:
            if path in opened:  # written as its traced code, as model.py writes it per task
                kinds[path] = "traced" if _streamable(module, path) else None
            elif any(o != path and under(o, path) for o in opened):
                kinds[path] = "stream" if _streamable(module, path) else None
            elif any(under(c, path) and c != path for c in containers):
                usable[path] = _copies(module, model, path, containers, buildable)
                kinds[path] = ("copies" if usable[path] is not None
                               else "stream" if _streamable(module, path) else None)
            else:
                usable[path] = _assembled(module, model, path)
                if usable[path] is not None and not buildable(usable[path]):
                    usable[path] = None
                kinds[path] = None if usable[path] is None else "whole"
        return kinds[path]

    groups = {mode: _call_groups(graph, kind_of) for mode, graph in module.graphs()}
    # A stream must be found in every mode (its generated class has one forward).
    kind = {k: gs[0].kind for found in groups.values() for k, gs in found.items()}
    keys = sorted(k for k in kind
                  if kind[k] == "whole" or all(k in found for found in groups.values()))
    build = functools.partial(_built, module, groups, usable=usable, model=model,
                              containers=containers)
    result = build(set(keys))
    if result is not None and same_outputs(module, result, examples):
        return result
    kept = {k for k in keys if (single := build({k})) is not None
            and same_outputs(module, single, examples)}
    result = build(kept) if kept else None
    if result is not None and same_outputs(module, result, examples):
        return result
    return module


def called_at(module: DualGraphModule, model: nn.Module, paths: set[str],
              examples: Sequence[dict[str, torch.Tensor]]) -> DualGraphModule | None:
    """``module`` with every annotated call of the submodules at ``paths`` (whose ops the graph
    holds inlined, their tensors read directly) as one ``call_module`` node, the submodule
    rebuilt from ``model``'s with ``module``'s tensors; None where a call was not annotated,
    cannot be placed, or the result does not compute exactly what ``module`` does."""
    usable: dict[str, nn.Module | None] = {}

    def kind_of(path: str) -> str | None:
        if path not in paths:
            return None
        if path not in usable:
            usable[path] = _assembled(module, model, path)
        return None if usable[path] is None else "whole"

    groups = {mode: _call_groups(graph, kind_of) for mode, graph in module.graphs()}
    found = {g.call.path for gs in groups.values() for found in gs.values() for g in found}
    if found != paths:
        return None
    keys = {k for gs in groups.values() for k in gs}
    result = _built(module, groups, keys, usable=usable, model=model, containers=set())
    if result is None or not same_outputs(module, result, examples):
        return None
    # Each new call sits in the calls around it (its members' stack up to its own entry), and
    # the calls are found again on the new graphs, so that those around can be collapsed too.
    for (mode, graph), (_mode, before) in zip(result.graphs(), module.graphs(), strict=True):
        order = {n: i for i, n in enumerate(before.nodes)}
        stacks: dict[str, list[dict]] = {}
        for key, (group, *_copies) in sorted(
                groups[mode].items(), key=lambda kv: min(map(order.get, kv[1][0].nodes.values()))):
            stack = next(iter(group.nodes.values())).meta.get("nn_module_stack") or {}
            outer = list(stack)[:list(stack).index(key)] if key in stack else list(stack)
            stacks.setdefault(group.call.path, []).append({k: stack[k] for k in outer})
        for node in graph.nodes:
            note(node, sites={}, feeds={})
            if node.op == "call_module" and stacks.get(str(node.target)):
                node.meta["nn_module_stack"] = stacks[str(node.target)].pop(0)
    annotate_calls(result, model, examples[0])
    return result


def contiguous_streams(module: DualGraphModule, containers: set[str]) -> None:
    """Order each graph of a branched model so that every task stream through a submodule
    holding branched layers runs as one stretch, task after task (the branching pass clones
    node by node, interleaving the tasks). Only the order in which random ops draw changes; the
    emitted model, which calls such a submodule once per stream, then draws in the same order.
    Only streams found whole in every mode are reordered; graphs with in-place ops or grad-mode
    switches are left as they are."""
    def kind_of(path: str) -> str | None:
        holds = any(under(c, path) for c in containers)
        return "stream" if holds and _streamable(module, path) else None

    if any(n.target in CONTEXT_SWITCHES or in_place(n)
           for _mode, graph in module.graphs() for n in graph.nodes):
        return  # (both modes keep one order, so their forwards stay one)
    found_in = {mode: _call_groups(graph, kind_of) for mode, graph in module.graphs()}
    # Only a stream found whole in every mode becomes a generated class's call (see collapse);
    # reordering another would only make the two modes' graphs differ in order.
    complete = set.intersection(*(set(found) for found in found_in.values()))
    for mode, graph in module.graphs():
        vertex: dict[fx.Node, Any] = {}
        for key, found in found_in[mode].items():
            if key not in complete:
                continue
            for group in found:
                for node in group.nodes.values():
                    if facts(node).task:
                        vertex[node] = (key, group.task)
        if vertex:
            _reorder(graph, vertex)
    module.train(module.training)  # (regenerates forward from the current graph)
    module.recompile()


def _reorder(graph: fx.Graph, vertex: dict[fx.Node, Any]) -> None:
    """Each stream's nodes as one stretch (left as it is where they are not one stretch of
    dataflow), every unit as early as its first node was."""
    position = {n: i for i, n in enumerate(graph.nodes)}
    first: dict[Any, int] = {}
    for n in graph.nodes:
        first.setdefault(vertex.get(n, n), position[n])
    reorder(graph, lambda n: vertex.get(n, n), first.__getitem__)


def under(path: str, prefix: str) -> bool:
    """``path`` is ``prefix`` or lies inside it."""
    return path == prefix or path.startswith(prefix + ".")


def _assembled(module: DualGraphModule, model: nn.Module, path: str,
               compiled_name: Callable[[str], str] = str) -> nn.Module | None:
    """A copy of ``model``'s submodule at ``path`` holding ``module``'s tensors (so ties and
    trained values carry over), or None when ``module`` lacks some of its state. A tensor's
    name in ``module`` is ``compiled_name`` of its name in ``model``."""
    try:
        original = model.get_submodule(path)
    except AttributeError:
        return None
    state = dict(named_tensors(module))
    persistent = set(original.state_dict(keep_vars=True))
    memo: dict[int, Any] = {}  # the copy takes the compiled tensors instead of copying its own
    for name, tensor in named_tensors(original):
        full = compiled_name(f"{path}.{name}")
        if full in state:
            memo[id(tensor)] = state[full]
        elif isinstance(tensor, nn.Parameter) or name in persistent:
            return None
        # (else a non-persistent buffer the graph never reads: the class computes it)
    return copy.deepcopy(original, memo)


def _copies(module: DualGraphModule, model: nn.Module, path: str, containers: set[str],
            buildable: Callable[[nn.Module], bool]) -> TaskCopies | None:
    """The submodule at ``path`` as one copy of the original per task, each holding that task's
    copies of the branched layers; None unless every tensor in it belongs to a branched layer
    (a shared one would be trained apart per task), no tensor is shared between tasks, and the
    source can build each copy."""
    inner = sorted(c for c in containers if under(c, path) and c != path)
    if not inner or path in containers:
        return None
    try:
        view = resolve(module, path)
        holders = [resolve(module, c) for c in inner]
    except AttributeError:
        return None
    if not all(isinstance(h, nn.Module) for h in [view, *holders]):
        return None  # (a parameter read directly, as a ViT's class token: no module to copy)
    tasks = [tuple(h._modules) or tuple(h._parameters) for h in holders]
    if not tasks[0] or any(t != tasks[0] for t in tasks):
        return None
    owner: dict[int, str] = {}
    for name, tensor in named_tensors(view):
        full = f"{path}.{name}"
        task = next((t for c in inner for t in tasks[0] if under(full, f"{c}.{t}")), None)
        if task is None or owner.setdefault(id(tensor), task) != task:
            return None

    def named(task: str) -> Callable[[str], str]:
        def compiled_name(name: str) -> str:
            c = next((c for c in inner if under(name, c)), None)
            return name if c is None else f"{c}.{task}{name[len(c):]}"
        return compiled_name

    copies = {}
    for task in tasks[0]:
        built = _assembled(module, model, path, named(task))
        if built is None or not buildable(built):
            return None
        copies[task] = built
    return TaskCopies(copies)


def _streamable(module: DualGraphModule, path: str) -> bool:
    """Whether the submodule at ``path`` can be a generated class: its members are named as
    attributes can be."""
    try:
        view = resolve(module, path)
    except AttributeError:
        return False
    names = [*view._modules, *view._parameters, *view._buffers]
    return isinstance(view, nn.Module) and all(
        n.isidentifier() and not keyword.iskeyword(n) for n in names)


def _call_groups(graph: fx.Graph, kind_of: Any) -> dict[str, list[_Group]]:
    """Each annotated call in ``graph`` whose submodule can be called as itself, or run per task
    stream by a generated class -> one group per task stream (the stream's copies plus the
    shared members), outermost calls first."""
    by_key: dict[str, list[fx.Node]] = {}
    calls: dict[str, Call] = {}
    feeds: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        for key, (_index, call) in facts(node).sites.items():
            by_key.setdefault(key, []).append(node)
            calls[key] = call
        for key in facts(node).feeds:
            feeds.setdefault(key, []).append(node)
    found: dict[str, list[_Group]] = {}
    claimed: set[fx.Node] = set()
    for key in sorted(by_key, key=lambda k: (calls[k].depth, k)):
        call, nodes = calls[key], by_key[key]
        kind = None if claimed.intersection(nodes) else kind_of(call.path)
        tasks = sorted({t for n in nodes if (t := facts(n).task)})
        shared = [n for n in nodes if not facts(n).task]
        if kind in ("stream", "copies") and (
                not tasks or any(n.op == "call_module" for n in shared)):
            kind = None  # (a shared layer inside would run once per stream)
        if kind in ("stream", "traced") and call.outside:
            kind = None  # (a generated class's inputs are values its ops read)
        if kind is None or kind == "traced" and tasks:
            continue
        kind = "stream" if kind == "traced" else kind
        streams = [(t, [n for n in nodes if facts(n).task == t] + shared)
                   for t in tasks] or [(None, shared)]
        key_nodes = set(nodes)
        built = []
        for task, members in streams:
            indexed = {facts(n).sites[key][0]: n for n in members}
            if len(indexed) != len(members) or set(indexed) != set(range(call.members)):
                break  # some of the call's nodes were moved or dropped (stream batching)
            inner = [n for i, n in indexed.items() if i not in call.outputs]
            if any(u not in key_nodes for n in inner for u in n.users) or (
                    len(streams) > 1 and any(indexed[i] in shared for i in call.outputs)):
                break
            outside = _outside(feeds.get(key, []), key, task, call.outside)
            if outside is None:
                break
            built.append(_Group(call, task, indexed, kind, outside=outside))
        else:
            found[key] = built
            claimed.update(nodes)
    return found


def _outside(nodes: list[fx.Node], key: str, task: str | None, count: int
             ) -> tuple[fx.Node, ...] | None:
    """The ``count`` values a call in ``task``'s stream takes without reading them: the nodes
    marked as feeding it, the stream's own copy where the branching pass cloned one; None where
    one is missing or ambiguous."""
    found: dict[int, list[fx.Node]] = {}
    for node in nodes:
        if facts(node).task in (None, task):
            found.setdefault(facts(node).feeds[key], []).append(node)
    picked = []
    for j in range(count):
        options = found.get(j, [])
        own = [n for n in options if facts(n).task == task] or options
        if len(own) != 1:
            return None
        picked.append(own[0])
    return tuple(picked)


def _built(module: DualGraphModule, groups: dict[str, dict[str, list[_Group]]], keys: set[str],
           *, usable: dict[str, nn.Module | None], model: nn.Module, containers: set[str]
           ) -> DualGraphModule | None:
    """``module`` with the calls in ``keys`` collapsed, or None where one cannot be placed."""
    usable = dict(usable)
    for key in keys:
        found = {mode: groups[mode][key] for mode in groups if key in groups[mode]}
        first = next(iter(found.values()))[0]
        if first.kind == "stream":
            stream = _stream(module, model, containers, found)
            if stream is None:
                return None
            usable[first.call.path] = stream
    graphs = {}
    for mode, graph in module.graphs():
        chosen = [g for k, found in groups[mode].items() if k in keys for g in found]
        graphs[mode] = _collapsed(graph, chosen)
        if graphs[mode] is None:
            return None
    paths = {g.call.path for found in groups.values() for k, gs in found.items() if k in keys
             for g in gs}
    whole = {g.call.path for found in groups.values() for k, gs in found.items() if k in keys
             for g in gs if g.kind == "whole"}
    regions = {t: r for t, r in module.named_modules() if isinstance(r, StreamRegion)}
    bodies = {target: _whole_calls(region.body, whole) for target, region in regions.items()}
    used = {str(n.target) for g in [*graphs.values(), *bodies.values()]
            for n in g.nodes if n.op in ("call_module", "get_attr")}
    root: dict[str, Any] = {}
    for target in used:
        inside = next((p for p in paths if under(target, p)), None)
        try:
            root[target] = (resolve(module, target) if inside is None else usable[inside]
                            if target == inside else
                            resolve(usable[inside], target[len(inside) + 1:]))
        except AttributeError:
            return None  # the graph still reads a constant the tracer lifted into the call
    root.update({p: usable[p] for p in paths})
    # A region calls whole the submodules the forward calls whole (its own copy: the region
    # object is the compiled module's too), with only the inputs it still reads.
    for target, region in regions.items():
        narrowed = region.with_body(bodies[target]) if bodies[target] is not region.body else None
        root[target] = region if narrowed is None else narrowed[0]
        if narrowed is not None:
            for graph in graphs.values():
                for node in graph.find_nodes(op="call_module", target=target):
                    node.args = tuple(node.args[i] for i in narrowed[1])
                prune(graph)
    try:
        result = DualGraphModule(root, graphs["train"], graphs.get("eval", graphs["train"]),
                                 type(module).__name__)
    finally:
        for region in regions.values():  # the new module binds them to itself
            region.bind(module)
    for path in paths:  # (the graphs call the copies inside: install their holder itself)
        if isinstance(usable[path], TaskCopies):
            fx.graph_module._assign_attr(usable[path], result, path)
    result.train(module.training)
    return result


def _whole_calls(body: fx.Graph, paths: set[str]) -> fx.Graph:
    """A stream-batching region's body with each call of a submodule at ``paths`` that it holds
    whole as one ``call_module`` node (``body`` itself where there is none)."""
    found = _call_groups(body, lambda path: "whole" if path in paths else None)
    chosen = [g for groups in found.values() for g in groups]
    collapsed = _collapsed(body, chosen) if chosen else None
    return body if collapsed is None else collapsed


def _collapsed(graph: fx.Graph, chosen: list[_Group]) -> fx.Graph | None:
    """``graph`` with each chosen group's nodes as one call (:func:`reconfx.graph.collapse`),
    or None where that cannot be ordered (a group reads a value another gives after it)."""
    try:
        new = collapse(graph, {i: list(g.nodes.values()) for i, g in enumerate(chosen)},
                       lambda new, key, env: _place(new, chosen[key], env))
    except ValueError:
        return None
    prune(new)  # (reads of the submodules' own tensors that only their calls used)
    new.lint()
    return new


def _place(new: fx.Graph, group: _Group, env: Env) -> dict[fx.Node, fx.Node]:
    """The group's call in ``new`` (its inputs read through ``env``), and the new value of each
    of its nodes read outside it."""
    call = group.call
    inputs = [env(group.nodes[m].all_input_nodes[p]) for m, p in call.inputs]
    inputs += [env(node) for node in group.outside]

    def filled(value: Any) -> Any:
        if isinstance(value, Ref):
            return inputs[value.index]
        if isinstance(value, tuple | list):
            return type(value)(filled(v) for v in value)
        if isinstance(value, dict):
            return {k: filled(v) for k, v in value.items()}
        return value

    if group.kind == "stream":
        node = new.call_module(call.path, (*inputs, group.task) if group.task else tuple(inputs))
    elif group.kind == "copies":
        node = new.call_module(f"{call.path}.{group.task}", filled(call.args), filled(call.kwargs))
    else:
        node = new.call_module(call.path, filled(call.args), filled(call.kwargs))
    # (a branched layer kept as aten ops starts its stream at the read of its weight)
    near = [*group.nodes.values(), *(a for n in group.nodes.values() for a in n.all_input_nodes
                                     if a.op == "get_attr")]
    points = [p for n in near if (p := facts(n).branch_point) is not None]
    # (the emitter unpacks a result whose items are all used)
    meta = note(node, NodeFacts(), name=call.path.replace(".", "_"),
                items=call.items if group.kind != "stream" else None, task=group.task or None,
                branch_point=points[0] if points else None)
    places = call.outputs
    placed: dict[fx.Node, fx.Node] = {}
    if group.kind == "stream":  # the generated forward returns the used values, in order
        used = sorted(places)
        places = {i: () if len(used) == 1 else (j,) for j, i in enumerate(used)}
    for index, place in places.items():
        if isinstance(place, Ref):  # (a stream's body returns it as it does its results)
            placed[group.nodes[index]] = inputs[place.index]
            continue
        value = node
        # (several results are named after the values they are; one after the call)
        name = facts(group.nodes[index]).name if len(places) > 1 else None
        for step in place:
            value = new.call_function(operator.getitem, (value, step))
            note(value, meta, name=name or meta.name)
        placed[group.nodes[index]] = value
    return placed


def _stream(module: DualGraphModule, model: nn.Module, containers: set[str],
            found: dict[str, list[_Group]]) -> TaskStream | None:
    """The stand-in for a submodule run per task stream, from the first task's group in each
    mode, or None where its body reads something outside the submodule."""
    group = next(iter(found.values()))[0]
    path = group.call.path
    inner = {c[len(path) + 1:] for c in containers if c.startswith(path + ".")}
    bodies = {}
    for mode, groups in found.items():
        body = _body(groups[0], inner, _input_names(groups[0], model))
        if body is None:
            return None
        bodies[mode] = body
    return TaskStream(resolve(module, path), bodies, type(model.get_submodule(path)).__name__,
                      group.task is not None)


def _input_names(group: _Group, model: nn.Module) -> list[str]:
    """Names for the values flowing into a stream: the forward's parameter names where the
    value was an argument, else the value's own name."""
    call = group.call
    names: list[str | None] = [None] * len(call.inputs)
    try:
        params = [p.name for p in inspect.signature(model.get_submodule(call.path).forward)
                  .parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError, AttributeError):
        params = []
    for j, value in enumerate(call.args):
        if isinstance(value, Ref) and j < len(params):
            names[value.index] = params[j]
    for k, value in call.kwargs.items():
        if isinstance(value, Ref):
            names[value.index] = k
    taken = {"self", "task", *keyword.kwlist}
    out = []
    for i, (m, p) in enumerate(call.inputs):
        node = group.nodes[m].all_input_nodes[p]
        meta = facts(node)
        base = names[i] or str(meta.name or node.name).removesuffix(f"_{meta.task}")
        base = base if base.isidentifier() else re.sub(r"\W", "_", base)
        out.append(unique_name(base, taken))
    return out


def _relative(target: str, path: str, inner: set[str], task: str) -> str | None:
    """``target`` inside the submodule at ``path``, a branched layer's task copy written with
    :data:`MARK`; None when it lies outside."""
    if not target.startswith(path + "."):
        return None
    rel = target[len(path) + 1:]
    for container in inner:
        own = f"{container}.{task}"
        if rel == own or rel.startswith(own + "."):
            return f"{container}.{MARK}{rel[len(own):]}"
    return rel


def _body(group: _Group, inner: set[str], names: list[str]) -> fx.Graph | None:
    call, task = group.call, group.task or ""
    body = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for (m, p), name in zip(call.inputs, names, strict=True):
        node = group.nodes[m].all_input_nodes[p]
        if node in env:
            continue
        env[node] = body.placeholder(name)
        note(env[node], name=name, type=_type_name(node))
    if group.task:
        note(body.placeholder("task"), name="task", type="str")
    prefix = call.path.replace(".", "_") + "_"
    order = {n: i for i, n in enumerate(next(iter(group.nodes.values())).graph.nodes)}
    for node in sorted(group.nodes.values(), key=order.__getitem__):
        for arg in node.all_input_nodes:
            if arg.op == "get_attr" and arg not in env:
                target = _relative(str(arg.target), call.path, inner, task)
                if target is None:
                    return None
                env[arg] = body.get_attr(target)
                env[arg].meta = dict(arg.meta)
        try:
            new = body.node_copy(node, env.__getitem__)
        except KeyError:
            return None
        if node.op == "call_module":
            target = _relative(str(node.target), call.path, inner, task)
            if target is None:
                return None
            new.target = target
        meta = facts(node)
        new.meta = dict(node.meta)
        note(new, meta, task=None, branch_point=None, sites={}, origin=None,
             name=meta.name and meta.name.removesuffix(f"_{task}").removeprefix(prefix))
        env[node] = new
    outs = [env[group.nodes[i]] for i in sorted(call.outputs)]
    body.output(outs[0] if len(outs) == 1 else tuple(outs))
    body.lint()
    return body


def _type_name(node: fx.Node) -> str:
    value = node.meta.get("val")
    if isinstance(value, int | torch.SymInt) and not isinstance(value, bool):
        return "int"
    if isinstance(value, torch.device):
        return "torch.device"
    return "torch.Tensor"
