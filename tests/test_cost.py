"""The cost of a selection before it is made (reconfx.cost): exact FLOP increase from one count
per node, the flops_budget policy, the early-branching warning, and the tables."""

import pytest

from reconfx.cli import main
from reconfx.cost import CostModel, Selection, flops, selection_lines
from reconfx.pipeline import branch_model, prepare
from reconfx.profiling import Scores
from reconfx.selection import select_layers
from reconfx.spec import SelectSpec
from tests.support import write_spec

RESNET = {"factory": "reconfx.zoo:small_resnet", "kwargs": {"width": 8}}
IMAGE = [{"name": "image", "shape": [2, 1, 12, 12]}]
TASKS = [{"name": "left"}, {"name": "right"}, {"name": "third", "output": "left"}]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cost")
    return prepare(write_spec(folder, "cost", model=RESNET, inputs=IMAGE,
                              tasks=[{"name": "left"}, {"name": "right"}]))


def test_the_flop_increase_is_exact_for_any_selection(prepared):
    cost = CostModel.measure(prepared.traced.module, prepared.examples[0])
    example = prepared.examples[0]
    original = flops(prepared.traced.module, example)
    assert cost.total == original
    shared = [x for x in prepared.layers if x.shared]
    for chosen in ([shared[0]], [shared[len(shared) // 2]], shared[-3:], shared[1::4]):
        branched = branch_model(prepared, chosen)
        assert cost.extra_flops(chosen) == flops(branched.module, example) - original


def test_flops_budget_buys_at_least_the_longest_ranked_prefix_that_fits(prepared):
    """The last layers rank first: the longest prefix of the ranking that fits is one set the
    budget can buy; the set bought scores at least as much, fits, and leaves out no layer that
    would still fit beside it."""
    cost = CostModel.measure(prepared.traced.module, prepared.examples[0])
    shared = [x for x in prepared.layers if x.shared]
    scores = {x.name: i + 1 for i, x in enumerate(shared)}
    chosen = select_layers(prepared.layers, SelectSpec(flops_budget=10.0), scores=scores,
                           cost=cost)
    limit = 0.10 * cost.total
    assert chosen and cost.extra_flops(chosen) <= limit
    ranked = sorted(shared, key=lambda x: -scores[x.name])
    prefix = max(n for n in range(len(ranked) + 1) if cost.extra_flops(ranked[:n]) <= limit)
    assert sum(scores[x.name] for x in chosen) >= sum(scores[x.name] for x in ranked[:prefix])
    assert all(cost.extra_flops([*chosen, x]) > limit for x in shared if x not in chosen)


def test_branching_early_is_warned_about_naming_the_layer(tmp_path, capsys):
    path = write_spec(tmp_path, model=RESNET, inputs=IMAGE,
                      tasks=[{"name": "left"}, {"name": "right"}],
                      select={"layers": ["bn1", "layer4.0.conv2"]})
    assert main(["compile", str(path), "--out", str(tmp_path / "o")]) == 0
    captured = capsys.readouterr()
    # The terminal's table, before the checks, and one warning line naming the layer.
    assert "selected 2 layer(s):" in captured.out and "  cost: +" in captured.out
    warnings = [line for line in captured.err.splitlines() if "warning" in line]
    assert len(warnings) == 1
    assert warnings[0].startswith("reconfx: warning: branching at 'bn1' makes ")
    assert "of the model's FLOPs run once per task" in warnings[0]
    report = (tmp_path / "o" / "report.md").read_text()
    assert "| layer | type | conflicts / observations | params per copy | tasks |" in report
    assert "- cost of the selection: +" in report and "branching at 'bn1'" in report


def test_scores_read_as_conflicts_out_of_observations(prepared):
    cost = CostModel.measure(prepared.traced.module, prepared.examples[0])
    layer = next(x for x in prepared.layers if x.shared)
    scores = Scores({layer.name: 12}, valid={layer.name: 100})
    selection = Selection.of([layer], scores, cost, 1000)
    assert selection.rows()[0][2] == "12 / 100"
    lines = selection_lines(selection)
    assert lines[0] == "selected 1 layer(s):" and lines[-1].startswith("  cost: +")
