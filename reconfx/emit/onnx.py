"""ONNX export of the emitted multi-task model, checked before it is kept (invariant I5).

The model's inputs keep the spec's names and each task's output is one ONNX output named after
the task, in spec order; the spec's dynamic axes stay dynamic (axis 0 is named ``batch``). Two
exporters are tried in a fixed order, torch's dynamo-based one (``dynamo=True``) and then the
TorchScript-based one, and the first file that passes every check is kept:

1. ``onnx.checker`` (full check, with shape inference);
2. onnxruntime against eager PyTorch in float32, output by output, on the example inputs, on a
   second batch size (and sequence length, where dynamic), and on a batch of real data when the
   spec has some: ``|ort - torch| <= atol + rtol * |torch|`` (atol 1e-4 and rtol 1e-3 by
   default; fp16 files 1e-2 and 1e-2).

:class:`OnnxOptions` holds the user's choices: the opset (``OPSETS``), the tolerances, the
dtype (``fp16``: the checked float32 graph converted by onnxruntime's float16 converter, weights
and activations in float16, inputs and outputs kept float32), and an onnxruntime optimisation
level (``O1``-``O3``: the graph optimisations onnxruntime applies when it loads a model, done
once and saved; for a Hugging Face backbone of a type onnxruntime's transformer optimizer knows,
that optimizer runs first). The file that is kept is the converted and optimised one, and it is
the one compared with PyTorch.

:func:`onnx_session` runs an exported file: named inputs in, ``{task: array}`` out.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from reconfx.errors import CheckError, OutputError, SpecError
from reconfx.spec import ONNX_OPSET as OPSET
from reconfx.spec import ONNX_OPSETS as OPSETS
from reconfx.streams import one_call_per_region, one_stream_per_call

__all__ = [
    "Comparison", "export_onnx", "EXPORTERS", "EXTERNAL_DATA_BYTES", "LEVELS", "onnx_session",
    "OnnxExport", "OnnxOptions", "PROVIDERS", "resolve_providers", "snippet", "TaskOutputs",
    "TOLERANCES"
]

TOLERANCES = {"fp32": (1e-4, 1e-3), "fp16": (1e-2, 1e-2)}  # dtype -> default (atol, rtol)
LEVELS = {"O1": "ORT_ENABLE_BASIC", "O2": "ORT_ENABLE_EXTENDED", "O3": "ORT_ENABLE_ALL"}
EXPORTERS = ("dynamo", "torchscript")
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
EXTERNAL_DATA_BYTES = 2 * 1024 ** 3  # protobuf's limit: larger weights go to model.onnx.data


class TaskOutputs(nn.Module):
    """The multi-task model with positional inputs and a tuple of task outputs (flat ONNX I/O)."""

    def __init__(self, model: nn.Module, inputs: list[str], tasks: list[str]):
        super().__init__()
        self.model = model
        self.inputs, self.tasks = inputs, tasks

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.model(**dict(zip(self.inputs, args, strict=True)))
        return tuple(outputs[t] for t in self.tasks)


@dataclass(frozen=True)
class OnnxOptions:
    """How to export: opset, dtype, onnxruntime optimisation level, parity tolerances (None:
    the dtype's defaults, ``TOLERANCES``), provider (None: CUDA when onnxruntime-gpu sees a GPU),
    and a Hugging Face model type with its attention heads and hidden size for onnxruntime's
    transformer optimizer (with ``optimize``)."""

    opset: int = OPSET
    dtype: str = "fp32"
    optimize: str | None = None
    atol: float | None = None
    rtol: float | None = None
    provider: str | None = None
    transformer: tuple[str, int, int] | None = None

    def __post_init__(self) -> None:
        if self.opset not in OPSETS:
            raise SpecError(f"opset {self.opset} is outside the supported range "
                            f"{OPSETS.start}-{OPSETS.stop - 1}", where="--opset",
                            fix=f"an opset from {OPSETS.start} to {OPSETS.stop - 1} (default "
                                f"{OPSET})")
        if self.dtype not in TOLERANCES:
            raise SpecError(f"unknown dtype '{self.dtype}'", where="--dtype", fix="fp32 or fp16")
        if self.optimize is not None and self.optimize not in LEVELS:
            raise SpecError(f"unknown optimisation level '{self.optimize}'", where="--optimize",
                            fix="O1, O2 or O3")
        for name in ("atol", "rtol"):
            value = getattr(self, name)
            if value is not None and not (value >= 0 and math.isfinite(value)):
                raise SpecError(f"{name} must be a finite number >= 0, got {value}",
                                where=f"--{name}", fix="e.g. --atol 1e-4 --rtol 1e-3")

    @property
    def tolerances(self) -> tuple[float, float]:
        atol, rtol = TOLERANCES[self.dtype]
        return (atol if self.atol is None else self.atol,
                rtol if self.rtol is None else self.rtol)


@dataclass
class Comparison:
    case: str  # which inputs: "example batch 8", "batch 9", "real data (test, 16)"
    task: str
    max_abs: float
    max_rel: float
    ok: bool


@dataclass
class OnnxExport:
    path: Path
    exporter: str
    provider: str
    comparisons: list[Comparison]
    rejected: dict[str, str] = field(default_factory=dict)  # exporter -> why it was not used
    seconds: float = 0.0
    options: OnnxOptions = field(default_factory=OnnxOptions)
    steps: list[str] = field(default_factory=list)  # what was done to the exported graph
    # name, dtype, example shape, named dynamic dimensions
    inputs: list[tuple[str, str, tuple, list[str]]] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)

    def report(self) -> list[str]:
        o = self.options
        atol, rtol = o.tolerances
        lines = ["## ONNX", "",
                 f"- `{self.path.name}`: opset {o.opset}, {o.dtype}, optimisation "
                 f"{o.optimize or 'none'}; exported by the {self.exporter} exporter in "
                 f"{self.seconds:.1f} s, checked with onnx.checker (full) and onnxruntime on "
                 f"{self.provider}"]
        lines += [f"- {step}" for step in self.steps]
        for name, why in self.rejected.items():
            lines.append(f"- the {name} exporter was tried first and not used: {why}")
        lines += ["", f"| inputs | output | max abs diff | max rel diff | within atol {atol:g}, "
                      f"rtol {rtol:g} |", "|---|---|---|---|---|"]
        lines += [f"| {c.case} | {c.task} | {c.max_abs:.3g} | {c.max_rel:.3g} | "
                  f"{'yes' if c.ok else 'NO'} |" for c in self.comparisons]
        return lines + ["", *snippet(self)]


def snippet(exported: OnnxExport) -> list[str]:
    """report.md's lines that show how to run the file with onnxruntime: on the CPU, and with
    the CUDA provider and IO binding (inputs and outputs on the GPU)."""
    name = exported.path.name
    make = []
    for input_name, dtype, shape, free in exported.inputs:
        note = f"  # any size along {', '.join(free)}" if free else ""
        make.append(f"{input_name} = np.zeros({tuple(shape)}, dtype=np.{dtype}){note}")
    feed = "{" + ", ".join(f'"{n}": {n}' for n, *_rest in exported.inputs) + "}"
    return ["### Running it", "", "CPU (`pip install onnxruntime`):", "", "```python",
            "import numpy as np", "import onnxruntime as ort", "",
            f'session = ort.InferenceSession("{name}", providers=["CPUExecutionProvider"])',
            *make,
            "names = [o.name for o in session.get_outputs()]",
            f"outputs = dict(zip(names, session.run(None, {feed})))  # "
            f"{', '.join(exported.outputs)}", "```", "",
            "GPU (`pip install onnxruntime-gpu` instead of onnxruntime), inputs and outputs kept "
            "on the GPU with IO binding:", "", "```python",
            f'session = ort.InferenceSession("{name}", providers=["CUDAExecutionProvider", '
            '"CPUExecutionProvider"])',
            "binding = session.io_binding()",
            *(f'binding.bind_ortvalue_input("{n}", ort.OrtValue.ortvalue_from_numpy({n}, '
              '"cuda", 0))' for n, *_rest in exported.inputs),
            *(f'binding.bind_output("{o}", "cuda")' for o in exported.outputs),
            "session.run_with_iobinding(binding)",
            "outputs = dict(zip(names, (v.numpy() for v in binding.copy_outputs_to_cpu())))",
            "```"]


def resolve_providers(requested: str | None) -> list[str]:
    """onnxruntime providers for ``--provider`` (None: CUDA when onnxruntime-gpu can use a GPU,
    else CPU). A provider that is asked for and missing is an error, never a silent fallback."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested is None:
        requested = "cuda" if PROVIDERS["cuda"] in available else "cpu"
    if requested not in PROVIDERS:
        raise SpecError(f"unknown onnxruntime provider '{requested}'", where="--provider",
                        fix="cpu or cuda")
    if PROVIDERS[requested] not in available:
        raise SpecError(f"onnxruntime has no {PROVIDERS[requested]} (available: "
                        f"{', '.join(available)})", where="--provider",
                        fix="pip uninstall onnxruntime && pip install 'reconfx[gpu]' "
                            "(onnxruntime-gpu; the two packages must not be installed together)"
                        if requested == "cuda" else "pip install 'reconfx[onnx]'")
    return [PROVIDERS[requested]] + ([PROVIDERS["cpu"]] if requested != "cpu" else [])


def _session(path: Path, providers: list[str]) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=providers)
    if session.get_providers()[0] != providers[0]:
        raise SpecError(f"onnxruntime could not start {providers[0]} (it fell back to "
                        f"{session.get_providers()[0]})", where="--provider",
                        fix="check the CUDA and cuDNN libraries onnxruntime-gpu needs, or use "
                            "--provider cpu")
    return session


