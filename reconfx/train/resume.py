"""Resuming an interrupted ``profile`` or ``run`` exactly where it stopped.

Every ``train.checkpoint_every`` steps (and at the end of every training epoch) the command
writes ``<export.dir>/checkpoints/resume.pt``, atomically: the model's and the optimiser's state,
the conflict counters, the loss scaler, the random states (torch's global generator, CUDA's, and
the data order's generator as it was at the start of the current epoch), the position in the
data and, while training, the epoch's running loss sums, the history and the best epoch's
weights. ``--resume`` loads it (``torch.load(weights_only=True)``: tensors and plain containers
only, nothing executed) and continues, so the final counters and weights are the ones an
uninterrupted run produces. The file is removed when the command has written its artifacts.
"""

from __future__ import annotations

import collections
import hashlib
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from reconfx import outdir
from reconfx.artifacts import replace_file, torch_load_safely
from reconfx.data.padding import collate_of
from reconfx.distributed import World
from reconfx.errors import ModelError, OutputError, SpecError

__all__ = [
    "Batches", "Checkpoint", "FILE", "FORMAT", "restore", "rng_state", "set_rng_state", "snapshot",
    "stored_state"
]

FORMAT = 2  # 2: the state is a payload of bytes with a sha256 over the spec's hash and them
FILE = "resume.pt"


class Batches:
    """Shuffled batches epoch after epoch, in exactly the order of
    ``DataLoader(dataset, batch_size, shuffle=True, drop_last, generator=Generator().manual_seed
    (seed))`` iterated once per epoch, and resumable at any batch: the epoch, the number of
    batches already handed out and the generator's state at the epoch's start say where.

    With several ranks (``world``), every rank draws the same global batches and loads only its
    contiguous shard of each; ``share`` is the shard's fraction of the global batch (its weight
    in the gradient of the global mean loss). A global batch smaller than the number of ranks
    (a last partial batch) is skipped on every rank. ``drop_last`` drops each epoch's last partial
    batch unless it is the only batch."""

    def __init__(self, dataset: torch.utils.data.Dataset, batch_size: int, seed: int, *,
                 drop_last: bool = False, world: World | None = None, workers: int = 0):
        self.dataset, self.batch_size = dataset, batch_size
        # (a split smaller than one batch keeps its only, partial batch)
        self.drop_last = drop_last and len(dataset) > batch_size  # type: ignore[arg-type]
        self.workers = workers  # (data-loader processes; the batches are the same)
        self.world = world or World()
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch, self.index = 0, 0
        self.start = self.generator.get_state()
        self.share = 1.0

    def __len__(self) -> int:
        n = len(self.dataset)  # type: ignore[arg-type]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch_batches(self) -> Iterator[tuple[dict, dict]]:
        """The rest of the current epoch; when it is exhausted the position moves to the start
        of the next one."""
        self.generator.set_state(self.start)
        sampler = torch.utils.data.BatchSampler(
            torch.utils.data.RandomSampler(self.dataset, generator=self.generator),
            self.batch_size, self.drop_last)
        shards = _Shards(sampler, self.index, self.world)
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=shards,
                                             generator=self.generator,
                                             collate_fn=collate_of(self.dataset),
                                             num_workers=self.workers)
        batches = iter(loader)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except ModelError:  # (padding refused a batch: the message names the spec field)
                raise
            except Exception as exc:  # the data set's own code failed: name it, one line
                first = (str(exc).strip().splitlines() or [""])[0][:300]
                raise ModelError(f"loading batch {self.index + 1} of epoch {self.epoch + 1} "
                                 f"failed: {type(exc).__name__}: {first}",
                                 where="data.factory", fix="fix the data set's __getitem__"
                                 ) from exc
            # (workers load ahead of what is handed out: the sampler's log, in order)
            self.index, self.share = shards.handed.popleft()
            yield batch
        self.epoch, self.index = self.epoch + 1, 0
        self.start = self.generator.get_state()

    def forever(self) -> Iterator[tuple[dict, dict]]:
        while True:
            yield from self.epoch_batches()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "start": self.start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self.start = state["start"]


class _Shards:
    """A batch sampler without its first ``skip`` batches (their indices are still drawn, so the
    random generator advances exactly as in a full pass), yielding this rank's contiguous shard
    of each global batch; ``handed`` logs, for each shard it yields, how many global batches
    of the epoch that completes and the shard's share of its global batch."""

    def __init__(self, sampler: torch.utils.data.BatchSampler, skip: int, world: World):
        self.sampler, self.skip, self.world = sampler, skip, world
        self.handed: collections.deque[tuple[int, float]] = collections.deque()

    def __iter__(self) -> Iterator[list[int]]:
        for index, batch in enumerate(self.sampler):
            if index < self.skip:
                continue
            if len(batch) < self.world.size:
                continue  # too small to give every rank an item
            start, stop = self.world.shard(len(batch))
            self.handed.append((index + 1, (stop - start) / len(batch)))
            yield batch[start:stop]

    def __len__(self) -> int:
        return max(len(self.sampler) - self.skip, 0)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def snapshot(parts: dict[str, Any], step: int) -> dict[str, Any]:
    """The state of ``parts`` (objects with ``state_dict``) after ``step`` steps, with the
    random states."""
    return {"step": step, "rng": rng_state(), **{k: v.state_dict() for k, v in parts.items()}}


