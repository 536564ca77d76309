"""The output folder belongs to the user: reconfx writes only into a folder it owns, only one
command writes it at a time, and nothing in it is trusted on its word.

A folder is reconfx's when it is new or empty, when its ``manifest.json`` (a regular file) says
reconfx wrote it and every file it lists that is still there has the sha256 it records, or when
it holds nothing but reconfx's own working files: its lock, staging folders carrying its marker,
and working folders (``checkpoints``, ``tensorboard``) each of whose files its ledger records.
Anything else is refused unless the user passes ``force``; the file system root, the home folder
and the working directory are refused even then. reconfx deletes only what it can prove it
wrote: artifacts under the names it writes whose sha256 the manifest records, working files its
ledger records with their size and modification time.

Every path reconfx opens inside the folder is opened without following links and must be a
regular file (or a folder it made): a link, FIFO or device in its place is refused in one line.

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
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from reconfx.errors import FolderRefused, OutputError

__all__ = [
    "apply_journal", "artifact_name", "CHANGED", "check_owned", "CHECKPOINTS", "clear_working",
    "file_sha256", "finish_stale", "foreign", "forget", "JOURNAL", "LEDGER", "ledger", "LOCK",
    "MANIFEST", "MARKER", "not_regular", "open_regular", "output_error", "owned", "present",
    "proven", "read_manifest", "read_regular", "record", "recorded", "REMOVALS", "repairing",
    "STAGING_PREFIX", "TENSORBOARD", "unchanged", "WORKING", "working_folder", "writing"
]

LOCK = ".reconfx.lock"
STAGING_PREFIX = ".staging-"
JOURNAL = ".commit"  # in a staging folder: the files to move, written before the first move
MARKER = ".reconfx-staging"  # in a staging folder: reconfx made it
REMOVALS = ".remove"  # in a staging folder: what the commit removes after its moves
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
WORKING = (CHECKPOINTS, TENSORBOARD)  # reconfx's working folders, filled while a command runs
LEDGER = ".reconfx-files"  # in a working folder: each file reconfx wrote there
_MAX_LISTING = 1 << 20  # bytes of a journal, removal list or ledger reconfx reads at most
_HELD: dict[Path, int] = {}  # folders this process holds the lock of -> the lock's descriptor


def open_regular(path: Path, flags: int = os.O_RDONLY, mode: int = 0o644) -> int:
    """A descriptor of ``path``, opened without following a link (and without blocking on a
    FIFO); an :class:`OutputError` naming it when it is a link or not a regular file."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise not_regular(path, "a link") from exc
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise not_regular(path, "not a regular file")
    return fd


def not_regular(path: Path, what: str) -> FolderRefused:
    return FolderRefused(f"{path} is {what}; reconfx follows no link and reads or writes only "
                         "regular files in an output folder", where=str(path.parent),
                         fix=f"remove {path}")


def read_regular(path: Path, limit: int = _MAX_LISTING) -> bytes:
    """The bytes of a regular file (no link followed), at most ``limit`` of them: a longer
    file is an :class:`OutputError`, as is a link or anything but a regular file."""
    fd = open_regular(path)
    try:
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise OutputError(f"{path} is larger than reconfx ever writes it ({limit:,} bytes)",
                          where=str(path.parent), fix=f"remove {path}")
    return data


def _lines(path: Path) -> list[str] | None:
    """The lines of a listing reconfx wrote (journal, removal list), None when it is missing,
    not a regular file, too long or not text (a damaged or planted one)."""
    try:
        return read_regular(path).decode("utf-8").splitlines()
    except (OSError, OutputError, UnicodeDecodeError):
        return None


# -- working folders ---------------------------------------------------------------------------
def _fingerprint(path: Path) -> list[int] | None:
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns] if stat.S_ISREG(st.st_mode) else None


def ledger(folder: Path) -> dict[str, list[int] | None]:
    """What the ledger of a working folder records: file name -> [size, mtime_ns] as reconfx
    left it, or None for a file a writer appends to (TensorBoard's event files); empty when
    there is none or it cannot be read."""
    try:
        data = json.loads(read_regular(folder / LEDGER))
    except (OSError, OutputError, ValueError, RecursionError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if _plain_name(k) and (
        v is None or isinstance(v, list) and len(v) == 2 and all(type(x) is int for x in v))}


def _write_ledger(folder: Path, entries: dict[str, list[int] | None]) -> None:
    """The ledger replaced atomically (under the folder's lock: one writer, so one temporary
    name serves)."""
    temporary = folder / f"{LEDGER}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(entries, handle, sort_keys=True)
    os.replace(temporary, folder / LEDGER)


