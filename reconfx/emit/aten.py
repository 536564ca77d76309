"""Readable spellings of the aten ops a torch.export graph holds.

``torch.ops.aten.transpose.int(x, 1, 2)`` reads as ``x.transpose(1, 2)``, ``aten.add.Tensor(a, b)``
as ``a + b``. Only ops listed here are rewritten, each to the Tensor method, torch function or
operator that dispatches to that same aten op with the same arguments; the emitter's parity check
(I4) runs on the result. Everything else keeps its exact ``torch.ops.aten`` name.
"""

from __future__ import annotations

import torch

aten = torch.ops.aten

# aten packet -> Tensor method name
METHODS = {
    "view": "view", "reshape": "reshape", "expand": "expand", "transpose": "transpose",
    "permute": "permute", "contiguous": "contiguous", "unsqueeze": "unsqueeze",
    "squeeze": "squeeze", "flatten": "flatten", "sym_size": "size", "to": "to",
    "type_as": "type_as", "mean": "mean", "sum": "sum", "softmax": "softmax",
    "masked_fill": "masked_fill", "gather": "gather", "repeat": "repeat",
    "expand_as": "expand_as", "clone": "clone", "amax": "amax", "select": "select",
    "chunk": "chunk", "split": "split", "unbind": "unbind",
}
# aten packet -> torch function
FUNCTIONS = {
    "cat": "torch.cat", "stack": "torch.stack", "matmul": "torch.matmul", "bmm": "torch.bmm",
    "where": "torch.where", "relu": "torch.relu", "tanh": "torch.tanh",
    "sigmoid": "torch.sigmoid", "exp": "torch.exp", "sqrt": "torch.sqrt",
    "rsqrt": "torch.rsqrt", "erf": "torch.erf", "arange": "torch.arange",
    "scaled_dot_product_attention": "torch.nn.functional.scaled_dot_product_attention",
    "gelu": "torch.nn.functional.gelu", "silu": "torch.nn.functional.silu",
}
# aten packet -> infix operator (two positional arguments, no keyword such as alpha)
INFIX = {"add": "+", "sub": "-", "mul": "*", "div": "/", "eq": "==", "ne": "!=", "lt": "<",
         "le": "<=", "gt": ">", "ge": ">=", "matmul": "@"}
UNARY = {"neg": "-"}


def packet(op: object) -> str | None:
    if isinstance(op, torch._ops.OpOverload) and op.namespace == "aten":
        return op.overloadpacket.__name__
    return None
