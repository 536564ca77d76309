"""Each pass on one small model, called directly (no spec, no output folder), with the graph
listing it produces: the walk-through of docs/passes.md, kept true by this test."""

import pytest
import torch
from torch import nn

import reconfx
from reconfx import kinds
from reconfx.batching import batch_streams
from reconfx.graph import collapse, listing
from reconfx.spec import SelectSpec
from reconfx.streams import regions_of


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.a, self.b = nn.Linear(8, 2), nn.Linear(8, 3)

    def forward(self, x):
        h = self.fc3(self.fc2(torch.relu(self.fc1(x))))
        return {"a": self.a(h), "b": self.b(h)}


def test_trace_select_branch_batch_emit_on_one_small_model():
    torch.manual_seed(0)
    model, example = TwoHeads(), {"x": torch.randn(2, 4)}

    # trace: one fx graph (train and eval are the same here), output {task: tensor}
    traced = reconfx.trace(model, example, {"a": "a", "b": "b"})
    assert traced.tier == "fx" and not traced.module.dual
    assert listing(traced.module.train_graph) == [
        "x = input", "fc1 = fc1(x)", "relu = relu(fc1)", "fc2 = fc2(relu)", "fc3 = fc3(fc2)",
        "a = a(fc3)", "b = b(fc3)", "return {'a': a, 'b': b}"]

    # inventory: every layer with the tasks that use it; the trunk is shared
    layers = reconfx.inventory(traced.module, ["a", "b"])
    assert [(x.name, x.tasks, x.shared) for x in layers] == [
        ("fc1", ("a", "b"), True), ("fc2", ("a", "b"), True), ("fc3", ("a", "b"), True),
        ("a", ("a",), False), ("b", ("b",), False)]

    # select: here by name (score policies rank by a profile's conflict counts)
    chosen = reconfx.select(layers, SelectSpec(layers=["fc2"]))
    assert [x.name for x in chosen] == ["fc2"]

    # branch: fc2 becomes one copy per task; everything after it runs once per task stream
    branched = reconfx.branch(traced.module, chosen, ["a", "b"])
    assert listing(branched.module.train_graph) == [
        "x = input", "fc1 = fc1(x)", "relu = relu(fc1)", "fc2 = fc2.a(relu)",
        "fc2_1 = fc2.b(relu)", "fc3 = fc3(fc2)", "fc3_1 = fc3(fc2_1)", "a = a(fc3)",
        "b = b(fc3_1)", "return {'a': a, 'b': b}"]
    copies = branched.module.fc2
    assert torch.equal(copies.a.weight, model.fc2.weight)
    assert torch.equal(copies.b.weight, model.fc2.weight)
    assert copies.a.weight is not copies.b.weight

    # stream batching: in eval mode the shared fc3 runs once on both streams joined
    batched = batch_streams(branched.module, example, ["x"])
    assert listing(batched.eval_graph) == [
        "x = input", "fc1 = fc1(x)", "relu = relu(fc1)", "fc2 = fc2.a(relu)",
        "fc2_1 = fc2.b(relu)",
        "stream_regions_shared_fc3 = stream_regions.shared_fc3(fc2, fc2_1)",
        "getitem = getitem(stream_regions_shared_fc3, 0)",
        "getitem_1 = getitem(stream_regions_shared_fc3, 1)", "a = a(getitem)",
        "b = b(getitem_1)", "return {'a': a, 'b': b}"]
    assert listing(batched.train_graph) == listing(branched.module.train_graph)
    (region,) = regions_of(batched)
    assert listing(region.body) == ["fc2 = input", "fc3 = fc3(fc2)", "return (fc3,)"]
    batched.eval()
    got, want = batched(**example), model.eval()(**example)
    for task in ("a", "b"):
        torch.testing.assert_close(got[task], want[task], rtol=0, atol=1e-6)

    # emit: the source a reviewer reads; training takes the streams one by one
    source = reconfx.emit_python(batched, "TwoHeadsBranched", doc="doc",
                                 task_containers=branched.containers).source
    forward = source[source.index("    def forward("):]
    assert forward == '''    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        fc1 = self.fc1(x)
        relu = torch.relu(fc1)
        # branch point: fc2; one copy per task from here
        fc2_a = self.fc2.a(relu)
        fc2_b = self.fc2.b(relu)
        if self.training or not fits(2 * fc2_a.shape[0], self.stream_rows["shared_fc3"]):
            fc3_a = self.fc3(fc2_a)
            fc3_b = self.fc3(fc2_b)
        else:
            # fc3: shared; the task streams a, b run joined along the batch axis
            #   (stream batching)
            fc2 = torch.cat([fc2_a, fc2_b])
            fc3 = self.fc3(fc2)
            fc3_a, fc3_b = fc3.unflatten(0, (2, -1)).unbind()
        a_a = self.a(fc3_a)
        b_b = self.b(fc3_b)
        return {"a": a_a, "b": b_b}
'''
    assert "self.fc2 = nn.ModuleDict({task: nn.Linear(8, 8) for task in TASKS})" in source

    # each pass's docstring sketches these listings (Before/After), so the sketch cannot drift
    assert sketch(reconfx.branch) == (listing(traced.module.train_graph),
                                      listing(branched.module.train_graph))
    assert sketch(batch_streams) == (listing(branched.module.eval_graph),
                                     listing(batched.eval_graph))


