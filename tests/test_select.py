"""Selection policies on a real layer inventory (the small ResNet's 24 shared layers)."""

import itertools
import math
import random

import pytest

from reconfx.errors import SelectionError
from reconfx.pipeline import prepare
from reconfx.selection import budget_lines, candidates, select_layers
from reconfx.spec import SelectSpec
from tests.support import write_spec


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    folder = tmp_path_factory.mktemp("select")
    spec = write_spec(folder, "sel", model={"factory": "reconfx.zoo:small_resnet",
                                            "kwargs": {"width": 8}},
                      inputs=[{"name": "image", "shape": [2, 1, 12, 12]}],
                      tasks=[{"name": "left"}, {"name": "right"}])
    return prepare(spec)


@pytest.fixture(scope="module")
def layers(prepared):
    return prepared.layers


def shared(layers):
    return [x for x in layers if x.shared]


def scores_by_position(layers, values):
    """Scores for the shared layers in graph order (ties on purpose)."""
    return {layer.name: values[i % len(values)] for i, layer in enumerate(shared(layers))}


def names(chosen):
    return [x.name for x in chosen]


def test_top_k_ranks_by_score_and_breaks_ties_by_graph_order(layers):
    scores = scores_by_position(layers, [5, 9, 9, 1])
    chosen = select_layers(layers, SelectSpec(top_k=3), scores=scores)
    expected = [x.name for x in shared(layers) if scores[x.name] == 9][:3]
    assert names(chosen) == expected
    assert [x.order for x in chosen] == sorted(x.order for x in chosen)


def test_top_k_above_the_candidates_takes_all_and_warns(layers):
    with pytest.warns(UserWarning, match="exceeds the 24 candidate layers"):
        chosen = select_layers(layers, SelectSpec(top_k=99), scores=scores_by_position(layers, [1]))
    assert len(chosen) == 24


def test_fraction_rounds_up(layers):
    chosen = select_layers(layers, SelectSpec(fraction=0.1),
                           scores=scores_by_position(layers, [3, 2, 1]))
    assert len(chosen) == math.ceil(0.1 * 24)


def test_param_budget_buys_the_highest_total_score_that_fits(layers):
    """An exact knapsack: checked against every subset of 10 candidates, random scores."""
    import itertools
    import random

    spec = SelectSpec(param_budget=30.0, include=["layer1.*", "layer2.*"])
    pool = candidates(layers, spec)
    assert len(pool) == 10
    budget = 0.30 * sum(x.num_params for x in pool)
    for seed in range(3):
        rng = random.Random(seed)
        scores = {x.name: rng.randrange(0, 50) for x in shared(layers)}
        chosen = select_layers(layers, spec, scores=scores, tasks=3)
        best = max((sum(scores[x.name] for x in subset), -sum(x.num_params for x in subset))
                   for n in range(len(pool) + 1) for subset in itertools.combinations(pool, n)
                   if 2 * sum(x.num_params for x in subset) <= budget)
        assert (sum(scores[x.name] for x in chosen),
                -sum(x.num_params for x in chosen)) == best
        assert all(scores[x.name] > 0 for x in chosen)


