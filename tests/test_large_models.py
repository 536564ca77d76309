"""What lets a large backbone compile within about twice its weights' memory: the compiled model
shares every tensor it does not branch with the original, the checks and the weights file
stream tensors one at a time (reconfx.tensorfile), and the weights keep their dtype. The
billion-parameter measurement itself is a benchmark (bench/compile_scaling.py)."""

import pytest
import torch
from safetensors.torch import load_file, save_file

import reconfx
from reconfx.graph import named_tensors
from reconfx.tensorfile import Spill, read_header, read_tensors
from tests.support import compile_and_verify, write_spec

LLAMA = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)


def llama_folder(path, dtype):
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    LlamaModel(LlamaConfig(**LLAMA)).to(dtype).save_pretrained(path)
    return path


def llama_spec(tmp_path, folder, layers):
    return write_spec(tmp_path, "big", backbone={"hf": {"path": str(folder)},
                                                 "feature": "last_hidden_state"},
                      inputs=[{"name": "input_ids", "shape": [2, 8], "dtype": "int64",
                               "high": 100, "dynamic": [0, 1]}],
                      tasks=[{"name": "a", "head": {"out_features": 3}},
                             {"name": "b", "head": {"out_features": 2, "pool": "mean"}}],
                      select={"layers": layers})


def storages(module):
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for _, t in named_tensors(module) if t.untyped_storage().nbytes()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_compiled_model_copies_only_the_branched_layer(tmp_path, dtype):
    folder = llama_folder(tmp_path / "llama", dtype)
    emitted = compile_and_verify(llama_spec(tmp_path, folder, ["backbone.layers.1"]),
                                 tmp_path / "out")
    original, compiled = emitted.prepared.model, emitted.branched.module
    own = {p: n for p, n in storages(compiled).items() if p not in storages(original)}
    layer_bytes = sum(t.nbytes for n, t in original.named_parameters()
                      if n.startswith("backbone.layers.1."))
    assert sum(own.values()) == 2 * layer_bytes  # one copy per task, nothing else
    assert sum(layer.num_params for layer in emitted.branched.layers) * dtype.itemsize \
        == layer_bytes
    # model.py builds every module by its own class, whatever the dtype: the weights decide it
    report = (tmp_path / "out" / "report.md").read_text()
    assert "restored" not in report and "by their own class's constructor" in report
    # the weights keep their dtype, the heads take it, and load gives it back
    loaded = reconfx.load(tmp_path / "out")
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    assert {t.dtype for t in load_file(tmp_path / "out" / "weights.safetensors").values()
            if t.is_floating_point()} == {dtype}


def test_loading_keeps_ties_and_refuses_a_file_that_does_not_fit(tmp_path):
    folder = llama_folder(tmp_path / "llama", torch.float32)
    compile_and_verify(llama_spec(tmp_path, folder, ["backbone.layers.1"]), tmp_path / "out")
    weights = tmp_path / "out" / "weights.safetensors"
    tensors = load_file(weights)
    name = next(n for n in tensors if n.endswith("mlp.up_proj.weight"))
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, weights)
    from reconfx.artifacts import load_emitted

    with pytest.raises(reconfx.ReconfxError, match=f"does not fit Big in model.py: {name} is "
                       r"torch.float32 \(64, 31\), model.py builds torch.float32 \(64, 32\)"):
        load_emitted(tmp_path / "out", "Big")


def test_tensors_are_read_one_at_a_time_exactly(tmp_path):
    torch.manual_seed(0)
    tensors = {"a": torch.randn(3, 4).to(torch.bfloat16), "b": torch.arange(5),
               "c": torch.randn(()), "d": torch.zeros(0, 3), "e": torch.rand(2) > 0.5,
               "f": torch.randn(2, 2).half()}
    save_file(tensors, tmp_path / "t.safetensors", metadata={"format": "pt"})
    assert sorted(read_header(tmp_path / "t.safetensors")) == sorted(tensors)
    read = dict(read_tensors(tmp_path / "t.safetensors"))
    assert read.keys() == tensors.keys()
    for name, value in tensors.items():
        assert read[name].dtype == value.dtype and torch.equal(read[name], value), name
    assert [n for n, _ in read_tensors(tmp_path / "t.safetensors", ["f", "a"])] == ["f", "a"]
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-8])
    with pytest.raises(ValueError, match="the file ends before its tensors do"):
        dict(read_tensors(tmp_path / "cut.safetensors"))


def test_a_spill_restores_values_bit_for_bit():
    torch.manual_seed(0)
    base = torch.randn(6, 4)
    tensors = [torch.randn(5, 3).to(torch.bfloat16), torch.randn(()), base[:, 1],  # strided
               torch.nn.Parameter(torch.randn(4, 2)), torch.zeros(0)]
    before = [t.detach().clone() for t in tensors]
    with Spill(tensors) as spill, torch.no_grad():
        for t in tensors:
            t.mul_(3).add_(1)
        assert not torch.equal(tensors[0], before[0])
        spill.restore()
    for t, want in zip(tensors, before, strict=True):
        assert t.dtype == want.dtype and torch.equal(t, want)
    assert torch.equal(base[:, 1], before[2])  # (restored through the view)


class Plain(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.bn = torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)


class FromWeights(torch.nn.Module):
    """A constructor that computes a buffer from a parameter's values (a folded scale)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 3)
        self.register_buffer("scale", self.fc.weight.detach().abs().sum(), persistent=False)


class ReadsAValue(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 3)
        self.width = int(self.fc.weight.shape[0] + self.fc.bias.sum().item() * 0)


def test_classes_are_built_without_their_weights_unless_the_constructor_reads_them():
    from reconfx.artifacts import built_light

    light = built_light(Plain)
    assert light.fc.weight.is_meta and not light.bn.running_mean.is_meta
    for cls in (FromWeights, ReadsAValue):  # (meta tensors hold no values: built for real)
        assert not any(t.is_meta for t in [*built_light(cls).parameters(),
                                           *built_light(cls).buffers()]), cls.__name__
