"""Stream batching: task streams pass through shared layers as one batch (README: Stream batching).

After a branch point every downstream op runs once per task, also where the module it calls is
shared. Where that is exact, the T calls become one call on the streams concatenated along the
batch axis, split again afterwards. A *region* is a connected set of such ops; in the graph it is
one ``call_module`` of a :class:`StreamRegion`, whose body is the region's ops for a single stream.

Exactness rule (per op, for the mode the graph runs in):

- modules: torch.nn kinds with no batch-dependent behaviour (Linear, Conv, LayerNorm, GroupNorm,
  Embedding, activations, pooling, ...), and in eval mode also Dropout, BatchNorm with running
  statistics and batch-first MultiheadAttention; any other class (a user's leaf) is never batched;
- glue ops: per-sample functions and tensor methods (arithmetic, views, transposes, matmul,
  softmax, attention, ...), never in-place ops;
- shapes: run at two batch sizes, a region's inputs and outputs must carry the batch in axis 0
  (inside, one other axis may carry it: attention's (sequence, batch, ...) layout), and a shared
  input either carries it in axis 0 (repeated once per stream), is a size proportional to it
  (``batch * heads``, multiplied by the streams in a call) or does not depend on it;
- values: each op, then each region, is run on the streams' example values joined and must give
  their outputs joined (beyond float rounding: rtol 1e-4, atol 1e-5), else it is not batched.

Cost rule (deterministic): a batched call of a region may hold at most ``BUDGET_BYTES`` in its
largest intermediate value, or as much as the region's weights where those are larger (run one
stream at a time, every stream reads all of them again; joined, once). That gives a row cap,
checked at run time (the batch size is only known then): the streams run joined in one call
where they fit under it, else one by one (:func:`fits`).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten

from reconfx.emit.render import identifier, unique_name
from reconfx.facts import facts, note
from reconfx.graph import (
    CONTEXT_SWITCHES,
    REGIONS,
    DualGraphModule,
    Env,
    collapse,
    in_place,
    record,
    region_call,
    reorder,
    targets,
)
from reconfx.kinds import exact_module
from reconfx.streams import Region, StreamRegion, compiled_body, run_streams

__all__ = [
    "apply", "batch_kind", "batch_streams", "body_graph", "grown_example", "plan"
]

RTOL, ATOL = 1e-4, 1e-5

# Per-sample glue: function / method / aten names (in-place variants excluded separately).
_GLUE = frozenset("""
add sub mul truediv div floordiv neg pos pow matmul mm bmm addmm baddbmm linear conv1d conv2d
conv3d relu relu6 gelu silu mish sigmoid tanh hardtanh hardswish hardsigmoid leaky_relu elu
softplus softmax _softmax unflatten log_softmax _log_softmax dropout native_dropout layer_norm
native_layer_norm group_norm rms_norm embedding flatten view _unsafe_view reshape transpose t
permute contiguous unsqueeze squeeze expand expand_as clone to _to_copy type_as float half
bfloat16 size sym_size getitem getattr scaled_dot_product_attention
_scaled_dot_product_flash_attention_for_cpu masked_fill where exp log sqrt rsqrt erf abs
clamp clamp_min clamp_max maximum minimum mean sum amax amin max min chunk split
split_with_sizes unbind cat stack narrow slice select alias detach
""".split())


# -- planning ----------------------------------------------------------------------------------
def batch_kind(a: Any, b: Any) -> str:
    """How a value depends on the batch size, from its values at two batch sizes: ``batched``
    (a tensor whose axis 0 alone changes), ``inner`` (a tensor whose one other axis alone
    changes: the batch moved, or merged into another axis), ``static`` (unchanged shape or
    value), ``int`` (a size that changes), ``tuple`` (a container of such items) or ``other``.
    Region inputs and outputs must be ``batched``; inside, any single axis may carry it."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape == b.shape:
            return "static"
        changed = [i for i, (x, y) in enumerate(zip(a.shape, b.shape, strict=False)) if x != y]
        if a.dim() == b.dim() and len(changed) == 1:
            return "batched" if changed == [0] else "inner"
        return "other"
    if isinstance(a, int | torch.SymInt) and isinstance(b, int | torch.SymInt):
        return "static" if a == b else "int"
    if isinstance(a, tuple | list) and isinstance(b, tuple | list) and len(a) == len(b):
        kinds = {batch_kind(x, y) for x, y in zip(a, b, strict=True)}
        if kinds <= {"static"}:
            return "static"
        return "tuple" if kinds <= {"static", "batched", "inner", "int"} else "other"
    if (a is None and b is None) or (type(a) is type(b) and type(a) in (float, bool, str)):
        return "static" if a == b else "other"
    return "other"


