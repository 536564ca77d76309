"""ONNX export (I5): named inputs and per-task outputs, dynamic axes, onnxruntime parity with the
emitted PyTorch model, the exporter fallback, --task, providers, and nothing left on failure."""

import json

import numpy as np
import onnx
import pytest
import torch
import yaml

import reconfx
from reconfx.build import example_inputs
from reconfx.cli import main
from reconfx.emit import onnx as onnx_emit
from tests.support import listing, write_spec
from tests.test_hf_models import hf_spec
from tests.test_minilm import minilm_spec
from tests.test_sequence_models import encoder_spec


def with_onnx(spec, out):
    data = yaml.safe_load(spec.read_text())
    data["export"] = {"formats": ["python", "onnx"], "dir": str(out)}
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    return spec


def resnet_spec(tmp_path, tasks=("left", "right"), data=True):
    fields = dict(
        model={"factory": "reconfx.zoo:small_resnet",
               "kwargs": {"num_classes": 10, "width": 8, "tasks": list(tasks)}},
        inputs=[{"name": "image", "shape": [4, 1, 12, 12]}],
        tasks=[{"name": t} for t in tasks], select={"layers": ["layer3.*", "layer4.0.conv1"]})
    if data and len(tasks) == 2:
        fields["data"] = {"factory": "reconfx.data:multidigits", "kwargs": {"size": 64}}
    return with_onnx(write_spec(tmp_path, "onnx", **fields), tmp_path / "out")


def third_size(inputs):
    """Example inputs with every dynamic axis 3 longer: neither size the checks ran on."""
    return example_inputs([i.model_copy(update={"shape": [
        n + 3 * (axis in i.dynamic) for axis, n in enumerate(i.shape)]}) for i in inputs], seed=5)


def assert_exported(out, inputs, tasks, dynamic_axes, name="model.onnx", opset=18):
    """The file's interface and opset, and onnxruntime matching the emitted PyTorch model on
    inputs of another size than the export's."""
    proto = onnx.load(str(out / name))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == opset
    assert [i.name for i in proto.graph.input] == list(inputs)
    assert [o.name for o in proto.graph.output] == list(tasks)
    for i in proto.graph.input:
        dims = i.type.tensor_type.shape.dim
        assert {a for a, d in enumerate(dims) if d.dim_param} == set(dynamic_axes[i.name])
    run = reconfx.onnx_session(out / name)
    assert run.provider == "CPUExecutionProvider"
    model = reconfx.load(out).eval()
    with torch.no_grad():
        want = model(**inputs)
    got = run(**inputs)
    assert list(got) == list(tasks)
    for task in tasks:
        np.testing.assert_allclose(got[task], want[task].numpy(), rtol=1e-3, atol=1e-4)


def report_rows(out):
    text = (out / "report.md").read_text()
    section = text[text.index("## ONNX"):]
    section = section[:section.index("\n## ", 1)]
    return [line for line in section.splitlines() if line.startswith("| ") and "output" not in
            line]


@pytest.mark.parametrize("tasks", [("left", "right"), ("a", "b", "c")])
def test_resnet_exports_with_named_outputs_and_dynamic_batch(tmp_path, tasks):
    out = tmp_path / "out"
    compiled = reconfx.compile_spec(resnet_spec(tmp_path, tasks), out)
    assert (out / "model.onnx").is_file()
    assert json.loads((out / "manifest.json").read_text())["files"]["model.onnx"]["command"] \
        == "compile"
    # (layer3 on: the cost warning says most of the model runs once per task; nothing else)
    assert [w for w in compiled.warnings if not w.startswith("branching at 'layer3")] == []
    assert_exported(out, {"image": torch.randn(7, 1, 12, 12)}, tasks, {"image": [0]})
    rows = report_rows(out)
    cases = 3 if len(tasks) == 2 else 2  # example, second batch size, test data when present
    assert len(rows) == cases * len(tasks) and all(row.endswith("| yes |") for row in rows)
    assert any("test data, 16 items" in row for row in rows) == (len(tasks) == 2)


@pytest.mark.parametrize("case,tasks", [("encoder", 2), ("bert", 2), ("bert", 3), ("vit", 2),
                                        ("vit", 3), ("minilm", 2)])
