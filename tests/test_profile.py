"""The profiling pass: vectorised conflict counts equal a slow per-layer, per-pair reference on a
real model and real data; zero gradients are excluded; joint training makes progress."""

import json

import pytest
import torch

from reconfx.build import call_data_factory
from reconfx.cli import main
from reconfx.conflicts import ConflictCounter
from reconfx.pipeline import prepare
from reconfx.profiling import profile
from reconfx.spec import TrainSpec
from reconfx.train.objectives import loss_functions
from reconfx.train.resume import Batches
from reconfx.train.step import CHUNK
from tests.support import write_spec

ADAM = TrainSpec(optimizer="adam", lr=1e-3, weight_decay=0.0, seed=0)


def multidigits_spec(tmp_path, steps=8, select=None, threshold=-0.1, tasks=("left", "right"),
                     width=8):
    fields = dict(model={"factory": "reconfx.zoo:small_resnet",
                         "kwargs": {"num_classes": 10, "width": width, "tasks": list(tasks)}},
                  inputs=[{"name": "image", "shape": [4, 1, 12, 12]}],
                  tasks=[{"name": t, "loss": "cross_entropy"} for t in tasks],
                  data={"factory": "reconfx.data:multidigits" if len(tasks) == 2
                        else "tests.models:ThreeTasks", "kwargs": {"size": 512},
                        "batch_size": 64},
                  profile={"steps": steps, "threshold": threshold},
                  export={"dir": str(tmp_path / "out")})
    if select:
        fields["select"] = select
    return write_spec(tmp_path, "md", **fields)


def reference_counts(matrices, blocks, threshold):
    """Per step, per layer, per pair: cosine with .item(), counted in plain Python."""
    tasks = matrices[0].shape[0]
    conflicts = [[[0] * tasks for _ in range(tasks)] for _ in blocks]
    valid = [[[0] * tasks for _ in range(tasks)] for _ in blocks]
    for grads in matrices:
        for layer, (a, b) in enumerate(blocks):
            for i in range(tasks):
                for j in range(i + 1, tasks):
                    gi, gj = grads[i, a:b].double(), grads[j, a:b].double()
                    ni, nj = gi.norm().item(), gj.norm().item()
                    if ni == 0 or nj == 0:
                        continue
                    valid[layer][i][j] += 1
                    if (gi @ gj).item() / (ni * nj) < threshold:
                        conflicts[layer][i][j] += 1
    return torch.tensor(conflicts), torch.tensor(valid)


def run_profile(spec_path, steps, record=None):
    prepared = prepare(spec_path)
    s = prepared.loaded.spec
    data = call_data_factory(s.data, "train", 0, "spec")
    module = prepared.traced.module
    result = profile(module, prepared.layers, tasks=s.task_names,
                     loss_fns=loss_functions(list(s.tasks), "s"),
                     batches=Batches(data, s.data.batch_size, 0, drop_last=True), steps=steps,
                     threshold=s.profile.threshold, settings=ADAM, record=record)
    return result, [[row[f"loss/{t}"] for t in s.task_names] for row in result.rows]


@pytest.mark.parametrize("tasks", [("left", "right"), ("a", "b", "c")])
def test_counts_equal_the_per_pair_reference_on_multidigits(tmp_path, tasks):
    spec = multidigits_spec(tmp_path, tasks=tasks)
    recorded = []
    result, _ = run_profile(spec, 6, recorded.append)
    assert len(recorded) == 6
    # Every layer's block starts at a multiple of CHUNK; the padding between blocks stays zero.
    blocks = result.counter.blocks
    assert all(a % CHUNK == 0 for a, _b in blocks) and recorded[0].shape[1] % CHUNK == 0
    inside = torch.zeros(recorded[0].shape[1], dtype=torch.bool)
    for a, b in blocks:
        inside[a:b] = True
    assert all(not m[:, ~inside].any() for m in recorded)
    conflicts, valid = reference_counts(recorded, blocks, result.threshold)
    assert torch.equal(result.counter.conflicts, conflicts)
    assert torch.equal(result.counter.valid, valid)
    assert result.counter.hist.sum().item() == valid.sum().item()
    assert sum(result.counter.scores()) > 0  # the deeper layers do conflict


