"""Data-parallel profiling and training on ``torch.distributed``, launched with ``torchrun``.

``DistributedDataParallel`` assumes one backward pass per forward and cannot give per-task
gradients, so reconfx reduces its own buffers with collectives: after the T backward passes of
a step, each rank scales its T×P per-task gradient matrix (and, in one flat bucket, the loss
vector and the other parameters' gradients) by its share of the global batch and all-reduces
them (sum). Every rank then holds the gradients of the global batch's mean losses, computes the
same conflict statistics from them (the cosine of the global per-task gradients, not an average
of per-rank cosines), the same aggregated update and the same optimiser step, so weights and
counters stay identical on every rank. Each global batch is cut into one contiguous shard per
rank (:class:`~reconfx.train.resume.Batches`), so the union of the shards is exactly the batch a
single process would draw. Only rank 0 writes files and shows progress.

Communication per step: T × P + (losses + other gradients) floats, all-reduced; T times the
volume of plain data parallelism for the shared layers.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from reconfx.errors import ReconfxError, SpecError

__all__ = [
    "DistributedError", "finish", "init", "launched", "World", "world"
]


class DistributedError(ReconfxError):
    """A collective failed: another rank stopped, was killed or timed out."""

    exit_code = 1


@dataclass(frozen=True)
class World:
    """This process's place among ``size`` ranks (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def reduce_(self, matrix: torch.Tensor, small: list[torch.Tensor], share: float) -> None:
        """In place on every rank: the sum over ranks of ``share`` × each tensor. ``matrix`` (the
        T×P buffer) is reduced as it is; ``small`` tensors go through one flat bucket."""
        if not self.active:
            return
        with _collective(self, "all_reduce of the per-task gradients"):
            matrix.mul_(share)
            dist.all_reduce(matrix)
            if small:
                flat = torch.cat([t.reshape(-1) for t in small]) * share
                dist.all_reduce(flat)
                _unflatten(flat, small)

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In place: the sum over ranks (evaluation totals)."""
        if self.active:
            with _collective(self, "all_reduce of the evaluation totals"):
                dist.all_reduce(tensor)
        return tensor

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Rank 0's buffers (BatchNorm running statistics) on every rank, as DDP does: one flat
        broadcast per dtype."""
        if not self.active:
            return
        groups: dict[torch.dtype, list[torch.Tensor]] = {}
        for buffer in module.buffers():
            groups.setdefault(buffer.dtype, []).append(buffer)
        with _collective(self, "broadcast of the module buffers"):
            for tensors in groups.values():
                flat = torch.cat([t.reshape(-1) for t in tensors])
                dist.broadcast(flat, 0)
                _unflatten(flat, tensors)

    def barrier(self) -> None:
        if self.active:
            with _collective(self, "barrier"):
                dist.barrier()

    def shard(self, size: int) -> tuple[int, int]:
        """This rank's contiguous slice [start, stop) of a global batch of ``size`` items."""
        bounds = [size * r // self.size for r in range(self.size + 1)]
        return bounds[self.rank], bounds[self.rank + 1]


def _unflatten(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


_WORLD = World()


def world() -> World:
    return _WORLD


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher) as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(backend: str = "auto", timeout_s: float = 600.0, device: str = "auto",
         where: str = "spec") -> World:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT). ``backend``: ``auto`` is nccl when the ranks train on
    CUDA, else gloo. A single process stays rank 0 of 1 and touches nothing."""
    global _WORLD
    if not launched():
        _WORLD = World()
        return _WORLD
    if dist.is_initialized():
        return _WORLD
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    chosen = ("nccl" if cuda else "gloo") if backend == "auto" else backend
    if chosen == "nccl" and not (torch.cuda.is_available() and dist.is_nccl_available()):
        raise SpecError("distributed.backend is nccl, which needs CUDA GPUs and a CUDA build of "
                        "torch", where=f"{where}: distributed.backend", fix="use gloo (CPU)")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    try:
        dist.init_process_group(chosen, timeout=datetime.timedelta(seconds=timeout_s))
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DistributedError(f"cannot join the process group ({chosen}): {first[:300]}",
                               fix="launch with torchrun and check the rendezvous arguments"
                               ) from exc
    _WORLD = World(dist.get_rank(), dist.get_world_size(), local_rank, chosen)
    return _WORLD


def finish() -> None:
    """Leave the process group (at the end of a command)."""
    global _WORLD
    if dist.is_initialized():
        dist.destroy_process_group()
    _WORLD = World()


@contextlib.contextmanager
def _collective(w: World, what: str) -> Iterator[None]:
    """Turns a failed collective into one line naming this rank."""
    try:
        yield
    except ReconfxError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DistributedError(
            f"rank {w.rank} of {w.size}: the {what} failed: another rank stopped or timed out "
            f"({type(exc).__name__}: {first[:200]})",
            fix="see the first rank's error above; distributed.timeout_s bounds the wait"
        ) from exc