def sketch(function) -> tuple[list[str], list[str]]:
    """The Before and After columns of ``function``'s docstring sketch."""
    lines = function.__doc__.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("Before:"))
    column = lines[start].index("After:")
    before, after = [], []
    for line in lines[start + 1:]:
        if not line.strip():
            break
        before += [line[:column].strip()] if line[:column].strip() else []
        after += [line[column:].strip()] if line[column:].strip() else []
    return before, after


def test_collapse_makes_each_partition_one_call_placed_where_its_inputs_allow():
    # The one mechanism behind tier 2's re-lifted module calls and stream batching's regions.
    traced = reconfx.trace(TwoHeads(), {"x": torch.randn(2, 4)}, {"a": "a", "b": "b"})
    graph = traced.module.train_graph
    node = {n.name: n for n in graph.nodes}

    def block(new, key, env):  # one call for fc2 and fc3; it stands for fc3, read outside
        call = new.call_module(key, (env(node["relu"]),))
        return {node["fc3"]: call}

    collapsed = collapse(graph, {"block": [node["fc2"], node["fc3"]]}, block)
    assert listing(collapsed) == [
        "x = input", "fc1 = fc1(x)", "relu = relu(fc1)", "block = block(relu)",
        "a = a(block)", "b = b(block)", "return {'a': a, 'b': b}"]
    assert sketch(collapse) == (listing(graph), listing(collapsed))

    # fc1 and fc3 without fc2 in between: fc2 reads the partition and the partition reads it
    with pytest.raises(ValueError, match="not convex"):
        collapse(graph, {"block": [node["fc1"], node["fc3"]]}, block)


