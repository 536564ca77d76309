"""Reliability: faults in the model or the data stop a run with the step, task and layer named;
nothing is half-written when a process is killed or the disk fails; interrupted runs resume to
exactly the uninterrupted result; untrusted files execute nothing; runs are deterministic."""

from __future__ import annotations

import errno
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import reconfx
from reconfx import commands, outdir, pipeline
from reconfx.cli import main
from reconfx.errors import ModelError, TrainingError
from reconfx.layers import Layer
from reconfx.spec import load_spec_file
from reconfx.train.aggregators import aggregator
from reconfx.train.resume import Batches
from reconfx.train.step import MultiTaskStep
from tests.support import ARTIFACTS, resnet_spec, write_spec

ROOT = Path(__file__).resolve().parents[1]
MLP = "tests.models:DigitsMLP"


def digits_spec(tmp_path: Path, name: str = "rel", model: str = "reconfx.zoo:small_resnet",
                kwargs: dict | None = None, data: str = "reconfx.data:multidigits",
                size: int = 256, **fields) -> Path:
    base = dict(
        model={"factory": model, "kwargs": kwargs if kwargs is not None else {"width": 8}},
        inputs=[{"name": "image", "shape": [4, 1, 12, 12]}],
        tasks=[{"name": "left", "loss": "cross_entropy"},
               {"name": "right", "loss": "cross_entropy"}],
        data={"factory": data, "kwargs": {"size": size}, "batch_size": 32},
        profile={"steps": 12, "threshold": -0.1}, select={"top_k": 2},
        train={"epochs": 1, "lr": 1e-3}, export={"dir": str(tmp_path / "out")})
    base.update(fields)
    return write_spec(tmp_path, name, **base)


def run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, list[str]]:
    code = main(args)
    return code, capsys.readouterr().err.splitlines()


# --- models and data that break ------------------------------------------------------------


@pytest.mark.parametrize("select,phase", [({"top_k": 2}, "profiling step "),
                                          ({"layers": ["layer4.*"]}, "training epoch 1, batch ")])
def test_nan_in_the_data_names_the_input_and_the_step(tmp_path, capsys, select, phase):
    spec = digits_spec(tmp_path, data="tests.models:PoisonedDigits", select=select)
    code, err = run_cli(["run", str(spec), "--quiet"], capsys)
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith(f"reconfx: error: {phase}"), err
    assert "is not finite (losses: nan, nan); input 'image' of this batch holds NaN" in err[0]
    assert not (tmp_path / "out" / "model.py").exists()


def test_divergence_names_the_first_non_finite_layer_with_weights_intact(tmp_path):
    spec = digits_spec(tmp_path, model=MLP, kwargs={},
                       train={"epochs": 1, "lr": 1e8, "optimizer": "sgd"})
    prepared = pipeline.prepare(spec)
    with pytest.raises(TrainingError) as caught:
        pipeline.profile_prepared(prepared, progress=False)
    text = str(caught.value)
    assert text.startswith("profiling step ") and "the loss of task" in text, text
    assert "the first non-finite value is" in text, text
    assert any(f"'{layer}'" in text for layer in ("trunk", "mid", "left", "right")), text
    # the check runs before the optimiser step: the weights that failed are all finite
    assert all(torch.isfinite(p).all() for p in prepared.traced.module.parameters())


def test_non_finite_gradient_with_finite_losses_names_task_and_parameters(tmp_path):
    spec = digits_spec(tmp_path, model=MLP, kwargs={"sqrt": True})
    prepared = pipeline.prepare(spec)
    before = {k: v.clone() for k, v in prepared.traced.module.state_dict().items()}
    with pytest.raises(TrainingError) as caught:
        pipeline.profile_prepared(prepared, progress=False)
    text = str(caught.value)
    assert text.startswith("profiling step 1 of 12: the losses are finite"), text
    assert "task 'left' in the shared parameters trunk.weight, trunk.bias" in text, text
    after = prepared.traced.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing was updated


