"""Stream batching's runtime: what a batched graph runs (:mod:`reconfx.batching` plans and
applies it).

A region is one ``call_module`` of a :class:`StreamRegion`, whose body is the region's ops for
a single task stream; :func:`run_streams` runs the streams joined along the batch axis in one
call where they fit under the region's row cap (:func:`fits`), else one by one. The two
contexts fix every region's choice for a block: all streams in one call (what a static exported
graph holds), or each stream on its own.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from reconfx.aten import plain_calls
from reconfx.graph import Bound

__all__ = [
    "BUDGET_BYTES", "compiled_body", "fits", "one_call_per_region", "one_stream_per_call",
    "Region", "regions_of", "run_streams", "StreamRegion", "streams_per_call"
]

# Largest intermediate value of one batched call (bytes). Calibrated on this project's 2-core
# CPU (BENCHMARKS.md, stream batching): up to ~2 MiB concatenating streams pays; beyond, the
# bigger working set costs more than the calls it saves (0.6x at 6 MiB for a transformer layer).
BUDGET_BYTES = 2 * 1024 * 1024


@dataclass
class Region:
    """One batched region of a graph: per stream (task) its nodes, and the region's inputs."""

    name: str
    tasks: tuple[str, ...]
    nodes: dict[str, list[fx.Node]]  # task -> that stream's nodes in graph order
    modules: list[str] = field(default_factory=list)  # shared modules it calls, in order
    stream_inputs: list[dict[str, fx.Node]] = field(default_factory=list)  # per input: task->node
    repeated: list[fx.Node] = field(default_factory=list)  # shared, scale with the batch
    shared: list[fx.Node] = field(default_factory=list)  # shared, independent of the batch
    outputs: list[dict[str, fx.Node]] = field(default_factory=list)  # per output: task -> node
    bytes_per_row: int = 0
    weight_bytes: int = 0  # the parameters and buffers its ops read
    types: dict[fx.Node, str] = field(default_factory=dict)  # inputs that are not tensors
    body: fx.Graph | None = None  # one stream's ops (body_graph), set once the region is found

    @property
    def max_rows(self) -> int:
        return max(1, max(BUDGET_BYTES, self.weight_bytes) // max(self.bytes_per_row, 1))


def fits(rows: int, max_rows: int | None) -> bool:
    """Whether one call of a region may hold ``rows`` rows: all the task streams joined run as
    one call when they fit under the cap ``max_rows`` (None: no cap; 0: never), else each
    stream runs on its own."""
    return max_rows is None or 0 < max_rows and rows <= max_rows


def streams_per_call(streams: int, rows: int, max_rows: int | None) -> int:
    """How many of ``streams`` task streams of ``rows`` rows each one call holds: all of them
    or one (see :func:`fits`)."""
    return streams if fits(streams * rows, max_rows) else 1


def run_streams(body: Callable[..., tuple], streams: Sequence[tuple], repeated: tuple,
                shared: tuple, max_rows: int | None) -> tuple:
    """Run ``body`` for each task stream: all streams joined along the batch axis in one call
    where they fit under ``max_rows`` (see :func:`fits`), else one call per stream.
    ``repeated`` are the shared inputs that scale with the batch: tensors with a batch axis
    (repeated once per stream when joined) and sizes such as ``batch * heads`` (multiplied by
    the streams); ``shared`` are the others. Returns every stream's outputs, output by output."""
    n = len(streams)
    if n == 1 or not fits(n * streams[0][0].shape[0], max_rows):
        results = [body(*stream, *repeated, *shared) for stream in streams]
        return tuple(out for i in range(len(results[0])) for out in (r[i] for r in results))
    joined = [torch.cat(values) for values in zip(*streams, strict=True)]
    again = [torch.cat([value] * n) if isinstance(value, torch.Tensor) and value.dim()
             else value * n for value in repeated]
    # (not .chunk: exporters would fix the batch size its chunks depend on)
    return tuple(part for out in body(*joined, *again, *shared)
                 for part in out.unflatten(0, (n, -1)).unbind(0))


class StreamRegion(Bound):
    """A region's ``call_module``: its body (one stream's ops, on the graph's own modules) run by
    :func:`run_streams`. It owns no parameters; ``bind`` points it at the module it belongs to."""

    def __init__(self, region: Region, method: str):
        super().__init__()
        assert region.body is not None
        self.name, self.method, self.body = region.name, method, region.body
        self.tasks = region.tasks
        self.modules_called = list(region.modules)
        self.counts = (len(region.stream_inputs), len(region.repeated), len(region.shared))
        self.bytes_per_row, self.weight_bytes = region.bytes_per_row, region.weight_bytes
        self.max_rows: int | None = region.max_rows
        self._fn = compiled_body(region.body)

    def with_body(self, body: fx.Graph) -> tuple[StreamRegion, list[int]] | None:
        """A copy running ``body`` instead (the same ops, some as calls of whole submodules of
        the module it is bound to) without the inputs ``body`` no longer reads (it erases their
        placeholders), and the positions of the call's arguments it keeps; None where it reads
        no stream input."""
        placeholders = [n for n in body.nodes if n.op == "placeholder"]
        n_in, n_rep, _n_shared = self.counts
        used = [bool(p.users) for p in placeholders]
        if not any(used[:n_in]):
            return None
        streams = len(self.tasks)
        kept = [t * n_in + i for t in range(streams) for i in range(n_in) if used[i]] + [
            streams * n_in + j for j, u in enumerate(used[n_in:]) if u]
        for placeholder, u in zip(placeholders, used, strict=True):
            if not u:
                body.erase_node(placeholder)
        new = copy.copy(self)
        new.body, new._fn = body, compiled_body(body)
        new.counts = (sum(used[:n_in]), sum(used[n_in:n_in + n_rep]), sum(used[n_in + n_rep:]))
        new.modules_called = list(dict.fromkeys(
            str(n.target) for n in body.nodes if n.op == "call_module"))
        return new, kept

    def run(self, *args: Any) -> tuple:
        return self._fn(self._root, *args)

    def stream_args(self, args: Sequence[Any]) -> tuple[list[tuple], tuple, tuple]:
        """The call's arguments as :func:`run_streams` takes them: each stream's inputs, then the
        repeated and the shared inputs."""
        n_in, n_rep, _ = self.counts
        n_streams = len(self.tasks)
        streams = [tuple(args[i * n_in:(i + 1) * n_in]) for i in range(n_streams)]
        rest = tuple(args[n_streams * n_in:])
        return streams, rest[:n_rep], rest[n_rep:]

    def forward(self, *args: Any) -> tuple:
        return run_streams(self.run, *self.stream_args(args), self.max_rows)


def compiled_body(body: fx.Graph) -> Callable[..., tuple]:
    """The body as a function of (root module, *inputs), as fx compiles a forward."""
    with plain_calls(body):
        code = body.python_code(root_module="self")
    return fx.graph_module._forward_from_src(code.src, code.globals)


def regions_of(module: nn.Module) -> list[StreamRegion]:
    return [m for m in module.modules() if isinstance(m, StreamRegion)]


def one_call_per_region(module: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Within it, every region of ``module`` runs all streams in one call (no row cap): what a
    static exported graph (ONNX) holds."""
    return _rows(module, None)


def one_stream_per_call(module: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Within it, every region of ``module`` runs each stream on its own, so that exporting a
    subset of the tasks drops the other streams' ops."""
    return _rows(module, 0)


@contextlib.contextmanager
def _rows(module: nn.Module, value: int | None) -> Iterator[None]:
    rows = getattr(module, "stream_rows", None)
    saved_rows = dict(rows) if isinstance(rows, dict) else None
    regions = regions_of(module)
    saved = [r.max_rows for r in regions]
    try:
        if saved_rows is not None:
            rows.update(dict.fromkeys(rows, value))
        for r in regions:
            r.max_rows = value
        yield
    finally:
        if saved_rows is not None:
            rows.update(saved_rows)
        for r, v in zip(regions, saved, strict=True):
            r.max_rows = v
