"""Writing the output folder atomically, the manifest, and loading an emitted model back.

Every file goes to a staging folder next to its destination first; only after all checks pass is
each one moved into place with ``os.replace`` (atomic on one filesystem), so a failing or killed
command leaves every earlier file as it was. Before the first move the staging folder gets a
journal listing its files: from then on the commit is decided, and a command killed between two
moves is finished by the next one that opens the folder (or by :func:`load`), so the folder never
stays a mix of two commands' files.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import glob
import hashlib
import json
import os
import pickle
import platform
import re
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import traceback
import types
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from reconfx.errors import ModelError, OutputError
from reconfx.outdir import (
    JOURNAL,
    MANIFEST,
    MARKER,
    REMOVALS,
    STAGING_PREFIX,
    WORKING,
    apply_journal,
    artifact_name,
    file_sha256,
    finish_stale,
    open_regular,
    output_error,
    present,
    read_manifest,
    repairing,
)
from reconfx.tensorfile import read_header, read_tensors

__all__ = [
    "assign_state", "built_light", "check_sha", "follow_umask", "import_source", "load",
    "load_emitted", "manifest_text", "parameters_on_meta", "PROFILE", "read_source",
    "replace_file", "replace_text", "save_weights", "sha256", "signals_held", "Staging",
    "torch_load_safely", "verify", "verify_weights", "versions"
]

PROFILE = ("conflicts.json", "conflicts.png")  # the conflict profile compile selects by


class Staging:
    """Files written under ``<dir>/.staging-<unique>`` and committed together. The caller holds
    the folder's lock (:func:`reconfx.outdir.writing`); a marker file tells reconfx's staging
    folders from anything else of that name."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir.resolve()
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.path = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.out_dir))
            (self.path / MARKER).write_bytes(b"")
        except OSError as exc:
            raise output_error(exc, self.out_dir) from exc
        self.files: dict[str, None] = {}

    def write_text(self, name: str, text: str) -> Path:
        return self._write(name, lambda p: p.write_text(text, encoding="utf-8"))

    def write_with(self, name: str, writer: Any) -> Path:
        return self._write(name, writer)

    def adopt(self, name: str) -> Path:
        """Commit a file something else wrote into the staging folder (an exporter)."""
        path = self.path / name
        if not path.is_file():
            raise OutputError(f"{name} was not written", where=str(self.out_dir))
        self.files[name] = None
        return path

    def _write(self, name: str, writer: Any) -> Path:
        path = self.path / name
        try:
            writer(path)
            follow_umask(path)
        except Exception as exc:
            raise output_error(_io_error(exc), self.out_dir) from exc
        self.files[name] = None
        return path

    def commit(self, remove: Sequence[str] = ()) -> list[Path]:
        """Move every staged file into place, then remove ``remove`` (what an earlier model
        left: ``name sha256`` for an artifact, which is removed only while it still has that
        content, or a working folder's name): all of it, even when Ctrl-C or SIGTERM arrives
        meanwhile (both are held back until the end; SIGKILL leaves the journal, which the next
        command or reader replays)."""
        with signals_held():
            try:
                replace_text(self.path / REMOVALS, "".join(f"{name}\n" for name in remove))
                replace_text(self.path / JOURNAL, "".join(
                    f"{name} {file_sha256(self.path / name)} {present(self.out_dir / name)}\n"
                    for name in self.files))
                return apply_journal(self.path, self.out_dir)
            except OSError as exc:
                raise output_error(exc, self.out_dir) from exc
            finally:
                shutil.rmtree(self.path, ignore_errors=True)

    def commit_with_manifest(self, command: str, *, spec_path: Path, spec_sha: str, seed: int,
                             files: list[str], class_name: str, new_model: bool = False,
                             working: tuple[str, ...] = ()) -> list[Path]:
        """Write ``manifest.json`` for ``files`` (see :func:`manifest_text`) and commit,
        removing what the manifest says the new set replaces."""
        text, removed = manifest_text(self.out_dir, self.path, command=command, spec_path=spec_path,
                                      spec_sha=spec_sha, seed=seed, files=files,
                                      class_name=class_name, new_model=new_model, working=working)
        self.write_text(MANIFEST, text)
        return self.commit(removed)

    def abort(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM that arrive within the block take effect when it ends (their handlers
    only note them meanwhile; Python runs signal handlers in the main thread, whichever thread
    the OS delivers a signal to, which a signal mask would not cover). Outside the main thread,
    where handlers cannot be set, a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {number: signal.signal(number, lambda got, _frame: received.append(got))
                for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)
        if received:
            signal.raise_signal(received[0])


@functools.cache
def _file_mode() -> int:
    """What ``open()`` gives a new file under this process's umask (read from /proc, else by
    setting it and back, once)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def follow_umask(path: Path) -> None:
    """Give a file a writer created (safetensors makes its files readable by their owner only)
    the mode every other output file has: 0o666 less the umask."""
    os.chmod(path, _file_mode())


def replace_file(path: Path, writer: Any) -> None:
    """Write one file atomically: ``writer`` fills a temporary name beside it, then
    ``os.replace`` moves it into place, so a killed process never leaves half a file. The
    writer holds an exclusive ``flock`` on its temporary while it writes, so the half-written
    temporaries of killed processes, whose locks the kernel released, are removed the next
    time; liveness is the lock's, not a process id's (which another PID namespace or a
    reused PID would get wrong)."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    held = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
            _remove_unlocked(stale)
        held = os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        with contextlib.suppress(OSError):  # (no lock support: its temporary is never removed)
            fcntl.flock(held, fcntl.LOCK_EX)
        writer(temporary)
        follow_umask(temporary)
        os.replace(temporary, path)
    except Exception as exc:
        raise output_error(_io_error(exc), path.parent) from exc
    finally:
        temporary.unlink(missing_ok=True)
        if held is not None:
            os.close(held)


def _remove_unlocked(path: Path) -> None:
    """Delete a temporary no live writer holds locked."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # gone already
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return  # a writer is still filling it (or locks are unsupported: keep it)
    else:
        path.unlink(missing_ok=True)
    finally:
        os.close(fd)


def save_weights(module: nn.Module, path: Path) -> None:
    """The module's state as safetensors, byte-for-byte reproducible. A tensor held under
    several names (tied weights; per-task norms sharing one affine) is stored once, under its
    first name in ``state_dict`` order (:func:`load_emitted` gives it to all of them); a tensor
    that shares storage with another in any other way is stored as a copy. (safetensors'
    ``save_model`` records its alias table as metadata in hash order, which differs from one run
    to the next.)"""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    kept: set[int] = set()
    storages: set[tuple] = set()
    for name, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) in kept:
            continue
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        shared = storage in storages and tensor.untyped_storage().nbytes() > 0
        tensors[name] = tensor.detach().clone() if shared else tensor.detach().contiguous()
        kept.add(id(tensor))
        storages.add(storage)
    save_file(tensors, str(path), metadata={"format": "pt"})


def torch_load_safely(path: Path | BinaryIO) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only. A pickle that names
    any other Python object is refused, never executed; every failure is a ``ValueError`` with a
    one-line reason."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not _looks_pickled(path) or re.search(r"invalid load key|truncated|ran out of input",
                                                 str(exc), re.IGNORECASE):
            raise ValueError("it is not a torch checkpoint (no readable pickle data: truncated "
                             "or another kind of file)") from exc
        found = re.search(r"unsupported GLOBAL (\S+)", str(exc), re.IGNORECASE)
        what = f"a reference to {found.group(1)}" if found else "Python objects besides tensors"
        raise ValueError(f"it holds {what}, which a weights-only load refuses (unpickling it "
                         "would run code)") from exc
    except Exception as exc:
        if _zip_damaged(path):
            raise ValueError("it is truncated or damaged (torch's zip format, but its directory "
                             "of entries cannot be read)") from exc
        first = (str(exc).strip().splitlines() or [""])[0]
        first = first if len(first) <= 200 else first[:197] + "..."
        raise ValueError(f"{type(exc).__name__}: {first}") from exc


def _zip_damaged(source: Path | BinaryIO) -> bool:
    """Data that starts as torch's zip format does but is no readable zip (cut short)."""
    import zipfile

    if isinstance(source, Path):
        with open(source, "rb") as handle:
            head = handle.read(2)
    else:
        position = source.tell()
        head = source.read(2)
        source.seek(position)
    return head == b"PK" and not zipfile.is_zipfile(source)


def _looks_pickled(source: Path | BinaryIO) -> bool:
    """Whether the data starts as torch's zip format or a pickle (protocol 2 or later) does;
    random bytes do not (a hostile pickle does, and is described as such)."""
    if not isinstance(source, Path):
        return True
    with open(source, "rb") as handle:
        head = handle.read(2)
    return head == b"PK" or head[:1] == b"\x80"


def replace_text(path: Path, text: str) -> None:
    replace_file(path, lambda p: p.write_text(text, encoding="utf-8"))


def _io_error(exc: Exception) -> OSError:
    """``exc`` as an OSError when it is one, or wraps one the way safetensors' Rust writer does
    ("... (os error 28)"); anything else is not an I/O failure and is raised again."""
    if isinstance(exc, OSError):
        return exc
    found = re.search(r"\(os error (\d+)\)", str(exc))
    if found is None:
        raise exc
    code = int(found.group(1))
    return OSError(code, os.strerror(code))


def sha256(path: Path) -> str:
    found = file_sha256(path)
    if found is None:
        raise OutputError(f"{path} is a link or not a regular file", where=str(path.parent),
                          fix=f"remove {path}")
    return found


def versions() -> dict[str, str]:
    from reconfx import __version__

    found = {"python": platform.python_version(), "torch": torch.__version__,
             "reconfx": __version__}
    for name in ("onnx", "onnxruntime", "transformers"):
        module = sys.modules.get(name)
        if module is not None:
            found[name] = getattr(module, "__version__", "?")
    return found


def manifest_text(out_dir: Path, staged: Path, *, command: str, spec_path: Path, spec_sha: str,
                  seed: int, files: list[str], class_name: str, new_model: bool = False,
                  working: tuple[str, ...] = ()) -> tuple[str, list[str]]:
    """The manifest after a command's commit, and the removals it makes (see
    :meth:`Staging.commit`). A command that writes a new model (``new_model``: compile, run)
    removes every earlier artifact it does not write again, and the working folders'
    (``checkpoints``, ``tensorboard``) files it did not write itself (``working``), so the
    folder holds one model's result; compile keeps the conflict profile (the scores it selects
    by; its "branched" flags stay those of the command that profiled). Other commands add their
    entries; files derived from the model (ONNX) are recorded with the model's hash. Only files
    that exist with the content recorded for them are listed, and only those are removed, under
    the names reconfx writes: a name the manifest lists is not proof that reconfx wrote it."""
    try:
        old = read_manifest(out_dir)
    except (OSError, OutputError):
        old = {}
    entries = {k: v for k, v in old.get("files", {}).items()
               if artifact_name(k) and isinstance(v, dict)
               and file_sha256(out_dir / k) == v.get("sha256")}
    removed: list[str] = []
    if new_model:
        kept = {k: v for k, v in entries.items() if command == "compile" and k in PROFILE}
        removed = [f"{k} {v['sha256']}" for k, v in sorted(entries.items())
                   if k not in kept and k not in files]
        removed += [name for name in WORKING
                    if name not in working and (out_dir / name).is_dir()]
        entries = kept
    for name in files:
        entries[name] = {"command": command, "sha256": sha256(staged / name)}
    model = _model_sha(entries)
    for name in files:
        if name.endswith(".onnx") and model is not None:
            entries[name]["model_sha256"] = model
    data = {"class_name": class_name, "spec": {"path": str(spec_path.resolve()),
            "sha256": spec_sha}, "seed": seed, "versions": versions(), "files": entries}
    return json.dumps(data, indent=2, sort_keys=True) + "\n", removed


def _model_sha(entries: dict[str, Any]) -> str | None:
    """One hash of model.py and the weights, from the manifest's sums of the two (each file is
    read once: by the command writing it, or by ``load`` verifying it)."""
    found = [entries.get(name) for name in ("model.py", "weights.safetensors")]
    sums = [entry.get("sha256") if isinstance(entry, dict) else None for entry in found]
    if not all(isinstance(value, str) for value in sums):
        return None
    return hashlib.sha256("".join(sums).encode()).hexdigest()


def import_source(path: Path, class_name: str, source: bytes | None = None
                  ) -> type[nn.Module]:
    """The class ``class_name`` of a generated ``model.py``, run from ``source`` (its bytes,
    already verified) or from the bytes read once from ``path``: compiled here and executed in
    a fresh module, so Python's bytecode cache is neither read (a planted ``__pycache__`` runs
    nothing) nor written (loading writes nothing into the folder)."""
    if source is None:
        source = read_source(path)
    module_name = f"reconfx_emitted_{hashlib.sha1(source).hexdigest()[:12]}"
    module = types.ModuleType(module_name)
    module.__file__ = str(path)
    try:
        code = compile(source, str(path), "exec", dont_inherit=True)
        sys.modules[module_name] = module  # (dataclasses and pickling look classes up there)
        exec(code, module.__dict__)  # noqa: S102 - the verified bytes of model.py
    except Exception as exc:
        sys.modules.pop(module_name, None)
        line = next((f" (line {frame.lineno})" for frame in reversed(
            traceback.extract_tb(exc.__traceback__)) if frame.filename == str(path)), "")
        if isinstance(exc, SyntaxError) and exc.lineno:
            line = f" (line {exc.lineno})"
        first = (str(exc).splitlines() or [""])[0]
        raise ModelError(f"{path} does not import{line}: {type(exc).__name__}: {first}",
                         fix="install the packages model.py imports (those the model was "
                             "built with)") from exc
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ModelError(f"{path} defines no nn.Module class '{class_name}'")
    return cls


def read_source(path: Path) -> bytes:
    """A model.py's bytes, read once, without following a link."""
    try:
        fd = open_regular(path)
    except FileNotFoundError as exc:
        raise ModelError(f"{path} is missing", fix="re-run `reconfx compile` or `reconfx run`"
                         ) from exc
    except OutputError as exc:
        raise ModelError(exc.message, fix=exc.fix) from exc
    with os.fdopen(fd, "rb") as handle:
        return handle.read()


def load(directory: str | Path) -> nn.Module:
    """The emitted model in ``directory`` (``model.py`` + ``weights.safetensors``), in eval mode.
    Loading runs ``model.py``, which is code: its bytes are read once, checked against the
    sha256 ``manifest.json`` records, and those same bytes are compiled and run (never a
    bytecode cache); the weights are checked the same way. Nothing runs when either differs,
    and loading writes nothing into the folder (it only finishes a commit a killed command
    left, as the next command would).

    >>> model = reconfx.load("exported/multidigits-resnet")       # doctest: +SKIP
    >>> model(image=torch.rand(1, 1, 12, 12))["left"].shape        # doctest: +SKIP
    torch.Size([1, 10])
    """
    directory = Path(directory).resolve()
    try:
        with repairing(directory) as free:
            if free:  # finish a commit a killed command left half done
                finish_stale(directory)
    except OutputError as exc:
        raise ModelError(exc.message, where=exc.where, fix=exc.fix) from exc
    try:
        manifest = read_manifest(directory)
        name, files = manifest["class_name"], manifest.get("files", {})
        if not isinstance(name, str):
            raise TypeError
    except FileNotFoundError as exc:
        raise ModelError(f"{directory} has no {MANIFEST}",
                         fix="point at a folder written by `reconfx compile`") from exc
    except (OSError, OutputError, KeyError, TypeError) as exc:
        raise ModelError(f"{directory} has no readable {MANIFEST}",
                         fix="point at a folder written by `reconfx compile`, or re-run the "
                         "command that wrote it") from exc
    source = read_source(directory / "model.py")
    check_sha(directory, "model.py", files, hashlib.sha256(source).hexdigest())
    verify(directory, "weights.safetensors", files)
    return load_emitted(directory, name, source)


def verify(directory: Path, name: str, files: Any) -> None:
    """``directory/name`` must be a regular file with the sha256 the manifest records for it."""
    path = directory / name
    if not os.path.lexists(path):
        raise ModelError(f"{path} is missing", fix="re-run `reconfx compile` or `reconfx run`")
    check_sha(directory, name, files, file_sha256(path))


def check_sha(directory: Path, name: str, files: Any, actual: str | None) -> None:
    path = directory / name
    entry = files.get(name) if isinstance(files, dict) else None
    expected = entry.get("sha256") if isinstance(entry, dict) else None
    if expected is None:
        raise ModelError(f"{directory / MANIFEST} records no sha256 for {name}",
                         fix="re-run `reconfx compile` or `reconfx run` to write the folder again")
    if actual is None:
        raise ModelError(f"{path} is a link or not a regular file; reconfx loads only the "
                         "files it wrote", fix=f"remove {path} and re-run `reconfx compile`")
    if actual != expected:
        raise ModelError(f"{path} differs from the sha256 {MANIFEST} records for it (changed "
                         "since reconfx wrote it); nothing was imported or loaded",
                         fix="re-run `reconfx compile` or `reconfx run`, or restore the file")


def load_emitted(directory: Path, class_name: str, source: bytes | None = None) -> nn.Module:
    """Instantiate ``class_name`` from ``directory/model.py`` (or its bytes ``source``) and load
    its weights (a regular file: a link in their place is refused). The class is built with its
    parameters on the meta device and given the file's tensors, read one at a time: loading
    costs the weights once, not twice."""
    cls = import_source(directory / "model.py", class_name, source)
    weights = directory / "weights.safetensors"
    if not os.path.lexists(weights):
        raise ModelError(f"{weights} is missing", fix="re-run `reconfx compile`")
    if file_sha256(weights) is None:
        raise ModelError(f"{weights} is a link or not a regular file; reconfx loads only the "
                         "files it wrote", fix=f"remove {weights} and re-run `reconfx compile`")
    model = built_light(cls)
    try:
        stored = dict(read_tensors(weights))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{weights} is not a readable safetensors file ({exc})",
                         fix="re-run `reconfx compile`") from exc
    try:
        assign_state(model, stored)
    except ValueError as exc:
        raise ModelError(f"{weights} does not fit {class_name} in model.py: {exc}",
                         fix="re-run `reconfx compile`") from exc
    return model.eval()


