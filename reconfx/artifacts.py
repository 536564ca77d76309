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
import errno
import glob
import hashlib
import importlib.util
import json
import os
import pickle
import platform
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reconfx.errors import ModelError, OutputError

MANIFEST = "manifest.json"
JOURNAL = ".commit"  # in a staging folder: the files to move, written before the first move


class Staging:
    """Files written under ``<dir>/.staging-<pid>`` and committed together."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir.resolve()
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            _remove_stale(self.out_dir)
            self.path = self.out_dir / f".staging-{os.getpid()}"
            shutil.rmtree(self.path, ignore_errors=True)
            self.path.mkdir()
        except OSError as exc:
            raise _output_error(exc, self.out_dir) from None
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
        except Exception as exc:
            raise _output_error(_io_error(exc), self.out_dir) from None
        self.files[name] = None
        return path

    def commit(self) -> list[Path]:
        done = []
        try:
            replace_text(self.path / JOURNAL, "".join(f"{name}\n" for name in self.files))
            for name in self.files:
                os.replace(self.path / name, self.out_dir / name)
                done.append(self.out_dir / name)
        except OSError as exc:
            raise _output_error(exc, self.out_dir) from None
        finally:
            shutil.rmtree(self.path, ignore_errors=True)
        return done

    def abort(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


def replace_file(path: Path, writer: Any) -> None:
    """Write one file atomically: ``writer`` fills a temporary name beside it, then
    ``os.replace`` moves it into place, so a killed process never leaves half a file (and the
    half-written temporaries of killed processes are removed the next time)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
            pid = stale.name[len(path.name) + 2:-4]
            if pid.isdigit() and not _alive(int(pid)):
                stale.unlink(missing_ok=True)
        writer(temporary)
        os.replace(temporary, path)
    except Exception as exc:
        raise _output_error(_io_error(exc), path.parent) from None
    finally:
        temporary.unlink(missing_ok=True)


def save_weights(module: nn.Module, path: Path) -> None:
    """The module's state as safetensors, byte-for-byte reproducible. Tensors that are one
    tensor under several names (tied weights; per-task norms sharing one affine) are stored once,
    under their first name in ``state_dict`` order, which ``safetensors.torch.load_model``
    accepts; a tensor that shares storage with another in any other way is stored as a copy.
    (``safetensors.torch.save_model`` records its alias table as metadata in hash order, which
    differs from one run to the next.) Empty tensors share no data (all have a null data
    pointer), so each is stored under its own name."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    kept: set[tuple] = set()
    storages: set[tuple] = set()
    for name, tensor in module.state_dict().items():
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        view = (*storage, tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        if view in kept and tensor.untyped_storage().nbytes() > 0:
            continue
        shared = storage in storages and tensor.untyped_storage().nbytes() > 0
        tensors[name] = tensor.detach().clone() if shared else tensor.detach().contiguous()
        kept.add(view)
        storages.add(storage)
    save_file(tensors, str(path), metadata={"format": "pt"})


def torch_load_safely(path: Path) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only. A pickle that names
    any other Python object is refused, never executed; every failure is a ``ValueError`` with a
    one-line reason."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"unsupported GLOBAL (\S+)", str(exc), re.IGNORECASE)
        what = f"a reference to {found.group(1)}" if found else "Python objects besides tensors"
        raise ValueError(f"it holds {what}, which a weights-only load refuses (unpickling it "
                         "would run code)") from None
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"{type(exc).__name__}: {first}") from None


def replace_text(path: Path, text: str) -> None:
    replace_file(path, lambda p: p.write_text(text, encoding="utf-8"))


def _remove_stale(out_dir: Path) -> None:
    """Staging folders left by a killed run (their process is gone): a commit that had begun
    (the journal exists) is finished, anything else is removed."""
    for folder in out_dir.glob(".staging-*"):
        pid = folder.name.removeprefix(".staging-")
        if pid.isdigit() and not _alive(int(pid)):
            journal = folder / JOURNAL
            if journal.is_file():
                for name in journal.read_text(encoding="utf-8").splitlines():
                    if name and (folder / name).is_file():
                        os.replace(folder / name, out_dir / name)
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


def _output_error(exc: OSError, out_dir: Path) -> OutputError:
    reasons = {errno.ENOSPC: "the disk is full", errno.EACCES: "permission denied",
               errno.EROFS: "the file system is read-only", errno.EPERM: "permission denied"}
    reason = reasons.get(exc.errno or 0, exc.strerror or str(exc))
    return OutputError(f"cannot write the output folder {out_dir}: {reason}",
                       where="export.dir", fix="choose a writable folder with free space")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def versions() -> dict[str, str]:
    from reconfx import __version__

    found = {"python": platform.python_version(), "torch": torch.__version__,
             "reconfx": __version__}
    for name in ("onnx", "onnxruntime", "transformers"):
        module = sys.modules.get(name)
        if module is not None:
            found[name] = getattr(module, "__version__", "?")
    return found


def manifest_text(out_dir: Path, staged: Path, command: str, spec_path: Path, spec_sha: str,
                  seed: int, files: list[str], class_name: str) -> str:
    """The merged manifest: earlier entries of other commands are kept."""
    old: dict[str, Any] = {}
    try:
        old = json.loads((out_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        old = {}
    entries = dict(old.get("files", {})) if isinstance(old.get("files"), dict) else {}
    for name in files:
        entries[name] = {"command": command, "sha256": sha256(staged / name)}
    data = {"class_name": class_name, "spec": {"path": str(spec_path.resolve()),
            "sha256": spec_sha}, "seed": seed, "versions": versions(), "files": entries}
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def import_source(path: Path, class_name: str) -> type[nn.Module]:
    """Import the class ``class_name`` from a generated ``model.py``."""
    module_name = f"reconfx_emitted_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ModelError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ModelError(f"{path} defines no nn.Module class '{class_name}'")
    return cls


def load(directory: str | Path) -> nn.Module:
    """The emitted model in ``directory`` (``model.py`` + ``weights.safetensors``), in eval mode.

    >>> model = reconfx.load("exported/multidigits-resnet")       # doctest: +SKIP
    >>> model(image=torch.rand(1, 1, 12, 12))["left"].shape        # doctest: +SKIP
    torch.Size([1, 10])
    """
    directory = Path(directory)
    with contextlib.suppress(OSError):  # finish a commit a killed command left half done
        _remove_stale(directory)
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        name = manifest["class_name"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ModelError(f"{directory} has no readable {MANIFEST}",
                         fix="point at a folder written by `reconfx compile`") from None
    return load_emitted(directory, name)


def load_emitted(directory: Path, class_name: str) -> nn.Module:
    """Instantiate ``class_name`` from ``directory/model.py`` and load its weights."""
    from safetensors.torch import load_model

    model = import_source(directory / "model.py", class_name)()
    weights = directory / "weights.safetensors"
    if not weights.is_file():
        raise ModelError(f"{weights} is missing", fix="re-run `reconfx compile`")
    load_model(model, str(weights), strict=True)
    return model.eval()