def test_zero_or_absent_gradients_are_excluded_not_counted():
    counter = ConflictCounter([(0, 2), (2, 4)], tasks=3, threshold=0.0)
    grads = torch.tensor([[1.0, 0.0, 1.0, 1.0],
                          [-1.0, 0.0, 0.0, 0.0],   # task 1 has no gradient for layer 2
                          [0.0, 1.0, -1.0, -1.0]])
    counter.update(grads)
    # layer 1: pairs (0,1) cos -1 -> conflict, (0,2) cos 0, (1,2) cos 0: all valid
    assert counter.valid[0].sum() == 3 and counter.conflicts[0, 0, 1] == 1
    assert counter.conflicts[0].sum() == 1
    # layer 2: only pair (0,2) is valid, cos -1
    assert counter.valid[1].tolist() == [[0, 0, 1], [0, 0, 0], [0, 0, 0]]
    assert counter.conflicts[1].tolist() == [[0, 0, 1], [0, 0, 0], [0, 0, 0]]
    assert counter.strong[1, 0, 2] == 1


def test_counter_memory_does_not_grow_with_steps():
    counter = ConflictCounter([(0, 3)], tasks=2, threshold=-0.1)
    sizes = [t.numel() for t in (counter.conflicts, counter.valid, counter.hist)]
    for _ in range(50):
        counter.update(torch.randn(2, 3))
    assert [t.numel() for t in (counter.conflicts, counter.valid, counter.hist)] == sizes
    assert counter.valid.sum() == 50


def test_profiling_trains_jointly(tmp_path):
    _, losses = run_profile(multidigits_spec(tmp_path), 30)
    first, last = torch.tensor(losses[:5]).mean(0), torch.tensor(losses[-5:]).mean(0)
    assert (last < first).all()


def test_profile_command_writes_scores_and_compile_uses_them(tmp_path, capsys):
    spec = multidigits_spec(tmp_path, steps=10, select={"top_k": 5})
    assert main(["profile", str(spec), "--quiet"]) == 0
    out = tmp_path / "out"
    data = json.loads((out / "conflicts.json").read_text())
    assert data["steps"] == 10 and data["tasks"] == ["left", "right"]
    rows = {row["name"]: row for row in data["layers"]}
    assert len(rows) == 24  # the shared layers of the small ResNet
    assert sum(row["branched"] for row in rows.values()) == 5
    assert (out / "conflicts.png").stat().st_size > 0
    ranked = sorted(rows.values(), key=lambda r: -r["score"])
    assert main(["compile", str(spec), "--quiet"]) == 0
    report = (out / "report.md").read_text()
    assert "branched layers: 5 of 24 shared" in report
    for row in ranked[:3]:  # the highest scores are among the branched layers
        assert row["branched"]
    assert main(["inspect", str(spec)]) == 0
    assert "score" in capsys.readouterr().out.splitlines()[1]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"]["conflicts.json"]["command"] == "profile"
    assert manifest["files"]["model.py"]["command"] == "compile"


def test_compile_selecting_other_layers_rewrites_the_profiles_branched_flags(tmp_path):
    """A folder holds one model's result: after `compile` picks other layers from the stored
    profile, conflicts.json and its chart mark the layers this model branched."""
    import yaml

    spec = multidigits_spec(tmp_path, steps=10, select={"top_k": 5})
    assert main(["profile", str(spec), "--quiet"]) == 0
    out = tmp_path / "out"
    before = json.loads((out / "conflicts.json").read_text())
    chart = (out / "conflicts.png").read_bytes()
    fields = yaml.safe_load(spec.read_text())
    spec.write_text(yaml.safe_dump({**fields, "select": {"top_k": 2}}))
    assert main(["compile", str(spec), "--quiet"]) == 0
    after = json.loads((out / "conflicts.json").read_text())
    ranked = sorted(before["layers"], key=lambda r: (-r["score"], before["layers"].index(r)))
    assert {r["name"] for r in after["layers"] if r["branched"]} == \
        {r["name"] for r in ranked[:2]}
    assert [{k: v for k, v in r.items() if k != "branched"} for r in after["layers"]] == \
        [{k: v for k, v in r.items() if k != "branched"} for r in before["layers"]]
    assert (out / "conflicts.png").read_bytes() != chart
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"]["conflicts.json"]["command"] == "compile"
    assert "branched layers: 2 of 24 shared" in (out / "report.md").read_text()


def test_profile_needs_data_and_losses(tmp_path, capsys):
    spec = write_spec(tmp_path, "nodata", model={"factory": "reconfx.zoo:small_resnet"},
                      inputs=[{"name": "image", "shape": [2, 1, 12, 12]}],
                      tasks=[{"name": "left"}, {"name": "right"}])
    assert main(["profile", str(spec)]) == 2
    assert "data: profiling trains on data" in capsys.readouterr().err


