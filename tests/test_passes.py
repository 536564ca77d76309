"""Each pass on one small model, called directly (no spec, no output folder), with the graph
listing it produces: the walk-through of docs/passes.md, kept true by this test."""

import torch
from torch import nn

import reconfx
from reconfx.batching import batch_streams
from reconfx.graph import listing
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
    source = reconfx.emit_python(batched, "TwoHeadsBranched", "doc", branched.containers).source
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
