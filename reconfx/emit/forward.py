"""``forward``'s statements: a graph's nodes as named values, one statement each.

Values are named after module paths (``layer1_0_conv1``) with a ``_<task>`` suffix on task
streams; calls of consecutive ``ModuleList`` items become one loop; a stream-batched region is
written once per stream and once joined, under ``if not fits(...)``; where the train and eval
graphs differ, each difference is written once, on ``self.training`` (see
:mod:`reconfx.emit.merge`); aten ops take their plain torch spellings (:mod:`reconfx.aten`).
"""

from __future__ import annotations

import builtins
import dataclasses
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from reconfx.aten import Spelling, packet, spelling
from reconfx.calls import TaskStream
from reconfx.emit.merge import Alternatives, merge_modes
from reconfx.emit.render import (
    LINE,
    LOCAL,
    assign,
    bracketed,
    chain,
    comment,
    infix,
    local_name,
    render_arg,
    render_index,
    render_value,
    statement,
    unique_name,
)
from reconfx.emit.tree import FileParts, Tree, accessor, container_kind, node_at
from reconfx.facts import facts
from reconfx.graph import DualGraphModule, output_node, region_call, resolve
from reconfx.streams import StreamRegion

__all__ = ["ForwardWriter"]

_INFIX = {
    operator.add: "+", operator.sub: "-", operator.mul: "*", operator.truediv: "/",
    operator.floordiv: "//", operator.mod: "%", operator.pow: "**", operator.matmul: "@",
    operator.and_: "&", operator.or_: "|", operator.xor: "^", operator.lshift: "<<",
    operator.rshift: ">>", operator.eq: "==", operator.ne: "!=", operator.lt: "<",
    operator.le: "<=", operator.gt: ">", operator.ge: ">=",
}
_UNARY = {operator.neg: "-", operator.pos: "+", operator.invert: "~", operator.not_: "not "}
_RESERVED = set(dir(builtins)) | {"self", "torch", "nn", "F", "operator", "math"}


@dataclass
class _Scope:
    """The names of one method body being written: each value's local name, the names taken,
    and the task suffix of values whose nodes carry no task (a region's ops written for one
    stream)."""

    tree: Tree
    chains: dict[fx.Node, list[fx.Node]]
    room: int  # see _suffix_room
    suffix: str = ""
    names: dict[fx.Node, str] = field(default_factory=dict)
    taken: set[str] = field(default_factory=set)
    commented: set[str] = field(default_factory=set)  # branch points already commented
    unpacked: set[fx.Node] = field(default_factory=set)  # items named where they are made
    unused: set[fx.Node] = field(default_factory=set)  # values computed but read by nobody
    loop_items: set[str] = field(default_factory=set)  # names only loops bind (``layer``)

    def name_of(self, node: fx.Node) -> str:
        if node.op == "get_attr":
            return chain(accessor(self.tree, str(node.target)))
        return self.names[node]

    def fresh(self, node: fx.Node) -> str:
        stem, suffix = _base_name(node)
        return _fresh((stem, suffix or self.suffix), self.taken, self.room)

    def inner(self, suffix: str, chains: dict[fx.Node, list[fx.Node]],
              taken: set[str] | None = None) -> _Scope:
        """A scope for a region body's ops (``chains``: the body's loops)."""
        return _Scope(self.tree, chains, self.room, suffix, taken=self.taken if taken is None
                      else taken, commented=self.commented, loop_items=self.loop_items)


