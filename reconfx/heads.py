"""Turn a single-task backbone into a multi-task model: tap a feature, add one head per task.

The feature is the backbone's output (``output``), a named field of it, or, for a module path or
graph node name, the value computed there: the backbone is traced and cut after that node, so
nothing past the tap is kept. An encoder–decoder model tapped at its encoder (a field
``encoder_<name>`` of its output, or a module inside its encoder) keeps only the encoder
(:func:`encoder_only`): its decoder's inputs are not needed, and it never runs.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn

from reconfx.errors import ModelError
from reconfx.graph import prune
from reconfx.spec import HeadSpec
from reconfx.tree import output_leaves

__all__ = [
    "attach_heads", "build_head", "encoder_only", "EncoderOnly", "in_features",
    "multitask_model", "MultiTaskModel", "Pool", "pool_dims"
]


class EncoderOnly(nn.Module):
    """The encoder of an encoder–decoder model, under the path the model gives it
    (``encoder``, ``model.encoder``), so that layer names stay the model's; calling it calls the
    encoder with the inputs its forward names (a spec may still list the decoder's, which an
    encoder taking ``**kwargs`` would hand on to its layers)."""

    def __init__(self, encoder: nn.Module, path: str):
        super().__init__()
        self.path = path
        self.takes = tuple(p.name for p in inspect.signature(encoder.forward).parameters.values()
                           if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))
        owner: nn.Module = self
        *parents, name = path.split(".")
        for part in parents:
            owner.add_module(part, nn.Module())
            owner = getattr(owner, part)
        owner.add_module(name, encoder)

    def forward(self, **inputs: Any) -> Any:
        encoder = self
        for part in self.path.split("."):
            encoder = getattr(encoder, part)
        return encoder(**{k: v for k, v in inputs.items() if k in self.takes})


def encoder_only(model: nn.Module, feature: str, inputs: Sequence[str] | None = None
                 ) -> tuple[nn.Module, str]:
    """``model`` and ``feature`` as given, or, for an encoder–decoder model (it has
    ``get_encoder()`` and a decoder) tapped at its encoder (``encoder_last_hidden_state``, or a
    module path inside the encoder), the encoder alone in an :class:`EncoderOnly` and the
    feature to tap on it (``last_hidden_state``; a module path unchanged). Only where the
    encoder itself takes some of ``inputs`` (other than a mask): a model that computes its
    encoder's input from its own (a time-series transformer's lagged values and scaling,
    handed on as ``inputs_embeds``) is kept whole."""
    get = getattr(model, "get_encoder", None)
    if not callable(get) or not callable(getattr(model, "get_decoder", None)):
        return model, feature
    encoder = get()
    path = next((n for n, m in model.named_modules() if m is encoder and n), None)
    if path is None or encoder is model:
        return model, feature
    takes = set(inspect.signature(encoder.forward).parameters)
    if inputs is not None and not any(i in takes for i in inputs if "mask" not in i):
        return model, feature
    if feature.startswith("encoder_") and feature not in dict(model.named_modules()):
        return EncoderOnly(encoder, path), feature.removeprefix("encoder_")
    if feature.startswith(path + "."):
        return EncoderOnly(encoder, path), feature
    return model, feature


class Pool(nn.Module):
    """Reduce a feature before a head: ``mean``/``max`` over ``dims``, or ``cls`` (first token).

    The axes are fixed when the head is built (from the feature's rank), so the forward has no
    shape-dependent Python branch and traces into plain tensor ops. With a padding ``mask``
    (batch, seq) of a (batch, seq, dim) feature, ``mean`` and ``max`` leave out the positions
    where it is 0, so padding a batch does not change the result.
    """

    def __init__(self, mode: str, dims: tuple[int, ...]):
        super().__init__()
        self.mode = mode
        self.dims = dims

    def extra_repr(self) -> str:
        return f"{self.mode!r}, dims={self.dims}"

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.mode == "cls":
            return x[:, 0]
        if mask is None:
            return x.mean(self.dims) if self.mode == "mean" else x.amax(self.dims)
        keep = (mask != 0).unsqueeze(-1)
        if self.mode == "max":
            return x.masked_fill(~keep, torch.finfo(x.dtype).min).amax(1)
        weight = keep.to(x.dtype)
        return (x * weight).sum(1) / weight.sum(1).clamp_min(1)


def pool_dims(rank: int) -> tuple[int, ...]:
    """(batch, channels, h, w): the spatial axes; (batch, seq, dim): the sequence axis."""
    return (2, 3) if rank == 4 else (1,)


def build_head(spec: HeadSpec, in_features: int, rank: int) -> nn.Sequential:
    """The head's layers; a pool first unless the head pools with a mask (then the model pools
    before calling it, see :class:`MultiTaskModel`). Unpooled on a (batch, channels, h, w)
    feature, the head is per pixel: 1x1 convolutions over the channels."""
    layers: list[nn.Module] = []
    if spec.pool != "none" and spec.mask is None:
        layers.append(Pool(spec.pool, pool_dims(rank)))
    if spec.dropout:
        layers.append(nn.Dropout(spec.dropout))
    dims = [in_features, *spec.hidden, spec.out_features]
    per_pixel = rank == 4 and spec.pool == "none"
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        layers.append(nn.Conv2d(cin, cout, 1) if per_pixel else nn.Linear(cin, cout))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def in_features(feature: torch.Tensor, spec: HeadSpec) -> int:
    """The size a head reads: the channels of a (batch, channels, h, w) feature (pooled or per
    pixel), else the last axis."""
    return feature.shape[1] if feature.dim() == 4 and spec.pool != "cls" else feature.shape[-1]


class MultiTaskModel(nn.Module):
    """``backbone`` followed by one head per task; returns a dict keyed by task name.

    The backbone gets the inputs named in ``backbone_inputs`` (all when None). A task pooling
    with a padding mask has its :class:`Pool` in ``pools`` (called with the feature and the mask
    input named in ``masks``) before its head. Use :func:`multitask_model`: both tracers need
    ``forward`` to name each input, so the class is specialised to the spec's input names.
    """

    def __init__(self, backbone: nn.Module, heads: dict[str, nn.Module], *, field: str | None,
                 pools: dict[str, tuple[Pool, str]] | None = None,
                 backbone_inputs: Sequence[str] | None = None,
                 resizes: dict[str, str] | None = None):
        super().__init__()
        self.backbone = backbone
        if pools:
            self.pools = nn.ModuleDict({task: pool for task, (pool, _mask) in pools.items()})
        self.heads = nn.ModuleDict(heads)
        self.field = field
        self.masks = {task: mask for task, (_pool, mask) in (pools or {}).items()}
        self.backbone_inputs = None if backbone_inputs is None else list(backbone_inputs)
        self.resizes = dict(resizes or {})  # task -> the input its output is resized to
        # A decoder's key/value cache serves generation; a feature for task heads needs none
        # (Hugging Face decoders build one by default, an object no module call can pass on).
        self.backbone_options = {"use_cache": False} if "use_cache" in _parameters(
            backbone.forward) else {}

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        given = inputs if self.backbone_inputs is None else {
            k: v for k, v in inputs.items() if k in self.backbone_inputs}
        out = self.backbone(**given, **self.backbone_options)
        feature = out if self.field is None else _field(out, self.field)
        outputs = {}
        for name, head in self.heads.items():
            value = head(self.pools[name](feature, inputs[self.masks[name]])
                         if name in self.masks else feature)
            if name in self.resizes:
                value = nn.functional.interpolate(
                    value, size=inputs[self.resizes[name]].shape[-2:], mode="bilinear",
                    align_corners=False)
            outputs[name] = value
        return outputs


def _parameters(function: Any) -> list[str]:
    try:
        return list(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return []


def multitask_model(backbone: nn.Module, heads: dict[str, nn.Module], *, field: str | None,
                    input_names: Sequence[str], pools: dict[str, tuple[Pool, str]] | None = None,
                    backbone_inputs: Sequence[str] | None = None,
                    resizes: dict[str, str] | None = None) -> MultiTaskModel:
    """A :class:`MultiTaskModel` whose ``forward`` takes exactly ``input_names``."""
    names = [n for n in input_names if n.isidentifier()]
    if len(names) != len(input_names):
        raise ModelError(f"input names must be Python identifiers: {list(input_names)}")
    source = (f"def forward(self, {', '.join(names)}):\n"
              f"    return self.run({{{', '.join(f'{n!r}: {n}' for n in names)}}})\n")
    namespace: dict[str, Any] = {}
    exec(compile(source, "<reconfx multitask forward>", "exec"), namespace)  # noqa: S102
    cls = type("MultiTaskModel", (MultiTaskModel,), {"forward": namespace["forward"]})
    return cls(backbone, heads, field=field, pools=pools, backbone_inputs=backbone_inputs,
               resizes=resizes)


def _field(out: Any, name: str) -> Any:
    return out[name] if isinstance(out, dict) else getattr(out, name)


def attach_heads(backbone: nn.Module, feature: str, *, heads: dict[str, HeadSpec],
                 example: dict[str, torch.Tensor], where: str,
                 backbone_inputs: Sequence[str] | None = None) -> MultiTaskModel:
    """Build the multi-task model; head input sizes come from one run on the example inputs.
    The backbone gets the inputs in ``backbone_inputs`` (all when None)."""
    given = {k: v for k, v in example.items() if backbone_inputs is None or k in backbone_inputs}
    backbone, field = _tap(backbone, feature, given, where)
    with torch.no_grad():
        was_training = backbone.training
        out = backbone.eval()(**given)
        backbone.train(was_training)
    value = out if field is None else _field(out, field)
    if not isinstance(value, torch.Tensor):
        raise ModelError(f"feature '{feature}' is a {type(value).__name__}, not a tensor",
                         where=where, fix="tap a tensor-valued field or module")
    pools = {}
    for name, spec in heads.items():
        if spec.mask is None:
            continue
        mask = example[spec.mask]
        if value.dim() != 3 or tuple(mask.shape) != tuple(value.shape[:2]):
            raise ModelError(
                f"task '{name}' pools with mask '{spec.mask}' of shape {tuple(mask.shape)}, "
                f"which does not mark the positions of the feature of shape "
                f"{tuple(value.shape)} (a mask is (batch, seq) for a (batch, seq, dim) feature)",
                where=where, fix="tap a per-token feature, or drop the head's mask")
        pools[name] = (Pool(spec.pool, pool_dims(value.dim())), spec.mask)
    resizes = {name: spec.resize_to for name, spec in heads.items() if spec.resize_to}
    for name, target in resizes.items():
        if value.dim() != 4 or example[target].dim() < 3:
            raise ModelError(
                f"task '{name}' resizes its output to input '{target}' of shape "
                f"{tuple(example[target].shape)}, from the feature of shape {tuple(value.shape)} "
                "(resize_to is for a per-pixel head on a (batch, channels, h, w) feature, to an "
                "input whose last two axes are its height and width)",
                where=where, fix="tap a (batch, channels, h, w) feature, or drop resize_to")
    # (in the feature's dtype: a bf16 backbone gets bf16 heads)
    dtype = value.dtype if value.is_floating_point() else None
    built = {name: build_head(spec, in_features(value, spec), value.dim()).to(dtype)
             for name, spec in heads.items()}
    return multitask_model(backbone, built, field=field, input_names=list(example), pools=pools,
                           backbone_inputs=None if backbone_inputs is None
                           else list(backbone_inputs), resizes=resizes)


def _tap(backbone: nn.Module, feature: str, example: dict[str, torch.Tensor],
         where: str) -> tuple[nn.Module, str | None]:
    if feature == "output":
        return backbone, None
    submodules = dict(backbone.named_modules())
    if feature not in submodules:
        with torch.no_grad():
            fields = output_leaves(backbone.eval()(**example))
        if feature in fields or any(p.startswith(feature + ".") for p in fields):
            return backbone, feature
    return _cut_at(backbone, feature, submodules, where), None


def _cut_at(backbone: nn.Module, feature: str, submodules: dict[str, nn.Module],
            where: str) -> nn.Module:
    """Trace the backbone with fx and make ``feature`` (module path or node) its only output."""
    from reconfx.tracing import check_top_level_names, leaf_tracer

    check_top_level_names(backbone, fix=f"tap the backbone's output or an output field instead "
                          f"of '{feature}', or rename them")
    tracer = leaf_tracer([feature] if feature in submodules else [])  # (a container too)
    try:
        graph = tracer.trace(backbone)
    except Exception as exc:  # fx raises many kinds; we report one line
        raise ModelError(
            f"cannot tap '{feature}': the backbone cannot be cut there ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})", where=where,
            fix="tap the encoder's output instead: feature: encoder_last_hidden_state"
            if isinstance(backbone, EncoderOnly) else
            "tap the backbone's output or a named output field instead") from exc
    nodes = [n for n in graph.nodes
             if (feature in submodules and n.op == "call_module" and n.target == feature)
             or n.name == feature]
    if not nodes:
        raise ModelError(f"'{feature}' is neither an output field, a submodule nor a graph node",
                         where=where, fix="run `reconfx inspect` on the backbone to see names")
    tap = nodes[-1]
    output = next(n for n in graph.nodes if n.op == "output")
    output.args = (tap,)
    prune(graph)
    return fx.GraphModule(tracer.root, graph, class_name=type(backbone).__name__)
