"""Helpers shared by the tests: write a spec, compile it end to end, assert the invariants."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

import reconfx
from reconfx.build import example_inputs
from reconfx.commands import Emitted, compile_spec
from reconfx.graph import unique_parameters
from reconfx.outdir import LOCK
from reconfx.pipeline import Compiled, branch_model, emit_sources, prepare
from reconfx.selection import select_layers
from reconfx.streams import regions_of
from reconfx.tree import task_outputs

CHECKS = ["I1 init parity", "I2 sharing", "I3 isolation", "I4 emit parity"]
ARTIFACTS = ["model.py", "original.py", "branch.diff", "weights.safetensors", "report.md",
             "manifest.json"]


def listing(folder: Path) -> list[str]:
    """The names in an output folder, sorted, without reconfx's lock file (kept between
    commands: removing a lock file another process may have opened would break the lock)."""
    return sorted(p.name for p in folder.iterdir() if p.name != LOCK)


def resnet_spec(tmp_path: Path, layers: list[str], out: Path, name: str = "kill") -> Path:
    """A spec compiling the small ResNet with ``layers`` branched into ``out``, in a folder of
    its own per name and layer set."""
    folder = tmp_path / f"spec-{name}-{'-'.join(layers).replace('*', 'x')}"
    folder.mkdir(exist_ok=True)
    return write_spec(folder, name, model={"factory": "reconfx.zoo:small_resnet",
                                           "kwargs": {"width": 8}},
                      inputs=[{"name": "image", "shape": [2, 1, 12, 12]}],
                      tasks=[{"name": "left"}, {"name": "right"}],
                      select={"layers": layers}, export={"dir": str(out)})


def write_spec(folder: Path, name: str = "case", **fields: Any) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, **fields}, sort_keys=False))
    return path


def compile_and_verify(spec_path: Path, out: Path) -> Emitted:
    """Compile, then assert I1-I4 passed, the exact parameter count, parity of the reloaded
    emitted model at another batch size, and I6 (a fresh trace emits byte-identical text)."""
    compiled = compile_spec(spec_path, out)
    assert [c.name for c in compiled.checks] == CHECKS
    spec = compiled.prepared.loaded.spec
    onnx = ["model.onnx"] if "onnx" in spec.export.formats else []
    assert listing(out) == sorted(ARTIFACTS + onnx)
    tasks = len(spec.tasks)
    original = unique_parameters(compiled.prepared.traced.module)
    added = (tasks - 1) * sum(layer.num_params for layer in compiled.branched.layers)
    loaded = reconfx.load(out)
    assert unique_parameters(compiled.branched.module) == original + added
    assert unique_parameters(loaded) == original + added
    example = example_inputs(spec.inputs, seed=123, batch=spec.inputs[0].shape[0] + 3)
    want = task_outputs(compiled.prepared.model.eval()(**example), compiled.prepared.task_paths)
    got = loaded(**example)
    assert list(got) == spec.task_names
    # I1 holds within atol 1e-5 where task streams run joined (stream batching, task rows)
    batched = bool(regions_of(compiled.branched.module)) or "class PerTask(" in (
        out / "model.py").read_text()
    for task in spec.task_names:
        if batched:
            torch.testing.assert_close(got[task], want[task], rtol=0, atol=1e-5)
        else:
            assert torch.equal(want[task], got[task]), task
    assert_deterministic(spec_path, out)
    assert_ruff_clean(out / "model.py", out / "original.py")
    return compiled


def assert_ruff_clean(*paths: Path) -> None:
    """The emitted source passes the project's ruff configuration."""
    ruff = Path(sys.executable).with_name("ruff")
    done = subprocess.run([str(ruff), "check", "--no-cache", *map(str, paths)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout


def assert_deterministic(spec_path: Path, out: Path) -> None:
    """I6: tracing and emitting again from a freshly built model gives the same bytes."""
    prepared = prepare(spec_path)
    chosen = select_layers(prepared.layers, prepared.loaded.spec.select)
    again = Compiled(prepared, branch_model(prepared, chosen), ())
    sources = emit_sources(again)
    assert (out / "model.py").read_text() == sources.model_py
    assert (out / "original.py").read_text() == sources.original_py
    assert (out / "branch.diff").read_text() == sources.diff


def diff_lines(out: Path) -> tuple[list[str], list[str]]:
    """Removed and added lines of branch.diff (without the file headers)."""
    lines = (out / "branch.diff").read_text().splitlines()
    removed = [x[1:] for x in lines if x.startswith("-") and not x.startswith("---")]
    added = [x[1:] for x in lines if x.startswith("+") and not x.startswith("+++")]
    return removed, added
