"""Tracing tiers: turn any ``nn.Module`` into a :class:`DualGraphModule` with fine-grained layers.

Tier 1 (``fx``): ``torch.fx`` symbolic trace with a tracer whose leaves are the modules that
directly own parameters or buffers (plus stateless torch.nn modules and the spec's extra leaves);
containers are traced through. A submodule that fails to trace is retried as a leaf.

Tier 2 (``export``): ``torch.export.export(strict=False)`` with dynamic axes, then every call of a
leaf module is re-lifted from its aten ops back into a ``call_module`` of the original module
(grouped by the innermost ``nn_module_stack`` entry, which tells repeated calls apart), so
parameters stay owned by their modules and train/eval behaviour is the module's again.

``auto`` uses tier 1 when it needs no fallback leaf that hides more than one parameterised module
and reproduces the eager model; else tier 2; tier 1 with coarse leaves is the last resort. Both
modes are traced; where the glue differs, both graphs are kept (see :mod:`reconfx.graph`).
"""

from __future__ import annotations

import contextlib
import fnmatch
import inspect
import io
import logging
import operator
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import fx, nn

from reconfx.aten import drop_default_layout
from reconfx.calls import without_defaults
from reconfx.errors import ModelError, TraceError
from reconfx.facts import facts, note
from reconfx.graph import (
    DualGraphModule,
    Env,
    collapse,
    output_node,
    prune,
    record,
    resolve,
    same_graph,
)
from reconfx.kinds import is_leaf, settings_in
from reconfx.modes import ATOL, max_diff, preserved, run, run_reaching, silenced
from reconfx.tree import key_str, task_outputs

__all__ = [
    "check_top_level_names", "COARSE_KEPT", "describe", "export_trace", "fx_trace", "leaf_tracer",
    "name_nodes", "parameterised_modules", "RANDOM_SETTINGS", "random_settings", "TierFailure",
    "trace", "Traced", "traced_matches"
]

# Ops that only check shapes or guard export; they carry no data and are not kept.
_DROPPED_TARGETS = {
    torch.ops.aten._assert_tensor_metadata.default,
    torch.ops.aten._assert_scalar.default,
    torch.ops.aten.sym_constrain_range_for_size.default,
    torch._assert,
}

# How a note on the coarse fx leaves kept (tier 2 failing too) begins; the selection's error
# for a layer hidden in such a leaf gives what follows it.
COARSE_KEPT = "the coarse fx leaves are kept: "


@dataclass(frozen=True)
class Traced:
    """A traced model and how it was obtained."""

    module: DualGraphModule
    tier: str
    notes: tuple[str, ...] = ()
    ignored_outputs: tuple[str, ...] = ()  # what the model returns besides the tasks' outputs
    atol: float = 0.0  # the tolerance within which the graph reproduces the model (0: exactly)


def parameterised_modules(module: nn.Module) -> int:
    return sum(1 for m in module.modules() if any(
        p is not None for p in m._parameters.values()))


class _LeafTracer(fx.Tracer):
    def __init__(self, leaves: Sequence[str]):
        super().__init__()
        self.leaves = list(leaves)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if any(fnmatch.fnmatchcase(qualname, pattern) for pattern in self.leaves):
            return True
        return is_leaf(m)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:
            if not hasattr(exc, "reconfx_path"):
                exc.reconfx_path = self.path_of_module(m)  # type: ignore[attr-defined]
            raise


def leaf_tracer(extra_leaves: Sequence[str] = ()) -> fx.Tracer:
    """A tracer with reconfx's leaf rule (used to cut a backbone at a tapped feature)."""
    return _LeafTracer(extra_leaves)


class TierFailure(Exception):
    def __init__(self, tier: str, path: str | None, exc: BaseException):
        self.tier, self.path, self.exc = tier, path, exc
        super().__init__(f"{tier}: {describe(exc, path)}")


