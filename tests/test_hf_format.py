"""The Hugging Face format: an output folder that transformers' AutoModel.from_pretrained loads
(trust_remote_code), also where reconfx cannot be imported, with sharded weights above a size,
a model card, and `reconfx export DIR --format hf` for a folder compiled before."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml

import reconfx
from reconfx.cli import main
from tests.support import resnet_spec, write_spec

MINILM = dict(backbone={"factory": "reconfx.zoo:minilm", "feature": "last_hidden_state"},
              inputs=[{"name": "input_ids", "shape": [2, 8], "dtype": "int64", "high": 30522,
                       "dynamic": [0, 1]}],
              tasks=[{"name": "ner", "head": {"out_features": 9}},
                     {"name": "sentiment", "head": {"out_features": 2, "pool": "mean"}}],
              select={"layers": ["backbone.encoder.layer.5"]})

BLOCK_RECONFX = """
import sys

class NoReconfx:
    def find_spec(self, name, path=None, target=None):
        if name == "reconfx" or name.startswith("reconfx."):
            raise ImportError("reconfx is not installed here")

sys.meta_path.insert(0, NoReconfx())
"""


@pytest.mark.parametrize("source", ["factory", "hf"])
def test_a_folder_in_the_hf_format_loads_without_reconfx(tmp_path, source):
    """From a backbone given by factory and one given by hf: (a folder), the output folder
    loads with AutoModel in a process that cannot import reconfx, computes what reconfx.load's
    model does bit for bit, and save_pretrained of it loads again the same."""
    from reconfx.zoo import minilm_path

    out = tmp_path / "out"
    fields = dict(MINILM)
    if source == "hf":
        fields["backbone"] = {"hf": {"path": str(minilm_path())}, "feature": "last_hidden_state"}
    spec = write_spec(tmp_path, "minilm-hf", export={"formats": ["python", "hf"],
                                                     "dir": str(out)}, **fields)
    assert main(["compile", str(spec), "--quiet"]) == 0
    for name in ("config.json", "configuration_reconfx.py", "modeling_reconfx.py",
                 "model.safetensors", "README.md"):
        assert (out / name).is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"config.json", "model.safetensors", "README.md"} <= set(manifest["files"])
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_reconfx.MinilmHfForMultiTask"
    assert config["tasks"] == ["ner", "sentiment"] and config["inputs"] == ["input_ids"]
    ids = torch.randint(0, 30522, (3, 11))
    torch.save(ids, tmp_path / "ids.pt")
    script = BLOCK_RECONFX + textwrap.dedent(f"""
        import torch
        from transformers import AutoModel

        model = AutoModel.from_pretrained({str(out)!r}, trust_remote_code=True,
                                          local_files_only=True)
        assert not model.training
        with torch.no_grad():
            outputs = model(input_ids=torch.load({str(tmp_path / 'ids.pt')!r}))
        assert not any(name.startswith("reconfx") for name in sys.modules)
        torch.save(dict(outputs), {str(tmp_path / 'outputs.pt')!r})
        model.save_pretrained({str(tmp_path / 'resaved')!r})
        again = AutoModel.from_pretrained({str(tmp_path / 'resaved')!r},
                                          trust_remote_code=True, local_files_only=True)
        with torch.no_grad():
            repeated = again(input_ids=torch.load({str(tmp_path / 'ids.pt')!r}))
        assert all(torch.equal(repeated[t], outputs[t]) for t in outputs)
    """)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = torch.load(tmp_path / "outputs.pt")
    with torch.no_grad():
        want = reconfx.load(out)(input_ids=ids)
    assert list(got) == ["ner", "sentiment"]
    assert all(torch.equal(got[task], want[task]) for task in want)
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "AutoModel.from_pretrained(" in card and "## Branched layers" in card
    assert "`backbone.encoder.layer.5.output.dense`" in card and "## Checks" in card


def test_weights_above_the_shard_size_are_sharded_with_an_index(tmp_path):
    out = tmp_path / "out"
    spec = resnet_spec(tmp_path, ["layer4.*"], out, "shards")
    fields = yaml.safe_load(spec.read_text())
    fields["export"] = {"dir": str(out), "formats": ["python", "hf"],
                        "hf": {"max_shard_mb": 0.05}}
    spec.write_text(yaml.safe_dump(fields))
    assert main(["compile", str(spec), "--quiet"]) == 0  # (its check loads the shards)
    shards = sorted(p.name for p in out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert not (out / "model.safetensors").exists()


def test_export_writes_the_hf_format_for_a_folder_compiled_before(tmp_path, capsys):
    out = tmp_path / "out"
    spec = resnet_spec(tmp_path, ["layer4.*"], out, "later")
    assert main(["compile", str(spec), "--quiet"]) == 0
    assert main(["export", str(out), "--format", "hf", "--quiet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"]["config.json"]["command"] == "export"
    assert manifest["files"]["model.py"]["command"] == "compile"
    assert main(["export", str(out), "--format", "hf", "--task", "left", "--quiet"]) == 2
    assert "--task apply to --format onnx only" in capsys.readouterr().err
