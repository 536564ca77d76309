"""Tensors to and from files one at a time, never mapped: a safetensors file read tensor by
tensor (a mapped file's pages count as the process's memory once read, so checking a large
model's weights through ``safe_open`` would hold a second copy of them), and a spill file that
keeps tensors' values while they are changed in place.

>>> with Spill([weight]) as spill:      # doctest: +SKIP
...     weight.mul_(2)
...     spill.restore()                 # weight holds its old values again
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType

import torch

__all__ = [
    "Spill", "read_header", "read_tensors"
]

# safetensors' dtype names
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER = 100 * 2**20  # bytes (safetensors' own limit)


def read_header(path: Path) -> dict:
    """The JSON header of the safetensors file at ``path`` (``__metadata__`` left out)."""
    with open(path, "rb") as f:
        return _header(f)[0]


def _header(f) -> tuple[dict, int]:
    (size,) = struct.unpack("<Q", f.read(8))
    if size > MAX_HEADER:
        raise ValueError(f"a safetensors header of {size} bytes (at most {MAX_HEADER})")
    header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def read_tensors(path: Path, names: Iterable[str] | None = None
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for each tensor of the safetensors file at ``path`` (of ``names``
    only, in that order, when given), each read into memory of its own: at most one is alive
    at a time unless the caller keeps them."""
    with open(path, "rb") as f:
        header, start = _header(f)
        for name in header if names is None else names:
            entry = header[name]
            begin, end = entry["data_offsets"]
            f.seek(start + begin)
            yield name, _read_into(f, end - begin).view(DTYPES[entry["dtype"]]).reshape(
                entry["shape"])


def _read_into(f, nbytes: int) -> torch.Tensor:
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    if nbytes and f.readinto(memoryview(buffer.numpy())) != nbytes:
        raise ValueError("the file ends before its tensors do")
    return buffer


class Spill:
    """The values of ``tensors`` written to a temporary file as the context opens, one tensor at
    a time; :meth:`restore` copies them back the same way. The file is removed on exit."""

    def __init__(self, tensors: Iterable[torch.Tensor]):
        self.tensors = list(tensors)
        self._file = None

    def __enter__(self) -> Spill:
        fd, name = tempfile.mkstemp(prefix="reconfx-spill-")
        os.unlink(name)  # (the open descriptor keeps it; nothing is left behind on a crash)
        self._file = os.fdopen(fd, "w+b")
        for t in self.tensors:
            self._file.write(memoryview(_bytes(t).numpy()))
        return self

    def restore(self) -> None:
        self._file.seek(0)
        with torch.no_grad():
            for t in self.tensors:
                t.copy_(_read_into(self._file, t.numel() * t.element_size())
                        .view(t.dtype).reshape(t.shape))

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._file.close()


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values as a flat uint8 tensor (no copy when ``t`` is contiguous)."""
    return t.detach().cpu().reshape(-1).contiguous().view(torch.uint8)
