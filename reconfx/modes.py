"""Running a module in one training mode from a fixed random state, and comparing outputs.

Every check that compares two models (tracing's acceptance, the invariants, collapsing calls,
the cost model) runs them through :func:`run`: with autograd enabled (fused no-grad fast paths
round differently), and with their buffers and training flags restored afterwards, so comparing
never changes state.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from reconfx.memory import release
from reconfx.tensorfile import Spill

__all__ = [
    "ATOL", "compare", "magnitude", "max_diff", "preserved", "restored", "run", "run_reaching",
    "same_outputs", "silenced"
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


@contextlib.contextmanager
def preserved(*modules: nn.Module) -> Iterator[None]:
    """Restore every buffer (BN running statistics) and the training flags on exit."""
    saved = [(m, {k: b.clone() for k, b in m.named_buffers()},
              {n: s.training for n, s in m.named_modules()}) for m in modules]
    try:
        yield
    finally:
        for module, buffers, modes in saved:
            with torch.no_grad():
                for name, buf in module.named_buffers():
                    buf.copy_(buffers[name])
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


def run(model: nn.Module, example: dict[str, torch.Tensor], training: bool, seed: int = 0):
    """One forward pass from a fixed RNG state; in train mode the running statistics it updates
    are restored, so every comparison starts from the same state."""
    return run_reaching(model, example, training=training, params={}, seed=seed)[0]


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