def test_task_without_gradient_is_reported(tmp_path, capsys):
    spec = digits_spec(tmp_path, model=MLP, kwargs={"detach_right": True})
    code, err = run_cli(["profile", str(spec), "--quiet"], capsys)
    assert code == 0
    assert err == ["reconfx: warning: task 'right' sent no gradient to 1 shared layer(s) in 12 "
                   "profiling steps: mid (its loss does not depend on them: detached, multiplied "
                   "by zero or dead activations; they score no conflicts with it)"]
    rows = {r["name"]: r for r in json.loads((tmp_path / "out" / "conflicts.json").read_text())
            ["layers"]}
    assert rows["mid"]["tasks_without_gradient"] == ["right"]
    assert rows["mid"]["valid_pairs"] == 0 and rows["mid"]["score"] == 0
    assert rows["trunk"]["tasks_without_gradient"] == [] and rows["trunk"]["valid_pairs"] == 12


class Changing(nn.Module):
    """Task 'b' has 3 outputs on the first call and 4 after."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        h = self.fc(x)
        return {"a": h, "b": h[:, :3] if self.calls == 1 else h}


def one_step(module: nn.Module, loss=torch.nn.functional.mse_loss,
             precision: str = "fp32") -> MultiTaskStep:
    shared = Layer("fc", "Linear", ("fc",), (), 20, ("a", "b"), 0)
    return MultiTaskStep(module, [shared], tasks=["a", "b"], loss_fns=[loss, loss],
                         aggregate=aggregator("ew", 2),
                         optimizer=torch.optim.SGD(module.parameters(), lr=0.1),
                         precision=precision)


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc(x)
        return {"a": h, "b": h * 2}


def test_fp16_does_not_skip_non_finite_losses_forever():
    """fp16 skips steps whose scaled gradients overflow; a loss that is itself NaN is an error,
    not an endless run of skipped steps."""
    step = one_step(TwoHeads(), precision="fp16")
    x = torch.randn(5, 4)
    x[2, 1] = float("nan")
    with pytest.raises(TrainingError, match="the loss of tasks 'a', 'b' is not finite "
                                            r"\(losses: nan, nan\); input 'x' of this batch"):
        step({"x": x}, {"a": torch.randn(5, 4), "b": torch.randn(5, 4)})


def test_output_shape_changing_between_batches_is_a_model_error():
    step = one_step(Changing())
    x = torch.randn(5, 4)
    step({"x": x}, {"a": torch.randn(5, 4), "b": torch.randn(5, 3)})
    with pytest.raises(ModelError, match=r"the output of task 'b' changed shape between batches "
                                         r"of same-shaped inputs: \(batch, 3\) then \(batch, 4\)"):
        step({"x": x}, {"a": torch.randn(5, 4), "b": torch.randn(5, 4)})


def test_loss_that_rejects_output_and_target_is_a_model_error():
    step = one_step(nn.ModuleDict({"fc": nn.Linear(4, 4)}))
    step.module.forward = lambda x: {"a": step.module["fc"](x), "b": step.module["fc"](x)}
    with pytest.raises(ModelError, match=r"tasks\[1\]\.loss: the loss of task 'b' cannot compare "
                                         r"the model's output \(5, 4\) torch.float32 with the "
                                         r"target \(5, 7\)"):
        step({"x": torch.randn(5, 4)}, {"a": torch.randn(5, 4), "b": torch.randn(5, 7)})
    with pytest.raises(ModelError, match="targets have no entry for task 'a'"):
        step({"x": torch.randn(5, 4)}, {"b": torch.randn(5, 4)})


# --- resume -----------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_follow_the_dataloader_order_and_resume_mid_epoch(workers):
    """The same batches in the same order with data-loader worker processes (data.workers),
    and a position to resume from that counts the batches handed out, not those the workers
    loaded ahead."""
    data = torch.utils.data.TensorDataset(torch.arange(50))
    reference = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True,
                                            generator=torch.Generator().manual_seed(3))
    expected = [b[0].tolist() for _ in range(3) for b in reference]
    stream = Batches(data, 8, 3, workers=workers)
    got = [b[0].tolist() for _ in range(3) for b in stream.epoch_batches()]
    assert got == expected
    first = Batches(data, 8, 3, workers=workers)
    taken = []
    for batch in first.epoch_batches():
        taken.append(batch[0].tolist())
        if len(taken) == 4:
            break
    state = first.state_dict()
    assert state["index"] == 4
    resumed = Batches(data, 8, 99)
    resumed.load_state_dict(state)
    rest = [b[0].tolist() for b in resumed.epoch_batches()]
    rest += [b[0].tolist() for _ in range(2) for b in resumed.epoch_batches()]
    assert taken + rest == expected


def resume_spec(folder: Path) -> Path:
    folder.mkdir()
    return digits_spec(folder, name="a", size=640, profile={"steps": 60, "threshold": -0.1},
                       select={"top_k": 6},
                       train={"epochs": 3, "checkpoint_every": 5, "aggregator": "pcgrad"})


def resume_state(path: Path) -> dict | None:
    from reconfx.train.resume import stored_state

    try:
        return stored_state(path)
    except Exception:  # not there yet, or being replaced
        return None


def metric_rows(out: Path) -> list[str]:
    return [line for line in (out / "report.md").read_text().splitlines()
            if line.startswith(("| left", "| right"))]


@pytest.mark.parametrize("phase", ["profiling", "train"])
def test_run_killed_mid_phase_resumes_to_the_uninterrupted_result(tmp_path, phase):
    """SIGKILL a `reconfx run` subprocess after its first checkpoint in ``phase``; `--resume`
    gives the same conflict counts, weights and test metrics as a run that was never stopped."""
    reference = tmp_path / "reference" / "out"
    commands.run_spec(resume_spec(tmp_path / "reference"), progress=False)
    spec = resume_spec(tmp_path / "resumed")
    out = tmp_path / "resumed" / "out"
    state_file = out / "checkpoints" / "resume.pt"
    process = subprocess.Popen([sys.executable, "-m", "reconfx", "run", str(spec), "--quiet"],
                               cwd=ROOT, stderr=subprocess.PIPE, text=True)
    seen = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        state = resume_state(state_file) if state_file.exists() else None
        if state is not None and state["phase"] == phase:
            process.send_signal(signal.SIGKILL)
            seen = state
            break
        time.sleep(0.01)
    process.wait(timeout=60)
    assert seen is not None, f"the run ended before a {phase} checkpoint: {process.stderr.read()}"
    assert not (out / "weights.safetensors").exists()
    final = resume_state(state_file)  # the kill may land after one more checkpoint
    done = commands.run_spec(spec, progress=False, resume=True)
    assert done.notes == (f"resuming from {state_file} ({final['phase']} step {final['step']})",)
    for name in ("weights.safetensors", "conflicts.json", "model.py"):
        assert (reference / name).read_bytes() == (out / name).read_bytes(), name
    assert metric_rows(reference) == metric_rows(out) and len(metric_rows(out)) == 2
    assert not state_file.exists()  # removed once the run has written its artifacts


def test_resume_refuses_a_checkpoint_of_another_spec_or_command(tmp_path, capsys):
    spec = digits_spec(tmp_path, train={"epochs": 1, "checkpoint_every": 4})
    folder = tmp_path / "out" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save({"format": 2, "command": "run", "spec_sha256": "0" * 64, "digest": "",
                "payload": torch.zeros(0, dtype=torch.uint8)}, folder / "resume.pt")
    outdir.record(folder, "resume.pt")  # (as if reconfx had written it: checked on resume)
    code, err = run_cli(["run", str(spec), "--quiet", "--resume"], capsys)
    assert code == 2 and err == [
        f"reconfx: error: {folder / 'resume.pt'}: the checkpoint was written for a different "
        "version of the spec (fix: restore the spec, or delete the checkpoint and run without "
        "--resume)"]
    code, err = run_cli(["profile", str(spec), "--quiet", "--resume"], capsys)
    assert code == 2 and "written by `reconfx run`, not `profile`" in err[0]


def test_a_resume_checkpoint_changed_after_writing_is_refused(tmp_path):
    """resume.pt carries a sha256 over the spec's hash and its state: a state swapped in (the
    same spec and command, a plausible step) is refused instead of trusted."""
    import io

    from reconfx.errors import SpecError
    from reconfx.train.resume import Checkpoint

    spec_sha = "1" * 64
    Checkpoint(tmp_path, "run", spec_sha, every=1).save("train", {"step": 3})
    assert Checkpoint(tmp_path, "run", spec_sha, every=1, resume=True).state["step"] == 3
    data = torch.load(tmp_path / "resume.pt", weights_only=True)
    forged = io.BytesIO()
    torch.save({"phase": "train", "step": 999}, forged)
    payload = torch.frombuffer(bytearray(forged.getvalue()), dtype=torch.uint8)
    torch.save({**data, "payload": payload}, tmp_path / "resume.pt")
    with pytest.raises(SpecError, match="content does not match the hash it carries"):
        Checkpoint(tmp_path, "run", spec_sha, every=1, resume=True)
    with pytest.raises(SpecError, match="written for a different version of the spec"):
        Checkpoint(tmp_path, "run", "2" * 64, every=1, resume=True)


@pytest.mark.parametrize("broken", ["missing part", "wrong shape", "no step"])
def test_a_resume_checkpoint_that_does_not_fit_the_run_is_one_line(tmp_path, capsys, broken):
    """A resume.pt whose hash matches (written by reconfx for this spec, or forged with the
    hash recomputed) but whose state does not fit the model is refused in one line naming the
    file, before training goes on from a half-loaded state."""
    from reconfx.train.resume import Checkpoint

    spec = digits_spec(tmp_path, train={"epochs": 1, "checkpoint_every": 4},
                       select={"layers": ["layer4.*"]})
    loaded = load_spec_file(spec)
    folder = tmp_path / "out" / "checkpoints"
    folder.mkdir(parents=True)
    state = {"step": 2, "rng": {"torch": torch.get_rng_state()},
             "model": {"conv1.weight": torch.zeros(3)}}
    if broken == "missing part":
        del state["model"]
    if broken == "no step":
        del state["step"]
    Checkpoint(folder, "run", loaded.sha256, every=1).save("train", state)
    code, err = run_cli(["run", str(spec), "--quiet", "--resume"], capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("reconfx: error: ") and "checkpoints/resume.pt: the resume " \
        "checkpoint " in err[0]
    assert {"missing part": "does not fit this run (no 'model')",
            "wrong shape": "does not fit this run (RuntimeError: Error(s) in loading",
            "no step": "holds no phase and step"}[broken] in err[0]
    assert "(fix: delete it and run without --resume)" in err[0]


def test_running_out_of_memory_is_one_line_naming_the_example_shapes(tmp_path, capsys,
                                                                      monkeypatch):
    """An allowed example (up to 2^28 elements per input) that does not fit in memory: the
    message is the one torch's CPU allocator raises."""
    def allocate(*_args, **_kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not "
                           "enough memory: you tried to allocate 1073741824 bytes.")

    monkeypatch.setattr(pipeline, "spec_examples", allocate)
    code, err = run_cli(["compile", str(digits_spec(tmp_path, select={"layers": ["layer4.*"]})),
                         "--quiet"], capsys)
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("reconfx: error: ran out of memory (RuntimeError: [enforce fail")
    assert "fix: give smaller example shapes in inputs[].shape" in err[0]


