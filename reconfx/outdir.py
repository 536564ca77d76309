"""The output folder belongs to the user: reconfx writes only into a folder it owns, and only one
command writes it at a time.

A folder is reconfx's when it is new or empty, when its ``manifest.json`` says reconfx wrote it,
or when it holds nothing but reconfx's own working files (the lock, staging folders, resume
checkpoints of an interrupted run, TensorBoard event files). Anything else is refused unless
the user passes ``force``; the file system root, the home folder and the working directory are
refused even then.

Every writing command holds an exclusive ``fcntl.flock`` on ``<folder>/.reconfx.lock`` for its
whole run. The kernel drops the lock when the process ends, however it ends, so whether a
writer is alive is decided by the lock, not by a process id (which another PID namespace or
machine cannot check). Holding the lock also means no other writer exists: every staging folder
left in the folder is then stale, and is finished (its journal replayed) or removed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

from reconfx.errors import FolderRefused, OutputError

LOCK = ".reconfx.lock"
STAGING_PREFIX = ".staging-"
JOURNAL = ".commit"  # in a staging folder: the files to move, written before the first move
MARKER = ".reconfx-staging"  # in a staging folder: reconfx made it
REMOVALS = ".remove"  # in a staging folder: what the commit removes after its moves
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
_CHECKPOINT_FILES = ("resume.pt", "best.safetensors", "last.safetensors")
# reconfx's working folders in an output folder, written while a command runs (not listed in
# the manifest), each with the test a file inside must pass to be reconfx's
WORKING = {
    CHECKPOINTS: lambda name: name in _CHECKPOINT_FILES or (name.startswith(".")
                                                           and name.endswith(".tmp")),
    TENSORBOARD: lambda name: name.startswith("events.out.tfevents."),
}
_HELD: dict[Path, int] = {}  # folders this process holds the lock of -> the lock's descriptor


def owned(folder: Path) -> bool:
    """Whether reconfx may write ``folder`` without ``force`` (see the module docstring)."""
    if not folder.exists():
        return True
    if not folder.is_dir():
        return False
    manifest = folder / "manifest.json"
    with contextlib.suppress(OSError, ValueError, AttributeError):
        data = json.loads(manifest.read_text(encoding="utf-8"))
        if "reconfx" in data.get("versions", {}):
            return True
    return all(_own_entry(entry) for entry in folder.iterdir())


def _own_entry(entry: Path) -> bool:
    if entry.name == LOCK or (entry.name.startswith(STAGING_PREFIX) and entry.is_dir()
                              and not entry.is_symlink()):
        return True
    ours = WORKING.get(entry.name)
    if ours is not None and entry.is_dir() and not entry.is_symlink():
        return all(ours(f.name) and f.is_file() and not f.is_symlink() for f in entry.iterdir())
    return False


def check_owned(folder: str | Path, force: bool = False) -> Path:
    """``folder`` resolved, or an :class:`OutputError` naming it when reconfx may not write
    there."""
    path = Path(folder).expanduser().resolve()
    protected = {Path("/"), Path.home().resolve(), Path.cwd().resolve()}
    if path in protected:
        raise FolderRefused(f"refusing to write into {path} (the file system root, the home "
                          "folder or the working directory), even with --force",
                          where="export.dir", fix="name a folder of its own, e.g. exported/NAME")
    blocker = next((p for p in (path, *path.parents) if p.exists()), path)
    if not blocker.is_dir():
        raise FolderRefused(f"the output folder {path} cannot be made: {blocker} is a file",
                            where="export.dir", fix="name a folder path that no file is in the "
                            "way of, e.g. exported/NAME")
    if not force and not owned(path):
        found = sorted(p.name for p in path.iterdir())
        more = ", ..." if len(found) > 5 else ""
        raise FolderRefused(
            f"the output folder {path} holds files reconfx did not write "
            f"({', '.join(found[:5])}{more})",
            where="export.dir", fix="choose a new or empty folder, or pass --force to write "
            "into this one (files reconfx produces would replace same-named files there)")
    return path


@contextlib.contextmanager
def writing(folder: str | Path, command: str, force: bool = False) -> Iterator[Path]:
    """Check that reconfx may write ``folder``, hold its lock while the block runs, and finish
    or remove what killed writers left there. Under torchrun only rank 0 writes, so only rank 0
    locks."""
    path = check_owned(folder, force)
    if os.environ.get("RANK", "0") != "0" or path in _HELD:
        yield path
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise output_error(exc, path) from None
    try:
        if not _lock(fd, path):
            raise FolderRefused(
                f"another reconfx command is writing {path} ({_holder(fd)})",
                where="export.dir", fix="wait for it to finish, or use another folder")
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}: reconfx {command}\n"
                 .encode())
        _HELD[path] = fd
        finish_stale(path)
        yield path
    finally:
        _HELD.pop(path, None)
        os.close(fd)  # releases the lock


def _lock(fd: int, path: Path) -> bool:
    """Take the exclusive lock without waiting: False when another process holds it. A file
    system without lock support (some network mounts) gets no lock and a warning."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        import sys

        print(f"reconfx: warning: {path}'s file system does not support locks; nothing stops "
              "a second command from writing it at the same time", file=sys.stderr)
        return True


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError):
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
        if text:
            return text
    return "holder unknown"


