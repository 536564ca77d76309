"""The reconfx spec: the one place that defines and documents what a YAML spec may say.

A spec names a model (or a backbone plus per-task heads), example inputs, tasks, which layers to
branch and where to write the results. Every model forbids unknown keys, so a typo is an error
that names the field instead of a silently ignored setting.

>>> spec = load_spec("specs/multidigits.yaml")          # doctest: +SKIP
>>> [t.name for t in spec.tasks]                         # doctest: +SKIP
['left', 'right']

Code execution: a spec runs code only through the factories it names explicitly
(``model.factory``/``backbone.factory`` and ``data.factory``); nothing else in it is executed.
"""

from __future__ import annotations

import hashlib
import keyword
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from reconfx.errors import SpecError
from reconfx.train.aggregators import AGGREGATORS

__all__ = [
    "BackboneSpec", "BranchSpec", "class_name", "DataSpec", "DistributedSpec", "DTYPES",
    "ExportSpec", "FactorySpec", "HeadSpec", "HfExportSpec", "HFSource", "InputSpec",
    "json_schema", "load_spec", "load_spec_file", "LoadedSpec", "MAX_EXAMPLE_ELEMENTS",
    "MAX_VALUES", "ModelSpec", "ONNX_OPSET", "ONNX_OPSETS", "OnnxSpec", "POLICIES", "ProfileSpec",
    "RandomSelect", "ScheduleSpec", "SelectSpec", "SparseSpec", "Spec", "TaskSpec", "TimmSource",
    "TraceSpec", "TrainSpec", "YAML11_WORDS"
]

_IDENTIFIER = r"^[A-Za-z_][A-Za-z0-9_]*$"


def _yaml11_words(value: Any) -> Any:
    """YAML 1.1 reads an unquoted ``off``/``no`` as false and ``on``/``yes`` as true: a field
    whose values include one of those words takes the boolean back as that word."""
    if value is False:
        return "off"
    if value is True:
        return "on"
    return value


YAML11_WORDS = BeforeValidator(_yaml11_words)
ONNX_OPSETS = range(17, 22)  # exported, checked and run by onnxruntime in tests/test_onnx.py
ONNX_OPSET = 18  # the default
_FACTORY = r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$"
# Task names become attribute names of per-task containers (nn.ModuleDict) in the emitted model.
_RESERVED_TASK_NAMES = frozenset(
    name for name in dir(torch.nn.ModuleDict()) if not name.startswith("__")
)


MAX_EXAMPLE_ELEMENTS = 2**28  # an example input above this (1 GiB of float32) is a typo


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HFSource(_Strict):
    """A Hugging Face ``transformers`` model, loaded with ``from_pretrained(path,
    local_files_only=True, **kwargs)``: reconfx never downloads."""

    path: str = Field(description="a local folder (config.json and weights), or a model id "
                      "already in the local Hugging Face cache")
    class_: str = Field(default="AutoModel", alias="class", pattern=_IDENTIFIER,
                        description="the transformers class: AutoModel, BertModel, ...")
    kwargs: dict[str, Any] = Field(
        description="keyword arguments of from_pretrained",default_factory=dict)
    trust_remote_code: bool = Field(
        default=False, description="run the Python code a model folder ships (its config's "
        "auto_map); without it such a folder is refused, never prompted for")


class TimmSource(_Strict):
    """A ``timm`` model by name, created with ``pretrained=False`` (no download); its weights
    come from the factory's ``checkpoint``."""

    name: str = Field(description="a timm model name, e.g. convnext_atto")
    kwargs: dict[str, Any] = Field(
        description="keyword arguments of timm.create_model",default_factory=dict)


