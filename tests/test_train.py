"""The multi-task step and training loop: shared layers get the aggregated gradient (scaled by
T), task-specific copies their own task's gradient; every aggregator runs; training learns."""

import copy
import re

import pytest
import torch
from safetensors.torch import load_file, load_model

from reconfx.build import call_data_factory
from reconfx.errors import SpecError
from reconfx.layers import inventory
from reconfx.pipeline import prepare
from reconfx.rewrite import branch
from reconfx.selection import select_layers
from reconfx.spec import TrainSpec
from reconfx.train.aggregators import AGGREGATORS, aggregator
from reconfx.train.loop import delta_m, evaluate, fit
from reconfx.train.objectives import METRICS, loss_functions, metric_functions
from reconfx.train.precision import DTYPES, resolve_device
from reconfx.train.resume import Batches
from reconfx.train.step import MultiTaskStep
from tests.support import write_spec


@pytest.fixture(scope="module")
def branched(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train")
    spec = write_spec(folder, "train",
                      model={"factory": "reconfx.zoo:small_resnet",
                             "kwargs": {"num_classes": 10, "width": 8}},
                      inputs=[{"name": "image", "shape": [4, 1, 12, 12]}],
                      tasks=[{"name": "left", "loss": "cross_entropy"},
                             {"name": "right", "loss": "cross_entropy"}],
                      data={"factory": "reconfx.data:multidigits", "kwargs": {"size": 256},
                            "batch_size": 32},
                      select={"layers": ["layer4.0.conv2", "layer4.0.bn2"]})
    prepared = prepare(spec)
    s = prepared.loaded.spec
    chosen = select_layers(prepared.layers, s.select)
    compiled = branch(prepared.traced.module, chosen, s.task_names)
    data = call_data_factory(s.data, "train", 0, "spec")
    return s, compiled, data


def batch(data, n=16):
    items = [data[i] for i in range(n)]
    inputs = {"image": torch.stack([x["image"] for x, _ in items])}
    targets = {t: torch.stack([y[t] for _, y in items]) for t in ("left", "right")}
    return inputs, targets


def test_shared_layers_get_the_aggregate_and_copies_their_own_gradient(branched):
    s, compiled, data = branched
    module = compiled.module
    layers = inventory(module, s.task_names)
    shared = [x for x in layers if x.shared]
    sgd = torch.optim.SGD(module.parameters(), lr=0.0)
    pcgrad = aggregator("pcgrad", 2)
    step = MultiTaskStep(module, shared, tasks=s.task_names,
                         loss_fns=loss_functions(list(s.tasks), "s"), aggregate=pcgrad,
                         optimizer=sgd)
    inputs, targets = batch(data)
    module.train()
    torch.manual_seed(0)
    step(inputs, targets)
    # Recompute by hand: per-task gradients of the same losses from the same state.
    torch.manual_seed(0)
    losses = step.losses(inputs, targets)
    shared_params = step.buffer.params
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        losses[t], shared_params, retain_graph=True)]) for t in range(2)]
    expected = pcgrad(torch.stack(rows))
    got = torch.cat([p.grad.reshape(-1) for p in shared_params])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    copy_left = module.get_submodule("layer4.0.conv2.left").weight
    own = torch.autograd.grad(losses[0], copy_left, retain_graph=True)[0]
    torch.testing.assert_close(copy_left.grad, own, rtol=1e-6, atol=1e-8)


def test_ew_is_the_gradient_of_the_summed_losses():
    matrix = torch.tensor([[1.0, 2.0], [3.0, -4.0]])
    assert torch.equal(aggregator("ew", 2)(matrix), torch.tensor([4.0, -2.0]))


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_every_aggregator_trains_one_step(branched, name):
    s, compiled, data = branched
    module = compiled.module
    shared = [x for x in inventory(module, s.task_names) if x.shared]
    adam = torch.optim.Adam(module.parameters(), lr=1e-3)
    step = MultiTaskStep(module, shared, tasks=s.task_names,
                         loss_fns=loss_functions(list(s.tasks), "s"),
                         aggregate=aggregator(name, 2), optimizer=adam)
    before = [p.detach().clone() for p in step.buffer.params]
    losses = step(*batch(data))
    assert losses.shape == (2,) and torch.isfinite(losses).all()
    assert any(not torch.equal(a, p) for a, p in zip(before, step.buffer.params, strict=True))


