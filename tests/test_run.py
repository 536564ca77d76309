"""reconfx run end to end on a MultiDigits subset, and reconfx eval on what it wrote."""

import json

import pytest
import torch

import reconfx
from reconfx import outdir
from reconfx.cli import main
from reconfx.data import multidigits
from tests.support import ARTIFACTS, assert_ruff_clean, listing, write_spec


def run_spec_file(tmp_path, select, aggregator="pcgrad", init="initial", sparse=None,
                  workers=0, tensorboard=False):
    return write_spec(
        tmp_path, "run",
        model={"factory": "reconfx.zoo:small_resnet", "kwargs": {"num_classes": 10, "width": 8}},
        inputs=[{"name": "image", "shape": [8, 1, 12, 12]}],
        tasks=[{"name": "left", "loss": "cross_entropy", "metric": "accuracy", "baseline": 0.5},
               {"name": "right", "loss": "cross_entropy", "metric": "accuracy",
                "baseline": 0.5}],
        data={"factory": "reconfx.data:multidigits", "kwargs": {"size": 2048},
              "batch_size": 64, "workers": workers},
        profile={"steps": 12, "threshold": -0.1}, select=select,
        train={"aggregator": aggregator, "epochs": 3, "lr": 3.0e-3, "init": init,
               "sparse": sparse},
        export={"dir": str(tmp_path / "out"), "tensorboard": tensorboard})


