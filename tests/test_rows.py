"""model.py with the task streams carried as one tensor (reconfx/rows.py): early branch points
keep the model's own block classes with per-task layers swapped in, and the form is written
only where it computes what the compiled model does."""

import pytest
import torch
from torch import nn

import reconfx
from reconfx.pipeline import branch_checked, prepare
from reconfx.rows import PerTask, task_rows
from tests.support import compile_and_verify, write_spec

RECON_LIKE = ["conv1", "bn1", "layer1.0.*", "layer2.1.conv1", "layer3.0.conv2", "layer4.1.conv1"]


def rows_of(spec_path):
    """The task-rows form of a spec's compiled model, or None where it does not hold."""
    prepared = prepare(spec_path)
    branched = branch_checked(prepared).branched
    s = prepared.loaded.spec
    return task_rows(branched, traced=prepared.traced.module, model=prepared.model,
                     examples=prepared.examples,
                     batch_inputs=[i.name for i in s.inputs if 0 in i.dynamic])


def test_per_task_runs_each_tasks_module_on_its_rows():
    torch.manual_seed(0)
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.randn(4, 3)
    layer = PerTask({"a": a, "b": b})
    assert torch.equal(layer(torch.cat([x, y])), torch.cat([a(x), b(y)]))
    # every tensor argument is split, other arguments passed as they are; tuples joined again
    pair = PerTask({"a": nn.MultiheadAttention(3, 1, batch_first=True),
                    "b": nn.MultiheadAttention(3, 1, batch_first=True)})
    q = torch.randn(4, 5, 3)
    out, weights = pair(q, q, q, need_weights=True)
    want = [m(q[i:i + 2], q[i:i + 2], q[i:i + 2], need_weights=True)
            for m, i in zip(pair.values(), (0, 2), strict=True)]
    assert torch.equal(out, torch.cat([w[0] for w in want]))
    assert torch.equal(weights, torch.cat([w[1] for w in want]))


@pytest.fixture(scope="module")
def resnet18_early(tmp_path_factory):
    folder = tmp_path_factory.mktemp("r18")
    path = write_spec(folder, "r18", model={"factory": "reconfx.zoo:resnet18"},
                      inputs=[{"name": "image", "shape": [2, 1, 36, 36]}],
                      tasks=[{"name": "left"}, {"name": "right"}],
                      select={"layers": RECON_LIKE}, export={"formats": ["python"]})
    compiled = compile_and_verify(path, folder / "out")  # I1-I4 (perturbed), I6, ruff
    return compiled, folder / "out"


def test_an_early_selection_keeps_the_blocks_as_their_own_classes(resnet18_early):
    _compiled, out = resnet18_early
    source = (out / "model.py").read_text()
    init = source[source.index("    def __init__(self) -> None:"):source.rindex("    def forward(")]
    forward = source[source.rindex("    def forward("):]
    # Each stage built by its own classes, the per-task layers swapped in after it; a block all
    # of whose layers are branched is one copy per task of the whole block.
    assert "        self.layer1 = nn.Sequential(BasicBlock(64, 64), BasicBlock(64, 64))\n" in init
    assert ("        self.layer1[0] = PerTask({task: BasicBlock(64, 64) for task in TASKS})\n"
            in init)
    assert "        self.layer2[1].conv1 = PerTask({\n" in init
    assert "        self.layer2[0].downsample[1] = per_task_statistics(" \
           "self.layer2[0].downsample[1])\n" in init
    # The stages are called whole, on the task rows; the streams split only for the heads.
    for line in ["image_streams = torch.cat([image, image])", "layer1 = self.layer1(maxpool)",
                 "layer4 = self.layer4(layer3)", "flatten_by_task = flatten.unflatten(0, (2, -1))",
                 "flatten_left, flatten_right = flatten_by_task.unbind()",
                 "heads_left = self.heads.left(flatten_left)"]:
        assert f"        {line}\n" in forward, line
    # No region written twice, no mode or row-cap branch, no generated class.
    assert "self.training" not in forward and "fits(" not in source
    assert source.count("(nn.Module):") == 1 and source.count("(nn.ModuleDict):") == 1
    # Reviewable: within the targets of bench/emission.py (428 / 534 lines per stream).
    diff = (out / "branch.diff").read_text()
    assert len(source.splitlines()) <= 200 and len(diff.splitlines()) <= 150
    report = (out / "report.md").read_text()
    assert "the forward carries the task streams as one tensor" in report


