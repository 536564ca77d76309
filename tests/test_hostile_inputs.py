"""Inputs a spec points at that could run code, exhaust memory or confuse the emitter: each is
refused in one line, or handled, before anything runs that the user did not ask for."""

from __future__ import annotations

import errno
import io
import json
import zipfile
from pathlib import Path

import pytest
import torch

from reconfx import commands
from reconfx.build import load_checkpoint
from reconfx.cli import main
from reconfx.errors import ModelError, OutputError
from tests.support import compile_and_verify, resnet_spec, write_spec


def cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, list[str], str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.err.splitlines(), captured.out


def objective_module(folder: Path, marker: Path) -> None:
    (folder / "my_objectives.py").write_text(
        f"open({str(marker)!r}, 'w').close()  # import-time code\n\n"
        "import torch\n\n\n"
        "def smooth_l1(output, target):\n"
        "    return torch.nn.functional.smooth_l1_loss(output, target)\n")


def test_validate_locates_a_loss_module_without_running_it(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "imported"
    objective_module(tmp_path, marker)
    monkeypatch.syspath_prepend(str(tmp_path))
    fields = dict(model={"factory": "reconfx.zoo:small_resnet"},
                  inputs=[{"name": "image", "shape": [2, 1, 12, 12]}],
                  data={"factory": "reconfx.data:multidigits"}, select={"layers": ["fc"]})
    good = write_spec(tmp_path, "good", tasks=[
        {"name": "left", "loss": "my_objectives:smooth_l1", "metric": "mae"},
        {"name": "right"}], **fields)
    code, err, out = cli(["validate", str(good)], capsys)
    assert code == 0 and out.startswith(f"{good}: ok")
    assert not marker.exists()
    bad = write_spec(tmp_path, "bad", tasks=[
        {"name": "left", "loss": "my_objectives:smooth_l2", "metric": "mae"},
        {"name": "right"}], **fields)
    code, err, _out = cli(["validate", str(bad)], capsys)
    assert code == 2 and err == [f"reconfx: error: {bad}: tasks[0].loss: 'my_objectives' "
                                 "defines no 'smooth_l2' (fix: check the name after ':')"]
    assert not marker.exists()


def remote_code_folder(tmp_path: Path, marker: Path) -> Path:
    from transformers import BertConfig

    folder = tmp_path / "remote"
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32)
    config.auto_map = {"AutoModel": "modeling_mine.MineModel"}
    config.save_pretrained(folder)
    (folder / "modeling_mine.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import BertModel\n\n\nclass MineModel(BertModel):\n    pass\n")
    return folder


def test_a_model_folder_that_ships_code_is_refused_without_a_prompt(tmp_path, capsys,
                                                                    monkeypatch):
    marker = tmp_path / "remote-code-ran"
    folder = remote_code_folder(tmp_path, marker)
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))  # (a prompt would read this)
    spec = write_spec(tmp_path, "remote", backbone={"hf": {"path": str(folder)},
                                                    "feature": "last_hidden_state"},
                      inputs=[{"name": "input_ids", "shape": [2, 8], "dtype": "int64",
                               "high": 50}],
                      tasks=[{"name": "a", "head": {"out_features": 2, "pool": "mean"}},
                             {"name": "b", "head": {"out_features": 3, "pool": "mean"}}],
                      select={"layers": ["backbone.encoder.layer.0.output.dense"]})
    code, err, out = cli(["compile", str(spec), "--out", str(tmp_path / "out"), "--quiet"],
                         capsys)
    assert code == 2 and len(err) == 1 and "[y/N]" not in out + err[0]
    assert "ships Python code of its own (its config's auto_map)" in err[0]
    assert "backbone.hf.trust_remote_code: true" in err[0]
    assert not marker.exists()


def bomb(path: Path, inflated: int) -> None:
    """A torch checkpoint whose first tensor's entry deflates to ``inflated`` zero bytes."""
    buffer = io.BytesIO()
    torch.save({"weight": torch.zeros(4, 4), "bias": torch.zeros(4)}, buffer)
    with zipfile.ZipFile(buffer) as source, zipfile.ZipFile(path, "w",
                                                            zipfile.ZIP_DEFLATED) as out:
        for info in source.infolist():
            data = source.read(info.filename)
            out.writestr(info.filename, bytes(inflated) if "/data/0" in info.filename else data)


def test_a_checkpoint_that_would_inflate_far_beyond_the_model_is_refused_unread(tmp_path):
    path = tmp_path / "bomb.pt"
    bomb(path, 200 << 20)
    assert path.stat().st_size < 1 << 20
    with pytest.raises(ModelError, match=r"would inflate to 209,715,\d+ bytes, more than 4x "
                                         r"the model's 80: it is not this model's checkpoint"):
        load_checkpoint(torch.nn.Linear(4, 4), path, "model.checkpoint")


def test_a_truncated_checkpoint_says_so(tmp_path):
    path = tmp_path / "cut.pt"
    torch.save(torch.nn.Linear(64, 64).state_dict(), path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ModelError, match=r"it is truncated or damaged \(torch's zip format, "
                                         r"but its directory of entries cannot be read\)"):
        load_checkpoint(torch.nn.Linear(64, 64), path, "model.checkpoint")


def test_a_full_disk_during_export_is_named_as_such(tmp_path, monkeypatch):
    out = tmp_path / "out"
    spec = resnet_spec(tmp_path, ["layer4.*"], out, "disk")
    commands.compile_spec(spec)
    before = json.loads((out / "manifest.json").read_text())

    def full(*_args, **_kwargs):
        raise RuntimeError("export failed") from OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("reconfx.emit.onnx._export", full)
    with pytest.raises(OutputError, match="cannot write model.onnx into .*: the disk is full"):
        commands.export_spec(spec)
    assert json.loads((out / "manifest.json").read_text()) == before


def test_a_spec_named_like_the_tasks_constant_compiles(tmp_path):
    out = tmp_path / "out"
    spec = resnet_spec(tmp_path, ["layer4.*"], out, "TASKS")
    compiled = compile_and_verify(spec, out)
    assert json.loads((out / "manifest.json").read_text())["class_name"] == "TASKSModel"
    assert "\nclass TASKSModel(nn.Module):" in (out / "model.py").read_text()
    assert compiled.checks


@pytest.mark.parametrize("task", ["__class__", "__init__", "__dict__", "_modules", "keys"])
def test_task_names_python_or_nn_module_reserve_are_refused(tmp_path, capsys, task):
    spec = write_spec(tmp_path, "reserved", model={"factory": "reconfx.zoo:small_resnet"},
                      inputs=[{"name": "image", "shape": [2, 1, 12, 12]}],
                      tasks=[{"name": task}, {"name": "right"}], select={"layers": ["fc"]})
    code, err, _out = cli(["validate", str(spec)], capsys)
    assert code == 2 and len(err) == 1
    assert f"'{task}' is reserved in Python or nn.ModuleDict; rename the task" in err[0]