class ForwardWriter:
    """``forward``'s lines for ``module``'s graphs, reaching its submodules through ``tree``:
    ``rows`` says the task streams run as one tensor (the branch-point comment says so);
    ``branch_notes`` adds to a branch point's comment (a layer -> its conflict score)."""

    def __init__(self, module: DualGraphModule, parts: FileParts, tree: Tree, *,
                 regions: list[StreamRegion], branch_notes: dict[str, str], rows: bool):
        self.module = module
        self.parts = parts
        self.tree = tree
        self.regions = regions
        self.branch_notes = branch_notes
        self.rows = rows
        self.nesting = 0  # extra indentation levels (a forward body rendered inside an if)
        self.spelled: dict[str, set[str]] = {}  # see _mode_arguments

    def lines(self) -> list[str]:
        """``forward``: one method for both modes where the train and eval graphs differ."""
        if self.module.dual:
            return self._one_forward()
        return self._method(self.module.train_graph, "forward")

    def _method(self, graph: fx.Graph, method: str) -> list[str]:
        """``method``'s source: forward (or a train/eval variant) returning the task dict."""
        scope = _Scope(self.tree, _chains(graph, self.tree), _suffix_room(graph))
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        for n in placeholders:
            scope.names[n] = str(n.target)
            scope.taken.add(str(n.target))
        params = ["self"] + [f"{scope.names[n]}: "
                             f"{facts(n).type or 'torch.Tensor'}"
                             for n in placeholders]
        result = output_node(graph).args[0]
        returns = ("dict[str, torch.Tensor]" if isinstance(result, dict) else "torch.Tensor"
                   if isinstance(result, fx.Node) else "tuple[torch.Tensor, ...]")
        lines = [statement(self._indent(1), "", f"def {method}(", params, f") -> {returns}:")]
        for node in graph.nodes:
            if node.op in ("placeholder", "get_attr") or _region_item(node):
                continue
            if node.op == "output":
                if isinstance(result, dict):
                    outs = [f'"{t}": {render_value(n, scope.name_of)}' for t, n in result.items()]
                    lines.append(statement(self._indent(2), "", "return {", outs, "}"))
                else:
                    lines.append(f"{self._indent(2)}return {render_value(result, scope.name_of)}")
            elif region_call(node):
                lines.append(self._region(node, scope))
            else:
                lines += self._statement(node, scope)
        return lines

    def _statement(self, node: fx.Node, scope: _Scope) -> list[str]:
        """The statement(s) computing ``node``, its value named in ``scope`` (none where the
        value keeps another's name or is written with the call it comes from)."""
        same = _identity_input(node)
        if same is not None:  # x + 0 and the like: the value keeps its name
            scope.names[node] = scope.name_of(same)
            return []
        if node in scope.chains:  # ``for layer in self.encoder.layer[:5]: h = layer(h)``
            scope.unpacked.update(scope.chains[node])
            return [self._loop_lines(scope.chains[node], scope)]
        if _folded(node) or node in scope.unpacked:  # written with the call (``f(x)[0]``)
            return []
        note = self._comment(node, scope.commented)
        lines = [note] if note else []
        items = _unpacked(node, self.module)
        if items:  # ``a, b = self.block(x, "left")``
            scope.unpacked.update(items)
            lhs = [scope.fresh(item) for item in items]
            scope.names.update(zip(items, lhs, strict=True))
            return [*lines, self._node_line(node, ", ".join(lhs), scope.name_of)]
        if facts(node).streams:  # ``x_streams = torch.cat([x, x])``
            first = node.args[0]
            joined = first[0] if isinstance(first, list | tuple) else first
            stem = f"{scope.name_of(joined).rstrip('_')}_streams"
            scope.names[node] = _fresh((stem, ""), scope.taken, scope.room)
        else:
            scope.names[node] = scope.fresh(node)
        # kept for its effect (an in-place op, set_grad_enabled) when unused: no name bound
        used = node.users and node not in scope.unused
        return [*lines, self._node_line(node, scope.names[node] if used else "", scope.name_of)]

    def _loop_lines(self, chain: list[fx.Node], scope: _Scope) -> str:
        """A chain of calls of a ``ModuleList``'s consecutive items as one loop (one statement
        of the method, so both modes' renderings compare it whole)."""
        calls = [n for n in chain if n.op == "call_module"]
        container, _, first = str(calls[0].target).rpartition(".")
        last = int(first) + len(calls)
        size = len(node_at(self.tree, container).children)
        items = accessor(self.tree, container)
        if (int(first), last) != (0, size):
            items += f"[{first if first != '0' else ''}:{last if last != size else ''}]"
        ind, carried = self._indent(2), chain[-1]
        suffix = _base_name(carried)[1] or scope.suffix  # (a task stream's loop: its task's)
        var = _fresh((local_name(container.replace(".", "_"), LOCAL), suffix), scope.taken,
                     scope.room)
        if "layer" not in scope.taken:  # (every loop rebinds it: one name serves them all)
            scope.loop_items.add("layer")
        item = "layer" if "layer" in scope.loop_items else _fresh(("layer", ""), scope.taken)
        scope.taken.add(item)
        scope.names[carried] = var
        args = [var, *_call_arguments(calls[0], scope.name_of)[1:]]
        tail = (f")[{render_index(carried.args[1], scope.name_of)}]"
                if carried.op == "call_function" else ")")
        return "\n".join([assign(ind, var, scope.name_of(calls[0].args[0])),
                          f"{ind}for {item} in {items}:",
                          statement(ind + "    ", var, f"{item}(", args, tail)])

    def _region(self, node: fx.Node, scope: _Scope) -> Alternatives:
        """A stream-batched region's call as ``if not fits(rows, cap): <each task stream's
        ops> else: <the streams joined: torch.cat, the ops once, a split>``, its outputs named
        as the region's results are."""
        region: StreamRegion = resolve(self.module, str(node.target))
        body, tasks, (n_in, n_rep, _n_shared) = region.body, region.tasks, region.counts
        inputs = [n for n in body.nodes if n.op == "placeholder"]
        outputs = output_node(body).args[0]
        ops = [n for n in body.nodes if n.op not in ("placeholder", "output", "get_attr")]
        args = [render_value(a, scope.name_of) for a in node.args]
        rest = args[len(tasks) * n_in:]
        results = {u.args[1]: u for u in node.users}
        ind = self._indent(2)
        chains = _chains(body, self.tree)

        def one_by_one(scope: _Scope) -> list[str]:
            """Each stream's ops, one stream after another (as the train graph has them), the
            region's results named in ``scope``."""
            lines = []
            scopes = [scope.inner(f"_{task}", chains=chains) for task in tasks]
            for t, inner in enumerate(scopes):
                inner.names.update(zip(inputs, args[t * n_in:(t + 1) * n_in] + rest,
                                       strict=True))
                inner.unused.update(o for k, o in enumerate(outputs)
                                    if k * len(tasks) + t not in results and len(o.users) == 1)
            for inner in scopes:
                for op in ops:
                    lines += self._statement(op, inner)
            for k, out in enumerate(outputs):
                for t, inner in enumerate(scopes):
                    if k * len(tasks) + t in results:
                        scope.names[results[k * len(tasks) + t]] = inner.name_of(out)
            return lines

        self.nesting += 2  # (also one level deeper, for merge_modes: the same names)
        try:
            deeper = one_by_one(dataclasses.replace(scope, names=dict(scope.names),
                                                    taken=set(scope.taken),
                                                    commented=set(scope.commented)))
        finally:
            self.nesting -= 2
        self.nesting += 1
        try:
            streams = one_by_one(scope)
            joined = [comment(self._indent(2), f"{_span(region.modules_called)}: shared; the "
                              f"task streams {', '.join(tasks)} run joined along the batch "
                              "axis (stream batching)")]
            # (its names are visible only in this branch: later names need not avoid them)
            together = scope.inner("", taken=set(scope.taken), chains=chains)
            joined += self._joined_inputs(together, inputs, args=args, streams=len(tasks),
                                          n_in=n_in, n_rep=n_rep)
            for op in ops:
                joined += self._statement(op, together)
            for k, out in enumerate(outputs):
                names = [scope.names[results[k * len(tasks) + t]]
                         if k * len(tasks) + t in results else "_" for t in range(len(tasks))]
                # (not .chunk: exporters would fix the batch size its chunks depend on)
                split = f"{together.name_of(out)}.unflatten(0, ({len(tasks)}, -1)).unbind()"
                line = f"{self._indent(2)}{', '.join(names)} = {split}"
                joined.append(line if len(line) <= LINE else statement(
                    self._indent(2), "", "(", names, f") = {split}"))
        finally:
            self.nesting -= 1
        rows = f"{len(tasks)} * {args[0]}.shape[0]"
        return Alternatives(ind, "not fits(", [rows, f'self.stream_rows["{region.method}"]'],
                            [streams, deeper], joined)

    def _joined_inputs(self, scope: _Scope, inputs: list[fx.Node], *, args: list[str],
                       streams: int, n_in: int, n_rep: int) -> list[str]:
        """The region's inputs for all streams joined: each stream input concatenated, each
        shared input with a batch axis repeated per stream (a size multiplied), the rest as
        they are."""
        lines = []
        rest = args[streams * n_in:]
        for i, param in enumerate(inputs):
            if i >= n_in + n_rep:
                scope.names[param] = rest[i - n_in]
                continue
            ind = self._indent(2)
            if i < n_in:
                name = scope.fresh(param)
                parts = [args[t * n_in + i] for t in range(streams)]
            else:  # named after the value it repeats (``mask_joined``)
                value = rest[i - n_in]
                stem = value if value.isidentifier() else _base_name(param)[0]
                name = _fresh((local_name(f"{stem}_joined", LOCAL), ""), scope.taken)
                parts = [value] * streams
            scope.names[param] = name
            if i >= n_in and facts(param).type not in (None, "torch.Tensor"):  # (``batch * 4``)
                lines.append(infix(ind, name, parts[0], "*", str(streams)))
                continue
            width = LINE - len(ind) - 16
            lines.append(statement(ind, name, "torch.cat(", [bracketed("[", parts, "]", width)]))
        return lines

    def _comment(self, node: fx.Node, commented: set[str]) -> str | None:
        """One comment per branch point, before the first task's first use of the layer."""
        layer = facts(node).branch_point
        if layer is None or layer in commented:
            return None
        commented.add(layer)
        note = self.branch_notes.get(layer, "")
        if self.rows:
            return comment(self._indent(2), f"branch point: {layer}{note}; from here the task "
                           "streams run as one tensor, the tasks' batches one after another")
        return comment(self._indent(2), f"branch point: {layer}{note}; one copy per task from "
                       "here")

    def _node_line(self, node: fx.Node, lhs: str, name_of: Any) -> str:
        ind = self._indent(2)
        source = node.args[0] if node.args else None
        if node.target is operator.getitem and isinstance(source, fx.Node) and _folded(source):
            return statement(ind, lhs, f"{accessor(self.tree, str(source.target))}(",
                             _call_arguments(source, name_of),
                             f")[{render_index(node.args[1], name_of)}]")
        args = _call_arguments(node, name_of, self._spelled(node))
        if node.op == "call_module":
            return statement(ind, lhs, f"{accessor(self.tree, str(node.target))}(", args)
        if node.op == "call_method":
            return statement(ind, lhs, f"{args[0]}.{node.target}(", args[1:])
        target = node.target
        if packet(target) == "slice" and not node.kwargs and isinstance(node.args[0], fx.Node):
            return assign(ind, lhs, f"{_operand(node.args[0], name_of)}"
                                    f"[{render_index(_slice_index(node.args[1:]), name_of)}]")
        plain = spelling(node)
        if plain is not None:
            return self._plain_line(plain, node, lhs, name_of)
        if target in _INFIX and len(node.args) == 2 and not node.kwargs:
            return infix(ind, lhs, _operand(node.args[0], name_of), _INFIX[target],
                         _operand(node.args[1], name_of))
        if target in _UNARY and len(node.args) == 1:
            return assign(ind, lhs, f"{_UNARY[target]}{_operand(node.args[0], name_of)}")
        if target is getattr and len(node.args) == 2 and str(node.args[1]).isidentifier():
            return assign(ind, lhs, f"{_operand(node.args[0], name_of)}.{node.args[1]}")
        if target is operator.getitem and not node.kwargs:
            return assign(ind, lhs, f"{_operand(node.args[0], name_of)}"
                                    f"[{render_index(node.args[1], name_of)}]")
        return statement(ind, lhs, f"{self._function(target)}(", args)

    def _plain_line(self, plain: Spelling, node: fx.Node, lhs: str, name_of: Any) -> str:
        ind = self._indent(2)
        if plain.kind == "infix":
            return infix(ind, lhs, _operand(node.args[0], name_of), plain.name,
                         _operand(node.args[1], name_of))
        if plain.kind == "unary":
            return assign(ind, lhs, f"{plain.name}{_operand(node.args[0], name_of)}")
        args = _call_arguments(node, name_of, self._spelled(node))
        if plain.kind == "method":
            return statement(ind, lhs, f"{args[0]}.{plain.name}(", args[1:])
        return statement(ind, lhs, f"{plain.name}(", args)

    def _function(self, target: Any) -> str:
        if isinstance(target, torch._ops.OpOverload):
            return f"torch.ops.{target.namespace}.{target._opname}.{target._overloadname}"
        qualified = fx.node._get_qualified_name(target)
        if qualified.startswith("builtins."):
            return qualified.removeprefix("builtins.")
        module = qualified.rpartition(".")[0]
        if module and not module.startswith("torch"):
            self.parts.imports.add(f"import {module}")
        return qualified

    def _indent(self, level: int) -> str:
        return "    " * (level + self.nesting)

    def _spelled(self, node: fx.Node) -> set[str]:
        return self.spelled.get(facts(node).name or node.name, set())

    def _one_forward(self) -> list[str]:
        """``forward`` for a model whose train and eval graphs differ, each difference written
        once where it is, on ``self.training`` (see :mod:`reconfx.emit.merge`)."""
        self.spelled = _mode_arguments([self.module.train_graph],
                                       [self.module.eval_graph, *(r.body for r in self.regions)])
        renderings: dict[fx.Graph, list[list[str]]] = {}
        try:
            # (at each depth an if block may need: train's third for a region's first branch)
            train_depth = 3 if self.regions else 2
            for graph, depth in ((self.module.train_graph, train_depth),
                                 (self.module.eval_graph, 2)):
                for self.nesting in range(depth):
                    renderings.setdefault(graph, []).append(self._method(graph, "forward"))
        finally:
            self.nesting = 0
        train, eval_ = renderings[self.module.train_graph], renderings[self.module.eval_graph]
        body = merge_modes([lines[1:] for lines in train], [lines[1:] for lines in eval_],
                           self._indent(2))
        return [train[0][0], *body]


