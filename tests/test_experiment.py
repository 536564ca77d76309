"""The reference experiment command on a MultiDigits subset: the grid it runs, what each run
records, the table's Δm and conflict columns computed from those records, and resuming."""

import json
import statistics

from reconfx.experiments import recon_table
from tests.support import write_spec


def experiment_spec(tmp_path, select):
    return write_spec(
        tmp_path, "experiment",
        model={"factory": "reconfx.zoo:small_resnet", "kwargs": {"num_classes": 10, "width": 8}},
        inputs=[{"name": "image", "shape": [8, 1, 12, 12]}],
        tasks=[{"name": "left", "loss": "cross_entropy", "metric": "accuracy"},
               {"name": "right", "loss": "cross_entropy", "metric": "accuracy"}],
        data={"factory": "reconfx.data:multidigits", "kwargs": {"size": 4096},
              "batch_size": 64},
        profile={"steps": 10, "threshold": -0.1}, select=select,
        train={"aggregator": "ew", "epochs": 1, "lr": 3.0e-3})


def test_grid_records_and_table(tmp_path, capsys):
    spec = experiment_spec(tmp_path, {"top_k": 5})
    out = tmp_path / "table"
    readme = tmp_path / "README.md"
    start, end = recon_table.markers()
    readme.write_text(f"intro\n{start}\nold\n{end}\nrest\n")
    args = ["--spec", str(spec), "--seeds", "0", "--aggregators", "ew", "pcgrad",
            "--size", "1024", "--out", str(out), "--readme", str(readme), "--quiet"]
    assert recon_table.main(args) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    single = {r["task"]: r for r in rows if r["variant"] == "single-task"}
    assert sorted(single) == ["left", "right"]
    assert all(list(r["test"]) == [r["task"]] for r in single.values())
    grid = {(r["aggregator"], r["variant"]): r for r in rows if r["variant"] != "single-task"}
    assert sorted(grid) == sorted((a, v) for a in ("ew", "pcgrad")
                                  for v in recon_table.VARIANTS)
    for name in ("ew", "pcgrad"):
        joint, recon, shared, random_k = (grid[name, v] for v in recon_table.VARIANTS)
        assert joint["branched"] == [] and joint["params"] == joint["original_params"]
        assert joint["flops"] == joint["original_flops"] < recon["flops"]
        assert len(recon["branched"]) == 5 and set(joint["scores"]) == set(joint["strong"])
        assert shared["branched"] == recon["branched"]  # same layers, other norm statistics
        # The ablation is parameter-matched: random layers adding top-K's parameters +-10%.
        added = [r["params"] - r["original_params"] for r in (recon, random_k)]
        assert abs(added[1] - added[0]) <= 0.1 * added[0]
        assert random_k["branched"] != recon["branched"]
        # The remaining shared layers are the joint model's shared layers minus the branched.
        assert set(recon["strong"]) == set(joint["strong"]) - set(recon["branched"])
        assert set(random_k["strong"]) == set(joint["strong"]) - set(random_k["branched"])
        # Every step of a 2-task run gives at most one valid pair per layer.
        steps = 1024 // 64
        assert all(0 < valid <= steps and 0 <= strong <= valid
                   for strong, valid in joint["strong"].values())
    # The table's delta-m is the standard formula against the same seed's single-task runs.
    recon = grid["pcgrad", "reconfx"]
    want = statistics.fmean((recon["test"][t] - single[t]["test"][t]) / single[t]["test"][t]
                            for t in ("left", "right")) * 100
    text = (out / "table.md").read_text()
    line = next(x for x in text.splitlines() if x.startswith("| pcgrad | reconfx |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[4] == f"{want:.2f}"
    joint = grid["pcgrad", "joint"]
    remaining = list(recon["strong"])
    before = (sum(joint["strong"][n][0] for n in remaining)
              / sum(joint["strong"][n][1] for n in remaining))
    assert cells[7].startswith(f"{100 * before:.1f}% → ")
    assert cells[6] == f"+{100 * (recon['flops'] / recon['original_flops'] - 1):.1f}"
    assert text.strip() in readme.read_text()
    assert readme.read_text().startswith("intro\n") and readme.read_text().endswith("\nrest\n")
    assert "old" not in readme.read_text()
    # Resuming: every run is recorded, so a second call trains nothing and rewrites the same rows.
    capsys.readouterr()
    assert recon_table.main(args) == 0
    assert json.loads((out / "results.json").read_text())["rows"] == rows


def test_score_consistency_between_seeds():
    """Spearman's rho of the layers' scores and the top-K overlap, over every pair of seeds."""
    scores = [{"a": 9, "b": 5, "c": 1, "d": 0}, {"a": 8, "b": 6, "c": 0, "d": 2},
              {"a": 0, "b": 1, "c": 2, "d": 3}]
    rows = [{"aggregator": "ew", "variant": "joint", "seed": i, "scores": p}
            for i, p in enumerate(scores)]
    line = recon_table.score_consistency(rows, k=2).splitlines()[2]
    # pairs: (0,1) rho 0.8, top-2 {a,b} both; (0,2) rho -1, overlap 0; (1,2) rho -0.8, {a,b}
    # vs {c,d}: 0
    rhos, overlaps = [0.8, -1.0, -0.8], [100.0, 0.0, 0.0]
    assert line == (f"| ew | 3 | {statistics.fmean(rhos):.2f} ± {statistics.stdev(rhos):.2f} | "
                    f"{statistics.fmean(overlaps):.0f} ± {statistics.stdev(overlaps):.0f}% |")


def test_matched_random_draws_layers_adding_the_target_parameters():
    from reconfx.layers import Layer
    from reconfx.selection import matched_random

    pool = [Layer(f"l{i}", "Conv2d", (f"l{i}",), (), n, ("a", "b"), i)
            for i, n in enumerate([100, 250, 400, 800, 1600, 3200])]
    for seed in range(20):
        chosen = matched_random(pool, 1000, seed=seed)
        assert 900 <= sum(layer.num_params for layer in chosen) <= 1100
        assert [layer.order for layer in chosen] == sorted(layer.order for layer in chosen)
    assert len({tuple(x.name for x in matched_random(pool, 1000, seed=s)) for s in range(20)}) > 1


def test_rejects_explicit_selection_and_unknown_aggregator(tmp_path, capsys):
    spec = experiment_spec(tmp_path, {"layers": ["layer4.*"]})
    assert recon_table.main(["--spec", str(spec), "--out", str(tmp_path / "t"), "--quiet"]) == 2
    assert "select: the experiment branches the layers a profile selects" in capsys.readouterr().err
    spec = experiment_spec(tmp_path, {"top_k": 3})
    assert recon_table.main(["--spec", str(spec), "--aggregators", "nope",
                             "--out", str(tmp_path / "t"), "--quiet"]) == 2
    assert "unknown aggregator 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_budgets_add_the_budgeted_choice_and_its_random_ablation(tmp_path):
    """--budgets: per FLOP budget, the layers flops_budget buys by the profile's scores and
    random layers within the same FLOP budget and its parameters, each recorded with the
    FLOPs and parameters it adds, and given rows of their own in the table."""
    spec = experiment_spec(tmp_path, {"top_k": 5})
    out = tmp_path / "table"
    args = ["--spec", str(spec), "--seeds", "0", "--aggregators", "ew", "--size", "512",
            "--variants", "reconfx", "--budgets", "20", "60", "--out", str(out), "--quiet"]
    assert recon_table.main(args) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    grid = {r["variant"]: r for r in rows if r["variant"] != "single-task"}
    assert sorted(grid) == sorted(["joint", "reconfx", "budget-20", "random-budget-20",
                                   "budget-60", "random-budget-60"])
    assert grid["budget-60"]["branched"]
    assert grid["budget-60"]["branched"] != grid["random-budget-60"]["branched"]
    assert len(grid["budget-60"]["branched"]) >= len(grid["budget-20"]["branched"])
    for budget in (20, 60):
        bought, drawn = grid[f"budget-{budget}"], grid[f"random-budget-{budget}"]
        for row in (bought, drawn):
            assert row["flops"] - row["original_flops"] <= budget / 100 * row["original_flops"]
        assert drawn["params"] <= bought["params"]
        scores = grid["joint"]["scores"]
        assert sum(scores[n] for n in bought["branched"]) >= sum(
            scores[n] for n in drawn["branched"])
    text = (out / "table.md").read_text()
    lines = [x for x in text.splitlines() if x.startswith("| ew |")]
    assert [x.split("|")[2].strip() for x in lines] == [
        "joint", "reconfx", "budget-20", "random-budget-20", "budget-60", "random-budget-60"]
