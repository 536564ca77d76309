"""Invariant checks (docs/invariants.md): I1 init parity, I2 sharing, I3 isolation, I4 emit parity.

Each check returns a :class:`Check` for the report, or raises :class:`CheckError` naming the task,
mode and largest difference. Models are run by :func:`reconfx.modes.run`, so checking never
changes state.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map

from reconfx.errors import CheckError
from reconfx.facts import facts
from reconfx.graph import named_tensors
from reconfx.kinds import dropout_attr
from reconfx.modes import ATOL, compare, kept_masks, magnitude, preserved, reached, run
from reconfx.tensorfile import Spill
from reconfx.tree import task_outputs

__all__ = [
    "Check", "check_emit", "check_isolation", "check_parity", "check_sharing", "perturbed",
    "random_after_branch", "random_leaves", "STOCHASTIC_OPS", "without_dropout"
]

STOCHASTIC_OPS = ("dropout", "bernoulli", "rand", "native_dropout", "scaled_dot_product")


@dataclass(frozen=True)
class Check:
    name: str
    detail: str


@contextlib.contextmanager
def without_dropout(paths: Sequence[str], *models: nn.Module) -> Iterator[None]:
    """Set the dropout probability of the torch.nn modules at ``paths`` to 0 in each model, so
    their random draws, whose order changes when streams are duplicated, do not matter."""
    changed = []
    for model in models:
        for path in paths:
            try:
                sub = model.get_submodule(path)
            except AttributeError:
                continue
            attr = dropout_attr(sub)
            if attr and getattr(sub, attr):
                changed.append((sub, attr, getattr(sub, attr)))
                setattr(sub, attr, 0.0)
    try:
        yield
    finally:
        for sub, attr, value in changed:
            setattr(sub, attr, value)


def random_after_branch(module: nn.Module) -> tuple[list[str], list[str], list[str]]:
    """Random ops on task streams in the train graph: paths of dropout-like modules called
    there or inside a leaf called there (as in the original model, without the task suffix),
    the same in the compiled model, and random glue ops."""
    graph = getattr(module, "train_graph", None)
    if graph is None:
        return [], [], []
    modules, compiled, glue = [], [], []
    for node in graph.nodes:
        task = facts(node).task
        if task is None:
            continue
        if node.op == "call_module":
            target = str(node.target)
            leaf = module.get_submodule(target)
            path = target.removesuffix(f".{task}")
            subs = [sub for sub, m in leaf.named_modules() if dropout_attr(m)]
            modules += [f"{path}.{sub}".rstrip(".") for sub in subs]
            compiled += [f"{target}.{sub}".rstrip(".") for sub in subs]
        elif node.op in ("call_function", "call_method"):
            name = str(getattr(node.target, "__name__", node.target))
            has_p = any(isinstance(a, float) and a > 0 for a in node.args[3:5]) or any(
                k in ("p", "dropout_p") and v for k, v in node.kwargs.items())
            if any(s in name for s in STOCHASTIC_OPS) and ("scaled" not in name or has_p):
                glue.append(node.name)
    return sorted(set(modules)), sorted(set(compiled)), glue


def random_leaves(compiled: nn.Module, example: dict[str, torch.Tensor]) -> list[str]:
    """The modules called on task streams in train mode whose output depends on the random
    state with the dropout switch applied (a functional dropout whose probability is a plain
    attribute): each is called twice more on copies of its recorded input, from two random
    states."""
    graph = getattr(compiled, "train_graph", None)
    targets = sorted({str(n.target) for n in (graph.nodes if graph is not None else ())
                      if n.op == "call_module" and facts(n).task})
    calls: dict[str, tuple] = {}

    def record(target: str) -> Callable:
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            calls.setdefault(target, tree_map(_copied, (args, kwargs)))
        return hook

    hooks = [compiled.get_submodule(t).register_forward_pre_hook(record(t), with_kwargs=True)
             for t in targets]
    try:
        run(compiled, example, True)
    finally:
        for hook in hooks:
            hook.remove()
    drawing = []
    with preserved(compiled), torch.random.fork_rng(devices=[]), torch.no_grad():
        for target, (args, kwargs) in calls.items():
            outs = []
            for seed in (1, 2):
                torch.manual_seed(seed)
                again = tree_map(_copied, (args, kwargs))
                outs.append(tree_leaves(compiled.get_submodule(target)(*again[0], **again[1])))
            if len(outs[0]) != len(outs[1]) or any(
                    isinstance(a, torch.Tensor) and not torch.equal(a, b)
                    for a, b in zip(*outs, strict=False)):
                drawing.append(target)
    return drawing


def _copied(value: object) -> object:
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def check_parity(original: nn.Module, compiled: nn.Module, task_paths: dict[str, str],
                 examples: Sequence[dict[str, torch.Tensor]], atol: float = 0.0) -> Check:
    """I1: compiled output for task t equals the original's, in eval and train mode."""
    notes = []
    random_modules, random_copies, random_glue = random_after_branch(compiled)
    with preserved(original, compiled), without_dropout(random_modules, original), \
            without_dropout(random_copies, compiled):
        for example in examples:
            batch = next(iter(example.values())).shape[0]
            for training in (False, True):
                if training and random_glue:
                    notes.append("train mode not compared: random ops after a branch point "
                                 f"draw in another order ({', '.join(random_glue[:3])})")
                    continue
                want = task_outputs(run(original, example, training), task_paths)
                got = run(compiled, example, training)
                bad = compare(want, got, atol)
                drawing = random_leaves(compiled, example) if bad and training else []
                if drawing:
                    notes.append("train mode not compared: modules after a branch point draw "
                                 "random numbers no dropout module's p controls, in another "
                                 f"order ({', '.join(drawing[:3])})")
                    continue
                if bad:
                    mode = "train" if training else "eval"
                    raise CheckError(
                        f"I1 init parity failed: task '{bad[0]}' differs in {mode} mode at batch "
                        f"{batch} by {bad[1]:.3g}", fix="report this model as a reconfx bug")
    exact = "bit-exact" if atol == 0 else f"atol {atol:g}"
    if random_modules:
        notes.append(f"train mode compared with {len(random_modules)} dropout module(s) after a "
                     "branch point set to p=0")
    return Check("I1 init parity", f"{exact}, eval and train mode, {_sizes(examples)}"
                 + (f"; {'; '.join(dict.fromkeys(notes))}" if notes else ""))


