"""Freed memory handed back to the system after each forward pass a check runs.

glibc's allocator keeps the memory a process frees for its later allocations, and raises its
threshold for serving large blocks from its own heap as they are freed; after a few forward
passes of a large model the process holds hundreds of megabytes it no longer uses, which every
later stage's peak then adds to (a 1.2-billion-parameter decoder's checks grew the process by
0.5 GB this way). :func:`release` asks glibc to return it (``malloc_trim``); elsewhere it does
nothing. :func:`available` says how much memory a device has free, for the checks that stop a
run before it allocates what cannot fit.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from pathlib import Path

import torch

__all__ = [
    "available", "release"
]


@functools.cache
def _trim() -> ctypes._CFuncPtr | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # (musl and others: no malloc_trim)
        return None


def release() -> None:
    """Return the memory the allocator holds free to the system (glibc only)."""
    trim = _trim()
    if trim is not None:
        trim(0)


def available(device: torch.device) -> int | None:
    """Bytes free on ``device``: a GPU's free memory, or the system's ``MemAvailable`` (Linux);
    None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None