class Payload:
    """Pickles to a call of os.system: what a hostile checkpoint would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_pickles_are_refused_and_never_run(tmp_path, capsys):
    marker = tmp_path / "pwned"
    hostile = tmp_path / "model.pt"
    torch.save({"conv1.weight": Payload(marker)}, hostile)
    spec = digits_spec(tmp_path, name="ckpt", model="reconfx.zoo:small_resnet",
                       kwargs={"width": 8})
    text = spec.read_text().replace("  kwargs:\n    width: 8\n",
                                    f"  kwargs:\n    width: 8\n  checkpoint: {hostile}\n")
    spec.write_text(text)
    code, err = run_cli(["compile", str(spec), "--quiet"], capsys)
    assert err == [f"reconfx: error: {spec}: model.checkpoint: cannot read checkpoint "
                   f"'{hostile}': it holds a reference to posix.system, which a weights-only "
                   "load refuses (unpickling it would run code) (fix: save it with "
                   "torch.save(model.state_dict()) or safetensors)"] and code == 2
    with hostile.open("wb") as f:  # a bare pickle (not torch's zip format)
        pickle.dump({"conv1.weight": Payload(marker)}, f)
    code, err = run_cli(["compile", str(spec), "--quiet"], capsys)
    assert code == 2 and "it holds Python objects besides tensors, which a weights-only load " \
        "refuses" in err[0], err
    spec.write_text(text.replace(f"  checkpoint: {hostile}\n", ""))
    folder = tmp_path / "out" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save({"format": 1, "payload": Payload(marker)}, folder / "resume.pt")
    outdir.record(folder, "resume.pt")  # (planted where reconfx's own would be)
    code, err = run_cli(["run", str(spec), "--quiet", "--resume"], capsys)
    assert err == [f"reconfx: error: {folder / 'resume.pt'}: cannot read the resume checkpoint: "
                   "it holds a reference to posix.system, which a weights-only load refuses "
                   "(unpickling it would run code) (fix: delete it and run without --resume)"]
    assert not marker.exists()


# --- nothing half-written ---------------------------------------------------------------------

KILLER = textwrap.dedent("""
    import os, signal, sys
    import safetensors.torch
    mode = sys.argv.pop(1)
    if mode == "mid-write":  # half a weights file, then the process dies
        def save_file(tensors, path, metadata=None):
            with open(path, "wb") as f:
                f.write(b"half a file")
            os.kill(os.getpid(), signal.SIGKILL)
        safetensors.torch.save_file = save_file
    else:  # dies between two of the commit's renames
        real, moved = os.replace, []
        def replace(src, dst):
            if ".staging-" in str(src) and not str(src).endswith(".tmp"):
                moved.append(src)
                if len(moved) == 3:
                    os.kill(os.getpid(), signal.SIGKILL)
            return real(src, dst)
        os.replace = replace
    from reconfx.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def killed(mode: str, spec: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-c", KILLER, mode, "compile", str(spec), "--quiet"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr
    return done


def test_killed_mid_write_leaves_the_previous_artifacts_intact(tmp_path):
    out = tmp_path / "out"
    commands.compile_spec(resnet_spec(tmp_path, ["layer4.*"], out))
    before = {name: (out / name).read_bytes() for name in ARTIFACTS}
    killed("mid-write", resnet_spec(tmp_path, ["layer3.*"], out))
    assert {name: (out / name).read_bytes() for name in ARTIFACTS} == before
    assert len(list(out.glob(".staging-*"))) == 1  # the dead process's half-written folder
    assert reconfx.load(out) is not None
    assert not list(out.glob(".staging-*"))  # removed by the next one to open the folder


def test_killed_mid_commit_is_finished_by_the_next_reader(tmp_path):
    out, clean = tmp_path / "out", tmp_path / "clean"
    commands.compile_spec(resnet_spec(tmp_path, ["layer4.*"], out))
    before = {name: (out / name).read_bytes() for name in ARTIFACTS}
    killed("mid-commit", resnet_spec(tmp_path, ["layer3.*"], out))
    changed = [name for name in ARTIFACTS if (out / name).read_bytes() != before[name]]
    # model.py and original.py moved (original.py is the same text for the two selections
    # where both are written on task rows, each calling every stage whole), then the process
    # died: branch.diff and the weights are still the old compile's
    assert changed in (["model.py"], ["model.py", "original.py"])
    assert len(list(out.glob(".staging-*"))) == 1
    model = reconfx.load(out)  # finishes the commit: every file is the new compile's
    assert not list(out.glob(".staging-*"))
    commands.compile_spec(resnet_spec(tmp_path, ["layer3.*"], clean))
    for name in ("model.py", "original.py", "branch.diff", "weights.safetensors"):
        assert (out / name).read_bytes() == (clean / name).read_bytes(), name
    assert sorted(model.state_dict()) == sorted(reconfx.load(clean).state_dict())


def test_checkpoint_killed_mid_write_keeps_the_previous_one(tmp_path):
    """Checkpoints and resume.pt are single files replaced atomically: a process killed while
    writing the new one leaves the old one loadable, and its temporary is removed next time."""
    path = tmp_path / "checkpoints" / "last.safetensors"
    module = nn.Linear(3, 2)
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from reconfx.artifacts import replace_file
        def half(p):
            Path(p).write_bytes(b"half a checkpoint")
            os.kill(os.getpid(), signal.SIGKILL)
        replace_file(Path({str(path)!r}), half)
    """)
    from reconfx.artifacts import replace_file, save_weights

    replace_file(path, lambda p: save_weights(module, p))
    before = path.read_bytes()
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, timeout=120)
    assert done.returncode == -signal.SIGKILL
    assert path.read_bytes() == before and len(list(path.parent.glob(".*.tmp"))) == 1
    from safetensors.torch import load_model

    load_model(nn.Linear(3, 2), str(path))
    replace_file(path, lambda p: save_weights(module, p))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.safetensors"]


def test_a_live_writers_temporary_is_kept_and_a_dead_ones_removed_whatever_its_pid(tmp_path):
    """Whether a temporary's writer still runs is decided by its flock, not by a process id:
    a reader in another PID namespace, or a reused PID, cannot delete a live writer's file."""
    import fcntl

    from reconfx.artifacts import replace_text

    path = tmp_path / "report.md"
    live = tmp_path / ".report.md.0123456789ab.tmp"  # (no PID in the name at all)
    live.write_text("being written")
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a writer elsewhere holds it
    try:
        replace_text(path, "one")
        assert live.read_text() == "being written"
    finally:
        os.close(fd)  # the writer dies: the kernel drops its lock
    replace_text(path, "two")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]
    assert path.read_text() == "two"