class FactorySpec(_Strict):
    """Where the model comes from: a callable named ``"package.module:callable"``, called with
    ``kwargs``; or ``hf`` (a Hugging Face model loaded offline); or ``timm`` (a timm model by
    name). ``checkpoint`` is loaded after construction."""

    factory: str | None = Field(default=None, pattern=_FACTORY,
                                description='"package.module:callable"')
    hf: HFSource | None = Field(default=None, description="a Hugging Face model loaded offline")
    timm: TimmSource | None = Field(default=None, description="a timm model by name")
    kwargs: dict[str, Any] = Field(
        description="keyword arguments of factory",default_factory=dict)
    checkpoint: Path | None = Field(
        default=None, description="state dict to load after construction: .pt/.pth or .safetensors"
    )

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint_suffix(cls, path: Path | None) -> Path | None:
        if path is not None and path.suffix not in {".pt", ".pth", ".safetensors"}:
            raise ValueError(f"checkpoint must end in .pt, .pth or .safetensors, got '{path.name}'")
        return path

    @model_validator(mode="after")
    def _one_source(self) -> FactorySpec:
        given = [k for k in ("factory", "hf", "timm") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of factory (\"package.module:callable\"), hf "
                             "({path: <folder>}) or timm ({name: <model name>})"
                             + (f"; got {', '.join(given)}" if given else ""))
        if self.kwargs and self.factory is None:
            raise ValueError(f"kwargs go inside {given[0]}: {{..., kwargs: {{...}}}}")
        return self

    @property
    def source(self) -> str:
        """The field naming the model: ``factory``, ``hf`` or ``timm``."""
        return "hf" if self.hf is not None else "timm" if self.timm is not None else "factory"

    @property
    def call(self) -> tuple[str, dict[str, Any]]:
        """The callable that builds the model, as ``"package.module:callable"``, and its
        keyword arguments."""
        if self.hf is not None:
            return "reconfx.zoo:hf_pretrained", {
                "path": self.hf.path, "cls": self.hf.class_,
                "trust_remote_code": self.hf.trust_remote_code, **self.hf.kwargs}
        if self.timm is not None:
            return "reconfx.zoo:timm_model", {"name": self.timm.name, **self.timm.kwargs}
        return str(self.factory), dict(self.kwargs)


class ModelSpec(FactorySpec):
    """A multi-task model: it returns a dict keyed by task name, or a tuple in task order."""


class BackboneSpec(FactorySpec):
    """A single-task backbone to convert: reconfx taps ``feature`` and adds one head per task.

    ``feature`` is ``output`` (the backbone's whole output), a named field of the output
    (``last_hidden_state``, ``pooler_output``), a submodule path (``encoder.layer.3``) or a graph
    node name; reconfx tries them in that order.
    """

    feature: str = Field(
        default="output", description="what to tap: output, an output field, a submodule path or a "
        "graph node name")


class HeadSpec(_Strict):
    """A task head on top of the backbone feature.

    ``pool`` reduces the feature before the head: ``mean``/``max`` over the sequence axis of a
    (batch, seq, dim) feature or the spatial axes of a (batch, channels, h, w) feature, ``cls``
    takes the first token, ``none`` keeps the feature as it is: a head per token of a (batch,
    seq, dim) feature, or per pixel of a (batch, channels, h, w) one (1x1 convolutions, output
    (batch, out_features, h, w): dense prediction such as segmentation).
    """

    type: Literal["linear", "mlp"] = Field(
        default="linear", description="linear, or mlp with hidden sizes")
    out_features: PositiveInt = Field(description="the head's output size (classes)")
    hidden: list[PositiveInt] = Field(default_factory=list, description="mlp hidden sizes")
    pool: Literal["none", "mean", "max", "cls"] = Field(
        default="none", description="mean or max over the sequence or spatial axes, cls (first "
        "token), or none (per-token heads)")
    mask: str | None = Field(
        default=None, description="with pool mean or max: the input holding the padding mask "
        "of a (batch, seq, dim) feature (1 at real tokens, 0 at padding); masked positions are "
        "left out of the pool")
    dropout: float = Field(
        description="dropout before the head's first linear layer",default=0.0, ge=0.0, lt=1.0)
    resize_to: str | None = Field(
        default=None, description="with pool none on a (batch, channels, h, w) feature: the "
        "input whose last two axes the head's output is resized to (bilinear), e.g. the image, "
        "so segmentation logits match per-pixel labels")

    @model_validator(mode="after")
    def _hidden_only_for_mlp(self) -> HeadSpec:
        if self.type == "linear" and self.hidden:
            raise ValueError("hidden sizes are for type: mlp; a linear head has none")
        if self.type == "mlp" and not self.hidden:
            raise ValueError("an mlp head needs at least one hidden size, e.g. hidden: [256]")
        if self.mask is not None and self.pool not in ("mean", "max"):
            raise ValueError(f"a mask applies to pool: mean or max, and this head's pool is "
                             f"{self.pool} (a cls or per-token head needs none)")
        if self.resize_to is not None and self.pool != "none":
            raise ValueError(f"resize_to applies to a per-pixel head (pool: none), and this "
                             f"head's pool is {self.pool}")
        return self


_DTYPES = Literal["float32", "float64", "float16", "bfloat16", "int64", "int32", "bool"]
DTYPES = {
    "float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
    "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32, "bool": torch.bool,
}


class InputSpec(_Strict):
    """One model input, passed to the model as a keyword argument named ``name``."""

    name: str = Field(
        description="the keyword argument's name (a Python identifier)",pattern=_IDENTIFIER)
    shape: list[PositiveInt] = Field(
        description="the example input's shape, batch first",min_length=1)
    dtype: _DTYPES = Field(default="float32", description="the input's dtype")
    dynamic: list[NonNegativeInt] | dict[NonNegativeInt, str] = Field(
        default_factory=lambda: [0], description="axes that may change size (default: the "
        "batch): a list of axes, or axes with the names ONNX gives them ({0: batch, 1: "
        "sequence}; inputs naming an axis alike share that dimension)")
    low: float | None = Field(default=None, description="lowest example value (int inputs)")
    high: float | None = Field(default=None, description="example values stay below this")
    pad: float | None = Field(
        default=None, description="value the data loader pads this input's items with where "
        "their sizes differ within a batch (0 for token ids); without it such a batch is refused")
    mask_of: str | None = Field(
        default=None, description="this input is the padding mask of the named input: 1 where "
        "that input has data, 0 where it was padded; built by the loader where items lack it")
    to_backbone: bool = Field(
        default=True, description="the backbone (or model) receives this input as the keyword "
        "argument of its name; false for an input only a head's mask reads")

    @model_validator(mode="after")
    def _check(self) -> InputSpec:
        if math.prod(self.shape) > MAX_EXAMPLE_ELEMENTS:
            raise ValueError(f"shape {self.shape} has {math.prod(self.shape):,} elements; the "
                             f"example input is built in memory (at most "
                             f"{MAX_EXAMPLE_ELEMENTS:,}): give a small example batch")
        for axis in self.dynamic:
            if axis >= len(self.shape):
                raise ValueError(f"dynamic axis {axis} is outside shape {self.shape}")
        for name in (self.dynamic.values() if isinstance(self.dynamic, dict) else ()):
            if not re.match(_IDENTIFIER, name):
                raise ValueError(f"dynamic axis name {name!r} is not an identifier (letters, "
                                 "digits, _)")
        if self.dtype.startswith("int") and self.high is None and self.mask_of is None:
            raise ValueError(
                "integer inputs need 'high' (exclusive upper bound of example values; "
                "token ids must stay below the vocabulary size)"
            )
        if self.low is not None and self.high is not None and self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.mask_of is not None and (len(self.shape) < 2 or self.dtype.startswith("float")
                                         and self.dtype != "float32"):
            raise ValueError("a mask (mask_of) has a (batch, seq) shape and an int, bool or "
                             "float32 dtype")
        return self


class TaskSpec(_Strict):
    name: str = Field(
        description="the task's name (a Python identifier); the output key a model returns it "
        "under",
        pattern=_IDENTIFIER)
    loss: str | None = Field(
        default=None, description="cross_entropy, mse, l1, bce, or package.module:function "
        "called as function(output, target) -> the batch's scalar loss")
    metric: str | None = Field(
        default=None, description="accuracy, miou (mean intersection over union of the "
        "classes, over the split: segmentation), mse, mae, or package.module:function called as "
        "function(output, target) -> one value per item (averaged over the split); default: "
        "the loss's usual metric")
    higher_is_better: bool = Field(
        default=True, description="the direction of a metric given as package.module:function "
        "(the built-in metrics know theirs): which validation epoch is best, and delta-m's sign")
    weight: PositiveFloat = Field(
        default=1.0, description="multiplies the task's loss, and so its gradient, before the "
        "aggregator combines the tasks' gradients (profiling and training)")
    output: str | None = Field(
        default=None, description='path of this task\'s output in the model output, "key.path"'
    )
    head: HeadSpec | None = Field(
        default=None, description="with backbone: the head built for this task")
    baseline: float | None = Field(default=None, description="single-task metric, for delta-m")

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, name: str) -> str:
        if keyword.iskeyword(name) or name in _RESERVED_TASK_NAMES or name.startswith("__"):
            raise ValueError(f"'{name}' is reserved in Python or nn.ModuleDict; rename the task")
        return name