def test_fit_learns_multidigits(branched, tmp_path):
    s, compiled, data = branched
    module = compiled.module
    shared = [x for x in inventory(module, s.task_names) if x.shared]
    metrics = metric_functions(list(s.tasks), "s")
    val = call_data_factory(s.data.model_copy(update={"kwargs": {"size": 256}}), "val", 0, "s")
    before = evaluate(module, val, tasks=s.task_names, metrics=metrics)
    result = fit(module, shared=shared, tasks=s.task_names,
                 loss_fns=loss_functions(list(s.tasks), "s"), metrics=metrics,
                 aggregate=aggregator("ew", 2), batches=Batches(data, 32, 0, drop_last=True),
                 val_data=val, settings=TrainSpec(epochs=3, lr=3e-3), progress=False,
                 checkpoints=tmp_path / "ckpt")
    assert len(result.history) == 3
    first, last = result.history[0], result.history[-1]
    assert last["loss/left"] < first["loss/left"] and last["loss/right"] < first["loss/right"]
    after = evaluate(module, val, tasks=s.task_names, metrics=metrics)
    assert after == result.best  # the best epoch's weights are the ones kept
    assert after["left"] > before["left"] and after["right"] > before["right"]
    # Checkpoints: best.safetensors holds the kept weights, last.safetensors the final epoch's.
    # (each recorded in the folder's ledger, which proves them reconfx's)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        ".reconfx-files", "best.safetensors", "last.safetensors"]
    restored = copy.deepcopy(module)
    for p in restored.parameters():
        p.data.zero_()
    load_model(restored, str(tmp_path / "ckpt" / "best.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(restored.state_dict().values(),
                                                 module.state_dict().values(), strict=True))
    last = load_file(str(tmp_path / "ckpt" / "last.safetensors"))
    same = all(torch.equal(last[k], v) for k, v in module.state_dict().items() if k in last)
    assert same == (result.best_epoch == 2)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_steps_learn_and_keep_float32_state(branched, precision):
    s, compiled, data = branched
    module = copy.deepcopy(compiled.module)
    shared = [x for x in inventory(module, s.task_names) if x.shared]
    step = MultiTaskStep(module, shared, tasks=s.task_names,
                         loss_fns=loss_functions(list(s.tasks), "s"),
                         aggregate=aggregator("pcgrad", 2),
                         optimizer=torch.optim.Adam(module.parameters(), 1e-3),
                         precision=precision)
    inputs, targets = batch(data, 32)
    module.train()
    with torch.no_grad(), torch.autocast("cpu", dtype=DTYPES[precision]):
        half = module(**inputs)["left"]
    assert half.dtype == DTYPES[precision]  # the forward really runs in reduced precision
    first = step(inputs, targets)
    for _ in range(20):
        last = step(inputs, targets)
    assert first.dtype == torch.float32 and bool((last < first).all())
    assert step.buffer.matrix.dtype == torch.float32 and torch.isfinite(step.buffer.matrix).all()
    assert all(p.dtype == torch.float32 for p in module.parameters())


def test_fp16_overflow_skips_the_step_and_halves_the_scale(branched):
    s, compiled, data = branched
    module = copy.deepcopy(compiled.module)
    shared = [x for x in inventory(module, s.task_names) if x.shared]
    step = MultiTaskStep(module, shared, tasks=s.task_names,
                         loss_fns=loss_functions(list(s.tasks), "s"),
                         aggregate=aggregator("ew", 2),
                         optimizer=torch.optim.SGD(module.parameters(), 0.1), precision="fp16")
    step.scaler.scale.fill_(3e38)  # scaled losses overflow float32: every gradient is inf
    before = copy.deepcopy(module.state_dict())
    module.train()
    step(*batch(data))
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if "running" not in k
               and "num_batches" not in k)
    assert float(step.scaler.scale) == pytest.approx(1.5e38)
    step.scaler.scale.fill_(1024.0)
    step(*batch(data))  # with the scale in range the step trains
    assert any(not torch.equal(before[k], module.state_dict()[k]) for k in before
               if k.endswith("weight"))