def test_flops_budget_passes_over_a_costly_top_layer_and_says_so(prepared):
    """Recon's profiles rank the stem first; branching it doubles the FLOPs, so a +25% budget
    takes the next layers that fit instead of stopping empty-handed."""
    from reconfx.cost import CostModel, Selection, selection_lines

    layers = prepared.layers
    cost = CostModel.measure(prepared.traced.module, prepared.examples[0])
    pool = shared(layers)
    scores = {x.name: len(pool) - i for i, x in enumerate(pool)}  # the stem ranks first
    spec = SelectSpec(flops_budget=25.0)
    chosen = select_layers(layers, spec, scores=scores, cost=cost)
    stem = pool[0]
    assert cost.extra_flops([stem]) > 0.25 * cost.total
    assert chosen and stem not in chosen
    assert cost.extra_flops(chosen) <= 0.25 * cost.total
    # no layer left out would still fit beside those taken
    for layer in pool:
        if layer not in chosen:
            assert cost.extra_flops([*chosen, layer]) > 0.25 * cost.total, layer.name
    lines = budget_lines(layers, spec, scores=scores, chosen=chosen, tasks=2, cost=cost)
    bought = sum(scores[x.name] for x in chosen)
    assert lines[0].startswith(f"select.flops_budget 25% bought {len(chosen)} of 24 candidate "
                               f"layers, conflict score {bought:,} of {sum(scores.values()):,}")
    assert lines[1].startswith(f"left out: `{stem.name}` (score 24; alone +")
    selection = Selection.of(chosen, scores, cost, 1000, budget=tuple(lines))
    assert selection_lines(selection)[-len(lines):] == [f"  {line}" for line in lines]
    # a budget no candidate fits buys nothing, and says what the top one would cost
    only_stem = SelectSpec(flops_budget=25.0, include=[stem.name])
    assert select_layers(layers, only_stem, scores=scores, cost=cost) == []
    nothing = Selection.of([], scores, cost, 1000, budget=tuple(
        budget_lines(layers, only_stem, scores=scores, chosen=[], tasks=2, cost=cost)))
    assert nothing.warning().startswith(
        f"select.flops_budget 25% bought no layer, so nothing is branched; left out: "
        f"`{stem.name}` (score 24; alone +")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_flops_budget_buys_the_most_conflict_that_fits(prepared, seed):
    """Against every subset of 12 candidates (random scores, some zero): the set bought has
    the highest total score of any that fits the budget, where taking the ranking in order
    (each layer while it fits) can be stuck with a costly early layer."""
    from reconfx.cost import CostModel

    cost = CostModel.measure(prepared.traced.module, prepared.examples[0])
    pool = shared(prepared.layers)[::2]
    rng = random.Random(seed)
    scores = {x.name: rng.choice([0, 1, 2, 5, 9, 20]) for x in shared(prepared.layers)}
    spec = SelectSpec(flops_budget=30.0, include=[x.name for x in pool])
    chosen = select_layers(prepared.layers, spec, scores=scores, cost=cost)
    limit = 0.30 * cost.total
    best = max(sum(scores[x.name] for x in subset)
               for n in range(len(pool) + 1) for subset in itertools.combinations(pool, n)
               if cost.extra_flops(subset) <= limit)
    assert cost.extra_flops(chosen) <= limit
    assert sum(scores[x.name] for x in chosen) == best
    ranked = sorted(pool, key=lambda x: (-scores[x.name], x.order))
    in_order = []
    for layer in ranked:
        if scores[layer.name] > 0 and cost.extra_flops([*in_order, layer]) <= limit:
            in_order.append(layer)
    assert sum(scores[x.name] for x in in_order) <= best


def test_min_score(layers):
    scores = scores_by_position(layers, [0, 4, 7])
    chosen = select_layers(layers, SelectSpec(min_score=4), scores=scores)
    assert names(chosen) == [x.name for x in shared(layers) if scores[x.name] >= 4]


def test_include_and_exclude_narrow_the_candidates(layers):
    spec = SelectSpec(top_k=50, include=["layer3.*", "layer4.*"], exclude=["*.bn*"])
    with pytest.warns(UserWarning):
        chosen = select_layers(layers, spec, scores=scores_by_position(layers, [1]))
    assert names(chosen) and all(n.startswith(("layer3", "layer4")) and ".bn" not in n
                                 for n in names(chosen))


def test_random_is_seeded_and_needs_no_profile(layers):
    first = select_layers(layers, SelectSpec(random={"k": 5, "seed": 3}))
    again = select_layers(layers, SelectSpec(random={"k": 5, "seed": 3}))
    other = select_layers(layers, SelectSpec(random={"k": 5, "seed": 4}))
    assert names(first) == names(again) and len(first) == 5
    assert names(first) != names(other)


def test_scores_from_another_model_are_refused(layers):
    with pytest.raises(SelectionError, match="no score for 24 candidate"):
        select_layers(layers, SelectSpec(top_k=2), scores={"fc": 3})