class DataSpec(_Strict):
    factory: str = Field(
        description="package.module:callable, called as factory(split=..., seed=..., **kwargs) for "
        "the splits train, val and test",
        pattern=_FACTORY)
    kwargs: dict[str, Any] = Field(
        description="keyword arguments of factory",default_factory=dict)
    batch_size: PositiveInt = Field(
        default=128, description="items per batch (profile, train, eval)")
    workers: int = Field(
        default=0, ge=0, description="data-loader processes for training and profiling "
        "(0: load in the main process); the batches and their order are the same")
    drop_last: bool = Field(
        default=True, description="training and profiling skip each epoch's last partial batch, "
        "as reference training loops do (a small last batch right before every evaluation can "
        "wreck a short SGD run with BatchNorm); kept when the split is smaller than one batch. "
        "Evaluation always uses every item")


class ProfileSpec(_Strict):
    steps: PositiveInt = Field(
        default=300, description="training steps the profile measures per-task gradients over")
    threshold: float = Field(default=-0.1, ge=-1.0, le=1.0, description="S: conflict if cos < S")


class RandomSelect(_Strict):
    k: PositiveInt = Field(description="how many layers to draw")
    seed: int = Field(default=0, description="the draw's seed")


class SelectSpec(_Strict):
    """Which shared layers to branch: exactly one policy, after include/exclude narrowing."""

    top_k: PositiveInt | None = Field(
        default=None, description="the k candidates with the highest conflict scores")
    fraction: float | None = Field(
        description="the ceil(fraction x candidates) highest-scoring candidates",
        default=None, gt=0.0, le=1.0)
    param_budget: PositiveFloat | None = Field(
        default=None, description="percent of the candidates' parameters the copies may add: "
        "the set of layers with the highest total score that fits (an exact knapsack)"
    )
    flops_budget: PositiveFloat | None = Field(
        default=None, description="percent of the original's FLOPs per forward the branched "
        "model may add (everything after a branch point runs once per task): the set of "
        "layers with the highest total score found that fits, a costly one passed over"
    )
    min_score: float | None = Field(
        default=None, description="every candidate scoring at least this")
    layers: list[str] | None = Field(
        default=None, description="exact layer paths or glob patterns; needs no profile"
    )
    random: RandomSelect | None = Field(
        default=None, description="k candidates drawn at random (an ablation; needs no profile)")
    include: list[str] = Field(
        description="names or globs narrowing the candidates (a module path stands for every layer "
        "under it)",
        default_factory=list)
    exclude: list[str] = Field(
        description="names or globs removed from the candidates",default_factory=list)

    @model_validator(mode="after")
    def _one_policy(self) -> SelectSpec:
        chosen = [name for name in POLICIES if getattr(self, name) is not None]
        if len(chosen) != 1:
            raise ValueError(
                f"give exactly one selection policy of {', '.join(POLICIES)}; got "
                + (", ".join(chosen) if chosen else "none")
            )
        if self.layers is not None and not self.layers:
            raise ValueError("layers is empty; name at least one layer path or glob")
        return self

    @property
    def policy(self) -> str:
        return next(name for name in POLICIES if getattr(self, name) is not None)

    @property
    def needs_scores(self) -> bool:
        """The policy ranks layers by conflict score (a profile must run first)."""
        return self.policy not in ("layers", "random")


