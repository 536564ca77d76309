"""Module calls in a traced graph: which stretch of nodes is one call of which submodule, and
with which arguments, so the emitter can write ``self.encoder.layer[0](hidden, mask)`` where
the surgery left a submodule untouched instead of the ops it traced to.

Both tracing tiers record, on every node, the stack of module calls it ran in
(``nn_module_stack``). That says which nodes belong to a call, not how the call was made: which
of the values flowing in is which argument, which constants it was given, and where in its
result (a tensor, a tuple, a model-output mapping) each value flowing out sits.
:func:`annotate` finds that out by running the eager model with hooks on every submodule and
the graph on the same example (from the same random state), and matching the tensors a call
received and returned to the values of the nodes around its stretch: a call is annotated only
when every match is exact and unique. The result is written on the nodes
(``node.meta["reconfx"]["sites"]``), so it survives the branching pass, which copies nodes.

:func:`collapse` then turns each complete call of a submodule that holds no branched layer into
one ``call_module`` node, and keeps the result only where the graph still computes exactly the
same outputs, in both modes, on every example.
"""

from __future__ import annotations

import copy
import inspect
import operator
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from reconfx.checks import compare, preserved, run
from reconfx.graph import DualGraphModule, prune, resolve

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
    the call the branching pass makes. ``args``/``kwargs`` are the call's arguments with
    :class:`Ref` in place of tensors; ``outputs`` maps each member whose value is used after
    the call to where it sits in the call's result (``(0,)``: ``result[0]``)."""

    path: str
    key: str
    members: int
    depth: int
    inputs: tuple[tuple[int, int], ...]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    outputs: dict[int, tuple[Any, ...]]


# -- annotate --------------------------------------------------------------------------------------
def annotate(module: DualGraphModule, model: nn.Module, example: dict[str, torch.Tensor]
             ) -> int:
    """Write the calls of ``model``'s submodules found in ``module``'s graphs on their nodes;
    returns how many calls were found (a call must be found in each mode's graph)."""
    leaves = {str(n.target) for _m, g in module.graphs() for n in g.nodes
              if n.op == "call_module"}
    found: dict[str, dict[str, Call]] = {}
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
                    args, kwargs = _without_defaults(model.get_submodule(path), *recorded[:2])
                    call = _matched(key, path, depth, members, values, args, kwargs,
                                    recorded[2])
                    if call is not None:
                        found[mode][key] = call
    modes = list(found.values())
    kept = set(modes[0]).intersection(*modes[1:])
    for mode, graph in module.graphs():
        groups = _groups(graph, leaves)
        for key in kept:
            call = found[mode][key]
            for index, node in enumerate(groups[key][2]):
                node.meta.setdefault("reconfx", {}).setdefault("sites", {})[key] = (index, call)
    return len(kept)


def _call_id(key: str, path: str) -> tuple[str, int]:
    """(path, how many calls of it came before) for an ``nn_module_stack`` key (``a.b@1``)."""
    match = re.search(r"@(\d+)$", key)
    return path, int(match.group(1)) if match else 0