def test_cuda_device_without_a_gpu_is_a_spec_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(SpecError, match="train.device is cuda"):
        resolve_device("cuda", "s.yaml")
    assert resolve_device("auto") == torch.device("cpu")


def test_delta_m_signs_follow_the_metric_direction():
    metrics = {"a": METRICS["accuracy"], "b": METRICS["mae"]}
    # a: 0.90 vs 0.80 -> +12.5%; b: 0.5 vs 0.4 (lower is better) -> -25%
    assert delta_m({"a": 0.90, "b": 0.5}, {"a": 0.80, "b": 0.4}, metrics) == pytest.approx(-6.25)


def test_learning_rate_schedules_step_after_every_optimiser_step():
    from reconfx.spec import ScheduleSpec
    from reconfx.train.objectives import make_schedule

    def rates(spec, steps_per_epoch=4, epochs=3):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        schedule = make_schedule(optimizer, spec, steps_per_epoch, epochs)
        seen = []
        for _ in range(steps_per_epoch * epochs):
            seen.append(round(optimizer.param_groups[0]["lr"], 6))
            optimizer.step()
            schedule.step()
        return seen

    assert rates(ScheduleSpec()) == [1.0] * 12
    assert rates(ScheduleSpec(kind="step", every=1, gamma=0.5)) == [1.0] * 4 + [0.5] * 4 + [
        0.25] * 4
    assert rates(ScheduleSpec(kind="multistep", milestones=[2], gamma=0.1)) == [1.0] * 8 + [
        0.1] * 4
    cosine = rates(ScheduleSpec(kind="cosine"))
    assert cosine[0] == 1.0 and cosine == sorted(cosine, reverse=True) and cosine[-1] < 0.02
    assert rates(ScheduleSpec(kind="cosine", warmup_steps=4))[:4] == [0.25, 0.5, 0.75, 1.0]


@pytest.mark.parametrize(("fields", "needle"), [
    ({"kind": "multistep"}, "multistep needs milestones"),
    ({"kind": "cosine", "gamma": 0.5}, "gamma do(es) not apply to kind 'cosine'"),
])
def test_schedule_fields_that_do_not_fit_are_refused(fields, needle):
    from pydantic import ValidationError

    from reconfx.spec import ScheduleSpec

    with pytest.raises(ValidationError, match=re.escape(needle)):
        ScheduleSpec(**fields)


def test_task_weights_and_callables_from_the_spec(branched):
    """``weight`` scales a task's loss (and so its gradient); ``loss`` and ``metric`` may name
    functions; a custom metric's direction comes from ``higher_is_better``."""
    from reconfx.spec import TaskSpec

    s, compiled, data = branched
    inputs, targets = batch(data)
    out = compiled.module(**inputs)["left"]
    plain, heavy, custom = loss_functions([
        TaskSpec(name="a", loss="cross_entropy"),
        TaskSpec(name="b", loss="cross_entropy", weight=2.5),
        TaskSpec(name="c", loss="tests.models:squared_error")], "s")
    assert torch.allclose(heavy(out, targets["left"]), 2.5 * plain(out, targets["left"]))
    one_hot = torch.nn.functional.one_hot(targets["left"], 10).float()
    assert torch.equal(custom(out, targets["left"]), ((out - one_hot) ** 2).mean())
    ((name, metric),) = metric_functions([TaskSpec(
        name="a", loss="cross_entropy", metric="tests.models:wrong_items",
        higher_is_better=False)], "s")
    assert name == "wrong_items" and not metric.higher_is_better
    wrong = int((out.argmax(-1) != targets["left"]).sum())
    assert metric.total(out, targets["left"]) == wrong
    assert metric.count(out, targets["left"]) == 16
    with pytest.raises(SpecError, match="has no attribute"):
        loss_functions([TaskSpec(name="a", loss="tests.models:no_such_loss")], "s")