POLICIES = ("top_k", "fraction", "param_budget", "flops_budget", "min_score", "layers",
            "random")


class BranchSpec(_Strict):
    norm_stats: Literal["per_task", "shared"] = Field(
        default="per_task",
        description="running statistics of shared norm layers after a branch point: one set per "
        "task (default) or one mixed set (Recon's behaviour)",
    )
    stream_batching: Annotated[Literal["eval", "tuned", "off"], YAML11_WORDS] = Field(
        default="eval",
        description="after a branch point, run the task streams through shared layers as one "
        "concatenated batch where that is exact and pays (eval mode, ONNX export; default), "
        "the same with each region's streams per call measured at compile time ('tuned', "
        "recorded in the report), or never ('off'). Training always runs the streams one by one",
    )
    tune_batches: list[PositiveInt] = Field(
        default_factory=lambda: [1, 16, 128], min_length=1,
        description="batch sizes that stream_batching: tuned times each region at",
    )
    tune_repeats: PositiveInt = Field(
        default=5, description="timed calls per option in stream_batching: tuned (median)")

    @model_validator(mode="after")
    def _tuning_needs_tuned(self) -> BranchSpec:
        given = sorted({"tune_batches", "tune_repeats"} & self.model_fields_set)
        if given and self.stream_batching != "tuned":
            raise ValueError(f"{' and '.join(given)} only apply with stream_batching: tuned "
                             f"(it is '{self.stream_batching}'): set it, or remove them")
        return self


