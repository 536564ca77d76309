"""model.py for models written like third-party libraries (tests/library.py): every module built
by its own class, rebuilt structures verified down to their children, parity for any weights."""

import copy

import pytest
import torch
from torch import nn

from reconfx.build import example_inputs
from reconfx.checks import check_emit
from reconfx.emit.constructors import constructor, differences
from reconfx.emit.restore import restored, tensor_source
from reconfx.errors import CheckError
from reconfx.graph import unique_parameters
from reconfx.spec import InputSpec
from tests import library
from tests.support import compile_and_verify, write_spec

LAYERS = ["block.conv2.*", "attention.proj", "mixer", "scale"]


@pytest.fixture(scope="module")
def compiled_library(tmp_path_factory):
    folder = tmp_path_factory.mktemp("library")
    path = write_spec(folder, "library", model={"factory": "tests.library:LibraryNet"},
                      inputs=[{"name": "image", "shape": [2, 3, 8, 8]}],
                      tasks=[{"name": "a"}, {"name": "b"}], select={"layers": LAYERS})
    compile_and_verify(path, folder / "out")  # I1-I4 (I4 with perturbed weights), I6, ruff
    return folder / "out"


def test_library_modules_are_built_by_their_own_classes(compiled_library):
    source = (compiled_library / "model.py").read_text()
    names = ["BatchNormAct2d", "ConvNormAct", "LayerNorm2d", "MixerSettings", "ParsedScale",
             "RepConv", "ScaledMixer", "SqueezeExcite", "WindowAttention"]
    assert "from tests.library import (\n" + "".join(f"    {n},\n" for n in names) + ")\n" \
        in source
    for line in [
        # untouched submodules are built (and called) whole, by their own classes
        "self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), LayerNorm2d(16))",
        "self.stem_act = BatchNormAct2d(16, act_layer=nn.Hardswish)",  # the argument searched
        "self.block.conv1 = ConvNormAct(16, 16)",  # arguments found in the submodules
        "self.block.se = SqueezeExcite(16)",
        "    RepConv(16, act_layer=nn.SiLU),",
        "    task: ScaledMixer(MixerSettings(width=16, expansion=2, layer_scale=0.01))",
        # a block holding a branched layer keeps its class, the per-task layer swapped in
        "self.attention = WindowAttention(16, 2, 4)",
        "self.attention.proj = PerTask({task: nn.Linear(16, 16) for task in TASKS})",
    ]:
        assert f"        {line}\n" in source, line
    assert "        reps = self.reps(stem_act)\n" in source
    assert "        attention = self.attention(block_relu)\n" in source
    assert "_from_factory" not in source and "tests.library.LibraryNet" not in source


def test_a_module_no_constructor_call_rebuilds_is_restored_from_its_state(compiled_library):
    source = (compiled_library / "model.py").read_text()
    assert '''        self.scale = PerTask({
            task: _restored(
                ParsedScale,
                {"width": 16, "groups": 2},
                scale=nn.Parameter(torch.empty(16, 1, 1)),
            )
            for task in TASKS
        })''' in source
    # A re-parameterised block no longer matches what its constructor builds.
    assert """                RepConv,
                {},
                act=nn.ReLU(),
                reparam_conv=nn.Conv2d(16, 16, 3, padding=1),""" in source
    report = (compiled_library / "report.md").read_text()
    assert "## How model.py builds its modules\n\n- 11 by their own class's constructor\n" \
           "- 1 restored from their recorded attributes and tensors (no constructor call " \
           "rebuilds them): `scale`\n" in report


def test_emitted_class_runs_before_its_weights_load(compiled_library):
    from reconfx.artifacts import import_source

    model = import_source(compiled_library / "model.py", "Library")().eval()
    out = model(image=torch.rand(3, 3, 8, 8))
    assert {k: v.shape for k, v in out.items()} == {"a": (3, 3), "b": (3, 4)}


def test_a_rebuild_must_match_the_whole_subtree():
    """A norm layer rebuilt from its own attributes gets the default activation child: the
    comparison sees it, and the search finds the class argument that builds the right one."""
    hardswish = library.BatchNormAct2d(4, act_layer=nn.Hardswish)
    assert differences(hardswish, library.BatchNormAct2d(4)) == 1
    assert differences(hardswish, library.BatchNormAct2d(4, act_layer=nn.Hardswish)) == 0
    assert constructor(hardswish).call == "BatchNormAct2d(4, act_layer=nn.Hardswish)"
    assert constructor(library.BatchNormAct2d(4, apply_act=False)).call == \
        "BatchNormAct2d(4, apply_act=False)"


def test_a_required_argument_kept_under_another_name_is_found():
    assert constructor(library.LayerNorm2d(12, eps=1e-3)).call == "LayerNorm2d(12, eps=0.001)"


def test_restoring_needs_every_member_in_source_form():
    module = library.ParsedScale("4x3")
    assert constructor(module) is None
    assert restored(module, lambda name, value: None) is None
    built = restored(module, lambda name, value: "nn.Parameter(torch.ones(4, 1, 1))")
    assert (built.head, tuple(built.arguments())) == ("_restored", (
        "ParsedScale", '{"width": 4, "groups": 3}', "scale=nn.Parameter(torch.ones(4, 1, 1))"))