def test_run_profiles_branches_trains_and_emits_trained_weights(tmp_path, capsys):
    spec = run_spec_file(tmp_path, {"top_k": 4})
    assert main(["run", str(spec), "--quiet"]) == 0
    out = tmp_path / "out"
    assert listing(out) == sorted(
        ARTIFACTS + ["checkpoints", "conflicts.json", "conflicts.png", "metrics.csv",
                     "steps.csv"])
    rows = [row.split(",") for row in (out / "metrics.csv").read_text().splitlines()]
    assert rows[0] == ["epoch", "lr", "loss/left", "loss/right", "conflict/strong",
                       "conflict/valid", "conflict/strong_share", "val/left", "val/right"]
    assert [row[0] for row in rows[1:]] == ["1", "2", "3"]
    # The epochs' strong conflicts add up to the training total report.md gives.
    strong, valid = (sum(int(row[i]) for row in rows[1:]) for i in (4, 5))
    assert (f"{100 * strong / valid:.1f}% while training the branched one"
            in (out / "report.md").read_text())
    assert all(float(row[6]) == pytest.approx(int(row[4]) / int(row[5])) for row in rows[1:])
    # steps.csv: every step's learning rate and losses; each epoch's mean is metrics.csv's loss.
    steps = [row.split(",") for row in (out / "steps.csv").read_text().splitlines()]
    assert steps[0] == ["step", "epoch", "lr", "loss/left", "loss/right"]
    assert [int(row[0]) for row in steps[1:]] == list(range(1, len(steps)))
    for epoch, row in enumerate(rows[1:], 1):
        losses = [float(s[3]) for s in steps[1:] if int(s[1]) == epoch]
        assert len(losses) == (len(steps) - 1) // 3
        assert sum(losses) / len(losses) == pytest.approx(float(row[2]), rel=1e-4)
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        ".reconfx-files", "best.safetensors", "last.safetensors"]
    assert all(outdir.recorded(checkpoints, n) for n in ("best.safetensors", "last.safetensors"))
    report = (out / "report.md").read_text()
    assert report.startswith("# reconfx run: run")
    assert "branched layers: 4 of 24 shared" in report
    assert "| left | accuracy |" in report and "delta-m vs the single-task baselines" in report
    assert "strongly conflicting gradient pairs" in report
    conflicts = json.loads((out / "conflicts.json").read_text())
    assert sum(row["branched"] for row in conflicts["layers"]) == 4
    # The strong-conflict shares before and after branching, as report.md gives them, are in
    # conflicts.json for the chart's side panel.
    after = conflicts["after_branching"]
    assert after["layers"] == 20 and after["profile_steps"] == conflicts["steps"]
    assert (f"in the 20 remaining shared layers: {100 * after['before']:.1f}% while profiling"
            in report)
    assert f"{100 * after['after']:.1f}% while training the branched one" in report
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"]["weights.safetensors"]["command"] == "run"
    assert_ruff_clean(out / "model.py")
    # The emitted weights are the trained ones: the reloaded model scores exactly the test
    # accuracy the run reported, well above chance (0.1).
    model = reconfx.load(out)
    test = multidigits("test", 0, size=2048)
    with torch.no_grad():
        accuracy = (model(image=test.images)["left"].argmax(-1) == test.left).float().mean()
    assert f"| left | accuracy | {accuracy.item():.4f} |" in report
    assert accuracy > 0.3
    capsys.readouterr()
    assert main(["eval", str(spec)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ["task", "metric", "test"]
    rows = {line.split()[0]: line.split()[1:] for line in printed[2:4]}
    assert set(rows) == {"left", "right"} and rows["left"][0] == "accuracy"
    assert printed[4].startswith("delta-m vs the single-task baselines in the spec: ")
    assert f"| left | accuracy | {float(rows['left'][1]):.4f} |" in report  # same as run


def test_run_with_explicit_layers_and_sparse_training(tmp_path):
    spec = run_spec_file(tmp_path, {"layers": ["layer4.*"]}, aggregator="mgda",
                         sparse={"fraction": 0.6}, workers=2)  # (two loader processes)
    assert main(["run", str(spec), "--quiet"]) == 0
    out = tmp_path / "out"
    assert not (out / "conflicts.json").exists()  # an explicit choice needs no profile
    assert "- sparse training: 6" in (out / "report.md").read_text()
    assert torch.isfinite(next(iter(reconfx.load(out).parameters()))).all()


def scalars(folder):
    """TensorBoard's reading of the event files in ``folder``: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def test_run_writes_tensorboard_scalars_live_and_compile_clears_them(tmp_path):
    spec = run_spec_file(tmp_path, {"layers": ["layer4.*"]}, aggregator="ew", tensorboard=True)
    assert main(["run", str(spec), "--quiet"]) == 0
    out = tmp_path / "out"
    found = scalars(out / "tensorboard")
    steps = [row.split(",") for row in (out / "steps.csv").read_text().splitlines()[1:]]
    epochs = [row.split(",") for row in (out / "metrics.csv").read_text().splitlines()[1:]]
    assert sorted(found) == sorted(["step/lr", "step/loss/left", "step/loss/right", "lr",
                                    "loss/left", "loss/right", "val/left", "val/right",
                                    "conflict/strong", "conflict/valid",
                                    "conflict/strong_share"])
    # every step's loss, and each epoch's row at the step that ended it, as the CSVs hold them
    assert [s for s, _v in found["step/loss/left"]] == [int(row[0]) for row in steps]
    assert [v for _s, v in found["step/loss/left"]] == pytest.approx(
        [float(row[3]) for row in steps], rel=1e-5)  # (6 digits in the CSV, float32 in TB)
    ends = [max(int(s[0]) for s in steps if s[1] == row[0]) for row in epochs]
    assert [s for s, _v in found["val/right"]] == ends
    assert [v for _s, v in found["val/right"]] == pytest.approx(
        [float(row[-1]) for row in epochs], rel=1e-5)
    assert outdir.owned(out) and "tensorboard" not in json.loads(
        (out / "manifest.json").read_text())["files"]
    assert main(["compile", str(spec), "--quiet"]) == 0  # a new model: old scalars go
    assert not (out / "tensorboard").exists() and not (out / "checkpoints").exists()


def test_a_resumed_run_keeps_the_scalars_up_to_its_step_and_drops_the_rest(tmp_path):
    from reconfx.train.scalars import TensorBoard

    first = TensorBoard(tmp_path)
    for step in range(1, 11):
        first.add(step, {"step": step, "loss/left": float(step)})
    first.close()
    resumed = TensorBoard(tmp_path, start=6)  # resumed from the state saved after step 6
    for step in range(7, 9):
        resumed.add(step, {"loss/left": -float(step)})
    resumed.close()
    assert scalars(tmp_path) == {"loss/left": [(s, float(s)) for s in range(1, 7)]
                                 + [(7, -7.0), (8, -8.0)]}
    TensorBoard(tmp_path).close()  # a fresh run starts afresh
    assert scalars(tmp_path) == {}


def test_tensorboard_without_its_package_is_a_spec_error_before_any_work(tmp_path,
                                                                          monkeypatch, capsys):
    import sys

    spec = run_spec_file(tmp_path, {"top_k": 4}, tensorboard=True)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    assert main(["run", str(spec), "--quiet"]) != 0
    err = capsys.readouterr().err
    assert "export.tensorboard" in err and "pip install 'reconfx[tensorboard]'" in err
    assert not (tmp_path / "out").exists()


def test_the_demo_recipe_repeats_exactly_whatever_threads_the_process_starts_with(tmp_path):
    """The demo's recipe (default spec: profile, branch the top layers, PCGrad) on a subset, run
    twice in fresh processes that start with 1 and with 3 CPU threads: with train.threads fixed
    in the spec, the conflict counts, the chosen layers and the test metrics are identical.
    (Without it, a count near the threshold can flip with the threads that split a kernel's
    sums, and with it the chosen layers and every metric: the full demo once reached different
    accuracies with 1 and with 2 threads.)"""
    import os
    import subprocess
    import sys

    import yaml

    demo = yaml.safe_load(open("specs/multidigits.yaml"))
    assert demo["train"]["threads"] == 2
    results = []
    for threads in (1, 3):
        out = tmp_path / f"threads{threads}"
        fields = {k: v for k, v in demo.items() if k != "name"}
        spec = write_spec(tmp_path, f"demo{threads}", **{
            **fields, "data": {**demo["data"], "kwargs": {"size": 1024}},
            "profile": {**demo["profile"], "steps": 20},
            "train": {**demo["train"], "epochs": 1},
            "export": {"formats": ["python"], "dir": str(out)}})
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        done = subprocess.run([sys.executable, "-m", "reconfx", "run", str(spec), "--quiet"],
                              env=env, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
        conflicts = json.loads((out / "conflicts.json").read_text())
        report = (out / "report.md").read_text()
        metrics = [line for line in report.splitlines() if line.startswith("| left |")
                   or line.startswith("| right |")]
        results.append(([(r["name"], r["score"], r["branched"]) for r in conflicts["layers"]],
                        metrics))
    assert results[0] == results[1]
    assert len(results[0][1]) == 2