def recorded(folder: Path, name: str) -> bool:
    """``folder/name`` is a file reconfx wrote there and nobody changed since."""
    entries = ledger(folder)
    if name not in entries:
        return False
    fingerprint = _fingerprint(folder / name)
    return fingerprint is not None and entries[name] in (None, fingerprint)


def record(folder: Path, *names: str, appended: bool = False) -> None:
    """Note in ``folder``'s ledger that reconfx wrote ``names`` there (``appended``: a writer
    goes on appending to them, so only their names prove them)."""
    entries = ledger(folder)
    for name in names:
        entries[name] = None if appended else _fingerprint(folder / name)
    _write_ledger(folder, entries)


def forget(folder: Path, name: str) -> None:
    """Remove a file reconfx wrote in ``folder`` and its ledger entry."""
    if recorded(folder, name):
        (folder / name).unlink(missing_ok=True)
    entries = ledger(folder)
    if entries.pop(name, "absent") != "absent":
        _write_ledger(folder, entries)


def _stray_temporary(folder: Path, name: str) -> bool:
    """A temporary reconfx's atomic writers leave when killed: ``.<recorded name>.<hex>.tmp``
    or the ledger's own."""
    if name == f"{LEDGER}.tmp":
        return True
    if not (name.startswith(".") and name.endswith(".tmp")):
        return False
    base = name[1:-4].rpartition(".")[0]
    return base in ledger(folder) or base in ("resume.pt", "best.safetensors",
                                              "last.safetensors")