def onnx_session(path: str | Path, provider: str | None = None
                 ) -> Callable[..., dict[str, np.ndarray]]:
    """Load an exported model: ``run = onnx_session("model.onnx"); run(image=x)`` returns
    ``{task: numpy array}``. Inputs may be numpy arrays or torch tensors."""
    session = _session(Path(path), resolve_providers(provider))
    names = [o.name for o in session.get_outputs()]
    expected = {i.name for i in session.get_inputs()}

    def run(**inputs: Any) -> dict[str, np.ndarray]:
        if set(inputs) != expected:
            raise TypeError(f"expected inputs {sorted(expected)}, got {sorted(inputs)}")
        feed = {k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
                for k, v in inputs.items()}
        return dict(zip(names, session.run(None, feed), strict=True))

    run.provider = session.get_providers()[0]  # type: ignore[attr-defined]
    return run


def _dims(dynamic: dict[str, list[int] | dict[int, str]], example: dict[str, torch.Tensor]
          ) -> dict[tuple[str, int], str]:
    """A dimension name per (input, dynamic axis). A name the spec gives is used as it is, and
    inputs giving one name share that dimension (their example sizes must agree). Unnamed axes
    with the same index and example size share one dimension, named ``batch`` (axis 0), ``seq``
    (axis 1) or ``axis<k>``, with a number added where that name is taken."""
    named: dict[str, int] = {}  # dimension name -> its example size
    out: dict[tuple[str, int], str] = {}
    for name, axes in dynamic.items():
        for axis, dim in (axes.items() if isinstance(axes, dict) else ()):
            size = example[name].shape[axis]
            if named.setdefault(dim, size) != size:
                raise SpecError(f"inputs name axis '{dim}' alike but their example sizes "
                                f"differ ({named[dim]} and {size} for '{name}')",
                                where=f"inputs[{name}].dynamic",
                                fix="give the axes other names, or example shapes that agree")
            out[name, axis] = dim
    shared: dict[tuple[int, int], str] = {}  # (axis, example size) -> name, for unnamed axes
    for name, axes in dynamic.items():
        for axis in axes:
            if (name, axis) in out:
                continue
            key = (axis, example[name].shape[axis])
            if key not in shared:
                base = "batch" if axis == 0 else "seq" if axis == 1 else f"axis{axis}"
                taken = set(named) | set(shared.values())
                shared[key] = next(f"{base}{i or ''}" for i in range(len(taken) + 1)
                                   if f"{base}{i or ''}" not in taken)
            out[name, axis] = shared[key]
    return out


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters' warnings, log lines and the graph dumps the TorchScript exporter writes
    to the process's stdout/stderr from C++ are not the user's concern; failures still raise,
    with their message."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _export(exporter: str, wrapper: TaskOutputs, *, example: dict[str, torch.Tensor],
            dynamic: dict[str, list[int] | dict[int, str]], path: Path, opset: int) -> None:
    names = wrapper.inputs
    args = tuple(example[n] for n in names)
    dims = _dims(dynamic, example)
    large = sum(p.numel() * p.element_size() for p in wrapper.parameters()) > EXTERNAL_DATA_BYTES
    with _quiet(), torch.no_grad():
        if exporter == "dynamo":
            shared = {dim: torch.export.Dim(dim) for dim in set(dims.values())}
            shapes = tuple({axis: shared[dims[n, axis]] for axis in dynamic.get(n, [])} or None
                           for n in names)
            program = torch.onnx.export(wrapper, args, dynamo=True, input_names=names,
                                        output_names=wrapper.tasks, opset_version=opset,
                                        dynamic_shapes=(shapes,), external_data=large)
            program.save(str(path), external_data=large)
            _at_opset(path, opset)
        else:
            axes = {n: {axis: dims[n, axis] for axis in dynamic.get(n, [])} for n in names}
            batch = next((dims[n, 0] for n in names if 0 in dynamic.get(n, [])), None)
            if batch is not None:
                axes.update({t: {0: batch} for t in wrapper.tasks})
            torch.onnx.export(wrapper, args, str(path), dynamo=False, input_names=names,
                              output_names=wrapper.tasks, opset_version=opset,
                              dynamic_axes={k: v for k, v in axes.items() if v})