def restore(parts: dict[str, Any], state: dict[str, Any]) -> int:
    """Load a :func:`snapshot` back into ``parts``; returns the step it was taken after. A
    state that does not fit (a missing part, a tensor of another shape or kind) is refused in
    one line, before training goes on from a half-loaded state."""
    try:
        for name, part in parts.items():
            part.load_state_dict(state[name])
        set_rng_state(state["rng"])
        return int(state["step"])
    except (KeyError, RuntimeError, TypeError, ValueError, IndexError, AttributeError) as exc:
        cause = f"no '{exc.args[0]}'" if isinstance(exc, KeyError) else \
            f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
        raise SpecError(f"the resume checkpoint does not fit this run ({cause})",
                        where=f"checkpoints/{FILE}", fix="delete it and run without --resume"
                        ) from exc


class Checkpoint:
    """The resume file of one command in ``folder``. With ``resume`` the state found there is
    loaded (and must come from the same command and spec); ``extra`` is saved with every state
    (``run`` keeps its finished profile there while it trains)."""

    def __init__(self, folder: Path, command: str, spec_sha256: str, every: int,
                 resume: bool = False):
        self.path = folder / FILE
        self.command, self.spec_sha256, self.every = command, spec_sha256, every
        self.extra: dict[str, Any] = {}
        self.state = self._load() if resume else None
        self.note = None
        if self.state is not None:
            self.note = (f"resuming from {self.path} ({self.state['phase']} step "
                         f"{self.state['step']})")
        elif resume:
            self.note = f"nothing to resume in {self.path}; starting from the beginning"
        elif not resume and self.path.is_file():
            self.note = (f"{self.path} holds an earlier interrupted {command}; starting afresh "
                         "(--resume continues it instead)")

    def phase(self, name: str) -> dict[str, Any] | None:
        """The loaded state when it was saved in phase ``name`` (``profiling``/``train``)."""
        return self.state if self.state is not None and self.state["phase"] == name else None

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, phase: str, state: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        torch.save({"phase": phase, **self.extra, **state}, buffer)
        payload = buffer.getvalue()
        data = {"format": FORMAT, "command": self.command, "spec_sha256": self.spec_sha256,
                "digest": _digest(self.spec_sha256, payload),
                "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8)}
        folder = outdir.working_folder(self.path.parent.parent, self.path.parent.name)
        replace_file(self.path, lambda p: torch.save(data, p))
        outdir.record(folder, FILE)

    def clear(self) -> None:
        outdir.forget(self.path.parent, FILE)

    def _load(self) -> dict[str, Any] | None:
        if not os.path.lexists(self.path):
            return None
        where = str(self.path)
        try:
            fd = outdir.open_regular(self.path)
        except (OSError, OutputError) as exc:
            raise SpecError(f"cannot read the resume checkpoint: {exc}", where=where,
                            fix="delete it and run without --resume") from exc
        try:
            with os.fdopen(fd, "rb") as handle:
                data = torch_load_safely(io.BytesIO(handle.read()))
        except ValueError as exc:  # truncated, not a torch file, or hostile: nothing executed
            raise SpecError(f"cannot read the resume checkpoint: {exc}", where=where,
                            fix="delete it and run without --resume") from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise SpecError("not a reconfx resume checkpoint (or from another version)",
                            where=where, fix="delete it and run without --resume")
        if data.get("command") != self.command:
            raise SpecError(f"the checkpoint was written by `reconfx {data.get('command')}`, "
                            f"not `{self.command}`", where=where,
                            fix=f"resume with `reconfx {data.get('command')} --resume`")
        if data.get("spec_sha256") != self.spec_sha256:
            raise SpecError("the checkpoint was written for a different version of the spec",
                            where=where, fix="restore the spec, or delete the checkpoint and "
                            "run without --resume")
        payload = _bytes(data.get("payload"))
        if payload is None or data.get("digest") != _digest(self.spec_sha256, payload):
            raise SpecError("the checkpoint's content does not match the hash it carries "
                            "(changed since reconfx wrote it)", where=where,
                            fix="delete it and run without --resume")
        try:
            state = torch_load_safely(io.BytesIO(payload))
        except ValueError as exc:
            raise SpecError(f"cannot read the resume checkpoint: {exc}", where=where,
                            fix="delete it and run without --resume") from exc
        if not isinstance(state, dict) or not isinstance(state.get("phase"), str) or \
                not isinstance(state.get("step"), int):
            raise SpecError("the resume checkpoint holds no phase and step", where=where,
                            fix="delete it and run without --resume")
        return state


def stored_state(path: Path) -> dict[str, Any]:
    """The state a resume file holds, unverified (for inspection; resuming verifies it)."""
    payload = _bytes(torch_load_safely(path).get("payload"))
    if payload is None:
        raise ValueError(f"{path} holds no resume state")
    return torch_load_safely(io.BytesIO(payload))


def _bytes(payload: Any) -> bytes | None:
    """The state's bytes (stored as a uint8 tensor: torch's weights-only loading refuses
    pickled ``bytes``)."""
    if not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8 or payload.dim() != 1:
        return None
    return payload.numpy().tobytes()


def _digest(spec_sha256: str, payload: bytes) -> str:
    return hashlib.sha256(spec_sha256.encode() + payload).hexdigest()
