"""The output folder is the user's: reconfx writes only into folders it owns, never moves or
deletes anything outside them, runs no code whose hash does not match its manifest, and lets one
command write a folder at a time (each hostile folder is built by the test itself)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

import reconfx
from reconfx import commands, outdir
from reconfx.cli import main
from reconfx.errors import FolderRefused, ModelError
from tests.support import ARTIFACTS, listing, resnet_spec, write_spec

ROOT = Path(__file__).resolve().parents[1]


def cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, list[str]]:
    code = main(args)
    return code, capsys.readouterr().err.splitlines()


def test_a_folder_holding_the_users_files_is_refused_without_force(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "model.py").write_text("my own model\n")
    (out / "notes.txt").write_text("keep me\n")
    spec = str(resnet_spec(tmp_path, ["layer4.*"], out, "folder"))
    code, err = cli(["compile", spec, "--quiet"], capsys)
    assert code == 2 and err == [
        f"reconfx: error: export.dir: the output folder {out} holds files reconfx did not write "
        "(model.py, notes.txt) (fix: choose a new or empty folder, or pass --force to "
        "write into this one (replacing model.py and removing nothing reconfx did not write))"]
    assert sorted(p.name for p in out.iterdir()) == ["model.py", "notes.txt"]
    assert (out / "model.py").read_text() == "my own model\n"
    assert cli(["compile", spec, "--quiet", "--force"], capsys)[0] == 0
    assert (out / "notes.txt").read_text() == "keep me\n"
    # once reconfx has written it (its manifest says so), the folder is reconfx's
    assert cli(["compile", spec, "--quiet"], capsys)[0] == 0


@pytest.mark.parametrize("where", ["root", "home", "cwd"])
def test_root_home_and_working_directory_are_refused_even_with_force(tmp_path, monkeypatch,
                                                                     where):
    monkeypatch.chdir(tmp_path)
    folder = {"root": Path("/"), "home": Path.home(), "cwd": Path(".")}[where]
    with pytest.raises(FolderRefused, match="refusing to write into .* even with --force"):
        outdir.check_owned(folder, force=True)


@pytest.mark.parametrize("force", [False, True])
def test_a_file_in_the_way_of_the_folder_is_named_and_kept(tmp_path, force):
    (tmp_path / "taken").write_text("a file of the user's\n")
    for folder in (tmp_path / "taken", tmp_path / "taken" / "inner"):
        with pytest.raises(FolderRefused, match=f"cannot be made: {tmp_path / 'taken'} is a file"):
            outdir.check_owned(folder, force=force)
    assert (tmp_path / "taken").read_text() == "a file of the user's\n"


def test_a_new_or_empty_folder_and_reconfx_working_files_are_owned(tmp_path):
    assert outdir.owned(tmp_path / "new") and outdir.owned(tmp_path)
    checkpoints = outdir.working_folder(tmp_path, "checkpoints")
    (checkpoints / "resume.pt").write_bytes(b"state")
    outdir.record(checkpoints, "resume.pt")
    (tmp_path / outdir.LOCK).write_bytes(b"")
    assert outdir.owned(tmp_path)  # an interrupted run's checkpoint, before any manifest
    board = outdir.working_folder(tmp_path, "tensorboard")
    (board / "events.out.tfevents.1.host.1.0").write_bytes(b"")
    outdir.record(board, "events.out.tfevents.1.host.1.0", appended=True)
    assert outdir.owned(tmp_path)  # a run's live TensorBoard scalars
    (board / "notes.txt").write_bytes(b"")
    assert not outdir.owned(tmp_path)
    (board / "notes.txt").unlink()
    (checkpoints / "mine.ckpt").write_bytes(b"")
    assert not outdir.owned(tmp_path)
    (checkpoints / "mine.ckpt").unlink()
    (checkpoints / "resume.pt").write_bytes(b"another tool's state")  # changed since recorded
    assert not outdir.owned(tmp_path)


def test_another_tools_working_files_are_not_reconfxs(tmp_path, capsys):
    """checkpoints/ and tensorboard/ of the same names as reconfx's, written by another tool:
    the folder is not reconfx's, and --force replaces reconfx's files only, deleting none of
    the other tool's."""
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    for name in ("best.safetensors", "last.safetensors"):
        (out / "checkpoints" / name).write_bytes(b"another tool's weights")
    (out / "tensorboard").mkdir()
    (out / "tensorboard" / "events.out.tfevents.1.host.1.0").write_bytes(b"its scalars")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    spec = str(resnet_spec(tmp_path, ["layer4.*"], out, "other"))
    code, err = cli(["compile", spec, "--quiet"], capsys)
    assert code == 2 and "holds files reconfx did not write (checkpoints, tensorboard)" in err[0]
    assert cli(["compile", spec, "--quiet", "--force"], capsys)[0] == 0
    assert all(p.read_bytes() == data for p, data in before.items())
    assert cli(["compile", spec, "--quiet"], capsys)[0] == 0  # its manifest holds now
    assert all(p.read_bytes() == data for p, data in before.items())


