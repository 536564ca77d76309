"""Constructor calls for leaf modules: ``nn.Conv2d(1, 16, 3, padding=1, bias=False)``.

Most modules keep their constructor arguments as attributes of the same name, so the generic
handler reads them back (a tensor-valued attribute such as ``bias`` stands for the flag
``bias=True``). Types whose constructor differs register a handler in ``HANDLERS``. Every call is
verified: it is evaluated, and the module it builds must have the same type, parameter and buffer
shapes and plain attributes as the original; otherwise the next, more explicit form is tried.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from reconfx.emit.render import render_value

Args = tuple[list[Any], dict[str, Any]]
HANDLERS: dict[type[nn.Module], Callable[[nn.Module], dict[str, Any]]] = {}


def handler(*types: type[nn.Module]) -> Callable[[Callable[[nn.Module], dict[str, Any]]], Any]:
    def register(fn: Callable[[nn.Module], dict[str, Any]]) -> Callable[[nn.Module], Any]:
        for t in types:
            HANDLERS[t] = fn
        return fn

    return register


@handler(nn.LSTM, nn.GRU, nn.RNN)
def _rnn(m: nn.Module) -> dict[str, Any]:
    values = {name: getattr(m, name) for name in (
        "input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
        "bidirectional")}
    if isinstance(m, nn.LSTM):
        values["proj_size"] = m.proj_size
    if isinstance(m, nn.RNN):
        values["nonlinearity"] = m.nonlinearity
    return values


@handler(nn.MultiheadAttention)
def _mha(m: nn.Module) -> dict[str, Any]:
    return {"embed_dim": m.embed_dim, "num_heads": m.num_heads, "dropout": m.dropout,
            "bias": m.in_proj_bias is not None, "add_bias_kv": m.bias_k is not None,
            "add_zero_attn": m.add_zero_attn, "kdim": m.kdim, "vdim": m.vdim,
            "batch_first": m.batch_first}


_SKIPPED = {"device", "dtype", "factory_kwargs"}


@dataclass(frozen=True)
class Constructor:
    """How to build one leaf: the call text and the import it needs ('' for torch.nn)."""

    head: str
    args: tuple[str, ...]
    import_line: str

    @property
    def call(self) -> str:
        return f"{self.head}({', '.join(self.args)})"


def _signature(cls: type) -> list[inspect.Parameter]:
    try:
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    except (TypeError, ValueError):
        return []
    return [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            and p.name not in _SKIPPED]


def _generic(m: nn.Module) -> dict[str, Any] | None:
    values = {}
    for p in _signature(type(m)):
        if hasattr(m, p.name):
            value = getattr(m, p.name)
            if isinstance(value, torch.Tensor) or (value is None and isinstance(p.default, bool)):
                value = value is not None  # e.g. bias: the flag that created the tensor
            values[p.name] = value
        elif p.default is inspect.Parameter.empty:
            return None
    return values


def _call(m: nn.Module, values: dict[str, Any], simplify: bool) -> list[str]:
    params = {p.name: p for p in _signature(type(m))}
    if not params and type(m) in HANDLERS:  # *args constructors (RNNs): use the base signature
        params = {p.name: p for p in _signature(nn.RNNBase)} | {
            "nonlinearity": inspect.Parameter("nonlinearity", inspect.Parameter.KEYWORD_ONLY,
                                              default="tanh")}
    positional, keywords = [], []
    for name, value in values.items():
        p = params.get(name)
        if simplify and isinstance(value, tuple) and value and all(v == value[0] for v in value):
            value = value[0]
        if p is not None and p.default is not inspect.Parameter.empty and _equal(value, p.default):
            continue
        required = p is not None and p.default is inspect.Parameter.empty and p.kind in (
            p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        if required and not keywords:
            positional.append(render_value(value))
        else:
            keywords.append(f"{name}={render_value(value)}")
    return positional + keywords


def _equal(a: Any, b: Any) -> bool:
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:
        return False


def _same_structure(a: nn.Module, b: nn.Module) -> bool:
    if type(a) is not type(b):
        return False
    shapes = lambda m: {k: (tuple(v.shape), v.dtype) for k, v in m.state_dict().items()}  # noqa: E731
    if shapes(a) != shapes(b):
        return False
    plain = (int, float, bool, str, tuple, type(None))
    for key, value in vars(a).items():
        if key.startswith("_") or key == "training" or not isinstance(value, plain):
            continue
        if not _equal(value, vars(b).get(key)):
            return False
    return not (is_torch_nn(a) and a.extra_repr() != b.extra_repr())


def _dtype(m: nn.Module) -> torch.dtype | None:
    """The ``dtype=`` a factory-kwargs constructor needs: the one floating dtype of the module's
    own tensors when it is not the default (a layer moved to float64 or bfloat16)."""
    floating = {t.dtype for t in m.state_dict().values() if t.is_floating_point()}
    if len(floating) != 1 or floating == {torch.get_default_dtype()}:
        return None
    try:
        accepts = "dtype" in inspect.signature(type(m).__init__).parameters
    except (TypeError, ValueError):
        return None
    return next(iter(floating)) if accepts else None


def is_torch_nn(m: nn.Module) -> bool:
    return type(m).__module__.startswith("torch.nn")


def constructor(m: nn.Module) -> Constructor | None:
    """A verified constructor call for ``m``, or None when no form rebuilds it exactly."""
    cls = type(m)
    if is_torch_nn(m) and getattr(nn, cls.__name__, None) is cls:
        prefix, import_line, namespace = f"nn.{cls.__name__}", "", {"nn": nn, "torch": torch}
    else:
        prefix = cls.__name__
        import_line = f"from {cls.__module__} import {cls.__name__}"
        namespace = {cls.__name__: cls, "torch": torch, "nn": nn}
    values = HANDLERS[cls](m) if cls in HANDLERS else _generic(m)
    if values is None:
        return None
    dtype = _dtype(m)
    if dtype is not None:
        values = {**values, "dtype": dtype}
    for simplify in (True, False):
        try:
            args = _call(m, values, simplify)
        except TypeError:  # an argument with no source form (e.g. a model config object)
            return None
        built = _build(cls, f"{prefix}({', '.join(args)})", namespace)
        if built is not None and _same_structure(m, built):
            return Constructor(prefix, tuple(args), import_line)
    return None


_BUILT: dict[tuple[type, str], nn.Module | None] = {}


def _build(cls: type, call: str, namespace: dict[str, Any]) -> nn.Module | None:
    """Evaluate a constructor call on the meta device (cached: models repeat their layers)."""
    key = (cls, call)
    if key not in _BUILT:
        try:
            with torch.device("meta"):
                _BUILT[key] = eval(call, namespace)  # noqa: S307 - text we generated
        except Exception:
            _BUILT[key] = None
    return _BUILT[key]
