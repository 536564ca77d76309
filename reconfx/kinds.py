"""What reconfx knows about kinds of modules, in one place; every pass asks here.

- containers (``nn.Sequential`` and friends) are opened by tracing, never leaves;
- leaves: which modules tracing keeps as one call (:func:`is_leaf`);
- exactness per mode: which compute every sample on its own, so that stream batching may run
  several task streams through them joined (:func:`exact_module`);
- random state: which hold a dropout probability, and under which attribute (:func:`dropout_attr`,
  set to 0 where the invariant checks compare train mode);
- statistics: which keep running statistics that branching gives one set per task
  (:func:`has_running_stats`).

How ``model.py`` rebuilds a module of a kind is the emitter's registry of constructor handlers
(:data:`reconfx.emit.constructors.HANDLERS`), for the kinds whose constructor arguments cannot be
read back from the instance generically.
"""

from __future__ import annotations

from torch import nn

CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)

# Modules that compute every sample on its own in both modes.
_ANY_MODE = (
    nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm,
    nn.Embedding, nn.Identity, nn.Flatten, nn.Unflatten, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU,
    nn.Mish, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Hardswish,
    nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softmax, nn.LogSoftmax, nn.PReLU,
    nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.Upsample, nn.PixelShuffle, nn.modules.padding._ConstantPadNd,
)
# ... and in eval mode only (their random draws, their batch statistics in train mode).
_EVAL_ONLY = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)


def is_torch_nn(module: nn.Module) -> bool:
    """A module of PyTorch's own ``torch.nn`` (not a subclass defined elsewhere)."""
    return type(module).__module__.startswith("torch.nn")


def owns_state(module: nn.Module) -> bool:
    return any(p is not None for p in module._parameters.values()) or any(
        b is not None for b in module._buffers.values()
    )


def is_leaf(module: nn.Module) -> bool:
    """Default leaf rule: a module that owns state directly and has no parameterised children,
    or a torch.nn module that owns state or has no children (ReLU, Dropout, MultiheadAttention)."""
    if isinstance(module, CONTAINERS):
        return False
    has_children = next(module.children(), None) is not None
    if is_torch_nn(module):
        return owns_state(module) or not has_children
    return owns_state(module) and not any(
        True for child in module.children() for _ in child.parameters()
    )


def exact_module(module: nn.Module, training: bool) -> bool:
    """The module (and everything in it) computes each sample on its own in this mode."""
    for sub in module.modules():
        if type(sub).__module__.split(".")[0] != "torch":
            return False
        if isinstance(sub, nn.modules.batchnorm._BatchNorm):
            if training or sub.running_mean is None:
                return False
        elif isinstance(sub, nn.MultiheadAttention):
            if not sub.batch_first or (training and sub.dropout > 0):
                return False
        elif isinstance(sub, _EVAL_ONLY):
            if training and getattr(sub, "p", 0.0) > 0:
                return False
        elif not isinstance(sub, _ANY_MODE):
            return False
    return True


def dropout_attr(module: nn.Module) -> str | None:
    """The attribute holding the module's dropout probability, None when it draws nothing."""
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return "p"
    if isinstance(module, nn.MultiheadAttention | nn.RNNBase):
        return "dropout"
    return None


def has_running_stats(module: nn.Module) -> bool:
    """A normalisation layer that tracks running statistics (BatchNorm, InstanceNorm with
    ``track_running_stats``)."""
    return isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats
