"""What reconfx knows about kinds of modules: one registry, which every pass consults.

Each kind (a module class, and its subclasses unless they register their own) records:

- ``container``: opened by tracing, never a leaf (``nn.Sequential`` and friends); every other
  module is a leaf or not by :func:`is_leaf`'s rule;
- ``exact``: whether it computes every sample on its own in a mode, so that stream batching may
  run several task streams through it joined (:func:`exact_module`);
- ``dropout``: the attribute holding its dropout probability (:func:`dropout_attr`, set to 0 where
  the invariant checks compare train mode);
- ``running_stats``: it may keep running statistics, which branching gives one set per task
  (:func:`has_running_stats`);
- ``constructor``: its constructor arguments, read from an instance, for the kinds whose
  arguments cannot be read back generically (:func:`constructor_values`; the emitter writes
  ``model.py``'s ``nn.LSTM(...)`` from them).

A kind unknown here is a leaf by the rule, never batched, draws nothing, keeps no statistics and
is rebuilt by the emitter's generic reading of its constructor arguments. :func:`register` adds
or changes a kind.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

__all__ = [
    "constructor_values", "dropout_attr", "exact_module", "has_running_stats", "is_leaf",
    "is_settings", "is_torch_nn", "Kind", "kind_of", "KINDS", "own_attributes", "owns_state",
    "register", "settings_in"
]


def _always(module: nn.Module, training: bool) -> bool:
    return True


def _never(module: nn.Module, training: bool) -> bool:
    return False


@dataclass(frozen=True)
class Kind:
    """What reconfx knows about one module class (see the module's docstring)."""

    exact: Callable[[nn.Module, bool], bool] = _never  # (module, training) -> per-sample
    container: bool = False
    dropout: str | None = None
    running_stats: bool = False
    constructor: Callable[[nn.Module], dict[str, Any]] | None = None


_UNKNOWN = Kind()
KINDS: dict[type[nn.Module], Kind] = {}


def register(*types: type[nn.Module], **fields: Any) -> None:
    """Record (or change) what reconfx knows about ``types``: the :class:`Kind` fields given,
    the others as registered before for the type or, the first time, for its nearest registered
    base class (or the defaults)."""
    for t in types:
        KINDS[t] = replace(kind_of(t), **fields)


def kind_of(module: nn.Module | type[nn.Module]) -> Kind:
    """The kind registered for the module's class, or for its nearest registered base class."""
    cls = module if isinstance(module, type) else type(module)
    return next((KINDS[c] for c in cls.__mro__ if c in KINDS), _UNKNOWN)


# -- the registry ------------------------------------------------------------------------------
register(nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict,
         container=True)
# Modules that compute every sample on its own in both modes.
register(
    nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm,
    nn.Embedding, nn.Identity, nn.Flatten, nn.Unflatten, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU,
    nn.Mish, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Hardswish,
    nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softmax, nn.LogSoftmax, nn.PReLU,
    nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.Upsample, nn.PixelShuffle, nn.modules.padding._ConstantPadNd,
    exact=_always)
# Random draws in train mode, unless the probability is 0.
register(nn.modules.dropout._DropoutNd, dropout="p",
         exact=lambda m, training: not training or m.p == 0)
# Batch statistics in train mode (InstanceNorm, also a _NormBase, normalises per sample but is
# not batched: its running statistics in eval mode are not checked here).
register(nn.modules.batchnorm._NormBase, running_stats=True)
register(nn.modules.batchnorm._BatchNorm,
         exact=lambda m, training: not training and m.running_mean is not None)


def _rnn(m: nn.Module) -> dict[str, Any]:
    values = {name: getattr(m, name) for name in (
        "input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
        "bidirectional")}
    if isinstance(m, nn.LSTM):
        values["proj_size"] = m.proj_size
    if isinstance(m, nn.RNN):
        values["nonlinearity"] = m.nonlinearity
    return values


def _mha(m: nn.Module) -> dict[str, Any]:
    return {"embed_dim": m.embed_dim, "num_heads": m.num_heads, "dropout": m.dropout,
            "bias": m.in_proj_bias is not None, "add_bias_kv": m.bias_k is not None,
            "add_zero_attn": m.add_zero_attn, "kdim": m.kdim, "vdim": m.vdim,
            "batch_first": m.batch_first}


register(nn.RNNBase, dropout="dropout")
register(nn.LSTM, nn.GRU, nn.RNN, constructor=_rnn)
# Per sample when the batch is axis 0 and nothing is drawn.
register(nn.MultiheadAttention, dropout="dropout", constructor=_mha,
         exact=lambda m, training: m.batch_first and not (training and m.dropout > 0))


# -- questions the passes ask ------------------------------------------------------------------
def is_torch_nn(module: nn.Module) -> bool:
    """A module of PyTorch's own ``torch.nn`` (not a subclass defined elsewhere)."""
    return type(module).__module__.startswith("torch.nn")


def owns_state(module: nn.Module) -> bool:
    return any(p is not None for p in module._parameters.values()) or any(
        b is not None for b in module._buffers.values()
    )


def is_leaf(module: nn.Module) -> bool:
    """Tracing's default leaf rule: never a container; a module that owns state directly and
    has no parameterised children, or a torch.nn module that owns state or has no children
    (ReLU, Dropout, MultiheadAttention)."""
    if kind_of(module).container:
        return False
    has_children = next(module.children(), None) is not None
    if is_torch_nn(module):
        return owns_state(module) or not has_children
    return owns_state(module) and not any(
        True for child in module.children() for _ in child.parameters()
    )


def exact_module(module: nn.Module, training: bool) -> bool:
    """The module (and everything in it) computes each sample on its own in this mode: each
    submodule of a kind exact in that mode. A class outside PyTorch answers only for itself (a
    user's subclass of ``nn.Linear`` may compute anything); PyTorch's own classes also by their
    base classes (``BatchNorm2d`` as ``_BatchNorm``)."""
    def kind(sub: nn.Module) -> Kind:
        own = KINDS.get(type(sub))
        if own is not None or type(sub).__module__.split(".")[0] != "torch":
            return own or _UNKNOWN
        return kind_of(sub)

    return all(kind(sub).exact(sub, training) for sub in module.modules())


def dropout_attr(module: nn.Module) -> str | None:
    """The attribute holding the module's dropout probability, None when it draws nothing."""
    return kind_of(module).dropout


def has_running_stats(module: nn.Module) -> bool:
    """A normalisation layer that tracks running statistics (BatchNorm, InstanceNorm with
    ``track_running_stats``)."""
    return kind_of(module).running_stats and bool(getattr(module, "track_running_stats", False))


def constructor_values(module: nn.Module) -> dict[str, Any] | None:
    """The constructor arguments of a kind registered with a ``constructor`` for exactly the
    module's class (a subclass's constructor may take other arguments); None otherwise."""
    kind = KINDS.get(type(module))
    return kind.constructor(module) if kind is not None and kind.constructor else None


_INTERNAL = set(vars(nn.Module()))  # nn.Module's own bookkeeping (_parameters, training, hooks)


def own_attributes(m: nn.Module) -> dict[str, Any]:
    """The instance's own recorded attributes, besides its tensors and children."""
    return {k: v for k, v in vars(m).items() if k not in _INTERNAL}


def is_settings(value: Any) -> bool:
    """A settings object: a dataclass instance or an object with ``to_dict`` (a Hugging Face
    config), not a module or a tensor."""
    if isinstance(value, type | nn.Module | torch.Tensor):
        return False
    return dataclasses.is_dataclass(value) or callable(getattr(value, "to_dict", None))


def settings_in(m: nn.Module) -> list[Any]:
    """The settings objects the modules of ``m``'s subtree keep, each once, outermost first."""
    found: dict[int, Any] = {}
    for sub in m.modules():
        for value in own_attributes(sub).values():
            if is_settings(value):
                found.setdefault(id(value), value)
    return list(found.values())