def test_transformers_export(tmp_path, case, tasks):
    if case == "encoder":
        spec = encoder_spec(tmp_path, ["encoder.layers.1.*"])
        data = yaml.safe_load(spec.read_text())  # ONNX names must differ: input 'tokens'
        data["tasks"][0]["name"] = "per_token"
        data["model"]["kwargs"]["tasks"] = ["per_token", "sequence"]
        spec.write_text(yaml.safe_dump(data, sort_keys=False))
    elif case == "minilm":
        spec = minilm_spec(tmp_path, ["backbone.encoder.layer.5.*"])
    else:
        spec = hf_spec(tmp_path, case, tasks)
    out = tmp_path / "out"
    compiled = reconfx.compile_spec(with_onnx(spec, out), out)
    s = compiled.prepared.loaded.spec
    assert compiled.branched.layers
    dynamic = {i.name: i.dynamic for i in s.inputs}
    grown = third_size(s.inputs)  # other batch and length than the checks used
    assert_exported(out, grown, s.task_names, dynamic)


def test_export_command_one_task_and_report_section(tmp_path, capsys):
    spec = resnet_spec(tmp_path)
    out = tmp_path / "out"
    reconfx.compile_spec(spec, out)
    full = onnx.load(str(out / "model.onnx"))
    assert main(["export", str(spec), "--format", "onnx", "--task", "right"]) == 0
    printed = capsys.readouterr().out
    assert "I5 onnx parity" in printed and str(out / "model.right.onnx") in printed
    proto = onnx.load(str(out / "model.right.onnx"))
    assert [o.name for o in proto.graph.output] == ["right"]
    names = {t.name for t in proto.graph.initializer}
    # The left task's copies and head are gone; the right task's are there.
    assert not any(".left." in n or n.endswith(".left") for n in names)
    assert any(".right." in n for n in names)
    size = sum(int(np.prod(t.dims)) for t in proto.graph.initializer)
    assert size < sum(int(np.prod(t.dims)) for t in full.graph.initializer)
    assert_exported(out, {"image": torch.randn(3, 1, 12, 12)}, ["right"], {"image": [0]},
                    name="model.right.onnx")
    assert (out / "report.md").read_text().count("## ONNX") == 1
    manifest = json.loads((out / "manifest.json").read_text())["files"]
    assert manifest["model.right.onnx"]["command"] == "export"
    assert manifest["model.onnx"]["command"] == "compile"