class SparseSpec(_Strict):
    """Sparse training: each output neuron of the encoder keeps ``per_neuron_k`` (or ``fraction``
    of its) largest-magnitude input connections trainable; exactly one of the two."""

    per_neuron_k: PositiveInt | None = Field(
        default=None, description="keep the K largest-magnitude weights per output neuron "
        "trainable")
    fraction: float | None = Field(
        description="keep this fraction of each weight tensor's entries trainable",
        default=None, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _one(self) -> SparseSpec:
        if (self.per_neuron_k is None) == (self.fraction is None):
            raise ValueError("give exactly one of per_neuron_k or fraction")
        return self


class ScheduleSpec(_Strict):
    """The learning rate over training, stepped after every optimiser step: ``constant``, or
    ``step`` (times ``gamma`` every ``every`` epochs), ``multistep`` (times ``gamma`` at each of
    ``milestones``, in epochs) or ``cosine`` (down to 0 over all steps); with ``warmup_steps``,
    first a linear rise from 0."""

    kind: Literal["constant", "step", "multistep", "cosine"] = Field(
        default="constant", description="how the rate decays")
    every: PositiveInt = Field(default=1, description="step: epochs between decays")
    milestones: list[PositiveInt] = Field(
        default_factory=list, description="multistep: the epochs at which the rate decays")
    gamma: PositiveFloat = Field(default=0.1, description="step, multistep: the decay factor")
    warmup_steps: int = Field(
        default=0, ge=0, description="steps of linear warm-up from 0 before the schedule")

    @model_validator(mode="after")
    def _fields_of_the_kind(self) -> ScheduleSpec:
        if self.kind == "multistep" and not self.milestones:
            raise ValueError("multistep needs milestones (epochs), e.g. milestones: [30, 60]")
        given = {"every", "milestones", "gamma"} & self.model_fields_set
        used = {"step": {"every", "gamma"}, "multistep": {"milestones", "gamma"}}.get(
            self.kind, set())
        if given - used:
            raise ValueError(f"{', '.join(sorted(given - used))} do(es) not apply to "
                             f"kind '{self.kind}': remove, or choose another kind")
        return self


class TrainSpec(_Strict):
    aggregator: str = Field(
        default="ew", description="how per-task gradients combine: ew, pcgrad, cagrad, mgda, "
        "graddrop, imtlg, alignedmtl, upgrad, dualproj, nashmtl")
    optimizer: Literal["adam", "adamw", "sgd"] = Field(
        default="adam", description="adam, adamw, or sgd with momentum 0.9")
    lr: PositiveFloat = Field(default=1e-3, description="learning rate")
    weight_decay: float = Field(
        description="weight decay",default=0.0, ge=0.0)
    epochs: PositiveInt = Field(default=10, description="passes over the train split")
    seed: int = Field(
        default=0, description="seeds the model's initialisation, the example inputs, the data "
        "order and the data factory")
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="auto: CUDA when visible, else CPU")
    schedule: ScheduleSpec = Field(
        default_factory=lambda: ScheduleSpec(), description="the learning rate over training")
    early_stopping: PositiveInt | None = Field(
        default=None, description="stop after this many epochs without a better validation "
        "score")
    keep: Literal["best", "last"] = Field(
        default="best", description="the weights run evaluates and emits: best (the best "
        "validation epoch's) or last (the last epoch's, as the Recon paper's protocol reports)")
    conflict_every: PositiveInt = Field(
        default=1, description="training counts conflict statistics on every N-th step; with a "
        "linear aggregator (ew) the other steps take one backward pass of the summed losses "
        "instead of one per task (same update, about 1/T of the backward cost)")
    threads: PositiveInt | None = Field(
        default=None, description="CPU threads for profiling, training and evaluation "
        "(torch.set_num_threads). A CPU kernel's float sums depend on how many threads split "
        "them, and a conflict count near the threshold on those sums, so a spec whose results "
        "must repeat on other machines fixes it; default: PyTorch's (one per core)")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        default="fp32", description="bf16/fp16: autocast for forward and losses (fp16 with "
        "dynamic loss scaling); parameters, gradients and statistics stay float32")
    init: Literal["initial", "profiled"] = Field(
        default="initial", description="initial: run retrains the branched model from the weights "
        "it had before profiling (the paper's protocol); profiled: it continues from the profiled "
        "ones")
    sparse: SparseSpec | None = Field(
        default=None, description="sparse training: only some weight entries of the shared encoder "
        "train")
    gradient_memory_gb: PositiveFloat = Field(
        default=2.0, description="cap on the per-task gradient matrix (tasks x the shared "
        "layers' parameters, float32) that profiling and training hold: above it, ew and mean "
        "take the layers in parts (one backward call per task and part, same result); other "
        "aggregators stop before allocating, naming the size they need")
    checkpoint_every: NonNegativeInt = Field(
        default=200, description="steps between resume checkpoints of profile and run "
        "(checkpoints/resume.pt; training also saves at every epoch's end); 0: epoch ends only")

    @field_validator("aggregator")
    @classmethod
    def _known_aggregator(cls, name: str) -> str:
        if name.lower() not in AGGREGATORS:
            raise ValueError(f"unknown aggregator '{name}': one of {', '.join(AGGREGATORS)}")
        return name


class DistributedSpec(_Strict):
    """Settings for runs launched with torchrun (ignored in a single process)."""

    backend: Literal["auto", "gloo", "nccl"] = Field(
        default="auto", description="auto: nccl when training on CUDA, else gloo")
    timeout_s: PositiveFloat = Field(
        default=600.0, description="how long a rank waits for the others in a collective")