def test_early_stopping_ends_training_once_validation_stops_improving(branched):
    """A validation metric that never moves: patience 2 stops after epoch 3 of 10 and keeps
    the first epoch's weights; the history and the schedule's rate are there per epoch."""
    from reconfx.spec import TaskSpec

    s, compiled, data = branched
    module = copy.deepcopy(compiled.module)
    shared = [x for x in inventory(module, s.task_names) if x.shared]
    metrics = metric_functions([TaskSpec(name=t, loss="cross_entropy",
                                         metric="tests.models:no_signal") for t in s.task_names],
                               "s")
    settings = TrainSpec(epochs=10, lr=1e-12, early_stopping=2,
                         schedule={"kind": "step", "every": 1, "gamma": 0.5})
    result = fit(module, shared=shared, tasks=s.task_names,
                 loss_fns=loss_functions(list(s.tasks), "s"), metrics=metrics,
                 aggregate=aggregator("ew", 2), batches=Batches(data, 64, 0, drop_last=True),
                 val_data=data, settings=settings, progress=False)
    assert result.stopped_after == 3 and len(result.history) == 3 and result.best_epoch == 0
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    assert [row["lr"] / 1e-12 for row in result.history] == pytest.approx([0.5, 0.25, 0.125])


def fresh_model(branched):
    s, compiled, _data = branched
    module = copy.deepcopy(compiled.module)
    return module, [x for x in inventory(module, s.task_names) if x.shared]


def train_once(branched, settings, data, val=None, batch_size=32, threshold=None,
               drop_last=True, **options):
    s = branched[0]
    module, shared = fresh_model(branched)
    metrics = metric_functions(list(s.tasks), "s")
    batches = Batches(data, batch_size, settings.seed, drop_last=drop_last)
    result = fit(module, shared=shared, tasks=s.task_names,
                 loss_fns=loss_functions(list(s.tasks), "s"), metrics=metrics,
                 aggregate=aggregator(settings.aggregator, 2), batches=batches, val_data=val,
                 settings=settings, progress=False, threshold=threshold, **options)
    return module, result


def test_training_drops_the_last_partial_batch_unless_told_otherwise(branched):
    s = branched[0]
    data = call_data_factory(s.data.model_copy(update={"kwargs": {"size": 100}}), "train", 0,
                             "s")
    for drop, steps in ((True, 3), (False, 4)):  # 100 items in batches of 32: 3 full + 4 items
        _module, result = train_once(branched, TrainSpec(epochs=2), data, drop_last=drop)
        assert [row["epoch"] for row in result.steps] == [1] * steps + [2] * steps
    small = call_data_factory(s.data.model_copy(update={"kwargs": {"size": 20}}), "train", 0,
                              "s")
    _module, result = train_once(branched, TrainSpec(epochs=1), small)
    assert len(result.steps) == 1  # a split smaller than one batch keeps its only batch