def describe(exc: BaseException, path: str | None = None) -> str:
    """One line: where in user code the exception came from, and its message."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if "/torch/" not in f.filename and "/reconfx/" not in f.filename]
    line = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    where = f"in '{path}'" if path else "at the top level"
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{where}{line}: {type(exc).__name__}: {message}"


# ---------------------------------------------------------------------------------------------
# Tier 1: torch.fx
# ---------------------------------------------------------------------------------------------

def _concrete_args(model: nn.Module, input_names: Sequence[str]) -> dict[str, Any]:
    """Fix every forward parameter the spec does not name to its default."""
    signature = inspect.signature(model.forward)
    concrete = {}
    for name, param in signature.parameters.items():
        if name in input_names or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if param.default is inspect.Parameter.empty:
            raise ModelError(f"forward() needs '{name}', which the spec's inputs do not name",
                             fix=f"add an input named '{name}' to inputs")
        concrete[name] = param.default
    missing = [n for n in input_names if n not in signature.parameters]
    if missing and not any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values()):
        raise ModelError(f"forward() of {type(model).__name__} takes no argument named "
                         f"{', '.join(repr(m) for m in missing)}",
                         fix=f"name inputs after forward()'s parameters: "
                             f"{', '.join(signature.parameters)}")
    return concrete


def fx_trace(model: nn.Module, input_names: Sequence[str], leaves: Sequence[str],
             training: bool, notes: list[str]) -> tuple[fx.Graph, list[str]]:
    """Trace in one mode; a submodule that fails is retried as a leaf. Returns the graph and the
    leaves that had to be added."""
    concrete = _concrete_args(model, input_names)
    forced: list[str] = []
    was_training = model.training
    model.train(training)
    try:
        while True:
            tracer = _LeafTracer([*leaves, *forced])
            try:
                graph = tracer.trace(model, concrete_args=concrete or None)
                break
            except Exception as exc:
                path = getattr(exc, "reconfx_path", None)
                if not path or path in forced:
                    raise TierFailure("fx", path, exc) from exc
                forced.append(path)
                notes.append(f"fx could not trace '{path}' ({describe(exc, path)}); "
                             "it is kept as one leaf")
    finally:
        model.train(was_training)
    _keep_spec_placeholders(graph, input_names)
    for node in graph.find_nodes(op="call_module"):  # (a leaf called as its parent called it)
        node.args, node.kwargs = without_defaults(model.get_submodule(str(node.target)),
                                                  node.args, node.kwargs)
    return graph, forced


def _keep_spec_placeholders(graph: fx.Graph, input_names: Sequence[str]) -> None:
    """Drop placeholders of fixed (concrete) arguments and order the rest as the spec does."""
    placeholders = {n.target: n for n in graph.nodes if n.op == "placeholder"}
    for name, node in placeholders.items():
        if name not in input_names:
            # fx checks a fixed non-None argument against its value: arg == value -> _assert
            for check in [u for u in node.users if u.target is operator.eq
                          and all(a.target is torch._assert for a in u.users)]:
                for assertion in list(check.users):
                    graph.erase_node(assertion)
                graph.erase_node(check)
            if node.users:
                raise ModelError(f"forward() argument '{name}' is used but not in the spec",
                                 fix="add it to the spec's inputs")
            graph.erase_node(node)
    anchor = next(n for n in graph.nodes if n.op != "placeholder")
    for name in input_names:
        anchor.prepend(placeholders[name])


# ---------------------------------------------------------------------------------------------
# Tier 2: torch.export + re-lifting
# ---------------------------------------------------------------------------------------------

def export_trace(model: nn.Module, example: dict[str, torch.Tensor], *,
                 dynamic: dict[str, list[int]], training: bool, notes: list[str],
                 leaves: Sequence[str] = ()) -> tuple[fx.Graph, dict[str, Any]]:
    """Export in one mode and re-lift leaf modules. Returns the graph (its output node keeps
    the flat outputs in ``meta["flat_outputs"]``) and the attribute table its get_attr and
    call_module targets refer to."""
    from torch.export import Dim

    shapes = {name: {axis: Dim.AUTO for axis in dynamic.get(name, [])} for name in example}
    was_training = model.training
    model.train(training)
    try:
        with _quiet_torch_logs():
            ep = torch.export.export(model, (), dict(example), dynamic_shapes=shapes, strict=False)
    except Exception as exc:
        raise TierFailure("torch.export", None, exc) from exc
    finally:
        model.train(was_training)
    flat = ep.module()
    _inline_wrapped(flat)
    drop_default_layout(flat.graph)
    return _relift(model, flat, example=example, training=training, notes=notes, leaves=leaves)


def _copy_in(sub: fx.GraphModule, gm: fx.GraphModule, prefix: str, operands: Sequence[Any]
             ) -> tuple:
    """Copy ``sub``'s ops into ``gm``'s graph at its insertion point, on ``operands``; returns
    the copies of its outputs. Constants it reads move to ``gm`` as ``<prefix>_<name>``."""
    env: dict[fx.Node, Any] = dict(zip(
        [n for n in sub.graph.nodes if n.op == "placeholder"], operands, strict=True))
    results: tuple = ()
    for inner in sub.graph.nodes:
        if inner.op == "output":
            results = tuple(fx.map_arg(inner.args[0], env.__getitem__))
        elif inner.op == "get_attr":
            name = f"{prefix}_{inner.target}".replace(".", "_")
            fx.graph_module._assign_attr(resolve(sub, str(inner.target)), gm, name)
            env[inner] = gm.graph.get_attr(name)
        elif inner.op != "placeholder":
            env[inner] = gm.graph.node_copy(inner, env.__getitem__)
    return results


def _inline_wrapped(gm: fx.GraphModule) -> None:
    """torch.export puts code run under ``torch.autocast(...)`` or ``torch.set_grad_enabled(...)``
    (Llama's rotary embedding runs under no_grad) in a higher-order op that calls a submodule. Each
    such call becomes the submodule's ops between the context's enter and exit calls, the way
    eager code runs them, so that every later pass and the emitted source see plain ops."""
    hops = torch.ops.higher_order
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (hops.wrap_with_autocast,
                                                              hops.wrap_with_set_grad_enabled):
            continue
        autocast = node.target is hops.wrap_with_autocast
        head = 4 if autocast else 1  # the context's arguments before the submodule
        sub_node, operands = node.args[head], node.args[head + 1:]
        sub = getattr(gm, str(sub_node.target))
        _inline_wrapped(sub)
        with gm.graph.inserting_before(node):
            if autocast:
                enter = gm.graph.call_function(torch.amp.autocast_mode._enter_autocast,
                                               tuple(node.args[:head]))
                context = [enter]
            else:
                before = gm.graph.call_function(torch.is_grad_enabled)
                context = [before, gm.graph.call_function(torch._C._set_grad_enabled,
                                                          (node.args[0],))]
            results = _copy_in(sub, gm, str(sub_node.target), operands)
            if autocast:
                context.append(gm.graph.call_function(torch.amp.autocast_mode._exit_autocast,
                                                      (enter,)))
            else:
                context.append(gm.graph.call_function(torch._C._set_grad_enabled, (before,)))
        for new in context:
            new.meta.update(node.meta)
        for user in list(node.users):
            if user.op == "call_function" and user.target is operator.getitem:
                user.replace_all_uses_with(results[user.args[1]])
                gm.graph.erase_node(user)
            else:
                raise TierFailure("torch.export", None, RuntimeError(
                    f"{node.target} output used as a whole by {user.format_node()}"))
        gm.graph.erase_node(node)
        if not sub_node.users:
            gm.graph.erase_node(sub_node)
            delattr(gm, str(sub_node.target))
    gm.recompile()


@contextlib.contextmanager
def _quiet_torch_logs() -> Iterator[None]:
    """torch.export prints the partial graph to stderr when it fails (torch 2.13) and logs
    warnings through its own handlers; we report one line instead."""
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
               if name == "torch" or name.startswith("torch.")]
    saved = [(logger, logger.disabled) for logger in loggers]
    for logger in loggers:
        logger.disabled = True
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for logger, disabled in saved:
            logger.disabled = disabled


def _outermost_leaf(model: nn.Module, node: fx.Node, modules: dict[str, nn.Module],
                    leaves: Sequence[str]) -> tuple[str, str] | None:
    stack = node.meta.get("nn_module_stack") or {}
    for key, (path, _type) in stack.items():
        module = modules.get(path)
        if module is None or not path:
            continue
        if is_leaf(module) or any(fnmatch.fnmatchcase(path, p) for p in leaves):
            return key, path
    return None


def _relift(model: nn.Module, flat: fx.GraphModule, *, example: dict[str, torch.Tensor],
            training: bool, notes: list[str], leaves: Sequence[str] = ()
            ) -> tuple[fx.Graph, dict[str, Any]]:
    modules = dict(model.named_modules())
    own_state = {path: {id(t) for t in list(m.parameters()) + list(m.buffers())}
                 for path, m in modules.items()}
    groups: dict[str, list[fx.Node]] = {}
    group_path: dict[str, str] = {}
    for node in flat.graph.nodes:
        if node.op != "call_function":
            continue
        found = _outermost_leaf(model, node, modules, leaves)
        if found:
            groups.setdefault(found[0], []).append(node)
            group_path[found[0]] = found[1]

    def tensor_of(n: fx.Node) -> Any:
        return resolve(flat, n.target) if n.op == "get_attr" else None

    calls: dict[str, tuple[fx.Node, fx.Node]] = {}  # group key -> (input, output)
    for key, members in groups.items():
        path = group_path[key]
        member_set = set(members)
        inputs, seen = [], set()
        for n in members:
            for arg in n.all_input_nodes:
                if arg in member_set or arg in seen:
                    continue
                if arg.op == "get_attr" and id(tensor_of(arg)) in own_state[path]:
                    continue
                seen.add(arg)
                inputs.append(arg)
        outputs = [n for n in members if any(u not in member_set for u in n.users)]
        tensor_inputs = [a for a in inputs if isinstance(a.meta.get("val"), torch.Tensor)]
        if (len(tensor_inputs) == 1 and len(outputs) == 1 and len(inputs) == 1
                and _single_input_forward(modules[path])):
            calls[key] = (tensor_inputs[0], outputs[0])
        elif outputs:  # (a call whose result nothing uses is dead code and is dropped)
            notes.append(f"'{path}' ({type(modules[path]).__name__}) is kept as aten ops: its call "
                         f"takes {len(inputs)} input(s) and gives {len(outputs)} output(s)")
    for key in _unfaithful(flat, calls, groups=groups, modules=modules, group_path=group_path,
                           example=example, training=training):
        del calls[key]
        notes.append(f"'{group_path[key]}' ({type(modules[group_path[key]]).__name__}) is kept "
                     "as aten ops: called on the one tensor its ops read, it computes something "
                     "else (its forward takes other arguments in the model)")
    attrs: dict[str, Any] = {}

    def module_call(graph: fx.Graph, key: str, env: Env) -> dict[fx.Node, fx.Node]:
        arg, out = calls[key]
        path = group_path[key]
        attrs[path] = modules[path]
        new = graph.call_module(path, (env(arg),))
        new.meta = {"nn_module_stack": dict(list(out.meta.get("nn_module_stack", {}).items())),
                    "val": out.meta.get("val")}
        return {out: new}

    def copied(graph: fx.Graph, node: fx.Node, env: Env) -> fx.Node | None:
        if node.op == "placeholder":
            return graph.placeholder(str(node.target))
        if node.op == "output":
            output = graph.output(None)
            output.meta["flat_outputs"] = [env(n) if isinstance(n, fx.Node) else n
                                           for n in node.args[0]]
            return output
        if node.op == "call_module" or node.target in _DROPPED_TARGETS:
            return None  # export's _guards_fn and shape assertions
        if node.op == "get_attr":
            attrs.setdefault(node.target, _state_by_name(model, flat, node.target))
        return graph.node_copy(node, env)

    graph = collapse(flat.graph, {key: groups[key] for key in calls}, module_call, copied)
    _keep_spec_placeholders(graph, list(example))
    return graph, attrs


def _unfaithful(flat: fx.GraphModule, calls: dict[str, tuple[fx.Node, fx.Node]], *,
                groups: dict[str, list[fx.Node]], modules: dict[str, nn.Module],
                group_path: dict[str, str], example: dict[str, torch.Tensor],
                training: bool) -> list[str]:
    """The re-lift candidates whose module, called on the value of the one tensor its recorded
    ops read, does not reproduce those ops' result bit-exactly (same seed). A module's ops may
    read one tensor while its forward takes another: OPT's positional embedding is called with
    the attention mask and recomputes positions from it unless given ``position_ids``."""

    if not calls:
        return []
    bad = []
    # (train-mode BatchNorm updates running statistics: restored; the global RNG is untouched)
    with preserved(flat, modules[""]), torch.random.fork_rng(devices=[]), torch.no_grad():
        values = record(flat, flat.graph, example, {arg for arg, _ in calls.values()})
        rng = torch.get_rng_state()  # (set_rng_state is far cheaper than manual_seed)
        for key, (arg, out) in calls.items():
            torch.set_rng_state(rng)
            # (re-run, not read from the recording: dropout must draw what the module call
            # draws, and an in-place op later in the graph may have changed the recorded value)
            want = _run_ops(flat, groups[key], {arg: values[arg]})[out]
            module = modules[group_path[key]].train(training)
            torch.set_rng_state(rng)
            try:
                with silenced():
                    got = module(values[arg])
            except Exception:
                got = None
            if not (isinstance(got, torch.Tensor) and got.shape == want.shape
                    and got.dtype == want.dtype and torch.equal(got, want)):
                bad.append(key)
    return bad


def _run_ops(gm: fx.GraphModule, nodes: list[fx.Node], env: dict[fx.Node, Any]
             ) -> dict[fx.Node, Any]:
    """Run call_function ``nodes`` in order on the values in ``env`` (the others they read are
    ``gm``'s attributes); returns ``env`` with their results."""
    def fetch(a: fx.Node) -> Any:
        return env[a] if a in env else resolve(gm, str(a.target))

    for n in nodes:
        env[n] = n.target(*fx.node.map_arg(n.args, fetch), **fx.node.map_arg(n.kwargs, fetch))
    return env


def _single_input_forward(module: nn.Module) -> bool:
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    required = [p for p in params if p.default is inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(required) == 1 or (
        not required and bool(params) and params[0].kind == inspect.Parameter.VAR_POSITIONAL)


def _state_by_name(model: nn.Module, flat: fx.GraphModule, target: str) -> Any:
    """The original model's tensor for an export get_attr target (constants come from export)."""
    try:
        return resolve(model, target)
    except AttributeError:
        return resolve(flat, target)


# ---------------------------------------------------------------------------------------------
# Normalising outputs to {task: node}, verifying, choosing the tier
# ---------------------------------------------------------------------------------------------

def _set_task_outputs(graph: fx.Graph, task_paths: dict[str, str], flat_paths: list[str] | None,
                      tier: str) -> None:
    out = output_node(graph)
    if flat_paths is not None:
        leaves = dict(zip(flat_paths, out.meta["flat_outputs"], strict=True))
    else:
        from torch.utils import _pytree as pytree

        pairs, _ = pytree.tree_flatten_with_path(out.args[0])
        if len(pairs) == 1 and not pairs[0][0]:
            leaves = {"": pairs[0][1]}
        else:
            leaves = {".".join(key_str(k) for k in path): leaf for path, leaf in pairs}
    result = {}
    for task, path in task_paths.items():
        node = leaves.get(path)
        if not isinstance(node, fx.Node):
            raise TierFailure(tier, None, RuntimeError(
                f"output '{path}' of task '{task}' is not computed by the traced graph"))
        result[task] = node
    out.args = (result,)
    prune(graph)
    graph.lint()


# Attributes a GraphModule sets on itself besides its class's: a submodule, parameter or buffer
# of the same name at the model's top level cannot be copied into the traced graph module.
_GRAPH_MODULE_STATE = {"meta", "_graph", "_code", "_tracer_cls", "_tracer_extras",
                       "train_graph", "eval_graph"}


def check_top_level_names(model: nn.Module, fix: str = "rename them, or give the model as a "
                          "`backbone:` tapped at its output or an output field (its modules "
                          "then live under 'backbone.')") -> None:
    members = [*model.named_children(), *model.named_parameters(recurse=False),
               *model.named_buffers(recurse=False)]
    taken = sorted(name for name, _ in members
                   if name in _GRAPH_MODULE_STATE or hasattr(DualGraphModule, name))
    if taken:
        raise ModelError(
            f"the model's top-level attribute(s) {', '.join(repr(n) for n in taken)} have the "
            "name of a torch.fx GraphModule attribute, so the traced graph module cannot hold "
            "them", fix=fix)


def trace(model: nn.Module, example: dict[str, torch.Tensor], task_paths: dict[str, str], *,
          dynamic: dict[str, list[int]] | None = None, tier: str = "auto",
          leaves: Sequence[str] = (), verify_with: dict[str, torch.Tensor] | None = None,
          class_name: str = "GraphModule", selected: Callable[[str], bool] | None = None
          ) -> Traced:
    """Trace ``model`` into a :class:`DualGraphModule` whose output is ``{task: tensor}``.

    ``selected`` says whether a module path is branched, where the selection is known before
    tracing (:func:`reconfx.selection.explicit_choice`): a coarse fx leaf that the selection
    branches whole, or not at all, then needs no finer layers, and tier 1 is kept.

    >>> from reconfx.zoo import small_resnet                               # doctest: +SKIP
    >>> t = trace(small_resnet(), {"image": torch.randn(2, 1, 12, 12)},
    ...           {"left": "left", "right": "right"})                      # doctest: +SKIP
    >>> t.tier                                                              # doctest: +SKIP
    'fx'
    """

    check_top_level_names(model)
    dynamic = dynamic if dynamic is not None else {name: [0] for name in example}
    input_names = list(example)
    failures: list[TierFailure] = []
    coarse: Traced | None = None
    if tier in ("auto", "fx"):
        notes: list[str] = []
        try:
            graphs, forced = [], []
            for mode in (True, False):
                graph, added = fx_trace(model, input_names, [*leaves, *forced], mode, notes)
                forced += added
                _set_task_outputs(graph, task_paths, None, "fx")
                graphs.append(graph)
            result = _assemble(model, graphs, root=model, tier="fx", notes=notes,
                               class_name=class_name)
            hidden = [p for p in forced if parameterised_modules(model.get_submodule(p)) > 1]
            if not hidden or tier == "fx":
                return _accepted(result, "fx", model, task_paths, [example, verify_with])
            if selected is not None and _coarse_fits(result.module, model, hidden, selected):
                result = _accepted(result, "fx", model, task_paths, [example, verify_with])
                return replace(result, tier="fx-coarse", notes=(
                    *result.notes, f"coarse fx leaves hide several layers ({', '.join(hidden)}),"
                    " and the selection branches each whole or runs it before any branch point,"
                    " so tier 1 is kept"))
            # (checked only where tier 2 fails and it is used)
            coarse = replace(result, tier="fx-coarse", notes=(
                *result.notes, f"coarse fx leaves hide several layers: {', '.join(hidden)}"))
        except TierFailure as exc:
            failures.append(exc)
    if tier in ("auto", "export"):
        notes = []
        try:
            graphs, attrs = [], {}
            for mode in (True, False):
                graph, table = export_trace(model, example, dynamic=dynamic, training=mode,
                                            notes=notes, leaves=leaves)
                _follow_input_device(graph)
                attrs.update(table)
                _set_task_outputs(graph, task_paths, _flat_paths(model, example), "torch.export")
                graphs.append(graph)
            result = _assemble(model, graphs, root=attrs, tier="export", notes=_dedupe(notes),
                               class_name=class_name)
            result = _accepted(result, "torch.export", model, task_paths, [example, verify_with])
            if coarse is not None:
                return replace(result, notes=("tier 2 used: tier 1 " + coarse.notes[-1],
                                              *result.notes))
            if failures:
                return replace(result, notes=(f"tier 2 used: tier 1 failed {failures[-1]}",
                                              *result.notes))
            return result
        except TierFailure as exc:
            failures.append(exc)
    if coarse is not None:
        try:
            coarse = _accepted(coarse, "fx", model, task_paths, [example, verify_with])
        except TierFailure as exc:
            failures.insert(0, exc)  # (tier 1's failure first, as it was tried first)
        else:
            return replace(coarse, notes=(*coarse.notes, f"{COARSE_KEPT}tier 2 "
                                          f"failed too ({failures[-1]})"))
    raise _trace_error(failures, model)


def _accepted(result: Traced, tier: str, model: nn.Module, task_paths: dict[str, str],
              examples: Sequence[dict[str, torch.Tensor] | None]) -> Traced:
    """``result`` when its graph reproduces the model (:func:`traced_matches`), with the
    tolerance it needed; else the tier fails."""
    mismatch, worst = traced_matches(model, result.module, task_paths, examples)
    if mismatch:
        raise TierFailure(tier, None, RuntimeError(mismatch))
    if worst == 0.0:
        return result
    return replace(result, atol=ATOL, notes=(
        *result.notes, f"the {tier} graph reproduces the model within {ATOL:g}, not bit-exactly "
        f"(max abs diff {worst:.2g}: its ops round differently from the model's kernels), and "
        "the checks compare within that tolerance"))


def _coarse_fits(module: DualGraphModule, model: nn.Module, hidden: Sequence[str],
                 selected: Callable[[str], bool]) -> bool:
    """Each coarse leaf at ``hidden`` is branched whole (the selection takes it and every
    parameterised module inside it), or untouched and called only before any branch point (so
    it never runs per task stream, where stream batching could not join it)."""
    for _mode, graph in module.graphs():
        after: set[fx.Node] = set()  # nodes downstream of a selected layer
        for node in graph.nodes:
            if (node.op == "call_module" and selected(str(node.target))) or any(
                    a in after for a in node.all_input_nodes):
                after.add(node)
        late = {str(n.target) for n in after if n.op == "call_module"}
        for path in hidden:
            inside = [f"{path}.{name}" for name, m in model.get_submodule(path).named_modules()
                      if name and any(p is not None for p in m._parameters.values())]
            choices = {selected(p) for p in [path, *inside]}
            if choices != {True} and (choices != {False} or path in late):
                return False
    return True


def _follow_input_device(graph: fx.Graph) -> None:
    """torch.export bakes the tracing device into ops as a constant (``arange(..., device=cpu)``,
    Llama's ``inv_freq.to(cpu, float32)``) and an autocast region's device type (``"cpu"`` for
    eager code's ``x.device.type``); make those follow the first input's device instead, so the
    graph and the emitted model run wherever their inputs are."""
    def baked(value: Any) -> bool:
        found: list[bool] = []
        fx.node.map_aggregate(value, lambda v: found.append(isinstance(v, torch.device)))
        return any(found)

    first = next((n for n in graph.nodes if n.op == "placeholder"), None)
    if first is None:
        return
    traced_on = first.meta.get("val", first.meta.get("example_value"))
    traced_on = getattr(traced_on, "device", torch.device("cpu")).type
    uses = [n for n in graph.nodes if n.op in ("call_function", "call_method")
            and baked((n.args, n.kwargs))]
    # autocast regions entered for the tracing device's type (``x.device.type`` in eager code)
    regions = [n for n in graph.nodes if n.target is torch.amp.autocast_mode._enter_autocast
               and n.args and n.args[0] == traced_on]
    if not uses and not regions:
        return
    anchor = next(n for n in graph.nodes if n.op != "placeholder")
    with graph.inserting_before(anchor):
        device = graph.call_function(getattr, (first, "device"))
        kind = graph.call_function(getattr, (device, "type")) if regions else None

    def follow(value: Any) -> Any:
        return device if isinstance(value, torch.device) else value

    for node in uses:
        node.args = fx.node.map_aggregate(node.args, follow)
        node.kwargs = fx.node.map_aggregate(node.kwargs, follow)
    for node in regions:
        node.args = (kind, *node.args[1:])
    graph.lint()


def _dedupe(notes: list[str]) -> list[str]:
    return list(dict.fromkeys(notes))


def _flat_paths(model: nn.Module, example: dict[str, torch.Tensor]) -> list[str]:
    from reconfx.tree import output_leaves

    with torch.no_grad():
        return list(output_leaves(model(**example)))


def _assemble(model: nn.Module, graphs: list[fx.Graph], *, root: nn.Module | dict[str, Any],
              tier: str, notes: list[str], class_name: str) -> Traced:
    train_graph, eval_graph = graphs
    if same_graph(train_graph, eval_graph):
        eval_graph = train_graph
    else:
        notes.append("the model's glue depends on training mode: the train and eval graphs "
                     "differ and both are kept")
    module = DualGraphModule(root, train_graph, eval_graph, class_name)
    module.train(model.training)
    name_nodes(module)
    return Traced(module, tier, tuple(notes))


# Settings of Hugging Face models that draw random numbers in train mode outside torch's
# dropout modules: SpecAugment's masks (drawn with numpy), LayerDrop and stochastic depth (a
# Python branch on a random draw). Neither tier reproduces such a forward in train mode.
RANDOM_SETTINGS = ("mask_time_prob", "mask_feature_prob", "layerdrop", "encoder_layerdrop",
                   "decoder_layerdrop", "drop_path_rate", "stochastic_depth_prob")


def random_settings(model: nn.Module) -> dict[str, float]:
    """The model's settings from :data:`RANDOM_SETTINGS` that are on (above 0)."""
    found: dict[str, float] = {}
    for settings in settings_in(model):
        for key in RANDOM_SETTINGS:
            value = getattr(settings, key, None)
            if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
                found.setdefault(key, value)
    return found


def _trace_error(failures: list[TierFailure], model: nn.Module) -> TraceError:
    parts = [str(f) for f in failures]
    path = next((f.path for f in failures if f.path), None)
    fix = (f"add '{path}' to trace.leaves, or make the code at that line traceable"
           if path else "make the model's forward traceable (no data-dependent Python control "
                        "flow), or wrap the failing part in a submodule and list it in "
                        "trace.leaves")
    random = random_settings(model) if any("train mode" in p for p in parts) else {}
    if random:
        keys = ", ".join(f"{k}={v:g}" for k, v in random.items())
        off = ", ".join(f"{k}: 0.0" for k in random)
        parts.append(f"the model's config draws random numbers in train mode outside dropout "
                     f"modules ({keys}: masks or skipped layers that neither tier reproduces)")
        fix = (f"switch them off for the compile, e.g. backbone.hf.kwargs: {{{off}}} (they are "
               "then off in profiling and training too)")
    return TraceError("neither tier can trace the model: " + "; ".join(parts), fix=fix)


# ---------------------------------------------------------------------------------------------
# Readable node names, stored in node.meta and kept by every later pass
# ---------------------------------------------------------------------------------------------

def _op_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    target = node.target
    if target is getattr and len(node.args) == 2 and isinstance(node.args[1], str):
        owner = node.args[0]  # x.shape is named "shape", x.device.type "device_type"
        if isinstance(owner, fx.Node) and owner.op == "call_function" and owner.target is getattr:
            return f"{_op_name(owner)}_{node.args[1]}"
        return node.args[1]
    if isinstance(target, torch._ops.OpOverload):
        packet = target.overloadpacket.__name__
        if packet == "sym_size" and len(node.args) == 2:  # x.size(1): "x_size_1"
            owner = node.args[0]
            name = (facts(owner).name or owner.name) if isinstance(owner, fx.Node) else "size"
            return f"{name}_size_{node.args[1]}"
        return packet.strip("_") or "op"
    name = getattr(target, "__name__", None) or str(target)
    return name.strip("_") or "op"


def _scope(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    paths = [path for path, _ in stack.values()
             if path and not path.startswith("_empty_nn_module_stack")]
    return paths[-1] if paths else ""


def name_nodes(module: DualGraphModule) -> None:
    """Give every node a readable base name derived from module paths (``layer1_0_conv1``,
    ``layer1_0_add``), with counters local to each name, as their
    :class:`~reconfx.facts.NodeFacts` ``name``."""
    for _mode, graph in module.graphs():
        counts: dict[str, int] = {}
        for node in graph.nodes:
            if node.op == "placeholder":
                base = str(node.target)
            elif node.op == "call_module":
                base = str(node.target).replace(".", "_")
            elif node.op in ("call_function", "call_method"):
                scope = _scope(node).replace(".", "_")
                base = f"{scope}_{_op_name(node)}" if scope else _op_name(node)
            else:
                continue
            n = counts.get(base, 0)
            counts[base] = n + 1
            note(node, name=base if n == 0 else f"{base}_{n}")


def traced_matches(model: nn.Module, traced: nn.Module, task_paths: dict[str, str],
                   examples: Sequence[dict[str, torch.Tensor] | None]
                   ) -> tuple[str | None, float]:
    """Whether the traced graph reproduces the eager model in both modes on all examples (the
    second has another batch size, catching shapes baked into the graph), within :data:`ATOL`
    (torch.export's ops may round differently from eager's fused kernels), and its outputs'
    gradient reaches the same parameters (checked once, in train mode). Returns what differs
    (None: nothing) and the largest difference seen."""
    shared = {id(q) for q in traced.parameters()}
    params = {n: q for n, q in model.named_parameters() if q.requires_grad and id(q) in shared}
    worst = 0.0
    with preserved(model, traced):
        for i, example in enumerate(filter(None, examples)):
            for training in (False, True):
                reach = params if training and i == 0 else {}
                # (run where no gradient is asked about: the checks after tracing run the model
                # and the graph again, and reuse these passes)
                want, want_reach = run_reaching(
                    model, example, training=training, params=reach,
                    outputs=lambda out: task_outputs(out, task_paths)) if reach else (
                    task_outputs(run(model, example, training), task_paths), {})
                batch = next(iter(example.values())).shape[0]
                mode = "train" if training else "eval"
                try:
                    with silenced():
                        got, got_reach = run_reaching(traced, example, training=training,
                                                      params=reach) if reach else (
                            run(traced, example, training), {})
                except Exception as exc:  # e.g. a size the tracer baked in indexes out of range
                    return (f"the traced graph fails in {mode} mode at batch {batch} where the "
                            f"model runs ({type(exc).__name__}: {exc})"), worst
                diffs = {task: max_diff(value, got[task]) for task, value in want.items()}
                bad = next(((task, d) for task, d in diffs.items() if d > ATOL), None)
                if bad:
                    return (f"traced graph differs from the model for task '{bad[0]}' in {mode} "
                            f"mode at batch {batch} (max abs diff {bad[1]:.3g})"), worst
                worst = max([worst, *diffs.values()])
                for name in reach:
                    if None not in (want_reach[name], got_reach[name]) and (
                            want_reach[name] != got_reach[name]):
                        return (f"the parameter '{name}' gets a gradient in the "
                                f"{'traced graph' if got_reach[name] else 'model'} only (code "
                                "under torch.no_grad() or similar that the tracer does not "
                                "record)"), worst
    return None, worst