def test_disk_full_and_permission_denied_are_one_line_errors(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    spec = resnet_spec(tmp_path, ["layer4.*"], out)
    commands.compile_spec(spec)
    before = {name: (out / name).read_bytes() for name in ARTIFACTS}
    import safetensors.torch

    def full(*args, **kwargs):
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left "
                                          "on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    code, err = run_cli(["compile", str(spec), "--quiet"], capsys)
    assert code == 1 and err == [f"reconfx: error: export.dir: cannot write the output folder "
                                 f"{out}: the disk is full (fix: choose a writable folder with "
                                 "free space)"]
    assert {name: (out / name).read_bytes() for name in ARTIFACTS} == before
    monkeypatch.undo()
    if not refuses_writes(Path("/sys")):
        pytest.skip("needs a folder the OS refuses to write (/sys)")
    denied = resnet_spec(tmp_path, ["layer3.*"], Path("/sys/reconfx-test"), name="deny")
    code, err = run_cli(["compile", str(denied), "--quiet"], capsys)
    assert code == 1 and len(err) == 1 and err[0].startswith(
        "reconfx: error: export.dir: cannot write the output folder /sys/reconfx-test: "
        f"{os.strerror(errno.EACCES).lower()}"), err


def refuses_writes(folder: Path) -> bool:
    try:
        (folder / "reconfx-probe").mkdir()
    except OSError:
        return True
    (folder / "reconfx-probe").rmdir()
    return False


# --- determinism ------------------------------------------------------------------------------


def test_same_spec_and_seed_give_identical_artifacts_across_processes(tmp_path):
    """Two `reconfx run` processes with different hash seeds: same selected layers, byte-
    identical source, weights and conflict statistics, the same test metrics."""
    outs = []
    for hash_seed in ("1", "2"):
        folder = tmp_path / f"h{hash_seed}"
        folder.mkdir()
        spec = digits_spec(folder, name="det", profile={"steps": 10, "threshold": -0.1},
                           select={"top_k": 5})
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        done = subprocess.run([sys.executable, "-m", "reconfx", "run", str(spec), "--quiet"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        outs.append(folder / "out")
    a, b = outs
    for name in ("model.py", "original.py", "branch.diff", "weights.safetensors",
                 "conflicts.json", "checkpoints/best.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert metric_rows(a) == metric_rows(b) and len(metric_rows(a)) == 2
