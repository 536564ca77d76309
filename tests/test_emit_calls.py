"""model.py calls the submodules the surgery left untouched as modules, with the arguments
the model gave them (reconfx.calls), and writes out only what holds a branched layer."""

import re

import pytest
from safetensors import safe_open

from reconfx.facts import facts
from tests.support import compile_and_verify, write_spec


def compiled_call_net(tmp_path_factory, name, layers, **fields):
    folder = tmp_path_factory.mktemp(name)
    path = write_spec(folder, name, model={"factory": "tests.models:CallNet"},
                      inputs=[{"name": "x", "shape": [3, 8]}],
                      tasks=[{"name": "a"}, {"name": "b"}], select={"layers": layers}, **fields)
    compiled = compile_and_verify(path, folder / "out")  # I1-I4, parity after reload, ruff
    return compiled, folder / "out"


@pytest.fixture(scope="module")
def compiled_calls(tmp_path_factory):
    return compiled_call_net(tmp_path_factory, "calls", ["blocks.2.fc"])


def test_untouched_blocks_are_called_with_the_models_arguments(compiled_calls):
    _compiled, out = compiled_calls
    source = (out / "model.py").read_text()
    # Positional and keyword arguments as the model passed them (scale=1.0 is the default and
    # left out), the one item of the result that is used taken where the call is.
    assert "blocks_0 = self.blocks[0](pair_sub, float_, scale=0.5)[0]\n" in source
    assert "blocks_1 = self.blocks[1](blocks_0, float_)[0]\n" in source
    assert "        self.blocks = nn.ModuleList([CallBlock(8), CallBlock(8), CallBlock(8)])\n" \
        in source
    # The block holding the branched layer is called as itself on the task rows (its inputs
    # repeated once per task), its branched layer swapped in.
    assert "        self.blocks[2].fc = PerTask({task: nn.Linear(8, 8) for task in TASKS})\n" \
        in source
    assert "blocks_1_streams = torch.cat([blocks_1, blocks_1])\n" in source
    assert "float_streams = torch.cat([float_, float_])\n" in source
    assert ("blocks_2_mul_1, blocks_2_mean = self.blocks[2](blocks_1_streams, float_streams, "
            "scale=1.5)\n") in source


def test_a_leaf_is_called_without_the_arguments_its_defaults_give(tmp_path):
    """fx records a leaf's call as the model spelled it; model.py leaves out what the leaf's
    forward would take by default, and passes the rest as its signature lays them out."""
    path = write_spec(tmp_path, "defaults", model={"factory": "tests.models:DefaultsNet"},
                      inputs=[{"name": "x", "shape": [3, 8]}],
                      tasks=[{"name": "a"}, {"name": "b"}], select={"layers": ["fc"]})
    compiled = compile_and_verify(path, tmp_path / "out")
    assert compiled.prepared.traced.tier == "fx"
    source = (tmp_path / "out" / "model.py").read_text()
    assert "norm_a = self.norm(fc_a)\n" in source
    assert "norm_1_a = self.norm(norm_a, scale=2.0)\n" in source


def test_a_call_whose_arguments_cannot_be_told_apart_stays_written_out(compiled_calls):
    _compiled, out = compiled_calls
    source = (out / "model.py").read_text()
    assert "self.pair(" not in source and "self.pair.fc(x)" in source


def test_the_original_calls_the_same_submodules(compiled_calls):
    _compiled, out = compiled_calls
    original = (out / "original.py").read_text()
    assert "blocks_1 = self.blocks[1](blocks_0, float_)[0]\n" in original
    assert "blocks_2_mul_1, blocks_2_mean = self.blocks[2](blocks_1, float_, scale=1.5)\n" \
        in original


def test_calls_are_recorded_on_the_nodes_of_both_modes(compiled_calls):
    compiled, _out = compiled_calls
    for _mode, graph in compiled.prepared.traced.module.graphs():
        sites = {key for n in graph.nodes for key in facts(n).sites}
        paths = {re.sub(r"@\d+$", "", key) for key in sites}
        assert {"blocks.0", "blocks.1", "blocks.2"} <= paths and "pair" not in paths


@pytest.fixture(scope="module")
def compiled_copies(tmp_path_factory):
    return compiled_call_net(tmp_path_factory, "copies", ["blocks.2.*"])