class OnnxSpec(_Strict):
    """How ``model.onnx`` is written (``reconfx export``'s flags override each field)."""

    opset: int = Field(default=ONNX_OPSET, ge=ONNX_OPSETS.start, le=ONNX_OPSETS.stop - 1,
                       description=f"ONNX opset, {ONNX_OPSETS.start} to {ONNX_OPSETS.stop - 1}")
    dtype: Literal["fp32", "fp16"] = Field(
        default="fp32", description="fp16: weights and activations float16 (onnxruntime's "
        "converter), inputs and outputs float32")
    optimize: Literal["O1", "O2", "O3"] | None = Field(
        default=None, description="onnxruntime graph optimisations applied and saved (O3 may "
        "tie the file to the provider it was optimised for); with a Hugging Face backbone of a "
        "type onnxruntime's transformer optimizer knows, that optimizer first")
    atol: NonNegativeFloat | None = Field(
        default=None, description="parity check: absolute tolerance (default 1e-4, fp16 1e-2)")
    rtol: NonNegativeFloat | None = Field(
        default=None, description="parity check: relative tolerance (default 1e-3, fp16 1e-2)")


class HfExportSpec(_Strict):
    """The Hugging Face format's options."""

    max_shard_mb: PositiveFloat = Field(
        default=5000, description="weights above this many megabytes are written as shards "
        "model-00001-of-0000N.safetensors with an index, as transformers writes them")


class ExportSpec(_Strict):
    formats: list[Literal["python", "onnx", "hf"]] = Field(
        description="python (model.py, weights), onnx (model.onnx) and hf (config.json, "
        "modeling files, model.safetensors and a model card README.md: the folder loads with "
        "transformers' AutoModel.from_pretrained(dir, trust_remote_code=True)); python is "
        "always written", default_factory=lambda: ["python"])
    dir: Path | None = Field(default=None, description="default: exported/<spec name>")
    onnx: OnnxSpec = Field(default_factory=OnnxSpec, description="model.onnx's opset, dtype, "
                           "optimisation and parity tolerances")
    hf: HfExportSpec = Field(default_factory=HfExportSpec,
                             description="the Hugging Face format's weight shards")
    tensorboard: bool = Field(
        default=False, description="run: also write the training scalars (per-step losses and "
        "learning rate, per-epoch metrics and conflict share) live as TensorBoard event files "
        "in <dir>/tensorboard (needs the tensorboard extra)")


class TraceSpec(_Strict):
    """Tracing options. ``tier: auto`` tries fx first and falls back to torch.export."""

    tier: Literal["auto", "fx", "export"] = Field(
        default="auto", description="auto: fx where it traces and checks, else torch.export")
    leaves: list[str] = Field(
        default_factory=list, description="module paths (globs) to keep as opaque leaves"
    )