@pytest.mark.parametrize(("tensor", "source"), [
    (torch.arange(512).expand(1, -1), "torch.arange(512).view(1, 512)"),
    (torch.zeros(2, 3, dtype=torch.int64), "torch.zeros(2, 3, dtype=torch.int64)"),
    (torch.full((3,), 2.5), "torch.full((3,), 2.5)"),
    (torch.tensor([[1, 5], [2, 3]]), "torch.tensor([1, 5, 2, 3]).view(2, 2)"),
    (torch.ones(2, dtype=torch.bool), "torch.ones(2, dtype=torch.bool)"),
    (torch.randn(40), None),
])
def test_buffer_values_the_class_computes(tensor, source):
    assert tensor_source(tensor) == source
    if source is not None:
        assert torch.equal(eval(source, {"torch": torch}), tensor)  # noqa: S307


def test_emit_check_compares_with_the_original_for_other_weights():
    """An emitted model whose zero-initialised last norm got the wrong activation child computes
    the same function at the compiled weights (the norm's output is all zeros there), so only
    the comparison with perturbed weights tells it from the original (or, once trained, from
    the compiled model)."""
    torch.manual_seed(0)
    original = library.LibraryNet(width=8)
    wrong = copy.deepcopy(original)
    wrong.block.conv2.bn.act = nn.ReLU()
    examples = [example_inputs([InputSpec(name="image", shape=[2, 3, 8, 8])], seed=0)]
    want = original.eval()(**examples[0])
    assert all(torch.equal(want[t], wrong.eval()(**examples[0])[t]) for t in want)
    count = unique_parameters(original)
    paths = {"a": "a", "b": "b"}
    with pytest.raises(CheckError, match="perturbed, task 'a' differs from the original model"):
        check_emit(wrong, original, examples=examples, expected_params=count, original=original,
                   task_paths=paths)
    with pytest.raises(CheckError, match="perturbed, task 'a' differs from the compiled model"):
        check_emit(wrong, original, examples=examples, expected_params=count)
    right = copy.deepcopy(original)
    assert "perturbed" in check_emit(right, original, examples=examples, expected_params=count,
                                     original=original, task_paths=paths).detail
    assert all(torch.equal(p, q) for p, q in zip(original.parameters(), right.parameters(),
                                                  strict=True))  # weights restored


def test_a_module_restored_inside_a_submodule_built_whole_gets_the_helper(tmp_path):
    path = write_spec(tmp_path, "repstack", model={"factory": "tests.library:RepStack"},
                      inputs=[{"name": "image", "shape": [2, 3, 8, 8]}],
                      tasks=[{"name": "a"}, {"name": "b"}], select={"layers": ["neck"]})
    compile_and_verify(path, tmp_path / "out")  # model.py imports and runs
    source = (tmp_path / "out" / "model.py").read_text()
    assert "def _restored(cls: type" in source and "        body = self.body(image)\n" in source
    assert "            _restored(\n                RepConv," in source


def test_an_enum_member_that_is_a_str_is_written_as_the_member():
    from reconfx.emit.render import render_value
    from reconfx.emit.sources import sourced

    assert render_value(sourced(library.Layout.NHWC)) == "Layout.NHWC"
    assert render_value(sourced((library.Layout.NCHW, "NCHW"))) == '(Layout.NCHW, "NCHW")'


def test_a_list_whose_branched_item_runs_after_the_items_that_follow_it(tmp_path):
    path = write_spec(tmp_path, "scales", model={"factory": "tests.library:SplitScales"},
                      inputs=[{"name": "image", "shape": [2, 3, 8, 8]}],
                      tasks=[{"name": "a"}, {"name": "b"}],
                      select={"layers": ["stem", "convs.1"]})
    emitted = compile_and_verify(path, tmp_path / "out")
    assert emitted.prepared.traced.tier == "fx"
    source = (tmp_path / "out" / "model.py").read_text()
    assert """        self.convs = nn.ModuleList([
            nn.Conv2d(4, 4, 3, padding=1),
            PerTask({task: nn.Conv2d(4, 4, 3, padding=1) for task in TASKS}),
            nn.Conv2d(4, 4, 3, padding=1),
            nn.Conv2d(4, 4, 3, padding=1),
        ])""" in source


def test_an_item_inside_a_module_built_whole_is_reached_by_that_modules_own_containers():
    """A module built whole whose ops are written out (timm's RDNet, on task streams): the
    Sequential inside it has a gap among the items the graph calls (its activation is traced
    through), which must not make the access a dict's."""
    from reconfx.emit.tree import Tree, accessor

    mixer = library.GappedMixer(4)
    root = Tree()
    node = root.child("mixer")
    node.obj = mixer
    for index in ("0", "2", "4"):
        node.child("layers").child(index).obj = mixer.layers[int(index)]
    assert accessor(root, "mixer.layers.2") == "self.mixer.layers[2]"
    assert accessor(root, "mixer.layers.2.weight") == "self.mixer.layers[2].weight"
    heads = nn.ModuleDict({"0": nn.Linear(2, 2)})
    root.child("heads").obj = heads
    root.child("heads").child("0").obj = heads["0"]
    assert accessor(root, "heads.0") == 'self.heads["0"]'
