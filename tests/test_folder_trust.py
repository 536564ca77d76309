"""Nothing in an output folder is trusted on its word: bytecode caches, links, FIFOs, manifests
naming files reconfx never wrote, damaged journals, a RANK left in the environment (each
hostile folder is built by the test itself, on a real compile)."""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import py_compile
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import reconfx
from reconfx import commands, outdir
from reconfx.cli import main
from reconfx.errors import ModelError
from tests.support import ARTIFACTS, listing, resnet_spec, write_spec

ROOT = Path(__file__).resolve().parents[1]


def cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, list[str]]:
    code = main(args)
    return code, capsys.readouterr().err.splitlines()


@pytest.fixture
def compiled(tmp_path):
    out = tmp_path / "out"
    spec = resnet_spec(tmp_path, ["layer4.*"], out, "trust")
    commands.compile_spec(spec)
    return spec, out


def everything(folder: Path) -> dict[str, bytes | str]:
    """Every path under ``folder`` (links not followed) with its content or link target."""
    found: dict[str, bytes | str] = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        found[key] = (f"-> {os.readlink(path)}" if path.is_symlink() else
                      path.read_bytes() if path.is_file() else "dir")
    return found


def test_a_planted_bytecode_cache_never_runs_and_loading_writes_nothing(tmp_path, compiled,
                                                                         capsys):
    """Python's loader runs an unchecked-hash .pyc whatever model.py says; reconfx compiles the
    verified bytes of model.py itself, reads no cache and writes none."""
    spec, out = compiled
    marker = tmp_path / "payload-ran"
    source = out / "model.py"
    hostile = tmp_path / "hostile.py"
    hostile.write_text(source.read_text() + f"\nopen({str(marker)!r}, 'w').close()\n")
    cache = Path(importlib.util.cache_from_source(str(source)))
    cache.parent.mkdir()
    py_compile.compile(str(hostile), cfile=str(cache),
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    before = everything(out)
    reconfx.load(out)
    assert cli(["export", str(spec), "--quiet"], capsys)[0] == 0
    assert not marker.exists()
    assert (out / "__pycache__").is_dir() and everything(out / "__pycache__") == {
        k.removeprefix("__pycache__/"): v for k, v in before.items()
        if k.startswith("__pycache__/")}
    before = everything(out)
    reconfx.load(out)
    assert everything(out) == before  # no cache, no lock, nothing


def test_a_lock_that_is_a_link_is_refused_and_its_target_kept(tmp_path, compiled, capsys):
    spec, out = compiled
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's file\n")
    (out / outdir.LOCK).unlink()
    (out / outdir.LOCK).symlink_to(victim)
    code, err = cli(["compile", str(spec), "--quiet"], capsys)
    assert code == 2 and len(err) == 1
    assert f"{out / outdir.LOCK} is a link; reconfx follows no link" in err[0]
    assert victim.read_text() == "the user's file\n"
    with pytest.raises(ModelError, match="is a link; reconfx follows no link"):
        reconfx.load(out)
    (out / outdir.LOCK).unlink()
    (out / outdir.LOCK).symlink_to(tmp_path / "dangling")
    with pytest.raises(ModelError, match="is a link"):
        reconfx.load(out)
    assert not (tmp_path / "dangling").exists()


def test_a_folder_holding_only_a_linked_lock_is_not_reconfxs(tmp_path):
    (tmp_path / "victim").write_text("x")
    out = tmp_path / "out"
    out.mkdir()
    (out / outdir.LOCK).symlink_to(tmp_path / "victim")
    assert not outdir.owned(out)


def test_a_fifo_in_place_of_the_lock_is_one_line(compiled, capsys):
    spec, out = compiled
    (out / outdir.LOCK).unlink()
    os.mkfifo(out / outdir.LOCK)
    code, err = cli(["compile", str(spec), "--quiet"], capsys)
    assert code == 2 and len(err) == 1 and "is not a regular file" in err[0]
    assert "internal error" not in err[0]


def test_a_checkpoints_link_is_refused_and_the_linked_folder_kept(tmp_path, capsys):
    out = tmp_path / "out"
    mine = tmp_path / "mine"
    mine.mkdir()
    for name in ("best.safetensors", "last.safetensors", "resume.pt"):
        (mine / name).write_bytes(b"the user's " + name.encode())
    before = everything(mine)
    spec = write_spec(tmp_path, "linked", model={"factory": "reconfx.zoo:small_resnet",
                                                 "kwargs": {"width": 8}},
                      inputs=[{"name": "image", "shape": [2, 1, 12, 12]}],
                      tasks=[{"name": t, "loss": "cross_entropy", "metric": "accuracy"}
                             for t in ("left", "right")],
                      data={"factory": "reconfx.data:multidigits", "kwargs": {"size": 64},
                            "batch_size": 32},
                      select={"layers": ["layer4.*"]}, train={"epochs": 1},
                      export={"dir": str(out), "formats": ["python"]})
    out.mkdir()
    (out / "checkpoints").symlink_to(mine)
    code, err = cli(["run", str(spec), "--quiet", "--force"], capsys)
    assert code == 2 and len(err) == 1
    assert f"{out / 'checkpoints'} is a link or not a folder" in err[0]
    assert everything(mine) == before


def test_names_a_manifest_lists_are_not_proof_that_reconfx_wrote_them(compiled, capsys):
    spec, out = compiled
    (out / "notes.txt").write_text("the user's notes\n")
    manifest = json.loads((out / "manifest.json").read_text())
    for name in ("notes.txt", outdir.LOCK):
        manifest["files"][name] = {"command": "compile",
                                   "sha256": outdir.file_sha256(out / name)}
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert cli(["compile", str(spec), "--quiet"], capsys)[0] == 0
    assert (out / "notes.txt").read_text() == "the user's notes\n"
    assert (out / outdir.LOCK).is_file()


def test_an_artifact_changed_after_reconfx_wrote_it_is_never_deleted(compiled, capsys):
    """A new model's compile removes the earlier model's files, but only with the content
    reconfx gave them."""
    spec, out = compiled
    commands.export_spec(spec)  # model.onnx: the next compile (python only) removes it
    (out / "model.onnx").write_bytes(b"the user's own export")
    fields = yaml.safe_load(spec.read_text())
    fields.update(name="trust2", export={"dir": str(out), "formats": ["python"]})
    python_only = spec.parent / "trust2.yaml"
    python_only.write_text(yaml.safe_dump(fields))
    code, err = cli(["compile", str(python_only), "--quiet", "--force"], capsys)
    assert code == 0
    assert (out / "model.onnx").read_bytes() == b"the user's own export"


def test_rank_left_in_the_environment_does_not_skip_the_lock(compiled, monkeypatch, capsys):
    spec, out = compiled
    monkeypatch.setenv("RANK", "1")
    fd = os.open(out / outdir.LOCK, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another command is writing
    try:
        code, err = cli(["compile", str(spec), "--quiet"], capsys)
    finally:
        os.close(fd)
    assert code == 2 and "another reconfx command is writing" in err[0]


def test_a_journal_naming_a_folder_leaves_it_and_compiles(compiled, capsys):
    spec, out = compiled
    (out / "model.py.d").mkdir()
    staging = out / ".staging-x"
    staging.mkdir()
    (staging / outdir.MARKER).write_bytes(b"")
    (staging / "model.py").mkdir()
    (staging / outdir.JOURNAL).write_text("model.py\nreport.md\n")
    (out / "report.md").unlink()
    (out / "report.md").mkdir()  # a folder where the journal moves a file
    (staging / "report.md").write_text("staged\n")
    code, err = cli(["compile", str(spec), "--quiet", "--force"], capsys)
    assert code == 2 and err == [
        f"reconfx: error: export.dir: {out / 'report.md'} is a folder where reconfx writes a "
        f"file (fix: move {out / 'report.md'} away, or choose another output folder)"]
    reconfx.load(out)  # (the planted journal is not carried out; the staging folder goes)
    assert not staging.exists() and (out / "report.md").is_dir()
    (out / "report.md").rmdir()
    assert cli(["compile", str(spec), "--quiet", "--force"], capsys)[0] == 0
    assert (out / "model.py.d").is_dir()


@pytest.mark.parametrize("damage", ["journal", "removals", "manifest"])
def test_damaged_state_is_one_line_or_repaired(compiled, capsys, damage):
    spec, out = compiled
    if damage == "manifest":
        (out / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    else:
        staging = out / ".staging-y"
        staging.mkdir()
        (staging / outdir.MARKER).write_bytes(b"")
        name = outdir.JOURNAL if damage == "journal" else outdir.REMOVALS
        (staging / outdir.JOURNAL).write_text("")
        (staging / name).write_bytes(b"\xff\xfe model.py \x80\n")
    if damage == "manifest":
        with pytest.raises(ModelError, match="has no readable manifest.json"):
            reconfx.load(out)
        code, err = cli(["compile", str(spec), "--quiet"], capsys)
        assert code == 2 and len(err) == 1 and "holds files reconfx did not write" in err[0]
        assert cli(["compile", str(spec), "--quiet", "--force"], capsys)[0] == 0
    else:
        reconfx.load(out)  # the damaged listing is not carried out; the staging folder goes
        assert not (out / ".staging-y").exists()
    assert listing(out) == sorted(ARTIFACTS)
    reconfx.load(out)


def test_signals_at_random_moments_of_start_up_give_one_line(tmp_path):
    """Ctrl-C or SIGTERM while the command imports torch and numpy (its first seconds):
    exit 130 or 143 and one line, never a traceback, an internal error or a C++ abort. (A
    signal in the interpreter's own first few milliseconds, before reconfx's first line runs,
    ends the process with the signal's default action.)"""
    spec = resnet_spec(tmp_path, ["layer4.*"], tmp_path / "out", "signals")
    rng = random.Random(7)
    for trial in range(6):
        delay = rng.uniform(0.1, 1.6)
        number = rng.choice([signal.SIGINT, signal.SIGTERM])
        process = subprocess.Popen(
            [sys.executable, "-m", "reconfx", "compile", str(spec), "--quiet"], cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        time.sleep(delay)
        process.send_signal(number)
        _out, err = process.communicate(timeout=120)
        want = 143 if number == signal.SIGTERM else 130
        assert process.returncode == want, (trial, delay, err)
        assert len(err.splitlines()) == 1 and err.startswith("reconfx: "), (trial, delay, err)


def test_a_file_changed_after_it_was_hashed_is_hashed_again(tmp_path, monkeypatch):
    """The hashes of a commit's large files are remembered by their status; a change of content
    (even one that sets the modification time back) moves the status-change time, and a file
    changed within the last 2 s is never remembered."""
    made, real = [], hashlib.sha256

    class Counted:
        def __init__(self):
            self.inner = real()
            made.append(self)

        def update(self, block):
            self.inner.update(block)

        def hexdigest(self):
            return self.inner.hexdigest()

    monkeypatch.setattr(outdir.hashlib, "sha256", Counted)
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"a" * 4096)
    assert outdir.file_sha256(path) == outdir.file_sha256(path) == real(b"a" * 4096).hexdigest()
    assert len(made) == 2  # (just written: not remembered)
    later = time.time_ns() + 10 * 10**9
    monkeypatch.setattr(outdir.time, "time_ns", lambda: later)  # the file is now 10 s old
    outdir.file_sha256(path)
    outdir.file_sha256(path)
    assert len(made) == 3
    times = os.stat(path)
    time.sleep(0.05)  # (past the file system clock's tick)
    with open(path, "r+b") as f:
        f.write(b"b")
    os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))
    assert outdir.file_sha256(path) == real(b"b" + b"a" * 4095).hexdigest()
    assert len(made) == 4