class Spec(_Strict):
    name: str = Field(
        description="names the output folder (exported/<name> by default) and the emitted class",
        pattern=r"^[A-Za-z0-9][\w.-]*$")
    model: ModelSpec | None = Field(
        default=None, description="a multi-task model; give this or backbone")
    backbone: BackboneSpec | None = Field(
        default=None, description="a single-task backbone to convert, with one head per task; give "
        "this or model")
    inputs: list[InputSpec] = Field(
        description="the model's inputs, in the order forward takes them",min_length=1)
    tasks: list[TaskSpec] = Field(
        description="at least two tasks",min_length=2)
    data: DataSpec | None = Field(
        default=None, description="the data set profile, run and eval read; compile needs none")
    profile: ProfileSpec = Field(
        description="the conflict-profiling pass",default_factory=ProfileSpec)
    select: SelectSpec | None = Field(
        default=None, description="which shared layers to branch; none: branch nothing")
    branch: BranchSpec = Field(
        description="how the branched model runs",default_factory=BranchSpec)
    train: TrainSpec = Field(
        description="training of run (and of profile's short run)",default_factory=TrainSpec)
    export: ExportSpec = Field(
        description="where and in which formats the compiled model is written",
        default_factory=ExportSpec)
    trace: TraceSpec = Field(
        description="how the model is traced",default_factory=TraceSpec)
    distributed: DistributedSpec = Field(
        description="settings for runs launched with torchrun",default_factory=DistributedSpec)

    @model_validator(mode="after")
    def _consistent(self) -> Spec:
        if (self.model is None) == (self.backbone is None):
            raise ValueError("give exactly one of 'model' (a multi-task model) or 'backbone'")
        for kind, names in (("input", [i.name for i in self.inputs]),
                            ("task", [t.name for t in self.tasks])):
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"duplicate {kind} names: {', '.join(dupes)}")
        headless = [t.name for t in self.tasks if t.head is None]
        if self.backbone is not None and headless:
            raise ValueError(f"with a backbone every task needs a head; missing: {headless}")
        if self.model is not None and len(headless) != len(self.tasks):
            raise ValueError("task heads are built only for a 'backbone'; a 'model' has its own")
        names = [i.name for i in self.inputs]
        for i, spec in enumerate(self.inputs):
            if spec.mask_of is not None and spec.mask_of not in set(names) - {spec.name}:
                raise ValueError(f"inputs[{i}].mask_of: '{spec.mask_of}' is not another input "
                                 f"(inputs: {', '.join(names)})")
        for i, task in enumerate(self.tasks):
            if task.head is not None and task.head.mask is not None and \
                    task.head.mask not in names:
                raise ValueError(f"tasks[{i}].head.mask: '{task.head.mask}' is not an input "
                                 f"(inputs: {', '.join(names)}); declare the mask as an input, "
                                 "e.g. {name: attention_mask, mask_of: input_ids}")
            if task.head is not None and task.head.resize_to is not None and \
                    task.head.resize_to not in names:
                raise ValueError(f"tasks[{i}].head.resize_to: '{task.head.resize_to}' is not an "
                                 f"input (inputs: {', '.join(names)})")
        if not any(i.to_backbone for i in self.inputs):
            raise ValueError("every input has to_backbone: false; the model needs at least one")
        if self.model is not None and not all(i.to_backbone for i in self.inputs):
            raise ValueError("to_backbone: false is for a 'backbone' with heads; a 'model' "
                             "receives every input")
        for i, spec in enumerate(self.inputs):
            source = next((s for s in self.inputs if s.name == spec.mask_of), None)
            if source is not None and (spec.shape != source.shape[:2]
                                       or set(spec.dynamic) != set(source.dynamic) & {0, 1}):
                raise ValueError(f"inputs[{i}]: mask '{spec.name}' has shape {spec.shape} and "
                                 f"dynamic axes {spec.dynamic}; as the mask of "
                                 f"'{source.name}' it needs shape {source.shape[:2]} and "
                                 f"dynamic {sorted(set(source.dynamic) & {0, 1})}")
        return self

    @property
    def factory(self) -> FactorySpec:
        return self.model if self.model is not None else self.backbone  # type: ignore[return-value]

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def export_dir(self) -> Path:
        return self.export.dir if self.export.dir is not None else Path("exported") / self.name


class LoadedSpec(BaseModel):
    """A validated spec with where it came from (for messages and the manifest)."""

    model_config = ConfigDict(frozen=True)
    spec: Spec
    path: Path
    sha256: str


def load_spec(path: str | Path) -> Spec:
    """Load and validate a YAML spec; raise :class:`SpecError` naming the file, line and field."""
    return load_spec_file(path).spec


def load_spec_file(path: str | Path) -> LoadedSpec:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise SpecError("spec file not found", where=str(path), fix="check the path") from exc
    except IsADirectoryError as exc:
        raise SpecError("is a folder, not a spec file", where=str(path),
                        fix="pass the spec's .yaml file (`reconfx export` also takes an "
                            "output folder)") from exc
    except OSError as exc:
        raise SpecError(f"cannot read spec: {exc.strerror}", where=str(path),
                        fix="check the file's permissions") from exc
    try:
        text = raw.decode("utf-8")
        data = yaml.safe_load(text)
        tree = yaml.compose(text)
    except UnicodeDecodeError as exc:
        raise SpecError("not UTF-8 text", where=str(path), fix="save the spec as UTF-8") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or (str(exc).splitlines() or ["?"])[0]
        raise SpecError(f"malformed YAML: {problem}", where=f"{path}{line}") from exc
    except (ValueError, OverflowError) as exc:  # a scalar YAML cannot convert (a 5,000-digit int)
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise SpecError(f"malformed YAML: a value cannot be read: {first}",
                        where=str(path)) from exc
    except RecursionError as exc:
        raise SpecError("the YAML is nested too deeply", where=str(path),
                        fix="a spec needs a few levels of nesting") from exc
    size = _expanded_size(tree)
    if size > MAX_VALUES:
        raise SpecError(f"the YAML expands to more than {MAX_VALUES:,} values (aliases?)",
                        where=str(path), fix="write the spec out without recursive aliases")
    _no_duplicate_keys(tree, path)
    if not isinstance(data, dict):
        raise SpecError(
            f"the spec must be a mapping of fields, got {type(data).__name__}",
            where=str(path),
            fix="start with 'name:', 'model:', 'inputs:', 'tasks:' (see `reconfx schema`)",
        )
    try:
        spec = Spec.model_validate(data)
    except ValidationError as exc:
        raise _spec_error(exc, path, tree) from exc
    return LoadedSpec(spec=spec, path=path, sha256=hashlib.sha256(raw).hexdigest())


