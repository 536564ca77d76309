"""Running a module in one training mode from a fixed random state, and comparing outputs.

Every check that compares two models (tracing's acceptance, the invariants, collapsing calls,
the cost model) runs them through :func:`run`: with autograd enabled (fused no-grad fast paths
round differently), and with their buffers and training flags restored afterwards, so comparing
never changes state.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from reconfx.memory import release
from reconfx.tensorfile import Spill

__all__ = [
    "ATOL", "compare", "kept_masks", "magnitude", "max_diff", "preserved", "restored", "reusing",
    "run", "run_reaching", "same_outputs", "silenced"
]

# The checks' tolerance where two computations of the same function use kernels that round
# differently (stream batching's joined calls, torch.export's ops against eager's fused ones);
# elsewhere they compare bit-exactly.
ATOL = 1e-5


@contextlib.contextmanager
def silenced() -> Iterator[None]:
    """stderr captured: a GraphModule that raises prints its generated code's traceback there
    first, which a caller that handles the exception (a candidate found not to fit) must not
    show."""
    with contextlib.redirect_stderr(io.StringIO()):
        yield


class _KeptMasks(TorchDispatchMode):
    """Every dropout mask drawn as all ones (dropout then only scales by 1 / (1 - p));
    ``kept`` counts them."""

    def __init__(self) -> None:
        super().__init__()
        self.kept = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None
                           ) -> Any:
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet is torch.ops.aten.native_dropout and (len(args) < 3 or args[2] is not False):
            x, p = args[0], float(args[1])
            scale = 0.0 if p >= 1 else 1.0 / (1.0 - p)
            self.kept += 1
            return x * scale, torch.ones_like(x, dtype=torch.bool)
        if packet in (torch.ops.aten.bernoulli_, torch.ops.aten.bernoulli):
            self.kept += 1
            return args[0].fill_(1) if packet is torch.ops.aten.bernoulli_ else \
                torch.ones_like(args[0])
        return func(*args, **kwargs)


_MASKS_KEPT: contextvars.ContextVar[bool] = contextvars.ContextVar("masks_kept", default=False)


@contextlib.contextmanager
def kept_masks() -> Iterator[_KeptMasks]:
    """While open, every dropout mask (an element-wise Bernoulli draw: ``native_dropout``,
    ``bernoulli``) keeps every element. Two forms of one model that draw their masks in another
    order or grouping (one draw over all tasks' rows, or one per task stream) then compute the
    same train-mode function: such masks are drawn element by element, independently, so the
    grouping does not change their distribution, only which numbers land where. Yields the mode,
    whose ``kept`` counts the masks so drawn."""
    token = _MASKS_KEPT.set(True)
    try:
        with _KeptMasks() as mode:
            yield mode
    finally:
        _MASKS_KEPT.reset(token)


@contextlib.contextmanager
def preserved(*modules: nn.Module) -> Iterator[None]:
    """Restore every buffer (BN running statistics) and the training flags on exit. A buffer
    still the same tensor with the same values is left untouched, so its version counter
    says it is unchanged (:func:`run` relies on that; a norm layer's kernel updates its
    running statistics without moving the counter, hence the comparison of values)."""
    saved = [(m, {k: (b, b._version, b.clone()) for k, b in m.named_buffers()},
              {n: s.training for n, s in m.named_modules()}) for m in modules]
    try:
        yield
    finally:
        for module, buffers, modes in saved:
            with torch.no_grad():
                for name, buf in module.named_buffers():
                    was, version, value = buffers[name]
                    if buf is not was or buf._version != version or not torch.equal(buf, value):
                        buf.copy_(value)
            for name, sub in module.named_modules():
                sub.training = modes[name]


@contextlib.contextmanager
def restored(module: nn.Module) -> Iterator[None]:
    """Every parameter and buffer of ``module`` back to its values on exit (training in
    between changes them in place); the values wait in a temporary file, not in memory."""
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    with Spill(tensors.values()) as spill:
        try:
            yield
        finally:
            spill.restore()


def run(model: nn.Module, example: dict[str, torch.Tensor], training: bool, seed: int = 0,
        *, graph: bool = False):
    """One forward pass from a fixed RNG state; in train mode the running statistics it updates
    are restored, so every comparison starts from the same state. Inside :func:`reusing`, the
    outputs come detached, from an earlier pass of the same module in the same state where
    there was one; ``graph``: always a new pass, its outputs with their autograd graph."""
    memo = _REUSED.get()
    if graph or memo is None:
        return run_reaching(model, example, training=training, params={}, seed=seed)[0]
    model.train(training)  # (the state compared is the one the pass runs in)
    state = _state(model, example)
    key = (id(model), id(example), training, seed)
    buffers = [b for _n, b in model.named_buffers(remove_duplicate=False)]
    if state is not None:
        entry = memo.get(key)
        if entry is not None and entry[0]() is model and entry[1] == state and all(
                torch.equal(b, was) for b, was in zip(buffers, entry[3], strict=True)):
            return entry[2]
    out = run_reaching(model, example, training=training, params={}, seed=seed)[0]
    if state is not None and isinstance(out, dict):
        out = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in out.items()}
        memo[key] = (weakref.ref(model), state, out, [b.clone() for b in buffers], example)
    return out


# Outputs of run() by module, example, mode and seed, each with the state it was computed in.
_REUSED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("reused", default=None)


@contextlib.contextmanager
def reusing() -> Iterator[None]:
    """While open, :func:`run` of a module on an example it ran on before, in the same mode and
    state, returns the earlier outputs instead of running it again: the checks of one compile
    (tracing's acceptance, I1, collapsing calls, task rows, I4) compare the same reference
    models on the same examples. The state is everything a forward pass reads besides its
    code's classes (:func:`_state`); a module with hooks always runs."""
    token = _REUSED.set({})
    try:
        yield
    finally:
        _REUSED.reset(token)


def _state(model: nn.Module, example: dict[str, torch.Tensor]) -> tuple | None:
    """What a forward pass of ``model`` on ``example`` reads, as a comparable value: every
    submodule (its identity, class, generated code for a GraphModule, plain attributes, and the
    plain attributes of the objects it keeps, such as a config; none for a torch dropout module
    in eval mode), every parameter (identity, storage, version counter: an in-place change
    moves it), every buffer's identity and storage (their values are compared apart: a norm
    layer's kernel updates its running statistics without moving the counter), the example's
    tensors and the global modes. None (do not reuse) when any module has hooks."""
    from torch.nn.modules import module as torch_module

    if any((torch_module._global_forward_hooks, torch_module._global_forward_pre_hooks,
            torch_module._global_backward_hooks)):
        return None
    kept: dict[int, tuple] = {}

    def plain(obj: Any) -> tuple:
        if id(obj) not in kept:
            kept[id(obj)] = tuple((k, v) for k, v in vars(obj).items()
                                  if isinstance(v, _PLAIN))
        return kept[id(obj)]

    modules = []
    for name, sub in model.named_modules(remove_duplicate=False):
        if sub._forward_hooks or sub._forward_pre_hooks or sub._backward_hooks or getattr(
                sub, "_backward_pre_hooks", None):
            return None
        attrs = []
        # (torch's dropout modules are the identity in eval mode, whatever their p: the checks
        # set p to 0 where streams draw in another order)
        idle = not sub.training and type(sub).__module__ == "torch.nn.modules.dropout"
        for k, v in () if idle else vars(sub).items():
            if isinstance(v, _PLAIN):
                attrs.append((k, v))
            elif hasattr(v, "__dict__") and not isinstance(v, nn.Module | torch.Tensor | type):
                attrs.append((k, id(v), plain(v)))
        code = getattr(sub, "code", None) if isinstance(sub, torch.fx.GraphModule) else None
        modules.append((name, id(sub), type(sub), code, tuple(attrs)))
    tensors = tuple((name, id(t), t.data_ptr(), t._version, t.requires_grad)
                    for name, t in model.named_parameters(remove_duplicate=False))
    buffers = tuple((name, id(t), t.data_ptr(), t.dtype, tuple(t.shape))
                    for name, t in model.named_buffers(remove_duplicate=False))
    inputs = tuple((k, id(v), v.data_ptr(), v._version) if isinstance(v, torch.Tensor) else
                   (k, repr(v)) for k, v in example.items())
    return (tuple(modules), tensors, buffers, inputs, torch.is_grad_enabled(),
            torch.is_inference_mode_enabled(), torch.get_default_dtype(), _MASKS_KEPT.get())


_PLAIN = (int, float, bool, str, type(None), torch.dtype, torch.device)


def magnitude(outputs: dict[str, torch.Tensor]) -> float:
    """The largest absolute value among floating ``outputs``, at least 1: with perturbed
    weights, other kernels run on other values, so a comparison allows ATOL times this."""
    return max([1.0, *(float(w.detach().abs().max()) for w in outputs.values()
                       if w.is_floating_point() and w.numel())])


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    if not a.is_floating_point():
        return 0.0 if torch.equal(a, b) else float("inf")
    return (a.detach().double() - b.detach().double()).abs().max().item() if a.numel() else 0.0


def compare(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor],
            atol: float) -> tuple[str, float] | None:
    """The first task whose output differs by more than ``atol`` (0 means bit-exact)."""
    for task, want in expected.items():
        got = actual[task]
        exact = atol == 0.0
        if exact and (got.shape != want.shape or not torch.equal(got, want)):
            return task, max_diff(want, got)
        if not exact and max_diff(want, got) > atol:
            return task, max_diff(want, got)
    return None


def run_reaching(model: nn.Module, example: dict[str, torch.Tensor], *, training: bool,
                 params: dict[str, nn.Parameter], outputs: Any = None, seed: int = 0
                 ) -> tuple[Any, dict[str, bool | None]]:
    """:func:`run` (its result mapped by ``outputs``), and for each of ``params`` whether the
    outputs' gradient reaches it (fx does not record ``torch.no_grad()`` blocks, so a traced
    graph can train what the model keeps fixed), read off the autograd graph (:func:`reached`)."""
    model.train(training)
    torch.manual_seed(seed)
    with preserved(model) if training else contextlib.nullcontext():
        out = model(**example)
        out = outputs(out) if outputs is not None else out
        found = reached([o for o in out.values() if isinstance(o, torch.Tensor)]) \
            if params else set()
    release()  # (the pass's freed activations)
    return out, {name: id(p) in found for name, p in params.items()}


def reached(outputs: list[torch.Tensor]) -> set[int]:
    """The ids of the tensors requiring grad that ``outputs``' gradient would reach: the leaves
    of their autograd graph, found by walking it (no backward runs, so no gradient is
    allocated: a large model's weights need no second copy for the question)."""
    found = {id(t) for t in outputs if t.requires_grad and t.grad_fn is None}
    seen: set = set()
    stack = [t.grad_fn for t in outputs if t.grad_fn is not None]
    while stack:
        fn = stack.pop()
        if fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)  # (an AccumulateGrad node: a leaf tensor)
        if variable is not None:
            found.add(id(variable))
        stack.extend(f for f, _index in fn.next_functions if f is not None)
    return found


def same_outputs(module: nn.Module, other: nn.Module, examples: Sequence[dict[str, torch.Tensor]],
                 atol: float = 0.0) -> bool:
    """Whether ``other`` gives ``module``'s outputs on every example in both modes, from the
    same random state (within ``atol``; 0: bit-exact); False where it raises."""
    with preserved(module, other):
        for example in examples:
            for training in (False, True):
                try:
                    with silenced():
                        got = run(other, example, training)
                except Exception:  # (a candidate form that does not fit the model)
                    return False
                if compare(run(module, example, training), got, atol):
                    return False
    return True