def test_a_module_path_selects_every_shared_layer_under_it(layers):
    by_module = select_layers(layers, SelectSpec(layers=["layer4"]))
    by_glob = select_layers(layers, SelectSpec(layers=["layer4.*"]))
    assert [layer.name for layer in by_module] == [layer.name for layer in by_glob]
    assert len(by_module) > 1 and all(layer.name.startswith("layer4.") for layer in by_module)
    # (a path is not a prefix of another name: layer4 does not take a layer4x)
    assert not [layer for layer in layers if layer.matches("layer")]


def test_selection_reads_the_scores_written_on_the_graph(tmp_path):
    """Conflict scores live on the graph's nodes (their NodeFacts' conflict): a profile,
    or an earlier profile's conflicts.json, writes them there, and selection and the emitter
    read them from there."""
    from reconfx.facts import Conflict, facts
    from reconfx.pipeline import branch_checked
    from reconfx.profiling import Scores, annotate_scores, scores_in

    spec = write_spec(tmp_path, "meta", model={"factory": "reconfx.zoo:small_resnet",
                                               "kwargs": {"width": 8}},
                      inputs=[{"name": "image", "shape": [2, 1, 12, 12]}],
                      tasks=[{"name": "left"}, {"name": "right"}], select={"top_k": 1},
                      export={"formats": ["python"]})
    prepared = prepare(spec)
    pool = shared(prepared.layers)
    scores = Scores({layer.name: i for i, layer in enumerate(pool)},
                    valid={layer.name: 100 for layer in pool})
    module = prepared.traced.module
    assert scores_in(module, prepared.layers) is None
    annotate_scores(module, prepared.layers, scores)
    top = pool[-1]
    (node,) = [n for n in module.graph.nodes if str(n.target) == top.paths[0]]
    assert facts(node).conflict == Conflict(score=len(pool) - 1, valid=100)
    assert scores_in(module, prepared.layers) == scores
    compiled = branch_checked(prepared)  # no scores given: those on the nodes
    assert names(compiled.branched.layers) == [top.name]
    assert compiled.selection.rows()[0][2] == f"{len(pool) - 1} / 100"


def test_only_score_based_policies_need_a_profile():
    needs = {policy: SelectSpec(**{policy: value}).needs_scores for policy, value in {
        "top_k": 3, "fraction": 0.5, "param_budget": 10.0, "flops_budget": 10.0,
        "min_score": 1.0, "layers": ["fc"], "random": {"k": 2}}.items()}
    assert needs == {"top_k": True, "fraction": True, "param_budget": True,
                     "flops_budget": True, "min_score": True, "layers": False, "random": False}


def test_flops_budget_prefers_two_cheaper_branch_points_to_one_costly_top_layer(tmp_path):
    """Three parallel towers: the top-ranked layer opens the widest tower and fits alone, but
    the two narrower towers' layers fit together and score more. Taking the ranking in order
    would buy the top layer and nothing else."""
    from reconfx.cost import CostModel

    spec = write_spec(tmp_path, "towers", model={"factory": "tests.models:Towers"},
                      inputs=[{"name": "x", "shape": [2, 4]}],
                      tasks=[{"name": "a"}, {"name": "b"}])
    prepared = prepare(spec)
    cost = CostModel.measure(prepared.traced.module, prepared.examples[0])
    by_name = {x.name: x for x in prepared.layers}
    wide, left, right = (by_name[f"towers.{i}.0"] for i in range(3))
    assert cost.extra_flops([left]) < cost.extra_flops([wide]) < cost.extra_flops([left, right])
    scores = {x.name: 0 for x in prepared.layers if x.shared} | {
        wide.name: 10, left.name: 6, right.name: 6}
    budget = 100 * cost.extra_flops([left, right]) / cost.total + 1e-6
    chosen = select_layers(prepared.layers, SelectSpec(flops_budget=budget), scores=scores,
                           cost=cost)
    assert chosen == [left, right]