def test_a_block_all_of_whose_layers_are_branched_is_copied_whole_per_task(compiled_copies):
    _compiled, out = compiled_copies
    source = (out / "model.py").read_text()
    assert 'TASKS = ("a", "b")\n' in source
    assert re.search(r"self\.blocks = nn\.ModuleList\(\[\s*CallBlock\(8\), CallBlock\(8\), "
                     r"nn\.ModuleDict\(\{task: CallBlock\(8\) for task in TASKS\}\)\s*\]\)",
                     source)
    # Each task's copy is called as the model called the block, after one branch-point comment.
    assert source.count("# branch point:") == 1
    # (its tuple result unpacked where it is made, as every item is used)
    for t in "ab":
        assert f"blocks_2_mul_1_{t}, blocks_2_mean_{t} = self.blocks[2].{t}(blocks_1, float_, " \
               "scale=1.5)\n" in source
    assert source.count("(nn.Module):") == 1  # no generated class: the original's own class
    # The weights file names each copy's tensors inside it.
    with safe_open(str(out / "weights.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"blocks.2.a.fc.weight", "blocks.2.b.norm.bias"} <= keys
    assert not any(k.startswith("blocks.2.fc") for k in keys)


def test_the_original_calls_the_block_the_model_copies(compiled_copies):
    _compiled, out = compiled_copies
    diff = (out / "branch.diff").read_text()
    changed = [line for line in diff.splitlines() if line[:1] in "+-" and line[:3] not in "+++---"]
    assert "-        blocks_2_mul_1, blocks_2_mean = self.blocks[2](blocks_1, float_, scale=1.5)" \
        in changed
    assert not [line for line in changed if "self.blocks[0](" in line or "Traced" in line]


@pytest.fixture(scope="module")
def compiled_stream(tmp_path_factory):
    # fc branched, the block's norm shared but run per task: a generated class
    return compiled_call_net(tmp_path_factory, "stream", ["blocks.2.fc"],
                             branch={"stream_batching": "off"})


def test_a_block_holding_branched_layers_is_a_generated_class(compiled_stream):
    _compiled, out = compiled_stream
    source = (out / "model.py").read_text()
    assert "class BranchedCallBlock(nn.Module):\n" in source
    # Its branched layers hold one copy per task; `task` picks the copy; it returns the two
    # values the model uses after it.
    assert 'TASKS = ("a", "b")\n' in source
    assert "self.fc = nn.ModuleDict({task: nn.Linear(8, 8) for task in TASKS})\n" in source
    assert "self.norm = nn.LayerNorm(8)\n" in source
    assert "def forward(self, x: torch.Tensor, mask: torch.Tensor, task: str) -> tuple[" in source
    assert "fc = self.fc[task](x)" in source and "norm = self.norm(mul)" in source
    assert "        return (mul_1, mean)\n" in source
    # The model builds it where the block was and calls it once per task stream, after the
    # branch point's comment.
    assert "        # branch point: blocks.2.fc (selected in the spec); one copy per task" in source
    built = "self.blocks = nn.ModuleList([CallBlock(8), CallBlock(8), BranchedCallBlock()])"
    assert built in source
    assert 'blocks_2_mul_1_a, blocks_2_mean_a = self.blocks[2](blocks_1, float_, "a")\n' in source
    assert 'blocks_2_mul_1_b, blocks_2_mean_b = self.blocks[2](blocks_1, float_, "b")\n' in source


def test_the_report_counts_the_generated_class(compiled_stream):
    _compiled, out = compiled_stream
    assert "- 1 as a class generated for a submodule run per task stream (its own modules " \
           "counted above): `blocks.2`\n" in (out / "report.md").read_text()


def test_the_original_writes_the_block_as_the_class_model_py_branches(compiled_stream):
    _compiled, out = compiled_stream
    original = (out / "original.py").read_text()
    assert "class TracedCallBlock(nn.Module):\n" in original
    assert "blocks_2_mul_1, blocks_2_mean = self.blocks[2](blocks_1, float_)\n" in original
    # The diff shows the surgery: per-task copies, the task argument, one call per stream.
    diff = (out / "branch.diff").read_text()
    assert "-        self.fc = nn.Linear(8, 8)\n" in diff
    assert "+        self.fc = nn.ModuleDict({task: nn.Linear(8, 8) for task in TASKS})\n" in diff
    assert "-        fc = self.fc(x)\n" in diff and "+        fc = self.fc[task](x)\n" in diff
    changed = [line for line in diff.splitlines() if line[:1] in "+-"]
    assert not [line for line in changed if "self.blocks[0](" in line or "Traced" in line[1:6]]


def test_each_stream_runs_as_one_stretch_in_the_compiled_graph(compiled_stream):
    """Dropout-free here, but the order is what makes random ops draw alike in the compiled
    graph and in the generated class: task a's ops of the block all come before task b's."""
    compiled, _out = compiled_stream
    graph = compiled.branched.module.train_graph
    tasks = [facts(n).task for n in graph.nodes
             if "blocks.2" in str(n.meta.get("nn_module_stack", {}))]
    first_b = tasks.index("b")
    assert "a" not in tasks[first_b:]


def test_blocks_that_trace_alike_share_one_generated_class(tmp_path):
    # Each block of the last stage holds a branched layer beside shared ones run per task.
    path = write_spec(tmp_path, "bottleneck",
                      model={"factory": "reconfx.zoo:BottleneckResNet",
                             "kwargs": {"width": 8, "blocks": [1, 1, 1, 3]}},
                      inputs=[{"name": "image", "shape": [2, 3, 32, 32]}],
                      tasks=[{"name": "left"}, {"name": "right"}],
                      select={"layers": ["layer4.0.conv1", "layer4.0.downsample.0",
                                         "layer4.1.conv2", "layer4.2.conv2"]},
                      branch={"stream_batching": "off"})
    compile_and_verify(path, tmp_path / "out")
    source = (tmp_path / "out" / "model.py").read_text()
    # The first block (with its downsample) and the two identical ones after it.
    assert source.count("(nn.Module):\n") == 3
    assert re.search(r"self\.layer4 = nn\.ModuleList\(\[\s*BranchedBottleneck\(\),\s*"
                     r"BranchedBottleneck2\(\),\s*BranchedBottleneck2\(\),?\s*\]\)", source)
    assert "        layer3 = self.layer3(layer2)\n" in source


def test_a_stage_all_of_whose_layers_are_branched_is_copied_whole(tmp_path):
    path = write_spec(tmp_path, "stage",
                      model={"factory": "reconfx.zoo:BottleneckResNet",
                             "kwargs": {"width": 8, "blocks": [1, 1, 1, 3]}},
                      inputs=[{"name": "image", "shape": [2, 3, 32, 32]}],
                      tasks=[{"name": "left"}, {"name": "right"}],
                      select={"layers": ["layer4.*"]})
    compile_and_verify(path, tmp_path / "out")
    source = (tmp_path / "out" / "model.py").read_text()
    assert source.count("(nn.Module):\n") == 1
    assert re.search(r"self\.layer4 = nn\.ModuleDict\(\{\s*task: nn\.Sequential\(\s*"
                     r"Bottleneck\(", source), source
    assert "        layer4_left = self.layer4.left(layer3)\n" in source
    assert "        layer4_right = self.layer4.right(layer3)\n" in source


def test_calls_of_a_module_lists_items_on_a_chain_are_a_loop(tmp_path):
    path = write_spec(tmp_path, "chain", model={"factory": "tests.models:ChainNet"},
                      inputs=[{"name": "x", "shape": [3, 8]}],
                      tasks=[{"name": "a"}, {"name": "b"}], select={"layers": ["blocks.3.*"]})
    compile_and_verify(path, tmp_path / "out")
    model_py, original_py = ((tmp_path / "out" / name).read_text()
                             for name in ("model.py", "original.py"))
    assert "        blocks = x\n        for layer in self.blocks[:3]:\n" \
           "            blocks = layer(blocks, float_)[0]\n" in model_py
    assert 'blocks_3_a = self.blocks[3].a(blocks, float_)[0]' in model_py
    assert "        blocks = x\n        for layer in self.blocks:\n" \
           "            blocks = layer(blocks, float_)[0]\n" in original_py


def test_a_block_the_source_cannot_build_whole_is_written_out(tmp_path):
    path = write_spec(tmp_path, "lambda", model={"factory": "tests.models:LambdaNet"},
                      inputs=[{"name": "x", "shape": [3, 8]}],
                      tasks=[{"name": "a"}, {"name": "b"}], select={"layers": ["neck"]})
    compile_and_verify(path, tmp_path / "out")
    source = (tmp_path / "out" / "model.py").read_text()
    assert "_from_factory" not in source and "self.block(" not in source
    assert "        block_fc = self.block.fc(x)\n" in source


def test_a_constant_the_tracer_lifted_stays_with_the_block_called_whole(tmp_path):
    path = write_spec(tmp_path, "const", model={"factory": "tests.models:ConstNet"},
                      inputs=[{"name": "x", "shape": [3, 8]}],
                      tasks=[{"name": "a"}, {"name": "b"}], select={"layers": ["neck"]})
    compiled = compile_and_verify(path, tmp_path / "out")
    assert any(k.startswith("_tensor_constant") for k in compiled.branched.module.state_dict())
    source = (tmp_path / "out" / "model.py").read_text()
    assert "        block = self.block(x)\n" in source and "_tensor_constant" not in source


def test_a_sequential_with_named_children_keeps_their_names(tmp_path):
    path = write_spec(tmp_path, "named", model={"factory": "tests.models:NamedSequentialNet"},
                      inputs=[{"name": "x", "shape": [3, 8]}],
                      tasks=[{"name": "a"}, {"name": "b"}], select={"layers": ["neck"]})
    compile_and_verify(path, tmp_path / "out")  # the weights load by name
    source = (tmp_path / "out" / "model.py").read_text()
    assert "        block = self.block(x)\n" in source and "fc=nn.Linear(8, 8)" in source