def hostile_staging(out: Path, name: str, journal: list[str]) -> Path:
    folder = out / name
    folder.mkdir()
    (folder / outdir.MARKER).write_bytes(b"")
    (folder / outdir.JOURNAL).write_text("".join(f"{n}\n" for n in journal))
    return folder


def test_journal_entries_that_leave_the_folder_are_never_followed(tmp_path):
    out = tmp_path / "out"
    commands.compile_spec(resnet_spec(tmp_path, ["layer4.*"], out, "folder"))
    before = {name: (out / name).read_bytes() for name in ARTIFACTS}
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_text("not reconfx's\n")
    (out / "decoy.txt").write_text("inside\n")
    hostile_staging(out, ".staging-1", ["../escaped.txt", "../outside/victim.txt",
                                        "link/victim.txt", "/etc/hostname"])
    (out / ".staging-1" / "link").symlink_to(outside)
    (out / ".staging-2").symlink_to(outside)  # a staging "folder" that is a link outside
    (out / ".staging-3").mkdir()  # no marker: not reconfx's, left alone
    reconfx.load(out)
    assert not (tmp_path / "escaped.txt").exists()
    assert (outside / "victim.txt").read_text() == "not reconfx's\n"
    assert sorted(p.name for p in outside.iterdir()) == ["victim.txt"]
    assert not (out / ".staging-1").exists() and (out / ".staging-3").is_dir()
    assert {name: (out / name).read_bytes() for name in ARTIFACTS} == before


def test_an_edited_model_py_or_swapped_weights_run_nothing(tmp_path, capsys):
    out, other = tmp_path / "out", tmp_path / "other"
    spec = resnet_spec(tmp_path, ["layer4.*"], out, "folder")
    commands.compile_spec(spec)
    commands.compile_spec(resnet_spec(tmp_path, ["layer3.*"], other, "other"))
    marker = tmp_path / "ran"
    model_py = out / "model.py"
    original = model_py.read_text()
    model_py.write_text(original + f"\nopen({str(marker)!r}, 'w').close()\n")
    with pytest.raises(ModelError, match=r"model.py differs from the sha256 manifest.json "
                                         r"records for it .* nothing was imported"):
        reconfx.load(out)
    code, err = cli(["export", str(spec), "--quiet"], capsys)
    assert code == 2 and "differs from the sha256" in err[0]
    assert not marker.exists()
    model_py.write_text(original)
    (out / "weights.safetensors").write_bytes((other / "weights.safetensors").read_bytes())
    with pytest.raises(ModelError, match="weights.safetensors differs from the sha256"):
        reconfx.load(out)


def test_a_second_writer_fails_at_once_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "out"
    spec = resnet_spec(tmp_path, ["layer4.*"], out, "folder")
    commands.compile_spec(spec)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from reconfx import outdir
        with outdir.writing({str(out)!r}, "run"):
            print("locked", flush=True)
            time.sleep(60)
    """)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        code, err = cli(["compile", str(spec), "--quiet"], capsys)
        assert code == 2 and err == [
            f"reconfx: error: export.dir: another reconfx command is writing {out} (pid "
            f"{holder.pid} on {os.uname().nodename}: reconfx run) (fix: wait for it to "
            "finish, or use another folder)"]
    finally:
        holder.kill()
        holder.wait()
    # the lock went with its process, whatever its process id means here
    assert cli(["compile", str(spec), "--quiet"], capsys)[0] == 0


def test_staging_is_judged_by_the_lock_not_by_a_process_id(tmp_path):
    """A staging folder named after a live process id (as another PID namespace's writer's
    would be) is finished once its folder's lock is free."""
    out = tmp_path / "out"
    commands.compile_spec(resnet_spec(tmp_path, ["layer4.*"], out, "folder"))
    staged = hostile_staging(out, f".staging-{os.getpid()}", [])
    (staged / "report.md").write_text("the new report\n")
    # (a journal as a commit writes it: the staged file's sha256 and that of the one replaced)
    (staged / outdir.JOURNAL).write_text(
        f"report.md {outdir.file_sha256(staged / 'report.md')} "
        f"{outdir.present(out / 'report.md')}\n")
    reconfx.load(out)
    assert (out / "report.md").read_text() == "the new report\n" and not staged.exists()