def built_light(cls: type[nn.Module]) -> nn.Module:
    """``cls()`` with its parameters on the meta device (:func:`parameters_on_meta`), for the
    caller to give it tensors; built for real where its constructor computes with their values
    (an error on meta tensors, or a buffer left on the meta device)."""
    try:
        with parameters_on_meta():
            model = cls()
        if not any(b.is_meta for b in model.buffers()):
            return model
    except (RuntimeError, NotImplementedError):  # (meta tensors hold no values to read)
        pass
    return cls()


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device as they are registered
    (no memory, no initialisation cost), and their buffers for real: the buffers a class
    computes and keeps out of its state dict (rotary frequencies, position ids) are model.py's
    own values, as they will be wherever the model is loaded."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:  # (a tied one is moved once)
            module._parameters[name] = type(param)(param.to("meta"),
                                                   requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def assign_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Make ``state``'s tensors ``module``'s own (no copy), name by name as in its state dict. A
    tensor ``module`` holds under several names (ties) is given once, from whichever of its names
    ``state`` has, and stays one tensor. The weights keep their floating dtype (bf16 weights
    make a bf16 model, whatever dtype the class builds in). ValueError when ``state`` misses a
    tensor of the state dict or holds one it does not have, or a shape differs."""
    wanted = module.state_dict(keep_vars=True)
    groups: dict[int, list[str]] = {}
    for name, tensor in wanted.items():
        groups.setdefault(id(tensor), []).append(name)
    unexpected = sorted(set(state) - set(wanted))
    if unexpected:
        raise ValueError(f"{len(unexpected)} tensors it does not have "
                         f"({', '.join(unexpected[:3])})")
    for names in groups.values():
        given = next((n for n in names if n in state), None)
        if given is None:
            raise ValueError(f"no tensor for {names[0]}")
        value, old = state[given], wanted[given]
        if value.shape != old.shape or (value.dtype != old.dtype and not (
                value.is_floating_point() and old.is_floating_point())):
            raise ValueError(f"{given} is {value.dtype} {tuple(value.shape)}, model.py "
                             f"builds {old.dtype} {tuple(old.shape)}")
        if isinstance(old, nn.Parameter):
            value = nn.Parameter(value, requires_grad=old.requires_grad)
        for name in names:
            owner, _, attr = name.rpartition(".")
            holder = module.get_submodule(owner)
            (holder._parameters if attr in holder._parameters else holder._buffers)[attr] = value


def verify_weights(path: Path, module: nn.Module) -> None:
    """The safetensors file at ``path`` holds ``module``'s state exactly: what
    :func:`load_emitted` would give ``module`` equals what it holds, tensor by tensor, bit for
    bit (read one at a time). ValueError naming the first tensor that differs."""
    stored = read_header(path)
    wanted = module.state_dict(keep_vars=True)
    given: dict[int, str] = {}
    for name in stored:
        if name not in wanted:
            raise ValueError(f"{path.name} holds {name}, which the model does not have")
        given[id(wanted[name])] = name
    missing = [n for n, t in wanted.items() if id(t) not in given]
    if missing:
        raise ValueError(f"{path.name} holds no tensor for {missing[0]}")
    for name, value in read_tensors(path):
        want = wanted[name]
        if value.dtype != want.dtype or value.shape != want.shape or not torch.equal(
                value, want.detach()):
            raise ValueError(f"{path.name} holds {name} other than the model's")