def _unpacked(node: fx.Node, module: Any) -> list[fx.Node]:
    """The items of a module call's tuple result (a generated class's, or one whose length the
    call's annotation recorded) or of the task rows' ``unbind``, in order, when each is taken
    once (its result is then unpacked where it is made); else empty."""
    if node.op == "call_method" and node.target == "unbind":
        items = facts(node).items  # (the task rows, reconfx.rows)
    elif node.op != "call_module" or region_call(node):
        return []
    else:
        try:
            stream = resolve(module, str(node.target))
        except AttributeError:
            return []
        if isinstance(stream, TaskStream):
            result = output_node(stream.train_graph).args[0]
            items = len(result) if isinstance(result, tuple) else None
        else:
            items = facts(node).items
    users = list(node.users)
    if items is None or any(
            u.target is not operator.getitem or type(u.args[1]) is not int for u in users):
        return []
    users.sort(key=lambda u: u.args[1])
    return users if [u.args[1] for u in users] == list(range(items)) else []


def _chains(graph: fx.Graph, tree: Tree) -> dict[fx.Node, list[fx.Node]]:
    """First call -> the nodes of a chain of at least three calls of consecutive items of one
    ``ModuleList``, next to each other in the graph, each taking the previous one's result (or
    the same item of it) first and the same other arguments."""
    nodes = [n for n in graph.nodes if n.op not in ("placeholder", "get_attr")]
    chains: dict[fx.Node, list[fx.Node]] = {}
    i = 0
    while i < len(nodes):
        chain, j = [nodes[i]], i
        while True:
            step = _chain_step(nodes, j, tree)
            if step is None:
                break
            chain += nodes[j + 1:step + 1]
            j = step
        if _folded(nodes[j]):
            chain.append(nodes[j + 1])  # (the item the last call's result is used for)
        calls = [n for n in chain if n.op == "call_module"]
        if len(calls) >= 3:
            chains[chain[0]] = chain
            i = j + 1
        else:
            i += 1
    return chains