@pytest.mark.slow
def test_a_tiny_last_batch_before_every_evaluation_wrecks_sgd_and_drop_last_prevents_it(
        tmp_path):
    """SGD (lr 0.1, momentum 0.9) with BatchNorm, 1,026 items in batches of 64: the 17th batch
    of every epoch holds 2 items and is the last step before each evaluation. Kept, it drags
    the validation accuracy towards chance (0.1); dropped (the default) it does not. Over four
    seeds (one seed alone can go either way), the mean over epochs and tasks measured 0.25
    kept and 0.37 dropped."""
    spec = write_spec(tmp_path, "partial",
                      model={"factory": "reconfx.zoo:small_resnet",
                             "kwargs": {"num_classes": 10, "width": 8}},
                      inputs=[{"name": "image", "shape": [4, 1, 12, 12]}],
                      tasks=[{"name": "left", "loss": "cross_entropy"},
                             {"name": "right", "loss": "cross_entropy"}],
                      data={"factory": "reconfx.data:multidigits", "kwargs": {"size": 1026},
                            "batch_size": 64})
    scores: dict[bool, list[float]] = {False: [], True: []}
    for seed in range(4):
        for drop in (False, True):
            prepared = prepare(spec)  # (the spec's seed 0 initialises the model)
            s = prepared.loaded.spec
            module = prepared.traced.module
            torch.manual_seed(seed)
            for p in module.parameters():  # a fresh draw of the initial weights per seed
                p.data.add_(0.01 * torch.randn_like(p))
            shared = [x for x in inventory(module, s.task_names) if x.shared]
            data = call_data_factory(s.data, "train", seed, "s")
            val = call_data_factory(s.data.model_copy(update={"kwargs": {"size": 512}}), "val",
                                    seed, "s")
            result = fit(module, shared=shared, tasks=s.task_names,
                         loss_fns=loss_functions(list(s.tasks), "s"),
                         metrics=metric_functions(list(s.tasks), "s"),
                         aggregate=aggregator("ew", 2),
                         batches=Batches(data, 64, seed, drop_last=drop), val_data=val,
                         settings=TrainSpec(epochs=3, lr=0.1, optimizer="sgd", seed=seed,
                                            keep="last"),
                         progress=False)
            scores[drop] += [row[f"val/{t}"] for row in result.history for t in s.task_names]
    kept, dropped = (sum(v) / len(v) for v in (scores[False], scores[True]))
    assert kept < 0.3 < dropped and dropped - kept > 0.08


def test_conflict_every_samples_the_statistics_and_ew_steps_stay_the_same(branched):
    """EW with conflict_every 3 takes one backward pass of the summed losses on the steps it
    does not count: the trajectory equals counting every step's per-task gradients (to float
    rounding), and the statistics hold every third step's observations."""
    data = branched[2]
    runs = {}
    for every in (1, 3):
        settings = TrainSpec(epochs=2, lr=1e-3, conflict_every=every)
        runs[every] = train_once(branched, settings, data, threshold=-0.1)
    (first, counted), (second, sampled) = runs[1], runs[3]
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    steps = len(counted.steps)
    assert steps == 16 and len(sampled.steps) == steps  # (256 items, batches of 32, 2 epochs)
    per_step = counted.conflicts.valid.sum() / steps
    assert per_step > 0 and sampled.conflicts.valid.sum() == per_step * -(-steps // 3)


def test_one_backward_pass_on_the_steps_ew_does_not_count(branched, monkeypatch):
    data, calls = branched[2], []
    grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or grad(*a, **k))
    train_once(branched, TrainSpec(epochs=1, conflict_every=4), data, threshold=-0.1)
    assert len(calls) == 2 * 2 + 6  # steps 1 and 5 per task, the six others once
    calls.clear()
    train_once(branched, TrainSpec(epochs=1, conflict_every=4, aggregator="pcgrad"), data,
               threshold=-0.1)
    assert len(calls) == 2 * 8  # a non-linear aggregator needs every task's gradient


def test_keep_last_ends_with_the_last_epochs_weights(branched, tmp_path):
    data = branched[2]
    val = call_data_factory(branched[0].data.model_copy(update={"kwargs": {"size": 128}}), "val",
                            0, "s")
    module, result = train_once(branched, TrainSpec(epochs=3, lr=3e-2, keep="last"), data, val,
                                checkpoints=tmp_path)
    last = load_file(str(tmp_path / "last.safetensors"))
    assert all(torch.equal(last[k], v) for k, v in module.state_dict().items() if k in last)
    assert result.kept_epoch == 2
    assert result.kept == {t: result.history[-1][f"val/{t}"] for t in ("left", "right")}


def _twin_steps(branched, cap, name="ew", optimizer=None):
    """Two steps on copies of the branched model: one holding the whole gradient matrix, one
    capped at ``cap`` bytes."""
    s, compiled, data = branched
    steps = []
    for limit in (None, cap):
        module = copy.deepcopy(compiled.module)
        shared = [x for x in inventory(module, s.task_names) if x.shared]
        opt = (optimizer or (lambda p: torch.optim.SGD(p, lr=0.05)))(module.parameters())
        steps.append(MultiTaskStep(module, shared, tasks=s.task_names,
                                   loss_fns=loss_functions(list(s.tasks), "s"),
                                   aggregate=aggregator(name, 2), optimizer=opt, cap=limit))
    return steps


