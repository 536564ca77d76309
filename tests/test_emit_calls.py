"""model.py calls the submodules the surgery left untouched as modules, with the arguments
the model gave them (reconfx.calls), and writes out only what holds a branched layer."""

import re

import pytest

from tests.support import compile_and_verify, write_spec


@pytest.fixture(scope="module")
def compiled_calls(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calls")
    path = write_spec(folder, "calls", model={"factory": "tests.models:CallNet"},
                      inputs=[{"name": "x", "shape": [3, 8]}],
                      tasks=[{"name": "a"}, {"name": "b"}], select={"layers": ["blocks.2.fc"]})
    compiled = compile_and_verify(path, folder / "out")  # I1-I4, parity after reload, ruff
    return compiled, folder / "out"


def test_untouched_blocks_are_called_with_the_models_arguments(compiled_calls):
    _compiled, out = compiled_calls
    source = (out / "model.py").read_text()
    # Positional and keyword arguments as the model passed them (scale=1.0 is the default and
    # left out), the one item of the result that is used taken where the call is.
    assert "blocks_0 = self.blocks[0](pair_sub, float_, scale=0.5)[0]\n" in source
    assert "blocks_1 = self.blocks[1](blocks_0, float_)[0]\n" in source
    assert "        self.blocks[0] = CallBlock(8)\n" in source
    # The block holding the branched layer is written out, one stream per task.
    assert "self.blocks[2].fc.a(blocks_1)" in source and "self.blocks[2].norm(" in source


def test_a_call_whose_arguments_cannot_be_told_apart_stays_written_out(compiled_calls):
    _compiled, out = compiled_calls
    source = (out / "model.py").read_text()
    assert "self.pair(" not in source and "self.pair.fc(x)" in source


def test_the_original_calls_the_same_submodules(compiled_calls):
    _compiled, out = compiled_calls
    original = (out / "original.py").read_text()
    assert "blocks_1 = self.blocks[1](blocks_0, float_)[0]\n" in original
    assert "self.blocks[2].fc(blocks_1)" in original


def test_calls_are_recorded_on_the_nodes_of_both_modes(compiled_calls):
    compiled, _out = compiled_calls
    for _mode, graph in compiled.prepared.traced.module.graphs():
        sites = {key for n in graph.nodes for key in n.meta.get("reconfx", {}).get("sites", {})}
        paths = {re.sub(r"@\d+$", "", key) for key in sites}
        assert {"blocks.0", "blocks.1", "blocks.2"} <= paths and "pair" not in paths