def test_the_loaded_model_runs_each_task_on_its_own_copies(resnet18_early):
    """Task t's output depends on task t's copies only, also through the shared layers."""
    _compiled, out = resnet18_early
    model = reconfx.load(out).eval()
    image = torch.randn(3, 1, 36, 36)
    with torch.no_grad():
        before = model(image=image)
        model.layer1[0].right.conv1.weight.mul_(2.0)
        after = model(image=image)
    assert torch.equal(before["left"], after["left"])
    assert not torch.equal(before["right"], after["right"])


def test_a_whole_stage_of_branched_layers_is_one_per_task_copy(tmp_path):
    path = write_spec(tmp_path, "stage", model={"factory": "reconfx.zoo:resnet18",
                                                "kwargs": {"tasks": ["a", "b", "c"]}},
                      inputs=[{"name": "image", "shape": [2, 1, 36, 36]}],
                      tasks=[{"name": "a"}, {"name": "b"}, {"name": "c"}],
                      select={"layers": ["conv1", "layer4.*"]}, export={"formats": ["python"]})
    compile_and_verify(path, tmp_path / "out")
    source = (tmp_path / "out" / "model.py").read_text()
    assert """        self.layer4 = PerTask({
            task: nn.Sequential(BasicBlock(256, 512, stride=2), BasicBlock(512, 512))
            for task in TASKS
        })""" in source
    assert "        image_streams = torch.cat([image, image, image])\n" in source
    assert "        flatten_by_task = flatten.unflatten(0, (3, -1))\n" in source
    assert "        flatten_a, flatten_b, flatten_c = flatten_by_task.unbind()\n" in source


@pytest.mark.parametrize(("model", "inputs", "tasks", "layers", "branch"), [
    # a softmax over the batch axis after the branch point: joined rows mix the tasks
    ({"factory": "tests.models:BatchMixing", "kwargs": {}}, [{"name": "x", "shape": [6, 16]}],
     ["a", "b"], ["fc1"], {}),
    # Recon's shared statistics: a shared BatchNorm in training sees every task's rows at once
    ({"factory": "reconfx.zoo:small_resnet", "kwargs": {}},
     [{"name": "image", "shape": [4, 1, 12, 12]}], ["left", "right"], ["layer2.0.conv1"],
     {"norm_stats": "shared"}),
], ids=["batch-mixing", "shared-statistics"])
def test_the_rows_form_is_refused_where_it_computes_something_else(tmp_path, model, inputs,
                                                                   tasks, layers, branch):
    path = write_spec(tmp_path, "refused", model=model, inputs=inputs,
                      tasks=[{"name": t} for t in tasks], select={"layers": layers},
                      branch=branch, export={"formats": ["python"]})
    assert rows_of(path) is None
    compile_and_verify(path, tmp_path / "out")  # the per-stream form, I1-I4
    assert "class PerTask(" not in (tmp_path / "out" / "model.py").read_text()


def test_one_random_op_after_the_branch_point_draws_the_same_on_rows(tmp_path):
    """Attention dropout once after the branch point: the form holds in training too."""
    path = write_spec(tmp_path, "dropout", model={"factory": "tests.models:TokenAttention",
                                                  "kwargs": {"dropout": 0.1}},
                      inputs=[{"name": "patches", "shape": [2, 6, 4]}],
                      tasks=[{"name": t} for t in "abc"], select={"layers": ["patch"]},
                      export={"formats": ["python"]})
    assert rows_of(path) is not None
    compile_and_verify(path, tmp_path / "out")  # I4 compares train mode from one seed
    source = (tmp_path / "out" / "model.py").read_text()
    assert "class PerTask(" in source and "dropout=0.1" in source