def _at_opset(path: Path, opset: int) -> None:
    """The file at ``path`` converted to ``opset`` by onnx's version converter where the
    exporter wrote another (the dynamo exporter writes nothing below 18). Weights in external
    data stay there: the graph is converted without them (loaded, they would not fit the 2 GB
    of one protobuf file)."""
    import onnx
    from onnx import version_converter

    model = onnx.load(str(path), load_external_data=False)
    current = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if current != opset:
        onnx.save(version_converter.convert_version(model, opset), str(path))


def _compare(session: Any, wrapper: TaskOutputs, cases: list[tuple[str, dict]],
             atol: float, rtol: float) -> list[Comparison]:
    out = []
    for case, inputs in cases:
        with torch.no_grad():
            want = [t.detach().float().numpy() for t in wrapper(*(inputs[n]
                                                                 for n in wrapper.inputs))]
        got = session.run(wrapper.tasks, {n: inputs[n].numpy() for n in wrapper.inputs})
        for task, a, b in zip(wrapper.tasks, got, want, strict=True):
            if a.shape != b.shape:
                out.append(Comparison(case, task, float("inf"), float("inf"), False))
                continue
            diff = np.abs(a.astype(np.float64) - b)
            rel = diff / np.maximum(np.abs(b), np.finfo(np.float32).tiny)
            ok = bool((diff <= atol + rtol * np.abs(b)).all())
            out.append(Comparison(case, task, float(diff.max(initial=0.0)),
                                  float(rel.max(initial=0.0)), ok))
    return out


