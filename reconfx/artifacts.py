"""Writing the output folder atomically, the manifest, and loading an emitted model back.

Every file goes to a staging folder next to its destination first; only after all checks pass is
each one moved into place with ``os.replace`` (atomic on one filesystem), so a failing or killed
command leaves every earlier file as it was.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reconfx.errors import ModelError, OutputError

MANIFEST = "manifest.json"


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
        except OSError as exc:
            raise _output_error(exc, self.out_dir) from None
        self.files[name] = None
        return path

    def commit(self) -> list[Path]:
        done = []
        try:
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
    ``os.replace`` moves it into place, so a killed process never leaves half a file."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        writer(temporary)
        os.replace(temporary, path)
    except OSError as exc:
        raise _output_error(exc, path.parent) from None
    finally:
        temporary.unlink(missing_ok=True)


def replace_text(path: Path, text: str) -> None:
    replace_file(path, lambda p: p.write_text(text, encoding="utf-8"))


def _remove_stale(out_dir: Path) -> None:
    """Staging folders left by a killed run (their process is gone) are removed."""
    for folder in out_dir.glob(".staging-*"):
        pid = folder.name.removeprefix(".staging-")
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
