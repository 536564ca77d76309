"""ONNX export of the emitted multi-task model, checked before it is kept (invariant I5).

The model's inputs keep the spec's names and each task's output is one ONNX output named after
the task, in spec order; the spec's dynamic axes stay dynamic (axis 0 is named ``batch``). Two
exporters are tried in a fixed order, torch's dynamo-based one (``dynamo=True``) and then the
TorchScript-based one, and the first file that passes every check is kept:

1. ``onnx.checker`` (full check, with shape inference);
2. onnxruntime against eager PyTorch, output by output, on the example inputs, on a second batch
   size (and sequence length, where dynamic), and on a batch of real data when the spec has some:
   ``|ort - torch| <= atol + rtol * |torch|`` with atol 1e-4 and rtol 1e-3.

:func:`onnx_session` runs an exported file: named inputs in, ``{task: array}`` out.
"""

from __future__ import annotations

import contextlib
import io
import logging
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

from reconfx.batching import one_call_per_region, one_stream_per_call
from reconfx.errors import CheckError, SpecError

OPSET = 18
ATOL, RTOL = 1e-4, 1e-3
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

    def report(self) -> list[str]:
        lines = ["## ONNX", "",
                 f"- `{self.path.name}`: opset {OPSET}, exported by the {self.exporter} exporter "
                 f"in {self.seconds:.1f} s, checked with onnx.checker (full) and onnxruntime on "
                 f"{self.provider}"]
        for name, why in self.rejected.items():
            lines.append(f"- the {name} exporter was tried first and not used: {why}")
        lines += ["", f"| inputs | output | max abs diff | max rel diff | within atol {ATOL:g}, "
                      f"rtol {RTOL:g} |", "|---|---|---|---|---|"]
        lines += [f"| {c.case} | {c.task} | {c.max_abs:.3g} | {c.max_rel:.3g} | "
                  f"{'yes' if c.ok else 'NO'} |" for c in self.comparisons]
        return lines


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


def _dims(dynamic: dict[str, list[int]], example: dict[str, torch.Tensor]
          ) -> dict[tuple[int, int], str]:
    """A name per (axis, example size): inputs whose dynamic axes have the same index and
    example size share one dimension (a batch, a sequence length)."""
    names: dict[tuple[int, int], str] = {}
    for name, axes in dynamic.items():
        for axis in axes:
            key = (axis, example[name].shape[axis])
            if key not in names:
                base = "batch" if axis == 0 else "seq" if axis == 1 else f"axis{axis}"
                taken = sum(1 for k in names if k[0] == axis)
                names[key] = base if taken == 0 else f"{base}{taken}"
    return names


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


def _export(exporter: str, wrapper: TaskOutputs, example: dict[str, torch.Tensor],
            dynamic: dict[str, list[int]], path: Path) -> None:
    names = wrapper.inputs
    args = tuple(example[n] for n in names)
    dims = _dims(dynamic, example)
    large = sum(p.numel() * p.element_size() for p in wrapper.parameters()) > EXTERNAL_DATA_BYTES
    with _quiet(), torch.no_grad():
        if exporter == "dynamo":
            shared = {key: torch.export.Dim(name) for key, name in dims.items()}
            shapes = tuple({axis: shared[axis, example[n].shape[axis]]
                            for axis in dynamic.get(n, [])} or None for n in names)
            program = torch.onnx.export(wrapper, args, dynamo=True, input_names=names,
                                        output_names=wrapper.tasks, opset_version=OPSET,
                                        dynamic_shapes=(shapes,), external_data=large)
            program.save(str(path), external_data=large)
        else:
            axes = {n: {axis: dims[axis, example[n].shape[axis]] for axis in dynamic.get(n, [])}
                    for n in names}
            if any(0 in dynamic.get(n, []) for n in names):
                axes.update({t: {0: "batch"} for t in wrapper.tasks})
            torch.onnx.export(wrapper, args, str(path), dynamo=False, input_names=names,
                              output_names=wrapper.tasks, opset_version=OPSET,
                              dynamic_axes={k: v for k, v in axes.items() if v})


def _compare(session: Any, wrapper: TaskOutputs, cases: list[tuple[str, dict]]
             ) -> list[Comparison]:
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
            ok = bool((diff <= ATOL + RTOL * np.abs(b)).all())
            out.append(Comparison(case, task, float(diff.max(initial=0.0)),
                                  float(rel.max(initial=0.0)), ok))
    return out


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


def export_onnx(model: nn.Module, inputs: list[str], tasks: list[str],
                dynamic: dict[str, list[int]], cases: list[tuple[str, dict[str, torch.Tensor]]],
                path: Path, provider: str | None = None, every_task: bool = True) -> OnnxExport:
    """Export ``model`` (called with keyword inputs, returning ``{task: tensor}``) to ``path``
    and check it; ``cases`` are the named input sets to compare on, the first one is exported
    with. Raises :class:`CheckError` naming each exporter's failure when none passes, and
    leaves nothing at ``path`` then. Stream batching: with ``every_task`` the streams of a
    region run in one call (a static graph has no row cap), else one by one so that the
    streams of the tasks left out are dropped with them."""
    import onnx

    providers = resolve_providers(provider)
    model.eval()
    wrapper = TaskOutputs(model, inputs, tasks).eval()
    rejected: dict[str, str] = {}
    for exporter in EXPORTERS:
        started = time.perf_counter()
        _remove(path)
        try:
            with (one_call_per_region if every_task else one_stream_per_call)(model):
                _export(exporter, wrapper, cases[0][1], dynamic, path)
            seconds = time.perf_counter() - started
            onnx.checker.check_model(str(path), full_check=True)
            session = _session(path, providers)
            comparisons = _compare(session, wrapper, cases)
        except SpecError:
            raise
        except Exception as exc:  # an exporter, checker or runtime failure: try the next one
            rejected[exporter] = _why(exc)
            continue
        bad = [c for c in comparisons if not c.ok]
        if bad:
            worst = max(bad, key=lambda c: c.max_abs)
            rejected[exporter] = (f"onnxruntime differs from PyTorch on {worst.case}, output "
                                  f"'{worst.task}': max abs diff {worst.max_abs:.3g}, max rel "
                                  f"{worst.max_rel:.3g} (atol {ATOL:g}, rtol {RTOL:g})")
            continue
        return OnnxExport(path, exporter, session.get_providers()[0], comparisons,
                          rejected, seconds)
    _remove(path)
    raise CheckError("no ONNX exporter produced a model that passes the checks: "
                     + "; ".join(f"{k}: {v}" for k, v in rejected.items()),
                     fix="the failures above name the op or the difference; replace that op in "
                         "the model with ones torch.onnx supports at opset 18, or leave onnx out "
                         "of export.formats")


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.with_name(path.name + ".data").unlink(missing_ok=True)
