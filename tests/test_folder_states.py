"""A property of every folder state: whatever an output folder holds (links in and out, FIFOs,
other tools' files and folders, hostile manifests and journals, planted bytecode caches),
`compile`, `compile --force` and `reconfx.load` change nothing outside it, remove nothing
reconfx did not write, and end in a consistent, verified folder or one line with exit 2; never
a traceback (hypothesis generates the states)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import py_compile
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reconfx
from reconfx import commands, outdir
from reconfx.cli import main
from reconfx.errors import ReconfxError
from tests.support import resnet_spec

EXAMPLES = 30  # (the README's reliability section quotes this number)

# Names a hostile or careless folder puts things under: reconfx's own, and others.
NAMES = ["model.py", "weights.safetensors", "manifest.json", "report.md", "model.onnx",
         outdir.LOCK, "checkpoints", "tensorboard", ".staging-a", "__pycache__", "notes.txt",
         "data", "events.out.tfevents.1.h.1.0"]
THINGS = ["file", "folder", "link-out-file", "link-out-folder", "dangling-link", "fifo"]


def plant(folder: Path, outside: Path, name: str, thing: str) -> None:
    path = folder / name
    if os.path.lexists(path):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    if thing == "file":
        path.write_bytes(b"someone else's " + name.encode())
    elif thing == "folder":
        path.mkdir()
        for inner in ("best.safetensors", "resume.pt", "notes.txt"):
            (path / inner).write_bytes(b"someone else's " + inner.encode())
    elif thing == "link-out-file":
        path.symlink_to(outside / "victim.txt")
    elif thing == "link-out-folder":
        path.symlink_to(outside / "victims")
    elif thing == "dangling-link":
        path.symlink_to(outside / "nothing-here")
    else:
        os.mkfifo(path)


def hostile_manifest(folder: Path, kind: str) -> None:
    path = folder / "manifest.json"
    if os.path.lexists(path) and (path.is_symlink() or not path.is_file()):
        return
    if kind == "nested":
        path.write_text("[" * 50_000 + "]" * 50_000)
    elif kind == "binary":
        path.write_bytes(b"\xff\xfe\x00{")
    elif kind == "lists-others":  # names files reconfx never wrote, with their true hashes
        files = {}
        for entry in folder.iterdir():
            if entry.is_file() and not entry.is_symlink():
                files[entry.name] = {"sha256": hashlib.sha256(entry.read_bytes()).hexdigest()}
        path.write_text(json.dumps({"class_name": "Trust", "versions": {"reconfx": "0.1.0"},
                                    "files": files}))


def hostile_staging(folder: Path, names: list[str]) -> None:
    staging = folder / ".staging-b"
    if os.path.lexists(staging):
        return
    staging.mkdir()
    (staging / outdir.MARKER).write_bytes(b"")
    (staging / outdir.JOURNAL).write_text("".join(f"{n}\n" for n in names))
    (staging / outdir.REMOVALS).write_text("".join(f"{n}\n" for n in names))
    for name in names:
        if "/" not in name and name not in ("", ".", ".."):
            (staging / name).write_bytes(b"staged by someone")


def planted_cache(folder: Path, marker: Path) -> None:
    source = folder / "model.py"
    if not source.is_file() or source.is_symlink():
        return
    cache = Path(importlib.util.cache_from_source(str(source)))
    if os.path.lexists(cache.parent) and not cache.parent.is_dir():
        return
    cache.parent.mkdir(exist_ok=True)
    hostile = folder.parent / "hostile_model.py"
    hostile.write_text(source.read_text() + f"\nopen({str(marker)!r}, 'w').close()\n")
    try:
        py_compile.compile(str(hostile), cfile=str(cache), doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    except py_compile.PyCompileError:
        pass  # (a planted model.py that is not Python: nothing to cache)


def snapshot(root: Path) -> dict[str, object]:
    """Every path under ``root`` (links not followed): its bytes, link target or kind."""
    found: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                found[key] = f"-> {os.readlink(path)}"
            elif path.is_file():
                found[key] = path.read_bytes()
            else:
                found[key] = "fifo" if not path.is_dir() else "dir"
    return found


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    root = tmp_path_factory.mktemp("template")
    out = root / "out"
    spec = resnet_spec(root, ["layer4.*"], out, "states")
    commands.compile_spec(spec)
    return spec, out


state = st.fixed_dictionaries({
    "base": st.sampled_from(["empty", "compiled"]),
    "plants": st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from(THINGS)),
                       max_size=4),
    "manifest": st.sampled_from([None, "nested", "binary", "lists-others"]),
    "staging": st.one_of(st.none(), st.lists(st.sampled_from(
        ["model.py", "notes.txt", "../escaped.txt", "data", "checkpoints", "manifest.json",
         ".reconfx.lock", "report.md"]), min_size=1, max_size=3)),
    "cache": st.booleans(),
    "force": st.booleans(),
})


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(case=state)
def test_any_folder_state_ends_verified_or_in_one_line(template, tmp_path_factory, capsys,
                                                       case):
    spec_path, template_out = template
    root = tmp_path_factory.mktemp("state")
    outside = root / "outside"
    (outside / "victims").mkdir(parents=True)
    (outside / "victim.txt").write_text("outside the folder\n")
    (outside / "victims" / "best.safetensors").write_text("outside the folder\n")
    out = root / "out"
    if case["base"] == "compiled":
        shutil.copytree(template_out, out, symlinks=True)
    else:
        out.mkdir()
    marker = root / "payload-ran"
    for name, thing in case["plants"]:
        plant(out, outside, name, thing)
    if case["manifest"]:
        hostile_manifest(out, case["manifest"])
    if case["staging"]:
        hostile_staging(out, case["staging"])
    if case["cache"]:
        planted_cache(out, marker)
    spec = root / "spec.yaml"
    spec.write_text(spec_path.read_text().replace(str(template_out), str(out)))
    outside_before = snapshot(outside)
    # what reconfx did not write and may not remove: everything planted but inside staging
    # folders (reconfx's by their marker), under names reconfx would replace with --force
    planted = {k: v for k, v in snapshot(out).items()
               if not k.startswith(".staging-") and (k.split("/")[0] not in
                                                     ("model.py", "weights.safetensors",
                                                      "manifest.json", "report.md",
                                                      "original.py", "branch.diff",
                                                      outdir.LOCK)
                                                     or not case["force"])}
    if case["manifest"] == "lists-others" and (out / "manifest.json").is_file():
        # A manifest claiming reconfx wrote the folder, whose hashes hold, makes the folder
        # reconfx's (as a forged ledger would its working files): it and the files it lists
        # under reconfx's names are replaced as reconfx's own.
        claimed = json.loads((out / "manifest.json").read_text()).get("files", {})
        planted = {k: v for k, v in planted.items() if k != "manifest.json"
                   and not (k in claimed and outdir.artifact_name(k))}
    if case["base"] == "compiled":  # (the template's own files are reconfx's)
        planted = {k: v for k, v in planted.items()
                   if (template_out / k).exists() is False or k.startswith("__pycache__")
                   or snapshot(template_out).get(k) != v}

    args = ["compile", str(spec), "--quiet"] + (["--force"] if case["force"] else [])
    code = main(args)
    err = capsys.readouterr().err.splitlines()
    assert code in (0, 2), err
    assert code == 0 or (len(err) == 1 and err[0].startswith("reconfx: error: ")), err
    if code == 0:
        reconfx.load(out)  # verified against its manifest
    else:
        try:
            reconfx.load(out)
        except ReconfxError as exc:  # one line, an error of reconfx's
            assert "\n" not in str(exc)
    assert not marker.exists()
    assert snapshot(outside) == outside_before
    after = snapshot(out)
    for key, value in planted.items():
        if key.split("/")[0] in ("checkpoints", "tensorboard") and code == 0 and not case[
                "force"]:
            continue  # (proven reconfx's by its ledger, or the compile was refused)
        assert after.get(key) == value, (key, case)
