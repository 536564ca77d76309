"""Plain spellings of the aten ops a torch.export graph holds.

``torch.ops.aten.transpose.int(x, 1, 2)`` reads as ``x.transpose(1, 2)``, ``aten.add.Tensor(a, b)``
as ``a + b``. Only ops listed here are respelled, each to the Tensor method, torch function or
operator that dispatches to that same aten op with the same arguments. Everything else keeps its
exact ``torch.ops.aten`` name.

Two users: the Python emitter writes these spellings into ``model.py`` (its parity check, I4,
runs on the result), and compiled graph modules run them (:func:`plain_calls`): a call through
an ``OpOverload`` costs about twice a Tensor method's Python binding (6 vs 3 us on this
project's CPU), which is most of a small model's forward time.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

__all__ = [
    "drop_default_layout", "FUNCTIONS", "INFIX", "METHODS", "packet", "plain_calls", "Spelling",
    "spelling", "UNARY"
]

# aten packet -> Tensor method name
METHODS = {
    "view": "view", "reshape": "reshape", "expand": "expand", "transpose": "transpose",
    "permute": "permute", "contiguous": "contiguous", "unsqueeze": "unsqueeze",
    "squeeze": "squeeze", "flatten": "flatten", "sym_size": "size", "to": "to",
    "type_as": "type_as", "mean": "mean", "sum": "sum", "softmax": "softmax",
    "masked_fill": "masked_fill", "gather": "gather", "repeat": "repeat",
    "expand_as": "expand_as", "clone": "clone", "amax": "amax", "select": "select",
    "chunk": "chunk", "split": "split", "unbind": "unbind", "unflatten": "unflatten",
    "new_ones": "new_ones", "new_zeros": "new_zeros", "new_full": "new_full",
    "new_empty": "new_empty", "clamp_min": "clamp_min", "clamp_max": "clamp_max",
    "clamp": "clamp", "abs": "abs", "any": "any", "all": "all", "index_select": "index_select",
    "pow": "pow", "cumsum": "cumsum", "diff": "diff",
}
# aten packet -> torch function
FUNCTIONS = {
    "cat": "torch.cat", "stack": "torch.stack", "matmul": "torch.matmul", "bmm": "torch.bmm",
    "where": "torch.where", "relu": "torch.relu", "tanh": "torch.tanh",
    "sigmoid": "torch.sigmoid", "exp": "torch.exp", "sqrt": "torch.sqrt",
    "rsqrt": "torch.rsqrt", "erf": "torch.erf", "arange": "torch.arange", "cos": "torch.cos",
    "sin": "torch.sin", "log": "torch.log", "ones_like": "torch.ones_like",
    "zeros_like": "torch.zeros_like",
    "scaled_dot_product_attention": "torch.nn.functional.scaled_dot_product_attention",
    "gelu": "torch.nn.functional.gelu", "silu": "torch.nn.functional.silu",
    "linear": "torch.nn.functional.linear",
}
# aten packet -> infix operator (two positional arguments, no keyword such as alpha)
INFIX = {"add": "+", "sub": "-", "mul": "*", "div": "/", "eq": "==", "ne": "!=", "lt": "<",
         "le": "<=", "gt": ">", "ge": ">=", "matmul": "@", "__and__": "&", "__or__": "|",
         "__xor__": "^", "bitwise_and": "&", "bitwise_or": "|", "bitwise_xor": "^"}
UNARY = {"neg": "-", "bitwise_not": "~"}


def packet(op: object) -> str | None:
    if isinstance(op, torch._ops.OpOverload) and op.namespace == "aten":
        return op.overloadpacket.__name__
    return None


@dataclass(frozen=True)
class Spelling:
    """How an aten call is written instead: ``kind`` is ``infix`` or ``unary`` (``name`` is the
    operator), ``method`` (a Tensor method) or ``function`` (a dotted torch function)."""

    kind: str
    name: str


def spelling(node: fx.Node) -> Spelling | None:
    """The plain spelling of ``node``'s aten call, or None where it keeps its aten name."""
    name = packet(node.target) if node.op == "call_function" else None
    if name is None:
        return None
    if name in INFIX and len(node.args) == 2 and not node.kwargs:
        return Spelling("infix", INFIX[name])
    if name in UNARY and len(node.args) == 1 and not node.kwargs:
        return Spelling("unary", UNARY[name])
    method = METHODS.get(name) or (name if name.endswith("_") and not name.startswith("_")
                                   and hasattr(torch.Tensor, name)
                                   else None)  # in-place ops: x.mul_(0.5)
    if name == "to" and "layout" in node.kwargs:  # Tensor.to takes no layout
        method = None
    if method and node.args and isinstance(node.args[0], fx.Node):
        return Spelling("method", method)
    if name in FUNCTIONS:
        return Spelling("function", FUNCTIONS[name])
    return None


def drop_default_layout(graph: fx.Graph) -> None:
    """torch.export writes the layout every dense tensor has into its conversions
    (``aten.to.dtype_layout(x, dtype=d, layout=torch.strided, device=v)``); without it, the
    same overload reads ``x.to(dtype=d, device=v)``."""
    for node in graph.nodes:
        if packet(node.target) == "to" and node.kwargs.get("layout") == torch.strided:
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != "layout"}


_OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv,
              "==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le,
              ">": operator.gt, ">=": operator.ge, "@": operator.matmul, "&": operator.and_,
              "|": operator.or_, "^": operator.xor}


def _callable(s: Spelling) -> tuple[str, Any]:
    """The fx (op, target) that runs spelling ``s``."""
    if s.kind == "method":
        return "call_method", s.name
    if s.kind == "unary":
        return "call_function", operator.neg if s.name == "-" else operator.invert
    if s.kind == "infix":
        return "call_function", _OPERATORS[s.name]
    obj: Any = torch
    for part in s.name.split(".")[1:]:
        obj = getattr(obj, part)
    return "call_function", obj


@contextlib.contextmanager
def plain_calls(graph: fx.Graph) -> Iterator[None]:
    """Within the block, ``graph``'s aten calls that have a plain spelling are that spelling's
    method or function calls (for generating the code that runs); restored afterwards."""
    saved = []
    for node in graph.nodes:
        s = spelling(node)
        if s is not None:
            saved.append((node, node.op, node.target))
            node.op, node.target = _callable(s)
    try:
        yield
    finally:
        for node, op, target in saved:
            node.op, node.target = op, target