def _chain_step(nodes: list[fx.Node], j: int, tree: Tree) -> int | None:
    """The position of the next call of a chain whose last call is at ``j``, None where the
    chain ends."""
    node = nodes[j]
    if node.op != "call_module" or region_call(node):
        return None
    container, _, index = str(node.target).rpartition(".")
    if not index.isdigit() or not container:
        return None
    try:
        if container_kind(node_at(tree, container)) != "list":
            return None
    except KeyError:
        return None
    carried, k = node, j + 1
    if _folded(node):
        carried, k = nodes[j + 1], j + 2
    if k >= len(nodes) or len(carried.users) != 1:
        return None
    nxt = nodes[k]
    meta, nxt_meta = facts(node), facts(nxt)
    if (nxt.op != "call_module" or str(nxt.target) != f"{container}.{int(index) + 1}"
            or not nxt.args or nxt.args[0] is not carried or nxt.args[1:] != node.args[1:]
            or nxt.kwargs != node.kwargs or _folded(nxt) != _folded(node)
            or meta.task != nxt_meta.task or nxt_meta.branch_point is not None):
        return None
    if _folded(nxt) and next(iter(nxt.users)).args[1] != carried.args[1]:
        return None  # (another item of the next result)
    return k


def _folded(node: fx.Node) -> bool:
    """A module call whose result is only used by taking one item of it (``layer(x)[0]``)."""
    users = list(node.users)
    return (node.op == "call_module" and not region_call(node) and len(users) == 1
            and users[0].op == "call_function" and users[0].target is operator.getitem
            and users[0].args[0] is node and not isinstance(users[0].args[1], fx.Node))