def _without_defaults(sub: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
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
    random state :func:`reconfx.checks.run` starts the eager model from."""
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


def _matched(key: str, path: str, depth: int, members: list[fx.Node],
             values: dict[fx.Node, Any], args: tuple, kwargs: dict, result: Any) -> Call | None:
    """The call's :class:`Call` when its arguments and results match the nodes around its
    members exactly and uniquely, else None."""
    member_set = set(members)
    inputs: list[fx.Node] = []
    located: list[tuple[int, int]] = []
    for index, node in enumerate(members):
        for position, arg in enumerate(node.all_input_nodes):
            if arg not in member_set and arg.op != "get_attr" and arg not in inputs:
                inputs.append(arg)
                located.append((index, position))

    def template(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            hits = [i for i, node in enumerate(inputs) if _same(values.get(node), value)]
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
        kwarg_template = {k: template(v) for k, v in kwargs.items()}
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
        if len({id(value) for _place, value in hits}) != 1:
            return None  # nowhere, or equal values in two places: which one is read is unknown
        outputs[index] = hits[0][0]
    return Call(path, key, len(members), depth, tuple(located), arg_template, kwarg_template,
                outputs)


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


def collapse(module: DualGraphModule, model: nn.Module, containers: set[str],
             examples: Sequence[dict[str, torch.Tensor]]) -> DualGraphModule:
    """``module`` with each annotated call of a submodule that holds no branched layer as one
    ``call_module`` node (the submodule rebuilt from ``model``'s, with ``module``'s tensors),
    kept only if it computes exactly what ``module`` does; ``module`` itself is unchanged."""
    usable: dict[str, nn.Module | None] = {}

    def submodule(path: str) -> nn.Module | None:
        if path not in usable:
            usable[path] = None if any(_under(c, path) for c in containers) else (
                _assembled(module, model, path))
        return usable[path]

    groups = {mode: _call_groups(graph, submodule) for mode, graph in module.graphs()}
    keys = sorted({k for found in groups.values() for k in found})
    result = _built(module, groups, set(keys), usable)
    if result is not None and _computes_the_same(module, result, examples):
        return result
    kept = {k for k in keys if (single := _built(module, groups, {k}, usable)) is not None
            and _computes_the_same(module, single, examples)}
    result = _built(module, groups, kept, usable) if kept else None
    if result is not None and _computes_the_same(module, result, examples):
        return result
    return module


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


def _assembled(module: DualGraphModule, model: nn.Module, path: str) -> nn.Module | None:
    """A copy of ``model``'s submodule at ``path`` holding ``module``'s tensors (so ties and
    trained values carry over), or None when ``module`` lacks some of its state."""
    try:
        original = model.get_submodule(path)
    except AttributeError:
        return None
    state = dict(module.named_parameters(remove_duplicate=False))
    state.update(module.named_buffers(remove_duplicate=False))
    sub = copy.deepcopy(original)
    persistent = set(sub.state_dict())
    for name, tensor in [*sub.named_parameters(remove_duplicate=False),
                         *sub.named_buffers(remove_duplicate=False)]:
        full = f"{path}.{name}"
        if full not in state:
            if isinstance(tensor, nn.Parameter) or name in persistent:
                return None
            continue  # a non-persistent buffer the graph never reads: the class computes it
        owner_path, _, attr = name.rpartition(".")
        owner = sub.get_submodule(owner_path)
        if attr in owner._parameters:
            owner._parameters[attr] = state[full]
        else:
            owner._buffers[attr] = state[full]
    return sub


def _call_groups(graph: fx.Graph, submodule: Any) -> dict[str, list[_Group]]:
    """Each annotated call in ``graph`` whose submodule can be called as itself -> one group
    per task stream (the stream's copies plus the shared members), outermost calls first."""
    by_key: dict[str, list[fx.Node]] = {}
    calls: dict[str, Call] = {}
    for node in graph.nodes:
        for key, (_index, call) in node.meta.get("reconfx", {}).get("sites", {}).items():
            by_key.setdefault(key, []).append(node)
            calls[key] = call
    found: dict[str, list[_Group]] = {}
    claimed: set[fx.Node] = set()
    for key in sorted(by_key, key=lambda k: (calls[k].depth, k)):
        call, nodes = calls[key], by_key[key]
        if claimed.intersection(nodes) or submodule(call.path) is None:
            continue
        tasks = sorted({t for n in nodes if (t := n.meta["reconfx"].get("task"))})
        shared = [n for n in nodes if not n.meta["reconfx"].get("task")]
        streams = [(t, [n for n in nodes if n.meta["reconfx"].get("task") == t] + shared)
                   for t in tasks] or [(None, shared)]
        key_nodes = set(nodes)
        built = []
        for task, members in streams:
            indexed = {n.meta["reconfx"]["sites"][key][0]: n for n in members}
            if len(indexed) != len(members) or set(indexed) != set(range(call.members)):
                break  # some of the call's nodes were moved or dropped (stream batching)
            inner = [n for i, n in indexed.items() if i not in call.outputs]
            if any(u not in key_nodes for n in inner for u in n.users) or (
                    len(streams) > 1 and any(indexed[i] in shared for i in call.outputs)):
                break
            built.append(_Group(call, task, indexed))
        else:
            found[key] = built
            claimed.update(nodes)
    return found


def _built(module: DualGraphModule, groups: dict[str, dict[str, list[_Group]]], keys: set[str],
           usable: dict[str, nn.Module | None]) -> DualGraphModule | None:
    """``module`` with the calls in ``keys`` collapsed, or None where one cannot be placed."""
    graphs = {}
    for mode, graph in module.graphs():
        chosen = [g for k, found in groups[mode].items() if k in keys for g in found]
        graphs[mode] = _collapsed(graph, chosen)
        if graphs[mode] is None:
            return None
    paths = {g.call.path for found in groups.values() for k, gs in found.items() if k in keys
             for g in gs}
    regions = [r for r in module.modules() if hasattr(r, "bind") and hasattr(r, "body")]
    used = {str(n.target) for g in [*graphs.values(), *(r.body for r in regions)]
            for n in g.nodes if n.op in ("call_module", "get_attr")}
    root: dict[str, Any] = {}
    for target in used:
        inside = next((p for p in paths if _under(target, p)), None)
        try:
            root[target] = (resolve(module, target) if inside is None or target == inside
                            else resolve(usable[inside], target[len(inside) + 1:]))
        except AttributeError:
            return None  # the graph still reads a constant the tracer lifted into the call
    root.update({p: usable[p] for p in paths})
    try:
        result = DualGraphModule(root, graphs["train"], graphs.get("eval", graphs["train"]),
                                 type(module).__name__)
    finally:
        for region in regions:  # the new module binds them to itself
            region.bind(module)
    result.train(module.training)
    return result


def _collapsed(graph: fx.Graph, chosen: list[_Group]) -> fx.Graph | None:
    order = {n: i for i, n in enumerate(graph.nodes)}
    last: dict[fx.Node, list[_Group]] = {}
    members: set[fx.Node] = set()
    for group in chosen:
        nodes = list(group.nodes.values())
        end = max(nodes, key=order.__getitem__)
        outside = [u for i in group.call.outputs for u in group.nodes[i].users
                   if u not in set(nodes)]
        if any(order[u] < order[end] for u in outside):
            return None  # something reads a result before the call has finished
        last.setdefault(end, []).append(group)
        members.update(nodes)
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    try:
        for node in graph.nodes:
            if node not in members:
                env[node] = new.node_copy(node, env.__getitem__)
                continue
            for group in last.get(node, []):
                _place(new, group, env)
    except KeyError:
        return None  # a call reads a value another call gives only after it
    prune(new)  # (reads of the submodules' own tensors that only their calls used)
    new.lint()
    return new


def _place(new: fx.Graph, group: _Group, env: dict[fx.Node, fx.Node]) -> None:
    call = group.call
    inputs = [env[group.nodes[m].all_input_nodes[p]] for m, p in call.inputs]

    def filled(value: Any) -> Any:
        if isinstance(value, Ref):
            return inputs[value.index]
        if isinstance(value, tuple | list):
            return type(value)(filled(v) for v in value)
        if isinstance(value, dict):
            return {k: filled(v) for k, v in value.items()}
        return value

    node = new.call_module(call.path, filled(call.args), filled(call.kwargs))
    meta = {"name": call.path.replace(".", "_")}
    if group.task:
        meta["task"] = group.task
    points = [n.meta["reconfx"]["branch_point"] for n in group.nodes.values()
              if "branch_point" in n.meta.get("reconfx", {})]
    if points:
        meta["branch_point"] = points[0]
    node.meta["reconfx"] = meta
    for index, place in call.outputs.items():
        value = node
        for step in place:
            value = new.call_function(operator.getitem, (value, step))
            value.meta["reconfx"] = dict(meta)
        env[group.nodes[index]] = value


def _computes_the_same(module: DualGraphModule, other: DualGraphModule,
                       examples: Sequence[dict[str, torch.Tensor]]) -> bool:
    with preserved(module, other):
        for example in examples:
            for training in (False, True):
                try:
                    got = run(other, example, training)
                except Exception:
                    return False
                if compare(run(module, example, training), got, 0.0):
                    return False
    return True