@contextlib.contextmanager
def repairing(folder: Path) -> Iterator[bool]:
    """For a reader (``reconfx.load``): True when no command is writing ``folder`` (this
    process holds its lock, or took it for the block), so staging folders may be finished."""
    if folder in _HELD:
        yield True
        return
    try:
        fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield False  # a read-only folder: nothing can be repaired there anyway
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            free = True
        except OSError:
            free = False
        yield free
    finally:
        os.close(fd)


def finish_stale(out_dir: Path) -> None:
    """Staging folders left by killed commands (the caller holds the folder's lock, so no other
    writer exists): a commit that had begun (the journal exists) is finished, anything else is
    removed. Only folders carrying reconfx's marker are touched."""
    for folder in out_dir.glob(f"{STAGING_PREFIX}*"):
        if folder.is_symlink() or not folder.is_dir() or not (folder / MARKER).is_file():
            continue
        if (folder / JOURNAL).is_file() and not (folder / JOURNAL).is_symlink():
            apply_journal(folder, out_dir)
        shutil.rmtree(folder, ignore_errors=True)


def apply_journal(folder: Path, out_dir: Path) -> list[Path]:
    """Carry out a staging folder's journal: move each staged file listed in it into
    ``out_dir``, then remove what its removal list names (files an earlier model left, and
    working folders: ``checkpoints``, ``tensorboard``). A name is used only when it is a plain
    name (no ``..``, no path), a staged file only when it is no link, so nothing outside
    ``out_dir`` is ever moved or deleted."""
    moved = []
    for name in _names(folder / JOURNAL):
        staged = folder / name
        if staged.is_file() and not staged.is_symlink():
            os.replace(staged, out_dir / name)
            moved.append(out_dir / name)
    for name in _names(folder / REMOVALS):
        target = out_dir / name
        if target.is_dir() and not target.is_symlink():
            if name in WORKING:
                shutil.rmtree(target)
        elif target.is_file() or target.is_symlink():
            target.unlink()
    return moved


def _names(listing: Path) -> list[str]:
    if not listing.is_file() or listing.is_symlink():
        return []
    return [n for n in listing.read_text(encoding="utf-8").splitlines() if _plain_name(n)]


def _plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name \
        and "\0" not in name


def output_error(exc: OSError, out_dir: Path) -> OutputError:
    reasons = {errno.ENOSPC: "the disk is full", errno.EACCES: "permission denied",
               errno.EROFS: "the file system is read-only", errno.EPERM: "permission denied"}
    reason = reasons.get(exc.errno or 0, exc.strerror or str(exc))
    return OutputError(f"cannot write the output folder {out_dir}: {reason}",
                       where="export.dir", fix="choose a writable folder with free space")
