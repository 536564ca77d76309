"""Non-finite losses and gradients: detected from one small vector per step, located after.

Every step copies one vector to the host: the T task losses, each task's summed squared gradient
over the shared layers (the conflict statistics compute it anyway; otherwise one sum per row of
the T×P buffer) and the norm of every other gradient. A non-finite entry stops the run before the
optimiser step, so the weights, the counters that are kept and the checkpoints never hold NaN.
Only then, off the hot path, does :func:`locate_loss` re-run the batch node by node to find the
first non-finite value, or :func:`locate_gradient` name the parameters whose gradient is
non-finite.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from torch import fx, nn

from reconfx.errors import TrainingError

__all__ = [
    "describe", "FIX", "locate_gradient", "locate_loss"
]

FIX = ("lower train.lr, check the data for NaN/inf, or use precision fp32; the run stopped "
       "before this step updated anything")


def describe(values: list[float]) -> str:
    return ", ".join(f"{v:.4g}" for v in values)


def _tensors(value: object) -> list[torch.Tensor]:
    """The floating-point tensors in a (nested) value."""
    found: list[torch.Tensor] = []
    fx.node.map_aggregate(value, lambda a: found.append(a) if isinstance(a, torch.Tensor)
                          and a.is_floating_point() else None)
    return found


def _finite(value: object) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in _tensors(value))


def _largest(args: object) -> float:
    """The largest magnitude among the floating-point tensors in (nested) ``args``."""
    return max((float(t.detach().abs().max()) for t in _tensors(args) if t.numel()),
               default=0.0)


class _FirstNonFinite(fx.Interpreter):
    """Runs the graph node by node and stops at the first output that is not finite."""

    found: tuple[fx.Node, float] | None = None
    last_layer: str | None = None

    def run_node(self, node: fx.Node) -> object:
        result = super().run_node(node)
        if self.found is None and node.op not in ("placeholder", "output", "get_attr") \
                and not _finite(result):
            args, kwargs = self.fetch_args_kwargs_from_env(node)
            self.found = (node, _largest((args, kwargs)))
            raise _Stop
        if node.op == "call_module":
            self.last_layer = str(node.target)
        return result


class _Stop(Exception):
    pass


def _node_text(module: nn.Module, node: fx.Node, largest: float, last_layer: str | None) -> str:
    if node.op == "call_module":
        kind = type(module.get_submodule(str(node.target))).__name__
        where = f"the output of layer '{node.target}' ({kind})"
    else:
        op = getattr(node.target, "__name__", str(node.target))
        after = f", after layer '{last_layer}'" if last_layer else ""
        where = f"the result of `{op}` (graph node {node.name}{after})"
    why = f"its inputs are finite (largest magnitude {largest:.3g})"
    if largest > 1e18:  # its square, or a sum of such products, overflows float32 (3.4e38)
        why += ": likely an overflow"
    return f"the first non-finite value is {where}; {why}"


def locate_loss(module: nn.Module, inputs: dict[str, torch.Tensor],
                *, targets: dict[str, torch.Tensor], tasks: list[str], losses: list[float],
                rng: torch.Tensor, context: Callable[[], contextlib.AbstractContextManager]
                ) -> TrainingError:
    """Why a task's loss is not finite: bad input, bad weights, or the first graph node whose
    output is not finite, found by re-running the batch with the step's random state."""
    bad = [t for t, v in zip(tasks, losses, strict=True) if not math.isfinite(v)]
    head = (f"the loss of task{'s' if len(bad) > 1 else ''} {', '.join(map(repr, bad))} is "
            f"not finite (losses: {describe(losses)})")
    for name, value in inputs.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return TrainingError(f"{head}; input '{name}' of this batch holds NaN or inf",
                                 fix="clean the data set (data.factory)")
    weights = [n for n, p in module.named_parameters() if not bool(torch.isfinite(p).all())]
    if weights:
        return TrainingError(f"{head}; non-finite weights: {_listing(weights)}", fix=FIX)
    for name in bad:
        target = targets.get(name)
        if isinstance(target, torch.Tensor) and target.is_floating_point() \
                and not bool(torch.isfinite(target).all()):
            return TrainingError(f"{head}; the targets of task '{name}' hold NaN or inf",
                                 fix="clean the data set (data.factory)")
    if not isinstance(module, fx.GraphModule):
        return TrainingError(head, fix=FIX)
    saved = torch.get_rng_state()
    torch.set_rng_state(rng)
    runner = _FirstNonFinite(module)
    try:
        with torch.no_grad(), context():
            runner.run(*inputs.values())
    except _Stop:
        pass
    finally:
        torch.set_rng_state(saved)
    if runner.found is None:
        return TrainingError(f"{head}; the model's outputs are finite, so the loss function "
                             "itself produced it", fix="check the targets and tasks[].loss")
    node, largest = runner.found
    return TrainingError(f"{head}; {_node_text(module, node, largest, runner.last_layer)}",
                         fix=FIX)


def locate_gradient(named: dict[int, str], task_rows: Iterator[tuple[str, list]],
                    others: list[tuple[nn.Parameter, torch.Tensor]], losses: list[float]
                    ) -> TrainingError:
    """Which parameters' gradients are not finite, per task for the shared layers (``task_rows``
    yields a task and its (parameter, gradient slice) pairs, in graph order) and summed over the
    tasks for the others (heads, per-task copies: their path names the task)."""
    parts = []
    for task, pairs in task_rows:
        bad = [named.get(id(p), "?") for p, g in pairs if not bool(torch.isfinite(g).all())]
        if bad:
            parts.append(f"task '{task}' in the shared {_listing(bad)} (nearest the output: "
                         f"{bad[-1]})")
    bad = [named.get(id(p), "?") for p, g in others if not bool(torch.isfinite(g).all())]
    if bad:
        parts.append(f"the task-specific {_listing(bad)}")
    what = "; ".join(parts) or "its squared norm overflows float32"
    return TrainingError(f"the losses are finite ({describe(losses)}) but the gradient is not: "
                         f"{what}", fix=FIX)


def _listing(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit
                                        else "")
    return f"parameter{'s' if len(names) > 1 else ''} {shown}"