class Scale(nn.Module):
    """A user's own per-sample layer: stream batching knows nothing of it until it is
    registered."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.full((8,), 0.5))

    def forward(self, x):
        return x * self.w


class ScaledHeads(TwoHeads):
    def __init__(self):
        super().__init__()
        self.scale = Scale()

    def forward(self, x):
        h = self.scale(self.fc3(self.fc2(torch.relu(self.fc1(x)))))
        return {"a": self.a(h), "b": self.b(h)}


def test_a_module_kind_registered_as_exact_joins_stream_batching():
    torch.manual_seed(0)
    model, example = ScaledHeads(), {"x": torch.randn(2, 4)}
    traced = reconfx.trace(model, example, {"a": "a", "b": "b"})
    chosen = reconfx.select(reconfx.inventory(traced.module, ["a", "b"]),
                            SelectSpec(layers=["fc2"]))

    def region_body() -> list[str]:
        branched = reconfx.branch(traced.module, chosen, ["a", "b"])
        (region,) = regions_of(batch_streams(branched.module, example, ["x"]))
        return listing(region.body)

    assert region_body() == ["fc2 = input", "fc3 = fc3(fc2)", "return (fc3,)"]
    assert not kinds.exact_module(model.scale, training=False)
    kinds.register(Scale, exact=lambda module, training: True)
    try:
        assert kinds.exact_module(model.scale, training=False)
        assert region_body() == ["fc2 = input", "fc3 = fc3(fc2)", "scale = scale(fc3)",
                                 "return (scale,)"]
    finally:
        del kinds.KINDS[Scale]


def test_module_kinds_answer_for_subclasses_of_torch_kinds_but_not_for_a_users_subclass():
    class Doubled(nn.Linear):  # a user's subclass may compute anything: unknown until registered
        def forward(self, x):
            return super().forward(x) * x.sum(0)  # (mixes the samples)

    assert kinds.exact_module(nn.BatchNorm2d(3).eval(), training=False)  # (via _BatchNorm)
    assert not kinds.exact_module(nn.BatchNorm2d(3).train(), training=True)
    assert not kinds.exact_module(Doubled(2, 2), training=False)
    assert kinds.dropout_attr(nn.Dropout2d()) == "p" and kinds.dropout_attr(nn.GRU(2, 2)) == (
        "dropout")
    assert kinds.has_running_stats(nn.BatchNorm1d(2))
    assert not kinds.has_running_stats(nn.InstanceNorm1d(2))  # (track_running_stats=False)
    assert kinds.constructor_values(nn.GRU(2, 3, batch_first=True))["batch_first"] is True
    assert kinds.constructor_values(nn.Linear(2, 2)) is None  # (read back generically)
    assert not kinds.is_leaf(nn.Sequential(nn.Linear(2, 2)))


def test_each_pass_replaces_a_nodes_record_and_a_copy_keeps_its_own():
    """What the passes know about a node is one frozen NodeFacts: the branching pass gives each
    clone its task, the node it stands for and the branch point it starts, and a record noted
    on a node later never reaches the records of the nodes copied from it."""
    import dataclasses

    from reconfx.facts import NodeFacts, facts, note

    torch.manual_seed(0)
    model, example = TwoHeads(), {"x": torch.randn(2, 4)}
    traced = reconfx.trace(model, example, {"a": "a", "b": "b"})
    graph = traced.module.train_graph
    fc2 = next(n for n in graph.nodes if n.target == "fc2")
    assert facts(fc2) == NodeFacts(name="fc2")
    layers = reconfx.inventory(traced.module, ["a", "b"])
    branched = reconfx.branch(traced.module, reconfx.select(layers, SelectSpec(layers=["fc2"])),
                              ["a", "b"])
    records = {n.name: facts(n) for n in branched.module.train_graph.nodes}
    assert records["fc2"] == NodeFacts(name="fc2", task="a", origin="fc2", branch_point="fc2")
    assert records["fc2_1"] == NodeFacts(name="fc2", task="b", origin="fc2", branch_point="fc2")
    assert records["fc3_1"] == NodeFacts(name="fc3", task="b", origin="fc3")
    assert records["fc1"] == NodeFacts(name="fc1")  # (before the branch point: shared)

    note(fc2, name="renamed")  # the original's record replaced: its clones keep theirs
    assert facts(fc2).name == "renamed"
    assert [facts(n).name for n in branched.module.train_graph.nodes if n.target
            in ("fc2.a", "fc2.b")] == ["fc2", "fc2"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        facts(fc2).task = "a"


def test_the_emitters_parts_write_init_and_forward_on_their_own():
    """The emitter's parts, called directly on the branched graph: the module tree's __init__
    lines (a branched layer as one copy per task), forward's statements (named by module path
    with the task's suffix, the branch point commented once), and the names the file's parts
    share (a generated class never takes a name an import binds)."""
    from reconfx.emit.forward import ForwardWriter
    from reconfx.emit.tree import FileParts, InitWriter

    torch.manual_seed(0)
    model, example = TwoHeads(), {"x": torch.randn(2, 4)}
    traced = reconfx.trace(model, example, {"a": "a", "b": "b"})
    layers = reconfx.inventory(traced.module, ["a", "b"])
    branched = reconfx.branch(traced.module, reconfx.select(layers, SelectSpec(layers=["fc2"])),
                              ["a", "b"])
    parts = FileParts()
    init = InitWriter(branched.module, parts, task_containers={"fc2"}, settings=(),
                      tasks=("a", "b"), regions=[], generate=None)
    init.collect()
    assert [line.strip() for line in init.lines()] == [
        "self.fc1 = nn.Linear(4, 8)",
        "self.fc2 = nn.ModuleDict({task: nn.Linear(8, 8) for task in TASKS})",
        "self.fc3 = nn.Linear(8, 8)", "self.a = nn.Linear(8, 2)", "self.b = nn.Linear(8, 3)"]
    assert parts.constants == {'("a", "b")': "TASKS"}
    forward = ForwardWriter(branched.module, parts, init.tree, regions=[],
                            branch_notes={"fc2": " (3 conflicts)"}, rows=False)
    assert [line.strip() for line in forward.lines()] == [
        "def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:",
        "fc1 = self.fc1(x)", "relu = torch.relu(fc1)",
        "# branch point: fc2 (3 conflicts); one copy per task from here",
        "fc2_a = self.fc2.a(relu)", "fc2_b = self.fc2.b(relu)",
        "fc3_a = self.fc3(fc2_a)", "fc3_b = self.fc3(fc2_b)",
        "a_a = self.a(fc3_a)", "b_b = self.b(fc3_b)", 'return {"a": a_a, "b": b_b}']
    parts.imports.add("from tests.library import Block, Other as BranchedBlock")
    assert [parts.class_name("Block"), parts.class_name("BranchedBlock"),
            parts.class_name("BranchedBlock")] == ["Block2", "BranchedBlock2", "BranchedBlock3"]