def test_missing_provider_is_an_error_not_a_fallback(tmp_path, capsys):
    spec = resnet_spec(tmp_path)
    reconfx.compile_spec(spec, tmp_path / "out")
    before = (tmp_path / "out" / "model.onnx").read_bytes()
    assert main(["export", str(spec), "--provider", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "no CUDAExecutionProvider" in err and "onnxruntime-gpu" in err
    assert (tmp_path / "out" / "model.onnx").read_bytes() == before


def test_dynamo_failure_falls_back_to_torchscript_and_says_why(tmp_path, monkeypatch):
    real = onnx_emit._export

    def failing(exporter, *args, **kwargs):
        if exporter == "dynamo":
            raise RuntimeError("Unsupported: aten::made_up_op has no ONNX translation")
        return real(exporter, *args, **kwargs)

    monkeypatch.setattr(onnx_emit, "_export", failing)
    out = tmp_path / "out"
    reconfx.compile_spec(resnet_spec(tmp_path), out)
    report = (out / "report.md").read_text()
    assert "exported by the torchscript exporter" in report
    assert ("the dynamo exporter was tried first and not used: RuntimeError: Unsupported: "
            "aten::made_up_op has no ONNX translation") in report
    assert_exported(out, {"image": torch.randn(2, 1, 12, 12)}, ["left", "right"],
                    {"image": [0]})


def test_failed_check_is_an_error_and_keeps_earlier_files(tmp_path, capsys):
    spec = resnet_spec(tmp_path)
    out = tmp_path / "out"
    reconfx.compile_spec(spec, out)
    before = {name: (out / name).read_bytes() for name in listing(out)}
    data = yaml.safe_load(spec.read_text())
    data["export"]["onnx"] = {"atol": 0.0, "rtol": 0.0}  # float differences now fail the check
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    assert main(["compile", str(spec), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "no ONNX exporter produced a model that passes the checks" in err
    assert "dynamo: onnxruntime differs from PyTorch" in err
    assert "torchscript: onnxruntime differs from PyTorch" in err and "(atol 0, rtol 0)" in err
    assert {name: (out / name).read_bytes() for name in listing(out)} == before


def test_input_and_task_with_one_name_is_a_spec_error(tmp_path, capsys):
    spec = with_onnx(encoder_spec(tmp_path, ["encoder.layers.1.*"]), tmp_path / "out")
    assert main(["compile", str(spec), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{spec}: tasks: ONNX needs distinct input and output names, and 'tokens'" in err
    assert "rename the task" in err
    assert not (tmp_path / "out" / "model.py").exists()


def test_large_weights_go_to_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_emit, "EXTERNAL_DATA_BYTES", 0)  # as if the weights were > 2 GB
    out = tmp_path / "out"
    reconfx.compile_spec(resnet_spec(tmp_path, data=False), out)
    assert (out / "model.onnx.data").stat().st_size > (out / "model.onnx").stat().st_size
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer
               if np.prod(t.dims) > 1024)
    files = json.loads((out / "manifest.json").read_text())["files"]
    assert {"model.onnx", "model.onnx.data"} <= set(files)
    assert_exported(out, {"image": torch.randn(5, 1, 12, 12)}, ["left", "right"],
                    {"image": [0]})


def test_external_data_stays_external_when_the_opset_is_converted(tmp_path, monkeypatch):
    """At an opset below the one the exporter writes, the graph is converted without loading
    the weights (loaded, over 2 GB they would not fit one protobuf file)."""
    monkeypatch.setattr(onnx_emit, "EXTERNAL_DATA_BYTES", 0)
    out = tmp_path / "out"
    spec = with_onnx(write_spec(tmp_path, "blocks", model={"factory": "tests.models:WrappedBlocks",
                                                           "kwargs": {"width": 32}},
                                inputs=[{"name": "x", "shape": [2, 4]}],
                                tasks=[{"name": "a"}, {"name": "b"}],
                                select={"layers": ["trunk.1.blocks.3.fc2"]}), out)
    data = yaml.safe_load(spec.read_text())
    data["export"]["onnx"] = {"opset": 17}
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    reconfx.compile_spec(spec, out)
    assert "exported by the dynamo exporter" in (out / "report.md").read_text()
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert (out / "model.onnx.data").stat().st_size >= 5 * 32 * 32 * 4  # (each 32 x 32 weight)
    assert_exported(out, {"x": torch.randn(5, 4)}, ["a", "b"], {"x": [0]}, opset=17)


def test_an_op_without_onnx_translation_is_named(tmp_path, capsys):
    spec = with_onnx(write_spec(tmp_path, "svd", model={"factory": "tests.models:SingularValues"},
                                inputs=[{"name": "x", "shape": [4, 6]}],
                                tasks=[{"name": "p"}, {"name": "q"}],
                                select={"layers": ["fc"]}), tmp_path / "out")
    assert main(["compile", str(spec), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1  # one line, no graph dump
    assert "dynamo: " in err and "aten._linalg_svd" in err
    assert "torchscript: UnsupportedOperatorError: Exporting the operator 'aten::linalg_svdvals' " \
           "to ONNX opset version 18 is not supported" in err
    assert "replace that op" in err
    assert not (tmp_path / "out").exists() or not listing(tmp_path / "out")


def compiled_resnet(tmp_path):
    spec = resnet_spec(tmp_path)
    data = yaml.safe_load(spec.read_text())
    data["export"]["formats"] = ["python"]  # (the tests below export themselves)
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    reconfx.compile_spec(spec, tmp_path / "out")
    return spec, tmp_path / "out"


def onnx_section(out):
    text = (out / "report.md").read_text()
    return text[text.index("## ONNX"):]


@pytest.mark.parametrize("opset", list(onnx_emit.OPSETS))
def test_every_supported_opset_exports_checks_and_runs(tmp_path, opset):
    spec, out = compiled_resnet(tmp_path)
    assert main(["export", str(spec), "--opset", str(opset), "--quiet"]) == 0
    proto = onnx.load(str(out / "model.onnx"))
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {opset}
    assert_exported(out, {"image": torch.randn(5, 1, 12, 12)}, ["left", "right"],
                    {"image": [0]}, opset=opset)
    assert f"opset {opset}, fp32, optimisation none" in onnx_section(out)


@pytest.mark.parametrize("flags,needle", [
    (["--opset", "16"], "--opset: opset 16 is outside the supported range 17-21"),
    (["--opset", "22"], "outside the supported range 17-21"),
    (["--atol", "-1"], "--atol: atol must be a finite number >= 0"),
])
def test_unsupported_export_options_are_refused_before_any_work(tmp_path, capsys, flags,
                                                                needle):
    spec, out = compiled_resnet(tmp_path)
    assert main(["export", str(spec), *flags, "--quiet"]) == 2
    assert needle in capsys.readouterr().err and not (out / "model.onnx").exists()


def test_export_takes_the_output_folder_and_its_manifests_spec(tmp_path, capsys):
    spec, out = compiled_resnet(tmp_path)
    assert main(["export", str(out), "--quiet"]) == 0
    assert_exported(out, {"image": torch.randn(2, 1, 12, 12)}, ["left", "right"],
                    {"image": [0]})
    spec.write_text(spec.read_text() + "\n# edited\n")
    assert main(["export", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "changed since it wrote" in err and "reconfx export SPEC --out FOLDER" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", str(empty), "--quiet"]) == 2
    assert "without a readable manifest.json" in capsys.readouterr().err


def test_fp16_export_holds_float16_weights_and_stays_within_its_tolerance(tmp_path):
    spec, out = compiled_resnet(tmp_path)
    assert main(["export", str(spec), "--dtype", "fp16", "--quiet"]) == 0
    proto = onnx.load(str(out / "model.onnx"))
    kinds = {onnx.helper.tensor_dtype_to_np_dtype(t.data_type) for t in proto.graph.initializer
             if len(t.dims) > 1}
    assert kinds == {np.dtype("float16")}  # every weight matrix and kernel
    assert [i.type.tensor_type.elem_type for i in proto.graph.input] == [onnx.TensorProto.FLOAT]
    section = onnx_section(out)
    assert "opset 18, fp16" in section and "within atol 0.01, rtol 0.01" in section
    run = reconfx.onnx_session(out / "model.onnx")
    image = torch.randn(6, 1, 12, 12)
    with torch.no_grad():
        want = reconfx.load(out)(image=image)
    got = run(image=image)
    for task in ("left", "right"):
        assert got[task].dtype == np.float32
        np.testing.assert_allclose(got[task], want[task].numpy(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("level", ["O1", "O2", "O3"])
def test_optimised_exports_are_saved_and_still_match(tmp_path, level):
    spec, out = compiled_resnet(tmp_path)
    assert main(["export", str(spec), "--optimize", level, "--quiet"]) == 0
    section = onnx_section(out)
    assert f"optimisation {level}" in section and f"graph optimisations {level}" in section
    assert_exported(out, {"image": torch.randn(3, 1, 12, 12)}, ["left", "right"],
                    {"image": [0]})
    if level != "O1":  # (extended levels fuse convolutions with their activations)
        ops = {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
        assert "FusedConv" in ops or "Conv" in ops


def test_named_dynamic_axes_name_the_onnx_dimensions(tmp_path):
    spec = with_onnx(write_spec(
        tmp_path, "axes", model={"factory": "reconfx.zoo:EncoderClassifier",
                                 "kwargs": {"dim": 16, "tasks": ["tag", "cls"]}},
        inputs=[{"name": "tokens", "shape": [2, 8], "dtype": "int64", "high": 30,
                 "dynamic": {0: "batch", 1: "sequence"}}],
        tasks=[{"name": "tag"}, {"name": "cls"}], select={"layers": ["encoder.layers.1.*"]}),
        tmp_path / "out")
    reconfx.compile_spec(spec, tmp_path / "out")
    proto = onnx.load(str(tmp_path / "out" / "model.onnx"))
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "sequence"]


def test_the_reports_cpu_snippet_runs_the_file(tmp_path, monkeypatch):
    spec, out = compiled_resnet(tmp_path)
    assert main(["export", str(spec), "--quiet"]) == 0
    section = onnx_section(out)
    cpu = section.split("```python\n")[1].split("```")[0]
    gpu = section.split("```python\n")[2].split("```")[0]
    assert 'ort.OrtValue.ortvalue_from_numpy(image, "cuda", 0)' in gpu
    assert 'binding.bind_output("left", "cuda")' in gpu
    monkeypatch.chdir(out)
    scope: dict = {}
    exec(cpu, scope)  # noqa: S102 (the report's own lines)
    assert set(scope["outputs"]) == {"left", "right"}
    assert scope["image"].shape == (4, 1, 12, 12)  # the spec's example shape
    want = reconfx.onnx_session(out / "model.onnx")(image=scope["image"])
    for task in ("left", "right"):
        np.testing.assert_array_equal(scope["outputs"][task], want[task])


def test_a_bert_backbone_goes_through_onnxruntimes_transformer_optimizer(tmp_path, capsys):
    spec = hf_spec(tmp_path, "bert", 2)
    out = tmp_path / "out"
    reconfx.compile_spec(spec, out)
    assert main(["export", str(out), "--optimize", "O2"]) == 0  # (the folder names its spec)
    printed = capsys.readouterr().out
    section = onnx_section(out)
    line = next(x for x in section.splitlines() if "transformer optimizer" in x)
    assert line.startswith("- onnxruntime's transformer optimizer (bert, ")
    assert "transformer optimizer (bert" in printed
    s = reconfx.load_spec(spec)
    grown = third_size(s.inputs)
    assert_exported(out, grown, s.task_names, {i.name: i.dynamic for i in s.inputs})


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the check would run")
def test_the_gpu_check_exits_at_once_without_a_gpu():
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    started = time.perf_counter()
    done = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=root, capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable},
                          timeout=60, check=False)
    assert done.returncode == 2 and time.perf_counter() - started < 30
    assert "no CUDA GPU visible" in done.stderr and "nothing measured" in done.stderr