def _sizes(examples: Sequence[dict[str, torch.Tensor]]) -> str:
    """``batch 8, 9``, or where other axes change too, the first input's shapes."""
    name = next(iter(examples[0]))
    shapes = [tuple(e[name].shape) for e in examples]
    if all(s[1:] == shapes[0][1:] for s in shapes):
        return "batch " + ", ".join(str(s[0]) for s in shapes)
    return f"{name} " + ", ".join(str(s) for s in shapes)


def check_sharing(compiled: nn.Module, copies: dict[str, dict[str, list[str]]]) -> Check:
    """I2: each branched layer's per-task copies are independent tensors; everything else is one
    Parameter object (appearing once, or at each of its tied names)."""
    params = dict(compiled.named_parameters(remove_duplicate=False))
    copy_names = set()
    for layer, per_task in copies.items():
        storages = {}
        for task, names in per_task.items():
            for name in names:
                copy_names.add(name)
                ptr = params[name].data_ptr()
                owner = storages.setdefault(ptr, task)
                if owner != task:
                    raise CheckError(f"I2 sharing failed: layer '{layer}' copies of tasks "
                                     f"'{owner}' and '{task}' share storage ({name})")
    shared = {n: p for n, p in params.items() if n not in copy_names}
    return Check("I2 sharing", f"{len(copies)} branched layer(s) with independent per-task "
                 f"copies; {len({id(p) for p in shared.values()})} shared parameter tensors")


def check_isolation(compiled: nn.Module, example: dict[str, torch.Tensor],
                    copies: dict[str, dict[str, list[str]]]) -> Check:
    """I3: task t's loss has no gradient on any other task's copy: in train mode (where the
    streams run apart, as they train), none of the other tasks' copies is a leaf of the autograd
    graph of task t's output (:func:`reconfx.modes.reached`; no backward runs)."""
    if not copies:
        return Check("I3 isolation", "no branched layers")
    params = dict(compiled.named_parameters(remove_duplicate=False))
    with preserved(compiled):
        outputs = run(compiled, example, True, graph=True)
        tasks = list(outputs)
        for task in tasks:
            others = [n for per_task in copies.values() for t, names in per_task.items()
                      if t != task for n in names]
            out = outputs[task]
            if not out.is_floating_point() or not others:
                continue
            found = reached([out])
            for name in others:
                if id(params[name]) in found:
                    raise CheckError(f"I3 isolation failed: task '{task}' has a gradient on {name}")
    return Check("I3 isolation", f"each of {len(tasks)} tasks' loss has no gradient on the other "
                 "tasks' copies")