def test_dropouts_one_after_another_on_the_rows_are_compared_with_every_mask_kept(tmp_path):
    """Several dropouts after the branch point draw their masks over all rows at once, where
    the compiled model draws one per task stream: the order of the draws differs, their
    distribution does not (element by element). The form is checked, and I4 compares train
    mode, with every mask keeping every element; the dropout scale still counts, so a wrong p
    is caught."""
    from reconfx.modes import kept_masks, run

    path = write_spec(tmp_path, "drops", model={"factory": "tests.models:DropoutStack"},
                      inputs=[{"name": "x", "shape": [3, 4]}],
                      tasks=[{"name": "a"}, {"name": "b"}], select={"layers": ["blocks.0.fc"]},
                      export={"formats": ["python"]})
    rows, _eager = rows_of(path)
    compiled = compile_and_verify(path, tmp_path / "out")
    report = (tmp_path / "out" / "report.md").read_text()
    assert "carries the task streams as one tensor" in report
    assert "train mode (dropout masks keeping every element)" in report
    source = (tmp_path / "out" / "model.py").read_text()
    assert "class PerTask(" in source and source.count("DropoutBlock(8, 0.25)") == 3
    example = compiled.prepared.examples[0]
    with kept_masks() as kept:
        want = run(compiled.branched.module, example, True)
        assert kept.kept == 2 * 3 * 2  # two dropouts per block, per task stream
        got = run(rows, example, True)
        for task in want:
            torch.testing.assert_close(got[task], want[task], rtol=0, atol=1e-5)
        rows.get_submodule("blocks.2.drop").p = 0.5
        assert not torch.allclose(want["a"], run(rows, example, True)["a"])


@pytest.mark.parametrize("tier", ["fx", "export"])
def test_a_branched_module_whose_tensors_the_graph_reads_is_swapped_in_whole(tmp_path, tier):
    """The first block's norm (a class of the user's own, traced through: the graph reads its
    weight) branched: on task rows it is one PerTask of whole copies of the norm, called
    where the model calls it, and every block is called whole by its class."""
    path = write_spec(tmp_path, "norms", model={"factory": "tests.models:NormBlocks"},
                      inputs=[{"name": "x", "shape": [3, 4]}],
                      tasks=[{"name": "a"}, {"name": "b"}], select={"layers": ["blocks.0.norm"]},
                      trace={"tier": tier}, export={"formats": ["python"]})
    rows, eager = rows_of(path)
    assert isinstance(eager.blocks[0].norm, PerTask)
    assert "blocks.0.norm" in {str(n.target) for n in rows.train_graph.nodes
                               if n.op == "call_module"}
    compile_and_verify(path, tmp_path / "out")
    source = (tmp_path / "out" / "model.py").read_text()
    assert "self.blocks[0].norm = PerTask({task: RMSNorm(8) for task in TASKS})" in source
    forward = source[source.rindex("    def forward("):]
    assert "        for layer in self.blocks:\n            blocks = layer(blocks)\n" in forward
    assert "rsqrt" not in forward and len(source.splitlines()) < 70


def test_embeddings_all_branched_are_one_per_task_copy_fed_the_rows(tmp_path):
    """Every layer of the embeddings branched: the position table, looked up with ids that
    have no batch axis, has no rows to split, so the embeddings module (all of whose state is
    branched) is swapped in whole, fed the token rows."""
    path = write_spec(tmp_path, "embed", model={"factory": "tests.models:PositionEncoder"},
                      inputs=[{"name": "tokens", "shape": [3, 6], "dtype": "int64",
                               "high": 20, "dynamic": [0, 1]}],
                      tasks=[{"name": "a"}, {"name": "b"}], select={"layers": ["embed.*"]},
                      export={"formats": ["python"]})
    _rows, eager = rows_of(path)
    assert isinstance(eager.embed, PerTask) and not isinstance(eager.embed.a.positions, PerTask)
    compile_and_verify(path, tmp_path / "out")
    source = (tmp_path / "out" / "model.py").read_text()
    assert "self.embed = PerTask({task: TokenEmbeddings(20, 8, 16) for task in TASKS})" in source
    assert "        embed = self.embed(tokens_streams)\n" in source
    assert "# branch point: embed.positions (selected in the spec)" in source  # (looked up first)