def grown_example(example: dict[str, torch.Tensor], batch_inputs: Sequence[str]
                  ) -> dict[str, torch.Tensor]:
    """``example`` one item larger along the batch axis of each of ``batch_inputs`` (run beside
    it to see what depends on the batch size)."""
    return {k: torch.cat([v, v[:1]]) if k in batch_inputs else v for k, v in example.items()}


def _proportional(values: list[dict[fx.Node, Any]], node: fx.Node,
                  examples: Sequence[dict[str, torch.Tensor]]) -> bool:
    """A shared size that is a multiple of the batch (``batch * heads``): with n streams in one
    call it becomes n times larger."""
    b1, b2 = next((a.shape[0], b.shape[0]) for a, b in zip(
        examples[0].values(), examples[1].values(), strict=True) if a.shape[:1] != b.shape[:1])
    v1, v2 = values[0][node], values[1][node]
    return v1 * b2 == v2 * b1


def _name(op: Any) -> str:
    if isinstance(op, torch._ops.OpOverload):
        return op.overloadpacket.__name__
    return str(getattr(op, "__name__", op))


def _arg(node: fx.Node, index: int, names: tuple[str, ...], default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return next((node.kwargs[k] for k in names if k in node.kwargs), default)


def _op_allowed(node: fx.Node, module: nn.Module, training: bool) -> bool:
    if node.op == "call_module":
        return exact_module(module.get_submodule(str(node.target)), training)
    if node.op not in ("call_function", "call_method"):
        return False
    name = _name(node.target)
    if name not in _GLUE or name.endswith("_") and not name.endswith("__") or (
            node.target in (operator.iadd, operator.isub, operator.imul, operator.itruediv)):
        return False  # not per-sample, or in place
    if name in ("dropout", "native_dropout"):  # random unless off: p == 0 or not training
        return _arg(node, 1, ("p",), 0.5) == 0 or not _arg(node, 2, ("training", "train"), True)
    if "scaled_dot_product" in name:  # (the fused CPU op takes dropout_p before its mask)
        at = [a.name for a in node.target._schema.arguments].index("dropout_p") if isinstance(
            node.target, torch._ops.OpOverload) else 4  # F.scaled_dot_product_attention's
        return _arg(node, at, ("dropout_p",), 0.0) == 0
    return True


@dataclass
class _Group:
    origin: str
    task_nodes: dict[str, fx.Node]  # task -> clone
    inputs: list[tuple[str, Any]]  # ("stream", origin) | ("shared", node) | ("const", value)


def _groups(graph: fx.Graph) -> dict[str, dict[str, fx.Node]]:
    groups: dict[str, dict[str, fx.Node]] = {}
    for node in graph.nodes:
        found = facts(node)
        if found.origin is not None and found.task is not None:
            groups.setdefault(found.origin, {})[found.task] = node
    return groups


def _leaves(node: fx.Node) -> tuple[list[Any], Any]:
    return tree_flatten((list(node.args), dict(node.kwargs)))


def _group_inputs(clones: dict[str, fx.Node], origin_of: dict[fx.Node, str]
                  ) -> list[tuple[str, Any]] | None:
    """Each argument position as a stream input (the same origin's clone for every task), a
    shared node, or a constant; None when the clones' arguments do not line up."""
    flat = {t: _leaves(n) for t, n in clones.items()}
    specs = {repr(spec) for _leaves_, spec in flat.values()}
    if len(specs) != 1:
        return None
    out: list[tuple[str, Any]] = []
    columns = zip(*(leaves for leaves, _spec in flat.values()), strict=True)
    for tasks_values in columns:
        first = tasks_values[0]
        if all(isinstance(v, fx.Node) for v in tasks_values):
            origins = {origin_of.get(v) for v in tasks_values}
            if len(set(tasks_values)) == 1 and first not in origin_of:
                out.append(("shared", first))
            elif len(origins) == 1 and None not in origins:
                out.append(("stream", origins.pop()))
            else:
                return None
        elif any(isinstance(v, fx.Node) for v in tasks_values):
            return None
        else:
            try:
                same = all(type(v) is type(first) and v == first for v in tasks_values)
            except Exception:  # a tensor constant, whose == is elementwise
                same = False
            if not same:
                return None
            out.append(("const", first))
    return out


def plan(module: nn.Module, graph: fx.Graph, examples: Sequence[dict[str, torch.Tensor]],
         training: bool = False) -> list[Region]:
    """The regions of ``graph`` to batch, given example inputs at two batch sizes (axis 0)."""
    groups = _groups(graph)
    if not groups:
        return []
    origin_of = {n: o for o, clones in groups.items() for n in clones.values()}
    values = [record(module, graph, ex) for ex in examples]
    kind = {n: batch_kind(values[0].get(n), values[1].get(n)) for n in graph.nodes}

    candidates: dict[str, _Group] = {}
    for origin, clones in groups.items():
        if len(clones) < 2:
            continue
        first = next(iter(clones.values()))
        if len({(n.op, str(n.target)) for n in clones.values()}) != 1:
            continue  # per-task copies
        if not _op_allowed(first, module, training):
            continue
        inputs = _group_inputs(clones, origin_of)
        if inputs is None or kind[first] == "other":
            continue
        streams = [kind[groups[o][next(iter(clones))]] for k, o in inputs if k == "stream"]
        shared = [kind[v] for k, v in inputs if k == "shared"]
        if not streams or any(k in ("tuple", "inner", "other") for k in shared) or any(
                kind[v] == "int" and not _proportional(values, v, examples)
                for k, v in inputs if k == "shared"):
            continue
        if kind[first] == "static" and isinstance(values[0].get(first), torch.Tensor) and (
                {"batched", "inner"} & set(streams)):
            continue  # reduces over the batch
        if not _op_exact(module, clones, origin_of, kind, values):
            continue
        candidates[origin] = _Group(origin, dict(clones), inputs)

    regions = _grow(graph, groups, candidates)
    planned = []
    for region_groups in regions:
        region = _finish(module, region_groups, groups, kind, values)
        if region is None:
            continue
        region.body = body_graph(region)
        if _validated(module, region, values):
            planned.append(region)
    return planned


def _axis(a: torch.Tensor, b: torch.Tensor) -> int:
    return next((i for i, (x, y) in enumerate(zip(a.shape, b.shape, strict=True)) if x != y), 0)


def _joined(items: list[Any], like: tuple[Any, Any]) -> Any:
    """Values of several streams as one batched value: tensors concatenated along the axis
    that carries the batch, sizes added, containers item by item, constants as they are."""
    first = items[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(items, _axis(*like)) if like[0].shape != like[1].shape else first
    if isinstance(first, int) and not isinstance(first, bool) and like[0] != like[1]:
        return sum(items)
    if isinstance(first, tuple | list):
        return type(first)(_joined([it[i] for it in items], (like[0][i], like[1][i]))
                           for i in range(len(first)))
    return first


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.allclose(
            a, b, rtol=RTOL, atol=ATOL, equal_nan=True)
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _op_exact(module: nn.Module, clones: dict[str, fx.Node], origin_of: dict[fx.Node, str],
              kind: dict[fx.Node, str], values: list[dict[fx.Node, Any]]) -> bool:  # noqa: C901
    """One call of the op on the streams' recorded inputs, joined, gives their recorded outputs
    joined: the op treats each sample on its own (catches e.g. a softmax over the batch)."""
    tasks = list(clones)
    first = clones[tasks[0]]
    if "inner" in {kind[first], *(kind[n] for n in first.all_input_nodes)}:
        # The batch moved off axis 0 (attention's (sequence, batch, ...) layout): streams are
        # interleaved there, so this op alone is not comparable; the region's check covers it.
        return True
    by_origin = {(origin_of[n], t): n for t, c in clones.items() for n in c.all_input_nodes
                 if n in origin_of}

    def joined(node: fx.Node) -> Any:
        like = (values[0][node], values[1][node])
        if node in origin_of:  # a stream: this origin's value in every stream
            streams = [by_origin[origin_of[node], t] for t in tasks]
            return _joined([values[0][n] for n in streams], like)
        return _joined([values[0][node]] * len(tasks), like)  # shared, scaled if batched

    args = fx.node.map_arg(first.args, joined)
    kwargs = fx.node.map_arg(first.kwargs, joined)
    try:
        with torch.no_grad():
            if first.op == "call_module":
                got = module.get_submodule(str(first.target))(*args, **kwargs)
            elif first.op == "call_method":
                got = getattr(args[0], str(first.target))(*args[1:], **kwargs)
            else:
                got = first.target(*args, **kwargs)
    except Exception:
        return False
    want = _joined([values[0][c] for c in clones.values()], (values[0][first], values[1][first]))
    return _same(got, want)


def _grow(graph: fx.Graph, groups: dict[str, dict[str, fx.Node]],
          candidates: dict[str, _Group]) -> list[list[_Group]]:
    """Connected, convex sets of candidate groups with the same tasks, in graph order. A region
    never spans a switch of grad mode or autocast (the enter and exit of ``torch.no_grad()`` or
    ``torch.autocast()``): collapsing it into one call would move its ops across the switch."""
    region_of: dict[str, int] = {}  # origin -> region id
    members: list[list[_Group]] = []
    joined: dict[int, int] = {}  # a region merged into another -> that one
    deps: dict[fx.Node, frozenset[int]] = {}  # regions a node depends on (transitively)
    origin_of = {n: o for o, clones in groups.items() for n in clones.values()}
    segment: dict[fx.Node, int] = {}  # how many switches come before the node
    count = 0
    for node in graph.nodes:
        count += node.op == "call_function" and node.target in CONTEXT_SWITCHES
        segment[node] = count

    def root(rid: int) -> int:
        while rid in joined:
            rid = joined[rid]
        return rid

    def region(n: fx.Node) -> int | None:
        origin = origin_of.get(n)
        return root(region_of[origin]) if origin in region_of else None

    def convex(ids: set[int], inputs: list[fx.Node]) -> bool:
        """No input from outside the regions ``ids`` (and the group joining them) depends on
        them."""
        for rid in ids:
            inputs = inputs + [n for g in members[rid] for clone in g.task_nodes.values()
                               for n in clone.all_input_nodes]
        return all(region(n) in ids or not {root(d) for d in deps[n]} & ids for n in inputs)

    for node in graph.nodes:
        ups: set[int] = set()
        for arg in node.all_input_nodes:
            ups |= deps.get(arg, frozenset())
            if origin_of.get(arg) in region_of:
                ups.add(region_of[origin_of[arg]])
        deps[node] = frozenset(ups)
        origin = origin_of.get(node)
        if origin is None or origin not in candidates or origin in region_of:
            continue
        group = candidates[origin]
        tasks = tuple(group.task_nodes)
        if len({segment[n] for n in group.task_nodes.values()}) != 1:
            continue
        inside = {root(region_of[o]) for k, o in group.inputs if k == "stream"
                  and o in region_of and tuple(members[root(region_of[o])][0].task_nodes) == tasks
                  and segment[members[root(region_of[o])][0].task_nodes[tasks[0]]]
                  == segment[node]}
        inputs = [n for clone in group.task_nodes.values() for n in clone.all_input_nodes]
        chosen = None
        if len(inside) > 1 and convex(inside, inputs):  # (attention joins its q, k and v)
            chosen = min(inside)
            for rid in inside - {chosen}:
                members[chosen] += members[rid]
                members[rid] = []
                joined[rid] = chosen
        for rid in sorted(inside, reverse=True) if chosen is None else ():
            # Joining keeps the region convex: no input from outside it depends on it.
            if convex({rid}, inputs):
                chosen = rid
                break
        if chosen is None:
            chosen = len(members)
            members.append([])
        members[chosen].append(group)
        region_of[origin] = chosen
    return [m for m in members if m]


def _finish(module: nn.Module, region_groups: list[_Group],
            groups: dict[str, dict[str, fx.Node]], kind: dict[fx.Node, str],
            values: list[dict[fx.Node, Any]]) -> Region | None:
    """The region's inputs and outputs, or None when it is not worth or not able to batch."""
    tasks = tuple(region_groups[0].task_nodes)
    origins = {g.origin for g in region_groups}
    nodes = {t: [g.task_nodes[t] for g in region_groups] for t in tasks}
    member = {n for ns in nodes.values() for n in ns}
    modules = [str(g.task_nodes[tasks[0]].target) for g in region_groups
               if g.task_nodes[tasks[0]].op == "call_module"]
    if not any(any(True for _ in module.get_submodule(m).parameters()) for m in modules):
        return None  # nothing but glue: the concatenation would cost what it saves
    stream_inputs: dict[str, dict[str, fx.Node]] = {}
    repeated: dict[fx.Node, None] = {}
    shared: dict[fx.Node, None] = {}
    for g in region_groups:
        for k, v in g.inputs:
            if k == "stream" and v not in origins:
                stream_inputs.setdefault(v, {t: groups[v][t] for t in tasks})
            elif k == "shared" and v.op != "get_attr":  # parameters: read in the body
                (repeated if kind[v] in ("batched", "int") else shared)[v] = None
    for clones in stream_inputs.values():
        if any(kind[n] != "batched" for n in clones.values()):
            return None
    outputs = []
    for g in region_groups:
        if any(u not in member for n in g.task_nodes.values() for u in n.users):
            if any(kind[n] != "batched" for n in g.task_nodes.values()):
                return None  # a size or a container leaves the region: keep it per stream
            outputs.append(dict(g.task_nodes))
    if not stream_inputs or not outputs:
        return None
    first_input = next(iter(stream_inputs.values()))[tasks[0]]
    rows = max(values[0][first_input].shape[0], 1)
    biggest = max((v.numel() * v.element_size() for n in nodes[tasks[0]]
                   for v in [values[0].get(n)] if isinstance(v, torch.Tensor)), default=0)
    types = {n: type(values[0][n]).__name__ for n in [*repeated, *shared]
             if not isinstance(values[0][n], torch.Tensor)}
    weights = {id(t): t for m in modules for sub in [module.get_submodule(m)]
               for t in [*sub.parameters(), *sub.buffers()]}
    weights.update({id(t): t for g in region_groups for k, v in g.inputs
                    if k == "shared" and v.op == "get_attr"
                    for t in [values[0].get(v)] if isinstance(t, torch.Tensor)})
    return Region(_region_name(modules), tasks, nodes, modules, list(stream_inputs.values()),
                  list(repeated), list(shared), outputs, -(-biggest // rows),
                  sum(t.numel() * t.element_size() for t in weights.values()), types)


def _region_name(modules: list[str]) -> str:
    """``encoder_layer_4`` or ``encoder_layer_4_to_5``: the modules' common path and, when they
    span several of its children, the first and last child."""
    parts = [m.split(".") for m in modules]
    common: list[str] = []
    for column in zip(*parts, strict=False):
        if len(set(column)) != 1:
            break
        common.append(column[0])
    if len(common) == min(len(p) for p in parts):
        common = common[:-1] if len(modules) > 1 else common
    depth = len(common)
    first, last = parts[0][depth] if depth < len(parts[0]) else "", parts[-1][depth] if (
        depth < len(parts[-1])) else ""
    name = "_".join(common + ([first] if first else []))
    if last and last != first:
        name += f"_to_{last}"
    return identifier(name or "streams")


def body_graph(region: Region) -> fx.Graph:
    """One stream's ops of ``region`` (the first task's), over placeholders for its inputs."""
    body = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    task = region.tasks[0]
    taken: set[str] = set()

    def placeholder(node: fx.Node) -> fx.Node:
        name = unique_name(identifier(_base(node)), taken)
        p = body.placeholder(name)
        note(p, name=name, type=region.types.get(node, "torch.Tensor"))
        return p

    for clones in region.stream_inputs:
        env[clones[task]] = placeholder(clones[task])
    for node in region.repeated + region.shared:
        env[node] = placeholder(node)
    for node in region.nodes[task]:
        for arg in node.all_input_nodes:
            if arg.op == "get_attr" and arg not in env:
                env[arg] = body.get_attr(str(arg.target))
        copy = body.node_copy(node, lambda n: env[n])
        note(copy, facts(node), task=None, branch_point=None)
        env[node] = copy
    body.output(tuple(env[out[task]] for out in region.outputs))
    body.lint()
    return body


def _base(node: fx.Node) -> str:
    found = facts(node)
    base = found.name or node.name
    return base.removesuffix(f"_{found.task}") if found.task else base


def _validated(module: nn.Module, region: Region, values: list[dict[fx.Node, Any]]) -> bool:
    """The region batched gives each stream's recorded outputs (both batch sizes)."""
    fn = compiled_body(region.body)
    for recorded in values:
        streams = [tuple(recorded[c[t]] for c in region.stream_inputs) for t in region.tasks]
        rep = tuple(recorded[n] for n in region.repeated)
        sh = tuple(recorded[n] for n in region.shared)
        try:
            with torch.no_grad():
                got = run_streams(lambda *a: fn(module, *a), streams, rep, sh, None)
        except Exception:
            return False
        want = [recorded[out[t]] for out in region.outputs for t in region.tasks]
        for a, b in zip(want, got, strict=True):
            if a.shape != b.shape or a.dtype != b.dtype or not torch.allclose(
                    a, b, rtol=RTOL, atol=ATOL, equal_nan=True):
                return False
    return True


# -- rewriting ---------------------------------------------------------------------------------
def apply(graph: fx.Graph, regions: list[Region], objs: dict[str, Any]) -> fx.Graph:
    """A new graph in which each region is one ``call_module`` of a :class:`StreamRegion`
    (added to ``objs``) followed by ``getitem`` nodes for the streams' outputs."""
    methods: set[str] = set()

    def write_call(new: fx.Graph, index: int, env: Env) -> dict[fx.Node, fx.Node]:
        region = regions[index]
        method = unique_name(f"shared_{region.name}", methods)
        target = f"{REGIONS}.{method}"
        objs[target] = StreamRegion(region, method)
        args = [env(c[t]) for t in region.tasks for c in region.stream_inputs]
        args += [env(n) for n in region.repeated + region.shared]
        call = new.call_module(target, tuple(args))
        note(call, name=method, region=region.name)
        items = {}
        for i, out in enumerate(region.outputs):
            for j, task in enumerate(region.tasks):
                item = new.call_function(operator.getitem, (call, i * len(region.tasks) + j))
                # (its name and task, not the module call it was part of: that call's ops
                # now run inside the region, so it cannot be written as one call)
                note(item, facts(out[task]), sites={})
                items[out[task]] = item
        return items

    partitions = {i: [n for ns in region.nodes.values() for n in ns]
                  for i, region in enumerate(regions)}
    try:
        new = collapse(graph, partitions, write_call)
    except ValueError as exc:
        raise RuntimeError(f"stream batching: {exc}") from exc
    _drop_unused(new)
    new.lint()
    return new


def _drop_unused(graph: fx.Graph) -> None:
    """Erase the region outputs nobody reads and the parameters only region bodies read (each
    body fetches its own)."""
    for node in reversed(list(graph.nodes)):
        if node.users:
            continue
        if node.op == "get_attr" or (
                node.op == "call_function" and node.target is operator.getitem
                and isinstance(node.args[0], fx.Node) and region_call(node.args[0])):
            graph.erase_node(node)


def batch_streams(module: DualGraphModule, example: dict[str, torch.Tensor],
                  batch_inputs: Sequence[str]) -> DualGraphModule:
    """``module`` with its eval graph's exact regions batched (a new module over the same
    submodules; its train graph ordered like the eval graph, see :func:`_align`), or ``module``
    itself when no region qualifies. ``batch_inputs`` are the inputs whose axis 0 is the batch;
    the example is also run one item larger to see what depends on the batch. On
    docs/passes.md's two-head model branched at ``fc2`` (the eval graph; tests/test_passes.py
    checks both listings)::

        Before:                  After:
        x = input                x = input
        fc1 = fc1(x)             fc1 = fc1(x)
        relu = relu(fc1)         relu = relu(fc1)
        fc2 = fc2.a(relu)        fc2 = fc2.a(relu)
        fc2_1 = fc2.b(relu)      fc2_1 = fc2.b(relu)
        fc3 = fc3(fc2)           stream_regions_shared_fc3 = stream_regions.shared_fc3(fc2, fc2_1)
        fc3_1 = fc3(fc2_1)       getitem = getitem(stream_regions_shared_fc3, 0)
        a = a(fc3)               getitem_1 = getitem(stream_regions_shared_fc3, 1)
        b = b(fc3_1)             a = a(getitem)
        return {'a': a, 'b': b}  b = b(getitem_1)
                                 return {'a': a, 'b': b}
    """
    if not batch_inputs:
        return module
    grown = grown_example(example, batch_inputs)
    was_training = module.training
    module.eval()
    try:
        regions = plan(module, module.eval_graph, [example, grown], training=False)
    finally:
        module.train(was_training)
    if not regions:
        return module
    objs = targets(module)
    eval_graph = apply(module.eval_graph, regions, objs)
    _align(module.train_graph, eval_graph, regions)
    batched = DualGraphModule(objs, module.train_graph, eval_graph, type(module).__name__)
    return batched.train(was_training)


def _align(train: fx.Graph, batched: fx.Graph, regions: list[Region]) -> None:
    """Order ``train`` (the unbatched graph the regions were planned on) like the batched eval
    graph: each region's ops where the region's call is, one stream after another (as the
    emitted source writes the streams one by one, a whole submodule's call per stream where it
    can), everything else in the eval graph's order, so that the two modes' code differs only
    at the regions. Only independent ops change places (random ops: the order the streams draw
    in); graphs with in-place ops or grad-mode switches keep their order."""
    if any(n.target in CONTEXT_SWITCHES or in_place(n) for n in train.nodes):
        return
    position = {n.name: (i,) for i, n in enumerate(batched.nodes)}
    at = {facts(n).region: position[n.name] for n in batched.nodes if region_call(n)}
    for region in regions:  # (the planned graph's nodes: the train graph's by name)
        for t, task in enumerate(region.tasks):
            for k, node in enumerate(region.nodes[task]):
                position[node.name] = (*at[region.name], t, k)
    key: dict[fx.Node, tuple[int, ...]] = {}
    for n in train.nodes:  # a node the eval graph lacks goes right after its inputs
        key[n] = position.get(n.name) or (*max((key[a] for a in n.all_input_nodes),
                                                default=(-1,)), 1)
    reorder(train, lambda n: n, key.__getitem__)