MAX_VALUES = 100_000  # a spec has dozens; YAML aliases can expand exponentially


def _expanded_size(node: yaml.Node | None) -> int:
    """How many values the document holds once every alias is expanded (an alias is the same
    node object again), counted without expanding: each node's size once, memoised."""
    sizes: dict[int, int] = {}

    def size(n: yaml.Node) -> int:
        if id(n) not in sizes:
            children: list[yaml.Node] = []
            if isinstance(n, yaml.MappingNode):
                children = [x for pair in n.value for x in pair]
            elif isinstance(n, yaml.SequenceNode):
                children = list(n.value)
            sizes[id(n)] = min(1 + sum(size(c) for c in children), MAX_VALUES + 1)
        return sizes[id(n)]

    return size(node) if node is not None else 0


def _no_duplicate_keys(node: yaml.Node | None, path: Path) -> None:
    """YAML keeps the last of two equal keys silently; a spec that says ``lr`` twice is an
    error naming both lines."""
    seen: set[int] = set()
    stack = [node] if node is not None else []
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if isinstance(n, yaml.MappingNode):
            first: dict[str, int] = {}
            for key, value in n.value:
                if isinstance(key, yaml.ScalarNode):
                    line = key.start_mark.line + 1
                    if key.value in first:
                        raise SpecError(f"duplicate key {key.value!r} (first on line "
                                        f"{first[key.value]})", where=f"{path}:{line}",
                                        fix="keep one of them")
                    first[key.value] = line
                stack += [key, value]
        elif isinstance(n, yaml.SequenceNode):
            stack += n.value


def _spec_error(exc: ValidationError, path: Path, tree: yaml.Node | None) -> SpecError:
    """Turn the first Pydantic error into one line: file:line: field: message."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc = [part for part in first["loc"] if not str(part).startswith("function-")]
    field = _dotted(loc)
    line = _yaml_line(tree, loc)
    where = f"{path}:{line}" if line else str(path)
    if field:
        where = f"{where}: {field}"
    if first["type"] == "extra_forbidden":
        message = f"unknown field {_quoted(loc[-1])}"
        fix = f"allowed here: {', '.join(_allowed_fields(loc[:-1]))}"
    elif first["type"] == "missing":
        message, fix = "required field is missing", f"add '{loc[-1]}' (see `reconfx schema`)"
    else:
        message = first["msg"].removeprefix("Value error, ")
        got = first.get("input")
        fix = None
        if first["type"] not in {"value_error", "assertion_error"} and not isinstance(
            got, dict | list
        ):
            message = f"{message}, got {got!r}"
    more = len(errors) - 1
    if more:
        message += f" (+{more} more error{'s' if more > 1 else ''})"
    return SpecError(message, where=where, fix=fix)


def _dotted(loc: list[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[\w-]+", str(part)):
            out += f".{part}" if out else str(part)
        else:  # a key with spaces, dots or control characters: quoted, escaped, one line
            out += f"[{part!r}]"
    return out


def _quoted(part: Any) -> str:
    return repr(part) if isinstance(part, str) else repr(str(part))


def _yaml_line(node: yaml.Node | None, loc: list[Any]) -> int | None:
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if k.value == part), None)
            key = next((k for k, v in node.value if k.value == part), None)
            if match is None:
                break
            line, node = key.start_mark.line + 1, match
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(
            node.value
        ):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _allowed_fields(loc: list[Any]) -> list[str]:
    model: type[BaseModel] | None = Spec
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        annotation = model.model_fields[part].annotation if part in model.model_fields else None
        model = _model_in(annotation)
    return list(model.model_fields) if model else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def json_schema() -> dict[str, Any]:
    """The spec's JSON Schema (what `reconfx schema` prints)."""
    return Spec.model_json_schema()


def class_name(spec_name: str) -> str:
    """CamelCase class name for the emitted model: 'multidigits-resnet' -> 'MultidigitsResnet'."""
    words = re.split(r"[^A-Za-z0-9]+", spec_name)
    name = "".join(w[:1].upper() + w[1:] for w in words if w)
    name = name if name[:1].isalpha() else f"Model{name}"
    # (an all-capitals name would read as, and may be, one of model.py's constants: TASKS; the
    # names model.py gives its own helper classes are taken: a class imported under another
    # of the file's names gets an alias, see reconfx.emit.sources.defining)
    return f"{name}Model" if name.isupper() or name in _HELPER_NAMES else name


_HELPER_NAMES = {"PerTask", "Any"}  # model.py's task-rows container and its typing import