def _region_item(node: fx.Node) -> bool:
    """A ``getitem`` of a region's results (written as part of the region's call)."""
    return (node.op == "call_function" and node.target is operator.getitem
            and isinstance(node.args[0], fx.Node) and region_call(node.args[0]))


def _span(modules: list[str]) -> str:
    return modules[0] if len(modules) == 1 else f"{modules[0]} ... {modules[-1]}"


def _base_name(node: fx.Node) -> tuple[str, str]:
    """The name a node's value gets (from its module path) and its task suffix (``_left``)."""
    meta = facts(node)
    base, task = meta.name or node.name, meta.task
    if not task:
        return base, ""
    return base.removesuffix(f"_{task}"), f"_{task}"


def _fresh(base: tuple[str, str], taken: set[str], room: int = 0) -> str:
    """A new local name: the base shortened to leave ``room`` for the longest task suffix (so
    every task's name is shortened alike and parallel lines align), a counter before the
    suffix where the name is taken."""
    stem, suffix = base
    name = local_name(stem, LOCAL - room if suffix else LOCAL)
    if name in _RESERVED:
        name = f"{name}_"
    return unique_name(name, taken, suffix)


def _suffix_room(graph: fx.Graph) -> int:
    tasks = {facts(n).task for n in graph.nodes}
    return max((len(t) + 1 for t in tasks if t), default=0)