def run_patched(patch: str, args: list[str]) -> subprocess.CompletedProcess:
    """``reconfx ARGS`` in a fresh process after running ``patch`` (which arranges a signal).
    Ctrl-C raises KeyboardInterrupt there as in a terminal, also where the tests run in a
    background job, which starts with SIGINT ignored."""
    script = "import signal\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n" + \
        textwrap.dedent(patch) + textwrap.dedent(f"""
        import sys
        from reconfx.cli import main
        sys.exit(main({args!r}))
    """)
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_sigterm_ends_with_one_line_and_exit_143_leaving_the_folder_as_it_was(tmp_path):
    out = tmp_path / "out"
    commands.compile_spec(resnet_spec(tmp_path, ["layer4.*"], out, "folder"))
    before = {name: (out / name).read_bytes() for name in ARTIFACTS}
    done = run_patched("""
        import os, signal
        from reconfx import commands
        real = commands.emit_sources
        def emit_sources(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)
            return real(*args, **kwargs)
        commands.emit_sources = emit_sources
    """, ["compile", str(resnet_spec(tmp_path, ["layer3.*"], out, "term")), "--quiet"])
    assert done.returncode == 143
    assert done.stderr.splitlines() == [
        "reconfx: terminated (SIGTERM); the output folder holds a complete set of files (this "
        "command's only if it had finished writing them); profile and run continue with "
        "--resume"]
    assert {name: (out / name).read_bytes() for name in ARTIFACTS} == before
    assert not list(out.glob(".staging-*"))


def test_ctrl_c_between_two_commit_moves_still_completes_the_commit(tmp_path):
    """The signal waits until the last file is moved: the folder holds the new compile's files
    only, never a new model.py beside the old weights."""
    out, clean = tmp_path / "out", tmp_path / "clean"
    commands.compile_spec(resnet_spec(tmp_path, ["layer4.*"], out, "folder"))
    spec = resnet_spec(tmp_path, ["layer3.*"], out, "again")
    done = run_patched("""
        import os, signal
        real, moves = os.replace, []
        def replace(source, target):
            real(source, target)
            moves.append(target)
            if str(target).endswith("model.py"):  # the journal went first
                os.kill(os.getpid(), signal.SIGINT)
        os.replace = replace
    """, ["compile", str(spec), "--quiet"])
    assert done.returncode == 130 and len(done.stderr.splitlines()) == 1, done.stderr
    assert not list(out.glob(".staging-*"))
    commands.compile_spec(resnet_spec(tmp_path, ["layer3.*"], clean, "again"))
    for name in ("model.py", "original.py", "branch.diff", "weights.safetensors"):
        assert (out / name).read_bytes() == (clean / name).read_bytes(), name
    reconfx.load(out)


def test_the_command_line_starts_without_torch():
    """Heavy imports happen inside commands: `reconfx --help` answers at once, and Ctrl-C is
    handled from the first instruction of main()."""
    done = subprocess.run([sys.executable, "-c", "import sys, reconfx.cli; "
                           "print('torch' in sys.modules)"], cwd=ROOT, capture_output=True,
                          text=True, check=True)
    assert done.stdout == "False\n"


