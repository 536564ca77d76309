"""The CLI's happy paths, the output folder contract and reconfx.load."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import reconfx
from reconfx import commands
from reconfx.cli import main
from tests.support import ARTIFACTS, listing, write_spec

ROOT = Path(__file__).resolve().parents[1]

RESNET = {"factory": "reconfx.zoo:small_resnet", "kwargs": {"num_classes": 3, "width": 8}}
IMAGE = [{"name": "image", "shape": [2, 1, 12, 12]}]
TASKS = [{"name": "left"}, {"name": "right"}]


def spec(tmp_path, layers=("layer4.*",)):
    return write_spec(tmp_path, "cli", model=RESNET, inputs=IMAGE, tasks=TASKS,
                      select={"layers": list(layers)})


def test_validate_ok(tmp_path, capsys):
    assert main(["validate", str(spec(tmp_path))]) == 0
    assert "ok ('cli': model reconfx.zoo:small_resnet, 1 input(s), tasks left, right)" in \
        capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "specs").glob("*.yaml")))
def test_every_bundled_spec_validates(capsys, name):
    assert main(["validate", str(ROOT / "specs" / name)]) == 0


def test_schema_is_json_with_the_fixed_fields(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    for field in ("name", "model", "inputs", "tasks", "data", "profile", "select", "branch",
                  "train", "export"):
        assert field in schema["properties"]


def test_inspect_json_lists_layers_with_tasks_and_selection(tmp_path, capsys):
    assert main(["inspect", str(spec(tmp_path)), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    layers = {layer["name"]: layer for layer in data["layers"]}
    assert data["tier"] == "fx"
    assert len(layers) == 26
    assert layers["layer4.0.conv1"] == {
        "name": "layer4.0.conv1", "type": "Conv2d", "paths": ["layer4.0.conv1"],
        "params": 64 * 32 * 9, "tasks": ["left", "right"], "shared": True, "branched": True,
        "score": None}  # no profile yet
    assert layers["heads.left"]["shared"] is False
    assert layers["conv1"]["branched"] is False


def test_inspect_table(tmp_path, capsys):
    assert main(["inspect", str(spec(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "26 layers (24 shared)" in out
    assert "layer4.0.conv1" in out and "left,right" in out


def test_compile_prints_absolute_paths_and_load_gives_the_model(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compile", str(spec(tmp_path)), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for name in ARTIFACTS:
        assert f"wrote {out.resolve() / name}" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["files"]) == set(ARTIFACTS) - {"manifest.json"}
    assert manifest["versions"]["torch"] == torch.__version__
    model = reconfx.load(out)
    assert set(model(image=torch.randn(1, 1, 12, 12))) == {"left", "right"}


def test_compile_prints_each_stage_as_it_starts_and_finishes_with_its_time(tmp_path, capsys):
    import re

    assert main(["compile", str(spec(tmp_path)), "--out", str(tmp_path / "out")]) == 0
    lines = capsys.readouterr().out.splitlines()
    stages = [line for line in lines if line.startswith("  ") and not line.startswith("    ")]
    timed = r" \(\d+\.\d s\)$"
    expected = [("building the model ...", r"built SmallResNet \(\d[\d,]* parameters\)"),
                ("tracing ...", r"traced with torch\.fx \(tier 1\)"),
                ("selecting ...", r"selected \d+ layer\(s\):"),
                ("branching and checking I1-I3 ...", r"branched; I1-I3 hold"),
                ("emitting model.py ...", r"emitted model\.py \(\d+ lines\) and original\.py"),
                ("checking I4 (the emitted model against the compiled one) ...", r"I4 holds")]
    for start, done in expected:
        at = stages.index(f"  {start}")
        assert re.fullmatch(f"  {done}{timed}", stages[at + 1]), stages[at + 1]
    assert main(["compile", str(spec(tmp_path)), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert capsys.readouterr().out == ""


def test_failed_compile_leaves_earlier_files_intact(tmp_path, monkeypatch):
    out = tmp_path / "out"
    commands.compile_spec(spec(tmp_path), out)
    before = {name: (out / name).read_bytes() for name in ARTIFACTS}

    def broken_report(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(commands, "compile_report", broken_report)
    with pytest.raises(OSError):
        commands.compile_spec(spec(tmp_path, ["layer3.*"]), out)
    assert {name: (out / name).read_bytes() for name in ARTIFACTS} == before
    assert listing(out) == sorted(ARTIFACTS)  # no staging left over
    assert reconfx.load(out) is not None


def test_python_dash_m_entry_point(tmp_path):
    done = subprocess.run([sys.executable, "-m", "reconfx", "validate", str(spec(tmp_path))],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_staging_left_by_a_killed_run_is_removed(tmp_path):
    from reconfx.outdir import MARKER

    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (out / f".staging-{dead}").mkdir(parents=True)
    (out / f".staging-{dead}" / MARKER).write_bytes(b"")  # reconfx's staging folders carry it
    (out / f".staging-{dead}" / "model.py").write_text("half-written")
    commands.compile_spec(spec(tmp_path), out)
    assert listing(out) == sorted(ARTIFACTS)


def test_weights_keep_every_empty_buffer_and_store_tied_tensors_once(tmp_path):
    """Empty tensors all have a null data pointer but share nothing: each is stored under its
    own name (torch.export lifts empty constants, one per use); a tensor under two names once."""
    from safetensors import safe_open
    from safetensors.torch import load_model

    from reconfx.artifacts import save_weights

    def module() -> torch.nn.Module:
        m = torch.nn.Linear(3, 3)
        m.register_buffer("first", torch.empty(0))
        m.register_buffer("second", torch.tensor([]))
        m.register_buffer("third", torch.empty(0, 4))
        m.tied = torch.nn.Linear(3, 3)
        m.tied.weight = m.weight
        return m

    path = tmp_path / "w.safetensors"
    save_weights(module(), path)
    with safe_open(str(path), "pt") as f:
        assert sorted(f.keys()) == ["bias", "first", "second", "third", "tied.bias", "weight"]
        assert f.get_tensor("third").shape == (0, 4)
    load_model(module(), str(path), strict=True)


def test_leaf_built_from_a_settings_object_gets_the_object_in_source(tmp_path):
    """A leaf whose constructor takes a settings object (HF's rotary embeddings take the model
    config) is built with that object rebuilt from its fields."""
    from tests.support import compile_and_verify

    path = write_spec(tmp_path, "configured", model={"factory": "tests.models:Configured"},
                      inputs=[{"name": "x", "shape": [3, 6]}], tasks=[{"name": "a"}, {"name": "b"}],
                      select={"layers": ["fc"]})
    out = tmp_path / "out"
    compile_and_verify(path, out)  # parity of the reloaded model.py included
    source = (out / "model.py").read_text()
    assert "        self.rotary = Rotary(Settings())\n" in source  # (width=8: its default)
    assert "from tests.models import Rotary, Settings\n" in source
    assert "_from_factory" not in source


def test_leaf_without_any_source_form_is_written_as_its_traced_code(tmp_path):
    """A leaf holding a function made at run time (no constructor call or restoring rebuilds
    it) becomes a class holding its own traced code; model.py never calls the factory, and I4
    holds with every weight perturbed."""
    from tests.support import compile_and_verify

    path = write_spec(tmp_path, "power", model={"factory": "tests.models:WithPowerLeaf"},
                      inputs=[{"name": "x", "shape": [3, 6]}], tasks=[{"name": "a"}, {"name": "b"}],
                      select={"layers": ["fc"]})
    out = tmp_path / "out"
    compile_and_verify(path, out)
    source = (out / "model.py").read_text()
    assert "class TracedPowerLeaf(nn.Module):" in source
    assert "        self.power = TracedPowerLeaf()\n" in source
    assert "        pow_1 = h ** 2\n        mul = pow_1 * self.scale\n" in source
    assert "_from_factory" not in source and "tests.models" not in source
    assert ("- 1 as a class holding its own traced code (an attribute has no source form, so no "
            "call of its class rebuilds it): `power`\n") in (out / "report.md").read_text()


def test_untraceable_leaf_without_any_source_form_stops_the_compile_naming_it(tmp_path, capsys):
    """Such a leaf whose forward fx cannot trace either (it branches on a value) cannot be
    written into model.py, which never calls the spec's factory: one line names the module, the
    attribute and the registration that fixes it, and nothing is written."""
    path = write_spec(tmp_path, "power", model={"factory": "tests.models:WithPowerLeaf",
                                                 "kwargs": {"branching": True}},
                      inputs=[{"name": "x", "shape": [3, 6]}], tasks=[{"name": "a"}, {"name": "b"}],
                      select={"layers": ["fc"]})
    out = tmp_path / "out"
    assert main(["compile", str(path), "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert ("model.py cannot build 'power' (BranchingPowerLeaf): no constructor call rebuilds "
            "it, its attribute(s) fn have no source form, and fx cannot trace its forward") in err
    assert "reconfx.kinds.register(BranchingPowerLeaf, constructor=lambda module: {...})" in err
    assert not (out / "model.py").exists()


def test_layers_in_another_dtype_get_a_dtype_argument(tmp_path):
    from tests.support import compile_and_verify

    path = write_spec(tmp_path, "double", model={"factory": "tests.models:DoubleNet"},
                      inputs=[{"name": "x", "shape": [3, 5], "dtype": "float64"}],
                      tasks=[{"name": "a"}, {"name": "b"}], select={"layers": ["fc"]})
    compile_and_verify(path, tmp_path / "out")  # parity of the reloaded model.py included
    source = (tmp_path / "out" / "model.py").read_text()
    assert "self.mid = nn.Linear(7, 7, dtype=torch.float64)" in source
    assert "nn.Linear(5, 7, dtype=torch.float64)" in source and "_from_factory" not in source


def test_the_spec_reference_in_docs_is_generated_from_the_models():
    """docs/spec.md is `reconfx schema --markdown`: every field, its type, default and
    description, so the reference cannot drift from what validate accepts."""
    from reconfx.spec import Spec
    from reconfx.specdoc import render

    text = render()
    committed = (ROOT / "docs" / "spec.md").read_text()
    assert committed == text, "docs/spec.md is stale: run `reconfx schema --markdown > " \
                              "docs/spec.md`"
    for name in Spec.model_fields:
        assert f"| `{name}` |" in text
    assert "| `mask_of` |" in text and "| `flops_budget` |" in text and "| `class` |" in text


def test_public_names_are_functions_and_no_module_shadows_one():
    """The API's names stay functions once every module of the package is imported (a module
    named like one, imported later, would replace it on the package)."""
    import importlib
    import inspect
    import pkgutil

    for info in pkgutil.walk_packages(reconfx.__path__, "reconfx."):
        if not info.name.startswith(("reconfx.experiments", "reconfx.__main__")):
            importlib.import_module(info.name)
    for name in ("trace", "profile", "select", "branch", "emit_python", "export_onnx", "run",
                 "load", "prepare", "inventory", "load_spec", "compile_spec"):
        assert inspect.isfunction(getattr(reconfx, name)), name
    assert set(reconfx.__all__) >= {"trace", "profile", "select", "run", "export_onnx"}


def test_no_module_imports_one_that_imports_it_back():
    """The package's imports (also those inside functions) form no cycle: each module can be
    read knowing only the modules below it."""
    import ast
    from pathlib import Path

    import networkx as nx

    root = Path(reconfx.__file__).parent
    graph = nx.DiGraph()
    for path in root.rglob("*.py"):
        name = ".".join(("reconfx", *path.relative_to(root).with_suffix("").parts))
        name = name.removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(
                    "reconfx.") and node.level == 0:
                graph.add_edge(name, node.module)
            elif isinstance(node, ast.Import):
                graph.add_edges_from((name, a.name) for a in node.names
                                     if a.name.startswith("reconfx."))
    assert list(nx.simple_cycles(graph)) == []


def test_every_output_file_follows_the_umask(tmp_path):
    """weights.safetensors (safetensors creates its files readable by their owner only) gets
    the same mode as every other output file: 0o666 less the umask."""
    import os
    import stat

    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "reconfx", "compile", str(spec(tmp_path)),
                           "--out", str(out), "--quiet"], capture_output=True, text=True,
                          check=False, preexec_fn=lambda: os.umask(0o027))
    assert done.returncode == 0, done.stderr
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir() if p.is_file()}
    assert "weights.safetensors" in modes
    assert {name: mode for name, mode in modes.items() if mode != 0o640} == {}


def test_report_lines_for_the_terminal():
    """run prints its results (Markdown in report.md) as aligned text."""
    from reconfx.tables import for_terminal

    lines = ["## Training and evaluation", "", "- aggregator `pcgrad`, 3 epoch(s)", "",
             "| task | metric | test |\n|---|---|---|\n| left | accuracy | 0.9287 |\n"
             "| right | mse | 0.0153 |", "", "- delta-m: +1.00%"]
    assert for_terminal(lines) == [
        "Training and evaluation:", "- aggregator pcgrad, 3 epoch(s)",
        "  task   metric    test", "  -----  --------  ------",
        "  left   accuracy  0.9287", "  right  mse       0.0153", "- delta-m: +1.00%"]


def test_parametrized_modules_are_built_as_themselves(tmp_path):
    """weight_norm and a user's own parametrization: model.py builds each as its class with the
    parametrization applied (the weights keep their parametrizations.* names), whether the
    module is shared or branched, and I4 holds with every weight perturbed."""
    from tests.support import compile_and_verify

    path = write_spec(tmp_path, "wn", model={"factory": "tests.models:WeightNormed"},
                      inputs=[{"name": "wave", "shape": [2, 64], "dynamic": [0, 1]}],
                      tasks=[{"name": "a"}, {"name": "b"}], select={"layers": ["pos", "norm"]})
    out = tmp_path / "out"
    compile_and_verify(path, out)
    source = (out / "model.py").read_text()
    assert ('        self.pos = nn.ModuleDict({\n            task: weight_norm(nn.Conv1d(8, 8, 4, '
            'padding=2, groups=2), name="weight", dim=2)\n            for task in TASKS\n'
            ) in source
    assert ('self.mix = parametrize.register_parametrization(nn.Linear(8, 8), "weight", '
            'Symmetric())') in source
    assert "_restored" not in source and "Traced" not in source
    loaded = reconfx.load(out)
    assert "pos.a.parametrizations.weight.original1" in loaded.state_dict()