def _call_arguments(node: fx.Node, name_of: Any, spelled: set[str] = frozenset()) -> list[str]:
    """A call node's arguments as source, long lists and tuples one item per line; an aten
    op's keyword arguments equal to its schema's defaults (``pin_memory=False``) left out, except
    those in ``spelled``, which are written by keyword from that one on (``dropout_p=0.0``)."""
    defaults: dict[str, Any] = {}
    args, kwargs = list(node.args), dict(node.kwargs)
    if isinstance(node.target, torch._ops.OpOverload):
        schema = node.target._schema.arguments
        defaults = {a.name: a.default_value for a in schema if a.has_default_value()}
        names = [a.name for a in schema]
        first = min((names.index(n) for n in spelled if n in names), default=len(args))
        if first < len(args) or spelled:
            kwargs = {**dict(zip(names[first:len(args)], args[first:], strict=False)), **kwargs}
            args = args[:first]
            kwargs = {n: kwargs.get(n, defaults.get(n)) for n in names[first:]
                      if n in kwargs or n in spelled}
            while args and _default(args[-1], defaults.get(names[len(args) - 1], _END)):
                args.pop()  # (a trailing ``None`` another mode leaves out)
    kwargs = {k: v for k, v in kwargs.items() if k in spelled
              or not (k in defaults and _default(v, defaults[k]))
              and not (k == "pin_memory" and v is False)}  # (False and None mean the same)
    return [render_arg(a, name_of) for a in args] + [
        f"{k}={render_arg(v, name_of)}" for k, v in kwargs.items()]