def test_profile_with_a_gradient_manipulation_aggregator(tmp_path):
    spec = multidigits_spec(tmp_path, steps=4)
    spec.write_text(spec.read_text() + "train: {aggregator: pcgrad}\n")
    from reconfx.commands import profile_spec

    done = profile_spec(spec, progress=False)
    assert done.result.counter.steps == 4


def test_branching_the_top_layers_lowers_conflict_in_the_remaining_shared_layers(tmp_path):
    """Same initial weights, same batches, same steps: the remaining shared layers of the
    branched model see fewer strongly conflicting gradient pairs than in the unbranched one."""
    import copy

    from reconfx.layers import inventory
    from reconfx.rewrite import branch
    from reconfx.selection import select_layers
    from reconfx.spec import SelectSpec

    spec = multidigits_spec(tmp_path, width=16)
    prepared = prepare(spec)
    s = prepared.loaded.spec
    data = call_data_factory(s.data.model_copy(update={"kwargs": {"size": 2048}}), "train", 0,
                             "spec")
    fns = loss_functions(list(s.tasks), "spec")
    module = prepared.traced.module
    initial = copy.deepcopy(module.state_dict())

    def run(model, layers):
        return profile(model, layers, tasks=s.task_names, loss_fns=fns,
                       batches=Batches(data, 64, 0, drop_last=True), steps=40, threshold=-0.1,
                       settings=ADAM)

    before = run(module, prepared.layers)
    module.load_state_dict(initial)
    chosen = select_layers(prepared.layers, SelectSpec(top_k=12), scores=before.scores())
    branched = branch(module, chosen, s.task_names)
    after = run(branched.module, inventory(branched.module, s.task_names))
    remaining = {layer.name for layer in after.layers}
    assert len(remaining) == 24 - 12

    def strong_share(result):
        rows = [i for i, layer in enumerate(result.layers) if layer.name in remaining]
        c = result.counter
        return float(c.strong[rows].sum()) / float(c.valid[rows].sum())

    # Measured on this CPU: 79% before, 40% after.
    assert strong_share(after) < 0.7 * strong_share(before)


@pytest.mark.parametrize("tasks", [2, 3, 4])
def test_the_chart_draws_each_task_pair(tmp_path, tasks):
    """One bar panel per task pair up to three pairs, a heatmap beyond; the strong-conflict
    panel when conflicts.json has the shares after branching. (The PNG's pixels are looked at
    by people; here its size follows the layout.)"""
    import itertools

    from PIL import Image

    from reconfx.profiling import chart

    names = [f"t{i}" for i in range(tasks)]
    pairs = [f"{a}/{b}" for a, b in itertools.combinations(names, 2)]
    rows = [{"name": f"layer{i}", "branched": i % 4 == 0,
             "pairs": {p: {"conflicts": (7 * i) % 60, "valid": 60 if i != 3 else 0}
                       for p in pairs}} for i in range(12)]
    data = {"threshold": -0.1, "steps": 60, "tasks": names, "layers": rows}
    chart(data, tmp_path / "plain.png")
    chart(data | {"after_branching": {"layers": 9, "profile_steps": 60, "train_steps": 90,
                                      "before": 0.7, "after": 0.3}}, tmp_path / "after.png")
    plain, after = Image.open(tmp_path / "plain.png"), Image.open(tmp_path / "after.png")
    panels = len(pairs) if len(pairs) <= 3 else 1
    assert plain.size[1] == int(120 * (2.6 * panels + 2.2))  # height: one row per panel
    assert after.size[0] == plain.size[0] + 360  # the side panel: 3 inches more


def test_a_capped_gradient_matrix_profiles_in_parts_to_the_same_scores(tmp_path, capsys):
    """A cap far below the small ResNet's matrix (0.8 MB) cuts its layers into parts: the same
    scores; an aggregator of the whole matrix stops before profiling, naming the file and the
    field and the size it needs."""
    from reconfx.commands import profile_spec

    scores = []
    for name, extra in (("whole", ""), ("parts", "train: {gradient_memory_gb: 0.0001}\n")):
        folder = tmp_path / name
        folder.mkdir()
        spec = multidigits_spec(folder, steps=4)
        spec.write_text(spec.read_text() + extra)
        scores.append(profile_spec(spec, progress=False).result.scores())
    assert scores[0] == scores[1] and scores[0].valid == scores[1].valid
    spec.write_text(spec.read_text().replace("gradient_memory_gb", "aggregator: pcgrad, "
                                             "gradient_memory_gb"))
    assert main(["profile", str(spec)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{spec}: train.gradient_memory_gb: the per-task" in err
    assert "set train.gradient_memory_gb to 0.1" in err