def check_emit(emitted: nn.Module, compiled: nn.Module,
               *, examples: Sequence[dict[str, torch.Tensor]], expected_params: int,
               original: nn.Module | None = None, task_paths: dict[str, str] | None = None,
               rename: Callable[[str], str | None] = str, atol: float = 0.0,
               exact: bool = True, compiled_name: Callable[[str], str] = str,
               rows: bool = False) -> Check:
    """I4: the emitted source with its weights reproduces the compiled model (bit-exactly where
    the traced graph reproduced the model ``exact``-ly, else within :data:`ATOL`: model.py calls
    the model's own modules where the graph runs the traced ops), same parameter count as the
    original plus (T-1) x the branched layers. It must also compute the same function for other
    weights: every floating parameter and buffer is perturbed the same way in the emitted model
    and in ``original`` (a compiled tensor matched to the original's through ``rename``), so a
    value derived from the weights and baked into the graph or the source is caught; compared
    within ``atol`` (I1's tolerance), or :data:`ATOL` times the outputs' magnitude where that is
    larger, since the perturbed weights run other kernels than the original's on the same
    values and a baked value shows as a difference of another order. Without ``original``
    (weights trained since, so they are no longer the original's) the reference is the compiled
    model, whose name for an emitted tensor is ``compiled_name`` of it. ``rows``: the emitted
    model carries the task streams as one tensor (:mod:`reconfx.rows`), so it draws a dropout
    mask once for all tasks' rows where the compiled model draws one per task stream; train
    mode is then compared with every mask keeping every element
    (:func:`reconfx.modes.kept_masks`)."""
    from reconfx.graph import unique_parameters

    count = unique_parameters(emitted)
    if count != expected_params:
        raise CheckError(f"I4 emit parity failed: emitted model has {count} parameters, "
                         f"expected {expected_params}")
    # (per stream: the same graph order, so the same random draws)
    masks = kept_masks() if rows else contextlib.nullcontext()
    with preserved(emitted, compiled), masks as kept:
        for example in examples:
            for training in (False, True):
                bad = compare(run(compiled, example, training), run(emitted, example, training),
                              0.0 if exact else ATOL)
                if bad:
                    mode = "train" if training else "eval"
                    raise CheckError(f"I4 emit parity failed: task '{bad[0]}' differs in {mode} "
                                     f"mode by {bad[1]:.3g}")
    if original is None:
        reference, outputs, rename, atol = compiled, dict, compiled_name, 0.0
    else:
        reference, outputs = original, lambda out: task_outputs(out, task_paths or {})
    # One model perturbed at a time: the emitted model may hold the reference's tensors.
    with preserved(reference), perturbed(reference):
        want = outputs(run(reference, examples[0], False))
    with preserved(emitted), perturbed(emitted, rename):
        bad = compare(want, run(emitted, examples[0], False), max(atol, ATOL * magnitude(want)))
    if bad:
        against = "the compiled model" if original is None else "the original model"
        raise CheckError(
            f"I4 emit parity failed: with every weight perturbed, task '{bad[0]}' differs from "
            f"{against} by {bad[1]:.3g} (a value derived from the weights is fixed in the graph "
            "or the source)", fix="report this model as a reconfx bug")
    masked = " (dropout masks keeping every element)" if kept and kept.kept else ""
    return Check("I4 emit parity", f"{'bit-exact' if exact else f'within {ATOL:g}'} in eval "
                 f"and train mode{masked}, "
                 "and the same function as "
                 f"{'the compiled' if original is None else 'the original'} model with every "
                 f"weight perturbed; {count} parameters")


@contextlib.contextmanager
def perturbed(module: nn.Module, rename: Callable[[str], str | None] = str) -> Iterator[None]:
    """Scale every floating parameter and buffer by exp(0.1 r), parameters shifted by 0.01 r
    first (r standard normal per element), restored on exit. The noise is drawn from a seed
    derived from the tensor's name (the smallest of its names, through ``rename``), so two
    models with the same names, or names ``rename`` maps to the same, get the same
    perturbation; a tensor ``rename`` maps to None is left as it is. Buffers keep their signs
    (variances stay positive). The original values wait in a temporary file, not in memory (a
    second copy of a large model's weights would not fit beside it), and are read back one
    tensor at a time."""
    names: dict[int, list[str]] = {}
    tensors: dict[int, torch.Tensor] = {}
    for name, t in named_tensors(module):
        renamed = rename(name)
        if t.is_floating_point() and renamed is not None:
            names.setdefault(id(t), []).append(renamed)
            tensors[id(t)] = t
    with Spill(tensors.values()) as spill:
        try:
            with torch.no_grad():
                for key, t in tensors.items():
                    _perturb(t, torch.Generator().manual_seed(zlib.crc32(min(names[key]).encode())))
            yield
        finally:
            spill.restore()


def _perturb(t: torch.Tensor, generator: torch.Generator, rows: int = 2**24) -> None:
    """:func:`perturbed`'s change of ``t``, in place, drawn a block of rows at a time (no
    temporary of ``t``'s size: a large embedding's would cost gigabytes); the blocks depend on
    ``t``'s shape only, so equal tensors get equal noise."""
    blocks = [t] if t.dim() == 0 else t.split(max(1, rows // max(1, t.numel() // max(1, len(t)))))
    for block in blocks:  # (one draw per element: drawing is most of the cost)
        noise = torch.randn(block.shape, generator=generator).to(t.device, t.dtype)
        if isinstance(t, nn.Parameter):
            block.add_(noise, alpha=0.01)
        block.mul_(noise.mul_(0.1).exp_())