def proven(folder: Path) -> bool:
    """Every entry of a working folder is a file reconfx wrote there (its ledger records it,
    unchanged) or the ledger itself, or a temporary of reconfx's writers."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return False
    return all(e.name == LEDGER and e.is_file(follow_symlinks=False)
               or recorded(folder, e.name) or _stray_temporary(folder, e.name)
               and e.is_file(follow_symlinks=False) for e in entries)


def working_folder(out: Path, name: str) -> Path:
    """``out/name`` ready for reconfx's working files: made when missing; refused in one line
    when it is a link or not a folder, or holds a file reconfx did not write (which a file of
    reconfx's would otherwise replace)."""
    path = out / name
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise not_regular(path, "a link or not a folder")
    try:
        path.mkdir(exist_ok=True)
    except OSError as exc:
        raise output_error(exc, out) from exc
    if not proven(path):
        foreign = sorted(e.name for e in os.scandir(path) if e.name != LEDGER
                         and not recorded(path, e.name) and not _stray_temporary(path, e.name))
        raise FolderRefused(f"{path} holds files reconfx did not write ({', '.join(foreign[:5])})",
                            where="export.dir", fix=f"move them out of {path}, or choose "
                            "another output folder")
    return path


def clear_working(folder: Path) -> None:
    """Remove the files reconfx wrote in a working folder, and the folder once nothing else
    is left in it (a file reconfx did not write stays, and so does the folder)."""
    if folder.is_symlink() or not folder.is_dir():
        return
    for entry in os.scandir(folder):
        if entry.name != LEDGER and (recorded(folder, entry.name)
                                     or _stray_temporary(folder, entry.name)):
            os.unlink(entry.path)
    if all(e.name == LEDGER for e in os.scandir(folder)):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(folder / LEDGER)
        with contextlib.suppress(OSError):
            folder.rmdir()


# -- ownership ---------------------------------------------------------------------------------
MANIFEST = "manifest.json"
_MAX_MANIFEST = 16 << 20  # bytes
# The names reconfx gives the files it writes into an output folder (besides its working files):
# it removes or replaces nothing under another name.
_ARTIFACT = re.compile(r"(model\.py|original\.py|branch\.diff|weights\.safetensors|report\.md|"
                       r"conflicts\.json|conflicts\.png|metrics\.csv|steps\.csv|"
                       r"results\.json|table\.md|README\.md|config\.json|"
                       r"configuration_reconfx\.py|modeling_reconfx\.py|model\.safetensors|"
                       r"model-\d{5}-of-\d{5}\.safetensors|model\.safetensors\.index\.json|"
                       r"model(\.[A-Za-z0-9_-]+)?\.onnx(\.data)?)")


def artifact_name(name: str) -> bool:
    """A name reconfx writes an artifact under (``model.py``, ``model.left.onnx``, ...)."""
    return _ARTIFACT.fullmatch(name) is not None


def read_manifest(folder: Path) -> dict:
    """``folder/manifest.json`` parsed: a regular file (no link), at most 16 MiB, a JSON object
    nested no deeper than JSON from reconfx is; an :class:`OutputError` naming it otherwise."""
    path = folder / MANIFEST
    try:
        data = json.loads(read_regular(path, _MAX_MANIFEST))
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:
        raise OutputError(f"{path} is not a manifest reconfx wrote (not readable JSON)",
                          where=str(folder), fix=f"remove {path}, or re-run the command that "
                          "wrote the folder") from exc
    if not isinstance(data, dict) or not isinstance(data.get("files", {}), dict):
        raise OutputError(f"{path} is not a manifest reconfx wrote", where=str(folder),
                          fix=f"remove {path}, or re-run the command that wrote the folder")
    return data


def file_sha256(path: Path) -> str | None:
    """The sha256 of a regular file read without following links (None: missing, a link or not
    a regular file). A file already hashed by this process and not changed since (the same
    device, inode, size, modification and status-change times, as git's index tells) is not
    read again: a commit checks each large file several times. Only a file whose status
    changed over 2 s before it was hashed is remembered, so a write in the same tick of the
    file system's clock cannot go unseen; the status-change time cannot be set back by any
    process but the clock's owner."""
    started = time.time_ns()
    try:
        fd = open_regular(path)
    except (OSError, OutputError):
        return None
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    with os.fdopen(fd, "rb") as handle:
        if key in _HASHED:
            return _HASHED[key]
        digest = hashlib.sha256()
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    if st.st_ctime_ns < started - _SETTLED_NS:
        _HASHED[key] = digest.hexdigest()
    return digest.hexdigest()


_HASHED: dict[tuple[int, ...], str] = {}  # see file_sha256
_SETTLED_NS = 2 * 10**9


def present(path: Path) -> str:
    """What is at ``path``, as a journal records what a commit replaces: ``-`` for nothing,
    ``other`` for anything but a regular file (a link, a FIFO, a folder), else its sha256."""
    if not os.path.lexists(path):
        return "-"
    return file_sha256(path) or "other"


def unchanged(folder: Path, files: dict) -> list[str]:
    """The files the manifest's ``files`` lists, present in ``folder``, whose content differs
    from the sha256 it records for them (or that are no regular file)."""
    changed = []
    for name, entry in files.items():
        if not _plain_name(name) or not os.path.lexists(folder / name):
            continue
        want = entry.get("sha256") if isinstance(entry, dict) else None
        if want is None or file_sha256(folder / name) != want:
            changed.append(name)
    return changed


CHANGED = "(changed since reconfx wrote it)"


def owned(folder: Path) -> bool:
    """Whether reconfx may write ``folder`` without ``force`` (see the module docstring)."""
    return not foreign(folder)


def foreign(folder: Path) -> list[str]:
    """What makes ``folder`` not reconfx's (see the module docstring): its entries reconfx cannot
    prove it wrote, or the files its manifest lists that changed; empty when reconfx owns it."""
    if not os.path.lexists(folder):
        return []
    if folder.is_symlink() or not folder.is_dir():
        return [folder.name]
    if os.path.lexists(folder / MANIFEST):
        try:
            data = read_manifest(folder)
        except (OSError, OutputError):
            return [MANIFEST]
        if isinstance(data.get("versions"), dict) and "reconfx" in data["versions"]:
            files = data.get("files", {})
            # (an entry under a name reconfx writes that the manifest does not list would be
            # replaced by the next command: not reconfx's to replace)
            unlisted = sorted(e.name for e in folder.iterdir()
                              if artifact_name(e.name) and e.name not in files)
            return unlisted + [f"{name} {CHANGED}" for name in unchanged(folder, files)]
        return [MANIFEST]
    return sorted(entry.name for entry in folder.iterdir() if not _own_entry(entry))


def _own_entry(entry: Path) -> bool:
    if entry.name == LOCK:
        return not entry.is_symlink() and entry.is_file()
    if entry.name.startswith(STAGING_PREFIX):
        return not entry.is_symlink() and entry.is_dir()
    if entry.name in WORKING:
        return not entry.is_symlink() and entry.is_dir() and proven(entry)
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
    if path.is_dir():
        blocked = sorted(e.name for e in os.scandir(path) if e.is_dir(follow_symlinks=False)
                         and (artifact_name(e.name) or e.name == MANIFEST))
        if blocked:
            raise FolderRefused(f"{path / blocked[0]} is a folder where reconfx writes a file",
                                where="export.dir", fix=f"move {path / blocked[0]} away, or "
                                "choose another output folder")
    found = [] if force else foreign(path)
    changed = [f.removesuffix(f" {CHANGED}") for f in found if f.endswith(CHANGED)]
    if changed and len(changed) == len(found):
        raise FolderRefused(
            f"{path / changed[0]} differs from the sha256 {MANIFEST} records for it {CHANGED}"
            + (f", and so do {len(changed) - 1} more of its files" if len(changed) > 1 else "")
            + "; nothing was run or written", where="export.dir",
            fix="restore it, or pass --force to `reconfx compile` or `run` to replace it")
    if found:
        more = ", ..." if len(found) > 5 else ""
        mine = sorted(e.name for e in path.iterdir() if artifact_name(e.name))
        replaced = (f"replacing {', '.join(mine)} and " if mine else "")
        raise FolderRefused(
            f"the output folder {path} holds files reconfx did not write "
            f"({', '.join(found[:5])}{more})",
            where="export.dir", fix=f"choose a new or empty folder, or pass --force to write "
            f"into this one ({replaced}removing nothing reconfx did not write)")
    return path


@contextlib.contextmanager
def writing(folder: str | Path, command: str, force: bool = False, main: bool = True
            ) -> Iterator[Path]:
    """Check that reconfx may write ``folder``, hold its lock while the block runs, and finish
    or remove what killed writers left there. ``main`` False: a distributed rank other than
    rank 0 (by its process group), which never writes, takes no lock and only gets the path."""
    if not main:
        yield Path(folder).expanduser().resolve()
        return
    path = check_owned(folder, force)
    if path in _HELD:
        yield path
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = open_regular(path / LOCK, os.O_RDWR | os.O_CREAT)
    except OSError as exc:
        raise output_error(exc, path) from exc
    try:
        if not _lock(fd, path):
            raise FolderRefused(
                f"another reconfx command is writing {path} ({_holder(fd)})",
                where="export.dir", fix="wait for it to finish, or use another folder")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}: reconfx {command}\n"
                  .encode(), 0)
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
    process holds its lock, or took it for the block), so staging folders may be finished. A
    folder without a lock was never written by a command (every command takes it first), and
    the reader creates none: it writes nothing of its own into the folder."""
    if folder in _HELD:
        yield True
        return
    try:
        fd = open_regular(folder / LOCK, os.O_RDONLY)
    except FileNotFoundError:
        yield False  # no command ever wrote here: nothing to repair
        return
    except OSError:
        yield False  # not readable: nothing can be repaired there anyway
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
        if folder.is_symlink() or not folder.is_dir() or not _regular(folder / MARKER):
            continue
        if _regular(folder / JOURNAL):
            apply_journal(folder, out_dir)
        shutil.rmtree(folder, ignore_errors=True)


def _regular(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def apply_journal(folder: Path, out_dir: Path) -> list[Path]:
    """Carry out a staging folder's journal: move each staged file listed in it into
    ``out_dir``, then remove what its removal list names (artifacts an earlier model left,
    each with the sha256 it must still have, and working folders: ``checkpoints``,
    ``tensorboard``, of which only the files their ledgers record). Each journal line is
    ``name staged-sha256 replaced-sha256`` (``-``: nothing there): a file is moved only while
    the staged file and the one it replaces still have those contents, under a plain name (no
    ``..``, no path) that reconfx writes; so nothing outside ``out_dir`` is ever moved or
    deleted, and nothing reconfx did not write is replaced. A journal or removal list that
    cannot be read (damaged or planted) is not carried out."""
    moved = []
    for line in _lines(folder / JOURNAL) or []:
        name, staged_sha, replaced_sha = (line.split(" ") + ["", ""])[:3]
        staged, target = folder / name, out_dir / name
        if not (_plain_name(name) and (artifact_name(name) or name == MANIFEST)):
            continue
        if file_sha256(staged) == staged_sha and present(target) == replaced_sha and not (
                target.is_dir() and not target.is_symlink()):
            os.replace(staged, target)
            moved.append(target)
    for line in _lines(folder / REMOVALS) or []:
        name, _, sha = line.partition(" ")
        target = out_dir / name
        if not _plain_name(name):
            continue
        if name in WORKING:
            clear_working(target)
        elif artifact_name(name) and sha and file_sha256(target) == sha:
            target.unlink()
    return moved


def _plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name \
        and "\0" not in name


def output_error(exc: OSError, out_dir: Path) -> OutputError:
    reasons = {errno.ENOSPC: "the disk is full", errno.EACCES: "permission denied",
               errno.EROFS: "the file system is read-only", errno.EPERM: "permission denied"}
    reason = reasons.get(exc.errno or 0, exc.strerror or str(exc))
    return OutputError(f"cannot write the output folder {out_dir}: {reason}",
                       where="export.dir", fix="choose a writable folder with free space")