def test_a_folder_holds_one_models_result(tmp_path, capsys):
    """After `run` (with ONNX), `export --task left` and a `compile` of other layers (python
    only), nothing of the earlier model is left: no model.onnx or model.left.onnx of the old
    weights, no checkpoints; the manifest lists exactly the files present. Files derived from a
    model record its hash."""
    out = tmp_path / "out"
    spec = write_spec(tmp_path, "seq", model={"factory": "reconfx.zoo:small_resnet",
                                              "kwargs": {"width": 8}},
                      inputs=[{"name": "image", "shape": [4, 1, 12, 12]}],
                      tasks=[{"name": "left", "loss": "cross_entropy"},
                             {"name": "right", "loss": "cross_entropy"}],
                      data={"factory": "reconfx.data:multidigits", "kwargs": {"size": 64},
                            "batch_size": 16},
                      select={"layers": ["layer4.*"]}, train={"epochs": 1},
                      export={"formats": ["python", "onnx"], "dir": str(out)})
    assert cli(["run", str(spec), "--quiet"], capsys)[0] == 0
    assert cli(["export", str(spec), "--task", "left", "--quiet"], capsys)[0] == 0
    manifest = json.loads((out / "manifest.json").read_text())
    model_hash = manifest["files"]["model.left.onnx"]["model_sha256"]
    assert manifest["files"]["model.onnx"]["model_sha256"] == model_hash
    assert (out / "checkpoints" / "best.safetensors").is_file()
    fields = yaml.safe_load(spec.read_text())
    fields.update(select={"layers": ["layer3.*"]}, export={"formats": ["python"], "dir": str(out)})
    other = write_spec(tmp_path, **fields)
    assert cli(["compile", str(other), "--quiet"], capsys)[0] == 0
    present = listing(out)
    assert present == sorted(ARTIFACTS)
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["files"]) == sorted(set(ARTIFACTS) - {"manifest.json"})
    assert {e["command"] for e in manifest["files"].values()} == {"compile"}


def test_export_to_a_folder_without_a_model_creates_nothing(tmp_path, capsys):
    out = tmp_path / "not-yet" / "out"
    spec = resnet_spec(tmp_path, ["layer4.*"], out)
    code, err = cli(["export", str(spec), "--quiet"], capsys)
    assert code == 2 and err == [
        f"reconfx: error: export.dir: {out} holds no compiled model (no manifest.json) "
        "(fix: run `reconfx compile` (or `run`) first)"]
    assert not (tmp_path / "not-yet").exists()


def test_a_model_py_whose_imports_are_gone_is_one_line(tmp_path, monkeypatch, capsys):
    """model.py imports the classes the model was built with; where their package is gone,
    loading the folder names the file, the line and the missing module."""
    (tmp_path / "gone_models.py").write_text(textwrap.dedent('''
        import torch
        from torch import nn

        class Scale(nn.Module):
            def __init__(self, width):
                super().__init__()
                self.width = width
                self.gain = nn.Parameter(torch.ones(width))

            def forward(self, x):
                return x * self.gain

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.body = nn.Linear(4, 4)
                self.scale = Scale(4)
                self.a = nn.Linear(4, 2)
                self.b = nn.Linear(4, 3)

            def forward(self, x):
                h = self.scale(self.body(x))
                return {"a": self.a(h), "b": self.b(h)}
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    spec = write_spec(tmp_path, "gone", model={"factory": "gone_models:Net"},
                      inputs=[{"name": "x", "shape": [2, 4]}], tasks=[{"name": "a"},
                                                                       {"name": "b"}],
                      select={"layers": ["scale"]}, export={"dir": str(out)})
    assert cli(["compile", str(spec), "--quiet"], capsys)[0] == 0
    assert "from gone_models import Scale\n" in (out / "model.py").read_text()
    (tmp_path / "gone_models.py").unlink()
    monkeypatch.delitem(sys.modules, "gone_models")
    code, err = cli(["export", str(out), "--quiet"], capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"reconfx: error: {out / 'model.py'} does not import (line ")
    assert err[0].endswith("ModuleNotFoundError: No module named 'gone_models' (fix: install "
                           "the packages model.py imports (those the model was built with))")


def test_an_emitted_model_py_that_does_not_run_fails_i4_and_writes_nothing(tmp_path,
                                                                           monkeypatch, capsys):
    import dataclasses

    emit = commands.emit_sources
    monkeypatch.setattr(commands, "emit_sources", lambda compiled: dataclasses.replace(
        emit(compiled), model_py="CONFIG = MissingConfig()\n"))
    out = tmp_path / "out"
    spec = str(resnet_spec(tmp_path, ["layer4.*"], out, "broken"))
    code, err = cli(["compile", spec, "--quiet"], capsys)
    assert code != 0 and len(err) == 1, err
    assert re.fullmatch(
        r"reconfx: error: I4 emit parity failed: the emitted model.py does not run \("
        + re.escape(str(out)) + r"/\.staging-\w+/model\.py does not import \(line 1\): "
        r"NameError: name 'MissingConfig' is not defined\) \(fix: report this model as a "
        r"reconfx bug\)", err[0]), err[0]
    assert not out.exists() or listing(out) == []