def _default(value: Any, default: Any) -> bool:
    """``value`` is a schema default's value (of its type: ``0`` is not ``False``)."""
    return not _reads_nodes(value) and type(value) is type(default) and value == default


def _reads_nodes(value: Any) -> bool:
    found: list[fx.Node] = []
    fx.node.map_arg(value, found.append)
    return bool(found)


def _mode_arguments(train: Sequence[fx.Graph], eval_: Sequence[fx.Graph]
                    ) -> dict[str, set[str]]:
    """For aten calls of the same name in the train and the eval graphs (a forward's, and
    the region bodies written inside it): the schema arguments that are constants differing
    between the two (one passing ``dropout_p=0.1``, the other leaving it at its default), so
    both spell them and the difference is one token."""
    found: list[dict[str, tuple[Any, dict[str, Any]]]] = []
    for graphs in (train, eval_):
        calls = {}
        for node in (n for graph in graphs for n in graph.nodes):
            if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
                schema = node.target._schema.arguments
                values = {a.name: a.default_value for a in schema if a.has_default_value()}
                values.update(zip((a.name for a in schema), node.args, strict=False))
                values.update(node.kwargs)
                calls[facts(node).name or node.name] = (node.target, values)
        found.append(calls)
    spelled: dict[str, set[str]] = {}
    for name, (target, train) in found[0].items():
        other = found[1].get(name)
        if other is None or other[0] is not target:
            continue
        differing = {k for k in train.keys() | other[1].keys()
                     if not _reads_nodes(train.get(k)) and not _reads_nodes(other[1].get(k))
                     and train.get(k) != other[1].get(k)}
        if differing:
            spelled[name] = differing
    return spelled


_END = 2**63 - 1  # the "to the end" of an aten slice


def _slice_index(args: tuple[Any, ...]) -> tuple[slice, ...]:
    """``aten.slice(x, dim, start, end, step)``'s arguments as the index ``x[:, start:end]``
    (which dispatches to the same op)."""
    dim, start, end, step = (list(args) + [0, None, None, 1][len(args):])[:4]
    start = None if start == 0 else start
    end = None if end is None or (isinstance(end, int) and end >= _END) else end
    return (*[slice(None)] * dim, slice(start, end, None if step == 1 else step))


def _identity_input(node: fx.Node) -> fx.Node | None:
    """The input of an aten op that returns its input's value unchanged (``x + 0``, ``x * 1``,
    ``x[:]``) in the same dtype and shape, when nothing modifies the result in place (then it could
    share the input's name); else None."""
    name = packet(node.target) if node.op == "call_function" else None
    neutral = {"add": 0, "sub": 0, "mul": 1, "div": 1}
    if name == "slice" and node.args and isinstance(node.args[0], fx.Node) and not node.kwargs:
        # x[:] along one axis: start 0, end past the axis, step 1
        _dim, start, end, step = (*node.args[1:], None, None, None, None)[:4]
        if start not in (None, 0) or step not in (None, 1) or (
                end is not None and not (isinstance(end, int) and end >= 2**62)):
            return None
        source = node.args[0]
    elif name not in neutral or len(node.args) != 2 or node.kwargs:
        return None
    else:
        source, other = node.args
        if not isinstance(source, fx.Node) or isinstance(other, bool) or other != neutral[name]:
            return None
    mine, theirs = node.meta.get("val"), source.meta.get("val")
    if not isinstance(mine, torch.Tensor) or not isinstance(theirs, torch.Tensor) or (
            mine.dtype != theirs.dtype or mine.shape != theirs.shape):
        return None
    if any(_may_mutate(u) for u in [*node.users, *source.users]):
        return None
    return source


def _may_mutate(node: fx.Node) -> bool:
    """Whether a call may change a tensor argument in place (an in-place op, any module)."""
    if node.op == "call_module":
        return True
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target._schema.is_mutable
    name = getattr(node.target, "__name__", str(node.target))
    return name.endswith("_") and not name.endswith("__")


def _operand(value: Any, name_of: Any) -> str:
    text = render_value(value, name_of)
    if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
        return f"({text})"
    return text