def _disk_full(exc: BaseException) -> bool:
    """Whether a failure comes from a full disk (or quota), anywhere in its chain of causes:
    the exporters wrap the OSError, or only repeat its message."""
    seen: set[int] = set()
    found: BaseException | None = exc
    while found is not None and id(found) not in seen:
        seen.add(id(found))
        if isinstance(found, OSError) and found.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(found) or "Disk quota exceeded" in str(found):
            return True
        found = found.__cause__ or found.__context__
    return False


def _why(exc: BaseException) -> str:
    """The most telling line of an exporter's failure, short enough for one report line: the
    dynamo exporter's "Exception summary" line, else the first line naming an unsupported op or
    an error, else the first line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    lines = [x.strip() for x in text.strip().splitlines() if x.strip()]
    summary = [lines[i + 1] for i, x in enumerate(lines[:-1])
               if x.startswith("## Exception summary")]
    useful = summary or [x for x in lines if re.search(r"[Uu]nsupported|not supported|Error",
                                                       x)]
    line = (useful or lines or [""])[0]
    return f"{type(exc).__name__}: {line[:300]}" if line else type(exc).__name__


def export_onnx(model: nn.Module, inputs: list[str], *, tasks: list[str],
                dynamic: dict[str, list[int] | dict[int, str]],
                cases: list[tuple[str, dict[str, torch.Tensor]]], path: Path,
                options: OnnxOptions | None = None, every_task: bool = True) -> OnnxExport:
    """Export ``model`` (called with keyword inputs, returning ``{task: tensor}``) to ``path``
    with ``options``, and check it; ``cases`` are the named input sets to compare on, the first
    one is exported with. Raises :class:`CheckError` naming each exporter's failure when none
    passes, and leaves nothing at ``path`` then. Stream batching: with ``every_task`` the
    streams of a region run in one call (a static graph has no row cap), else one by one so
    that the streams of the tasks left out are dropped with them."""
    import onnx

    options = options or OnnxOptions()
    providers = resolve_providers(options.provider)
    atol, rtol = options.tolerances
    model.eval()
    wrapper = TaskOutputs(model, inputs, tasks).eval()
    rejected: dict[str, str] = {}
    for exporter in EXPORTERS:
        started = time.perf_counter()
        _remove(path)
        try:
            with (one_call_per_region if every_task else one_stream_per_call)(model):
                _export(exporter, wrapper, example=cases[0][1], dynamic=dynamic, path=path,
                        opset=options.opset)
            seconds = time.perf_counter() - started
            onnx.checker.check_model(str(path), full_check=True)
            steps = _convert(path, options, providers)
            session = _session(path, providers)
            comparisons = _compare(session, wrapper, cases, atol, rtol)
        except SpecError:
            raise
        except Exception as exc:  # an exporter, checker or runtime failure: try the next one
            if _disk_full(exc):  # (no other exporter would fare better)
                _remove(path)
                raise OutputError(f"cannot write {path.name} into {path.parent}: the disk is "
                                  "full", where="export.dir", fix="free some space, or choose "
                                  "a folder on another disk") from exc
            rejected[exporter] = _why(exc)
            continue
        bad = [c for c in comparisons if not c.ok]
        if bad:
            worst = max(bad, key=lambda c: c.max_abs)
            rejected[exporter] = (f"onnxruntime differs from PyTorch on {worst.case}, output "
                                  f"'{worst.task}': max abs diff {worst.max_abs:.3g}, max rel "
                                  f"{worst.max_rel:.3g} (atol {atol:g}, rtol {rtol:g})")
            continue
        example = cases[0][1]
        io = [(i.name, str(example[i.name].numpy().dtype), tuple(example[i.name].shape),
               [d for d in i.shape if isinstance(d, str)]) for i in session.get_inputs()]
        return OnnxExport(path, exporter, session.get_providers()[0], comparisons, rejected,
                          seconds, options, steps, io, [o.name for o in session.get_outputs()])
    _remove(path)
    raise CheckError("no ONNX exporter produced a model that passes the checks: "
                     + "; ".join(f"{k}: {v}" for k, v in rejected.items()),
                     fix=f"the failures above name the op or the difference; replace that op in "
                         f"the model with ones torch.onnx supports at opset {options.opset}, "
                         "loosen --atol/--rtol where the difference is rounding, or leave onnx "
                         "out of export.formats")


def _convert(path: Path, options: OnnxOptions, providers: list[str]) -> list[str]:
    """The checked float32 file turned into what ``options`` ask for, in place: onnxruntime's
    transformer optimizer (a known Hugging Face type, with ``optimize``), float16, then
    onnxruntime's graph optimisations saved. Returns the report's lines on what was done."""
    import onnx

    steps = []
    if options.optimize is not None and options.transformer is not None:
        from onnxruntime.transformers.optimizer import optimize_model

        kind, heads, hidden = options.transformer
        with _quiet():
            optimized = optimize_model(str(path), model_type=kind, num_heads=heads,
                                       hidden_size=hidden, opt_level=0)
        fused = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
        optimized.save_model_to_file(str(path))
        steps.append(f"onnxruntime's transformer optimizer ({kind}, {heads} heads, hidden "
                     f"{hidden}): " + (", ".join(f"{v} {k}" for k, v in sorted(fused.items()))
                                       or "no pattern fused"))
    if options.dtype == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        with _quiet():
            half = convert_float_to_float16(onnx.load(str(path)), keep_io_types=True)
        onnx.save(half, str(path))
        steps.append("converted to float16 by onnxruntime's converter (weights and activations "
                     "float16; inputs and outputs stay float32); compared with float32 PyTorch")
    if options.optimize is not None:
        import onnxruntime as ort

        settings = ort.SessionOptions()
        settings.log_severity_level = 3
        settings.graph_optimization_level = getattr(ort.GraphOptimizationLevel,
                                                    LEVELS[options.optimize])
        optimized_path = path.with_name(path.name + ".opt")
        settings.optimized_model_filepath = str(optimized_path)
        ort.InferenceSession(str(path), settings, providers=providers)
        os.replace(optimized_path, path)
        steps.append(f"onnxruntime graph optimisations {options.optimize} "
                     f"({LEVELS[options.optimize]}) applied for {providers[0]} and saved"
                     + ("; the file may hold that provider's own ops and layouts"
                        if options.optimize == "O3" else ""))
    return steps


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.with_name(path.name + ".data").unlink(missing_ok=True)
    path.with_name(path.name + ".opt").unlink(missing_ok=True)