def test_stream_batching_off_keeps_the_streams_apart(tmp_path):
    path = write_spec(tmp_path, "apart", model={"factory": "reconfx.zoo:small_resnet",
                                                "kwargs": {"width": 8}},
                      inputs=[{"name": "image", "shape": [2, 1, 12, 12]}],
                      tasks=[{"name": "left"}, {"name": "right"}],
                      select={"layers": ["conv1"]}, branch={"stream_batching": "off"},
                      export={"formats": ["python"]})
    assert rows_of(path) is not None  # (it would hold)
    compile_and_verify(path, tmp_path / "out")
    source = (tmp_path / "out" / "model.py").read_text()
    assert "class PerTask(" not in source and "conv1_left = self.conv1.left(image)" in source


def test_one_tasks_model_holds_none_of_the_other_tasks_copies(resnet18_early):
    """For an export of one task: the streams entering once, that task's modules only."""
    from reconfx.rows import one_task

    compiled, out = resnet18_early
    model = reconfx.load(out).eval()
    examples = compiled.prepared.examples
    reduced = one_task(model, "right", examples)
    assert reduced is not model
    with torch.no_grad():
        for example in examples:
            assert set(reduced(**example)) == {"right"}
            torch.testing.assert_close(reduced(**example)["right"], model(**example)["right"],
                                       rtol=0, atol=1e-5)
    used = {name for name, _p in reduced.named_parameters()}
    cats = [n for n in reduced.graph.nodes if n.target is torch.cat]
    assert not cats and not any(".left" in name or "heads.left" in name for name in used)



def test_the_innermost_block_holding_the_branch_point_runs_whole_on_the_rows(tmp_path):
    """The last block's second linear branched: that block (trunk.1.blocks.3) runs whole on
    the task rows, its input repeated where it enters (so model.py can call it by its class),
    its part before the branched layer run for every task; the blocks before it, and the
    Sequential item holding them all, still run once."""
    import torch

    path = write_spec(tmp_path, "wrapped", model={"factory": "tests.models:WrappedBlocks"},
                      inputs=[{"name": "x", "shape": [2, 4]}],
                      tasks=[{"name": "a"}, {"name": "b"}],
                      select={"layers": ["trunk.1.blocks.3.fc2"]})
    rows, _eager = rows_of(path)
    (fork,) = [n for n in rows.train_graph.nodes if n.target is torch.cat]
    # (the block's input feeds its norm and its residual add)
    assert "trunk.1.blocks.3.norm" in {str(u.target) for u in fork.users} and len(fork.users) == 2
    order = list(rows.train_graph.nodes)
    at = {str(n.target): order.index(n) for n in order if n.op == "call_module"}
    assert at["trunk.1.blocks.2.fc2"] < order.index(fork) < at["trunk.1.blocks.3.norm"]


def test_a_copy_per_task_whose_norm_shares_its_parameters_is_swapped_in_layer_by_layer(
        tmp_path):
    """The stem and a block's downsampling convolution branched: the downsample's BatchNorm
    keeps one set of parameters with per-task statistics, so a copy per task of the whole
    downsample would hold its parameters twice once model.py builds it. model.py swaps the
    convolution and the norm in one by one, and the parameter count is exact (I4)."""
    path = write_spec(tmp_path, "ds", model={"factory": "reconfx.zoo:small_resnet",
                                             "kwargs": {"width": 8}},
                      inputs=[{"name": "image", "shape": [2, 1, 12, 12]}],
                      tasks=[{"name": "left"}, {"name": "right"}],
                      select={"layers": ["conv1", "layer3.0.downsample.0"]},
                      export={"formats": ["python"]})
    compile_and_verify(path, tmp_path / "out")  # (I4 compares the parameter counts)
    source = (tmp_path / "out" / "model.py").read_text()
    assert "self.layer3[0].downsample[1] = per_task_statistics(" in source
    assert "self.layer3[0].downsample = PerTask(" not in source