def test_a_capped_gradient_matrix_takes_the_layers_in_parts_with_the_same_step(branched):
    from reconfx.conflicts import ConflictCounter

    _s, _compiled, data = branched
    cap = 2 * 4 * 1040  # 1,040 columns for 2 tasks: some BatchNorm weight and bias land in two
    # parts; the larger convolutions (up to 36,864 parameters) each take a part of their own
    whole, parted = _twin_steps(branched, cap)
    parts = parted.buffer.parts
    assert len(whole.buffer.parts) == 1 and len(parts) > 10
    assert parted.buffer.matrix.numel() * 4 <= max(cap, 2 * 4 * max(
        p.numel() for p in parted.buffer.params))
    split = {i for part in parts for i, _a, _b in part.blocks}
    assert len(split) == len(whole.buffer.blocks)  # every layer counted, some across parts
    assert sum(len(part.blocks) for part in parts) > len(whole.buffer.blocks)
    counters = [ConflictCounter(step.buffer.blocks, 2, -0.1) for step in (whole, parted)]
    for k in range(3):
        inputs, targets = batch(data, 16 + k)
        for step, counter in zip((whole, parted), counters, strict=True):
            step.module.train()
            torch.manual_seed(k)
            step(inputs, targets, counter if k < 2 else None)
        for a, b in zip(whole.module.parameters(), parted.module.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert counters[0].steps == counters[1].steps == 2
    assert torch.equal(counters[0].valid, counters[1].valid)
    assert torch.equal(counters[0].conflicts, counters[1].conflicts)
    torch.testing.assert_close(counters[0].cos_sum, counters[1].cos_sum)


def test_an_aggregator_of_the_whole_matrix_above_the_cap_stops_before_allocating(branched):
    with pytest.raises(SpecError) as info:
        _twin_steps(branched, 2 * 4 * 3000, name="pcgrad")
    text = str(info.value)
    assert "train.gradient_memory_gb" in text and "aggregator 'pcgrad'" in text
    assert re.search(r"needs 0\.00 GB \(2 tasks x [\d,]+ parameters of \d+ shared layers", text)


def test_bf16_parameters_get_bf16_gradients_in_parts(branched):
    _s, _compiled, data = branched
    _whole, parted = _twin_steps(branched, 2 * 4 * 3000)
    parted.module.to(torch.bfloat16)
    inputs, targets = batch(data)
    before = [p.detach().clone() for p in parted.buffer.params]
    parted.module.train()
    losses = parted({"image": inputs["image"].bfloat16()}, targets)
    assert torch.isfinite(losses).all()
    assert all(p.grad.dtype == torch.bfloat16 for p in parted.buffer.params)
    assert any(not torch.equal(a, p) for a, p in zip(before, parted.buffer.params, strict=True))


def test_a_run_that_cannot_fit_stops_before_allocating(branched, monkeypatch):
    from reconfx import memory
    from reconfx.errors import TrainingError

    s, compiled, _data = branched
    module = compiled.module
    params = [p for p in module.parameters() if p.requires_grad]
    size = sum(p.numel() * 4 for p in params)
    monkeypatch.setattr(memory, "available", lambda device: 2 * size)  # gradients + momentum
    shared = [x for x in inventory(module, s.task_names) if x.shared]
    fns = loss_functions(list(s.tasks), "s")
    with pytest.raises(TrainingError) as info:
        MultiTaskStep(module, shared, tasks=s.task_names, loss_fns=fns,
                      aggregate=aggregator("ew", 2), optimizer=torch.optim.Adam(params),
                      cap=10**9)
    assert "optimiser's state 0.0 GB (2 per parameter)" in str(info.value)
    assert "train.optimizer: sgd" in str(info.value)
    step = MultiTaskStep(module, shared, tasks=s.task_names, loss_fns=fns,
                         aggregate=aggregator("ew", 2), optimizer=torch.optim.SGD(params, lr=0.1),
                         cap=10**9)  # (no momentum: fits)
    assert step.buffer.matrix.shape[0] == 2
