"""The passes in order; the only module that knows them all.

``prepare`` builds and traces the model a spec names; ``compile_spec`` selects, branches, checks
invariants I1-I4 and writes ``model.py``, ``original.py``, ``branch.diff``,
``weights.safetensors``, ``report.md`` and ``manifest.json`` atomically.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import json
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from reconfx import artifacts, calls, distributed, outdir
from reconfx.batching import batch_streams, regions_of
from reconfx.build import (
    build_model,
    call_data_factory,
    example_inputs,
    run_example,
    task_paths,
)
from reconfx.checks import (
    Check,
    check_emit,
    check_isolation,
    check_parity,
    check_sharing,
)
from reconfx.cost import CostModel, Selection, selection_lines
from reconfx.data.padding import collate_of
from reconfx.distributed import World
from reconfx.emit.constructors import settings_in
from reconfx.emit.onnx import OnnxExport, export_onnx
from reconfx.emit.python import FactorySource, buildable, emit_python
from reconfx.errors import CheckError, ModelError, SpecError
from reconfx.graph import named_tensors, unique_parameters
from reconfx.layers import Layer, inventory
from reconfx.profile import (
    Profile,
    annotate,
    chart,
    chart_of,
    load_scores,
    profile,
    rebranched,
    restore_profile,
)
from reconfx.report import (
    Cost,
    batching_section,
    compile_report,
    flops,
    latencies,
    markdown_table,
)
from reconfx.rewrite import Branched, branch
from reconfx.select import check_patterns, select_layers
from reconfx.spec import LoadedSpec, Spec, class_name, load_spec_file
from reconfx.stages import QUIET, Stages
from reconfx.trace import Traced, trace
from reconfx.train.aggregators import aggregator
from reconfx.train.loop import FitResult, delta_m, evaluate, fit
from reconfx.train.objectives import loss_functions, make_optimizer, metric_functions
from reconfx.train.precision import resolve_device
from reconfx.train.resume import Batches, Checkpoint
from reconfx.train.sparse import SparseMask, neuron_masks
from reconfx.train.step import layer_parameters
from reconfx.tuning import Tuned, tune

CONFLICTS = "conflicts.json"


@dataclass
class Prepared:
    loaded: LoadedSpec
    model: nn.Module
    traced: Traced
    layers: list[Layer]
    task_paths: dict[str, str]
    examples: list[dict[str, torch.Tensor]]


@dataclass
class Compiled:
    prepared: Prepared
    branched: Branched
    checks: list[Check]
    scores: dict[str, int] | None = None
    results: list[str] = field(default_factory=list)  # report lines of run (metrics, conflicts)
    profile: Profile | None = None  # written as conflicts.json/.png with the model (run)
    written: list[Path] = field(default_factory=list)
    out_dir: Path | None = None
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. where a resumed run picked up
    tuning: list[Tuned] = field(default_factory=list)  # stream_batching: tuned, measured
    selection: Selection | None = None  # the chosen layers, their scores and cost


def prepare(spec: LoadedSpec | str | Path, stages: Stages = QUIET) -> Prepared:
    """Build the model the spec names, trace it and take its layer inventory."""
    loaded = loaded_spec(spec)
    s = loaded.spec
    with stages("building the model", lambda: f"built {type(model).__name__} "
                f"({unique_parameters(model):,} parameters)"):
        torch.manual_seed(s.train.seed)  # the factory's random initialisation is in the spec
        model = build_model(s, loaded.path)
        check_patterns(s.select, model, str(loaded.path))
        examples = spec_examples(s)
        output = run_example(model, examples[0], s, loaded.path)
        run_example(model, examples[1], s, loaded.path, grown=True)
        paths, ignored = task_paths(s, output, str(loaded.path))
    with stages("tracing", lambda: _traced_line(traced)):
        dynamic = {i.name: list(i.dynamic) for i in s.inputs}
        traced = trace(model, examples[0], paths, dynamic, s.trace.tier, s.trace.leaves,
                       verify_with=examples[1], class_name=class_name(s.name))
        traced.ignored_outputs = ignored
        try:
            calls.annotate(traced.module, model, examples[0])
        except Exception as exc:  # model.py then writes the submodules' ops, not their calls
            traced.notes.append("how the submodules were called could not be found "
                                f"({type(exc).__name__}: {exc}); model.py writes out their ops")
    layers = inventory(traced.module, s.task_names)
    return Prepared(loaded, model, traced, layers, paths, examples)


def _traced_line(traced: Traced) -> str:
    tier = {"fx": "torch.fx (tier 1)", "export": "torch.export (tier 2)",
            "fx-coarse": "torch.fx with coarse leaves"}.get(traced.tier, traced.tier)
    why = next((n for n in traced.notes if n.startswith("tier 2 used")), None)
    return f"traced with {tier}" + (f"; {why[:160]}" if why else "")


def spec_examples(s: Spec) -> list[dict[str, torch.Tensor]]:
    """The example inputs every check runs on: the spec's shapes, and every dynamic axis one
    longer (a second batch size, a second sequence length)."""
    return [example_inputs(s.inputs, seed=s.train.seed),
            example_inputs(s.inputs, seed=s.train.seed + 1, grow=1)]


def compile_spec(spec: LoadedSpec | str | Path, out_dir: str | Path | None = None,
                 progress: bool = False, force: bool = False) -> Compiled:
    """Trace, branch the selected layers, check I1-I4 and write the artifacts (into a folder
    reconfx owns, unless ``force``; see :mod:`reconfx.outdir`). With ``progress``, each stage
    is printed as it starts and finishes."""
    loaded = loaded_spec(spec)
    stages = Stages(progress)
    with outdir.writing(output_dir(loaded, out_dir), "compile", force) as out:
        prepared = prepare(loaded, stages)
        compiled = branch_checked(prepared, stored_scores(out), stages)
        compiled.out_dir = out
        compiled.written = _write(compiled, compiled.out_dir, progress=progress, stages=stages)
    return compiled


def loaded_spec(spec: LoadedSpec | str | Path) -> LoadedSpec:
    """The spec, loaded from its file unless it already is."""
    return spec if isinstance(spec, LoadedSpec) else load_spec_file(spec)


def output_dir(loaded: LoadedSpec, out_dir: str | Path | None) -> Path:
    """``--out`` when given, else the spec's ``export.dir``."""
    return Path(out_dir) if out_dir is not None else loaded.spec.export_dir()


def branch_checked(prepared: Prepared, scores: dict[str, int] | None,
                   stages: Stages = QUIET) -> Compiled:
    """Select, branch and check I1-I3 against the original model."""
    s = prepared.loaded.spec
    with stages("selecting", lambda: "\n  ".join(selection_lines(selection))):
        cost = CostModel.measure(prepared.traced.module, prepared.examples[0])
        chosen = select_layers(prepared.layers, s.select, str(prepared.loaded.path), scores,
                               len(s.tasks), cost)
        selection = Selection.of(chosen, scores, cost, unique_parameters(prepared.traced.module))
    with stages("branching and checking I1-I3", "branched; I1-I3 hold"):
        return _branched_and_checked(prepared, chosen, scores, selection)


def _branched_and_checked(prepared: Prepared, chosen: list[Layer],
                          scores: dict[str, int] | None, selection: Selection) -> Compiled:
    branched = branch_model(prepared, chosen)
    warning = selection.warning()
    warnings = [warning] if warning else []
    try:
        parity = check_parity(prepared.model, branched.module, prepared.task_paths,
                              prepared.examples, 1e-5 if regions_of(branched.module) else 0.0)
    except CheckError as exc:
        if not regions_of(branched.module):
            raise
        # The batching planner checked its regions on the first example only; keep the model
        # correct rather than fast.
        branched = branch_model(prepared, chosen, batching=False)
        parity = check_parity(prepared.model, branched.module, prepared.task_paths,
                              prepared.examples)
        warnings.append(f"stream batching turned off: with it, {exc.message}; set "
                        "branch.stream_batching: off to silence this, and report the model")
    checks = [
        parity,
        check_sharing(branched.module, branched.copies),
        check_isolation(branched.module, prepared.examples[0], branched.copies),
    ]
    return Compiled(prepared, branched, checks, scores, warnings=warnings, selection=selection)


def branch_model(prepared: Prepared, chosen: list[Layer], batching: bool | None = None
                 ) -> Branched:
    """The branching pass, then stream batching as the spec asks (or as ``batching`` says).
    I1 holds within atol 1e-5 with batching (batched kernels round differently)."""
    s = prepared.loaded.spec
    branched = branch(prepared.traced.module, chosen, s.task_names, s.branch.norm_stats)
    if batching if batching is not None else s.branch.stream_batching != "off":
        branched.module = batch_streams(branched.module, prepared.examples[0],
                                        [i.name for i in s.inputs if 0 in i.dynamic])
    calls.contiguous_streams(branched.module, branched.containers)
    return branched


SCORE_POLICIES = ("top_k", "fraction", "param_budget", "flops_budget", "min_score")


def run_spec(spec: LoadedSpec | str | Path, out_dir: str | Path | None = None,
             progress: bool = True, resume: bool = False, force: bool = False) -> Compiled:
    """profile -> select -> branch -> train -> evaluate -> emit (trained weights). The state is
    saved in ``checkpoints/resume.pt`` on the way; ``resume`` continues from it."""
    loaded = loaded_spec(spec)
    with outdir.writing(output_dir(loaded, out_dir), "run", force) as out:
        return _run(loaded, out, progress, resume)


def _run(loaded: LoadedSpec, out: Path, progress: bool, resume: bool) -> Compiled:
    stages = Stages(progress)
    prepared = prepare(loaded, stages)
    loaded, s = prepared.loaded, prepared.loaded.spec
    require_data(loaded, "run")
    w = join(loaded)
    progress = progress and w.main
    checkpoint = open_checkpoint(loaded, out, "run", resume)
    initial = copy.deepcopy(prepared.traced.module.state_dict())
    result = None
    if s.select is not None and s.select.policy in SCORE_POLICIES:
        result = profile_prepared(prepared, progress, checkpoint)
        checkpoint.extra["profile"] = result.counter.state_dict()
        if s.train.init == "initial":  # the paper's protocol: retrain from the same start
            prepared.traced.module.load_state_dict(initial)
    compiled = branch_checked(prepared, result.scores() if result else None, stages)
    compiled.out_dir = out
    compiled.notes += [checkpoint.note] if checkpoint.note else []
    compiled.warnings += result.warnings() if result is not None else []
    trained = train_compiled(compiled, progress, checkpoints=out / "checkpoints",
                             resume=checkpoint)
    compiled.results = run_report(s, trained.metrics, trained.fitted, trained.test, result,
                                  trained.shared)
    if trained.sparse is not None:
        sparse = trained.sparse
        compiled.results.append(f"\n- sparse training: {100 * sparse.trainable_fraction:.1f}% of "
                                f"the encoder's weight entries trainable ({len(sparse.entries)} "
                                "weight tensors masked, heads and 1-D parameters fully trained)")
    compiled.profile = result
    if w.active:
        compiled.results.append(f"\n- data parallel on {w.size} ranks ({w.backend}): each "
                                "global batch sharded, per-task gradients all-reduced")
    if w.main:  # the other ranks hold the same weights and counters
        compiled.written = _write(compiled, compiled.out_dir, "run", progress, stages)
        checkpoint.clear()
    w.barrier()
    return compiled


def join(loaded: LoadedSpec) -> World:
    """Join the torchrun process group when launched as one of several ranks."""
    s = loaded.spec
    return distributed.init(s.distributed.backend, s.distributed.timeout_s, s.train.device,
                            str(loaded.path))


def open_checkpoint(loaded: LoadedSpec, out: Path, command: str, resume: bool) -> Checkpoint:
    """The resume checkpoint of ``command`` in ``out/checkpoints`` (loaded with ``resume``)."""
    return Checkpoint(out / "checkpoints", command, loaded.sha256,
                      loaded.spec.train.checkpoint_every, resume)


@dataclass
class Trained:
    fitted: FitResult
    test: dict[str, float]  # each task's test metric
    shared: list[Layer]  # the compiled model's shared layers, as its conflict counter orders them
    metrics: list
    sparse: SparseMask | None


def train_compiled(compiled: Compiled, progress: bool = True,
                   data: dict[str, torch.utils.data.Dataset] | None = None,
                   checkpoints: Path | None = None, resume: Checkpoint | None = None) -> Trained:
    """Train the compiled model in place with the spec's training settings on ``train.device``
    (best validation epoch kept, conflicts of its shared layers counted, checkpoints written
    to ``checkpoints``) and evaluate it on the test split; the model ends on the CPU. ``data``
    maps split names to data sets already built (the experiment reuses them)."""
    loaded, s = compiled.prepared.loaded, compiled.prepared.loaded.spec
    where = str(loaded.path)
    data = data or {split: call_data_factory(s.data, split, s.train.seed, f"{where}: data",
                                             s.inputs)
                    for split in ("train", "val", "test")}
    module = compiled.branched.module
    shared = [layer for layer in inventory(module, s.task_names) if layer.shared]
    metrics = metric_functions(list(s.tasks), where)
    with on_device(module, resolve_device(s.train.device, where)):
        sparse = encoder_mask(compiled, s) if s.train.sparse is not None else None
        fitted = fit(module, shared, s.task_names, loss_functions(list(s.tasks), where),
                     metrics, aggregator(s.train.aggregator, len(s.tasks), where),
                     data["train"], data["val"], s.train, s.data.batch_size, progress,
                     s.profile.threshold, sparse, checkpoints, resume, distributed.world())
        test = evaluate(module, data["test"], s.task_names, metrics,
                        world=distributed.world())
    return Trained(fitted, test, shared, metrics, sparse)


@contextlib.contextmanager
def on_device(module: nn.Module, device: torch.device) -> Iterator[None]:
    """Move the module (parameters in place) to ``device`` for the block, back to the CPU
    after, where the checks and the emitter work."""
    module.to(device)
    try:
        yield
    finally:
        module.to("cpu")


def encoder_mask(compiled: Compiled, s: Spec) -> SparseMask:
    """The sparse-training mask over the encoder: every layer that was shared in the original
    model (its remaining shared layers and the branched layers' per-task copies), not the
    heads."""
    module = compiled.branched.module
    encoder = {layer.name for layer in compiled.prepared.layers if layer.shared}
    params = []
    for layer in inventory(module, s.task_names):
        original = layer.name.rpartition(".")[0] if not layer.shared else layer.name
        if layer.name in encoder or (not layer.shared and original in encoder):
            params += layer_parameters(module, layer)
    masks = neuron_masks(params, s.train.sparse.per_neuron_k, s.train.sparse.fraction)
    return SparseMask(params, masks)


def evaluate_spec(spec: LoadedSpec | str | Path, out_dir: str | Path | None = None,
                  split: str = "test") -> tuple[dict[str, float], float | None]:
    """Each task's metric of the emitted model in the output folder, and delta-m when the spec
    gives every task's single-task baseline."""
    loaded = loaded_spec(spec)
    s, where = loaded.spec, str(loaded.path)
    require_data(loaded, "eval")
    metrics = metric_functions(list(s.tasks), where)
    model = artifacts.load(output_dir(loaded, out_dir))
    data = call_data_factory(s.data, split, s.train.seed, f"{where}: data", s.inputs)
    values = evaluate(model, data, s.task_names, metrics)
    baselines = {t.name: t.baseline for t in s.tasks if t.baseline is not None}
    named = {t: m for t, (_n, m) in zip(s.task_names, metrics, strict=True)}
    delta = delta_m(values, baselines, named) if len(baselines) == len(s.tasks) else None
    return values, delta


def run_report(s: Spec, metrics: list, fitted: FitResult, test: dict[str, float],
               result: Profile | None, shared: list[Layer]) -> list[str]:
    """report.md lines for run: test metrics, delta-m, conflict share before and after."""
    named = {t: m for t, (_n, m) in zip(s.task_names, metrics, strict=True)}
    lines = ["## Training and evaluation", "",
             f"- aggregator `{s.train.aggregator}`, {s.train.epochs} epoch(s), optimiser "
             f"{s.train.optimizer} (lr {s.train.lr}), best validation epoch "
             f"{fitted.best_epoch + 1}", ""]
    rows = [[t, name, f"{test[t]:.4f}", f"{fitted.best.get(t, float('nan')):.4f}"]
            for t, (name, _m) in zip(s.task_names, metrics, strict=True)]
    lines.append(markdown_table(["task", "metric", "test", "best val"], rows))
    baselines = {t.name: t.baseline for t in s.tasks if t.baseline is not None}
    if len(baselines) == len(s.tasks):
        lines += ["", f"- delta-m vs the single-task baselines in the spec: "
                      f"{delta_m(test, baselines, named):+.2f}%"]
    counter = fitted.conflicts
    if result is not None and counter is not None and counter.valid.numel():
        rest = {layer.name for layer in shared}
        rows_before = [r for r in result.to_json()["layers"] if r["name"] in rest]
        strong = sum((r["strong_share"] or 0) * r["valid_pairs"] for r in rows_before)
        valid = sum(r["valid_pairs"] for r in rows_before)
        after = int(counter.strong.sum()) / max(int(counter.valid.sum()), 1)
        if valid:
            lines += ["", f"- strongly conflicting gradient pairs (cos <= -0.01) in the "
                          f"{len(rest)} remaining shared layers: {100 * strong / valid:.1f}% "
                          f"while profiling the unbranched model ({result.steps} steps), "
                          f"{100 * after:.1f}% while training the branched one "
                          f"({counter.steps} steps)"]
    return lines


def stored_scores(out_dir: Path) -> dict[str, int] | None:
    """Conflict scores from an earlier ``reconfx profile`` in ``out_dir``, if there is one."""
    path = out_dir / CONFLICTS
    return load_scores(path) if path.is_file() else None


@dataclass
class Profiled:
    prepared: Prepared
    result: Profile
    chosen: list[Layer]
    written: list[Path]
    warnings: list[str]
    notes: list[str]


def require_data(loaded: LoadedSpec, command: str) -> None:
    if loaded.spec.data is None:
        raise SpecError(f"{command} trains on data, and the spec has none",
                        where=f"{loaded.path}: data",
                        fix='add data: {factory: "reconfx.data:multidigits", batch_size: 128}')


def profile_prepared(prepared: Prepared, progress: bool,
                     checkpoint: Checkpoint | None = None) -> Profile:
    """Run the profiling pass on the traced model (it trains those weights in place). A
    ``checkpoint`` that was saved after profiling (phase ``train`` of ``run``) holds the finished
    counters: they are taken from it and nothing is trained."""
    loaded, s = prepared.loaded, prepared.loaded.spec
    where = str(loaded.path)
    require_data(loaded, "profiling")
    finished = checkpoint.phase("train") if checkpoint is not None else None
    if finished is not None and "profile" in finished:
        result = restore_profile(prepared.traced.module, prepared.layers, s.task_names,
                                 s.profile.threshold, finished["profile"])
        annotate(prepared.traced.module, result)
        return result
    loss_fns = loss_functions(list(s.tasks), where)
    aggregate = aggregator(s.train.aggregator, len(s.tasks), where)
    dataset = call_data_factory(s.data, "train", s.train.seed, f"{where}: data", s.inputs)
    torch.manual_seed(s.train.seed)
    module = prepared.traced.module
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, s.train.optimizer, s.train.lr, s.train.weight_decay)
    bar = tqdm(total=s.profile.steps, desc="profiling", disable=not progress, leave=False)

    def on_step(step: int, losses: list[float]) -> None:
        if step % 10 == 0:
            bar.set_postfix({t: f"{v:.3f}" for t, v in zip(s.task_names, losses, strict=True)},
                            refresh=False)
        bar.update(step + 1 - bar.n)  # a resumed pass starts where it stopped

    with on_device(module, resolve_device(s.train.device, where)):
        result = profile(module, prepared.layers, s.task_names, loss_fns,
                         profile_batches(dataset, s), s.profile.steps, s.profile.threshold,
                         optimizer, on_step, aggregate=aggregate, precision=s.train.precision,
                         checkpoint=checkpoint)
        result.counter.to("cpu")
    bar.close()
    annotate(module, result)
    return result


def write_conflicts(staging: artifacts.Staging, result: Profile, branched: set[str]) -> list[str]:
    staging.write_text(CONFLICTS, json.dumps(result.to_json(branched), indent=1) + "\n")
    staging.write_with("conflicts.png", lambda p: chart(result, branched, p))
    return [CONFLICTS, "conflicts.png"]


def profile_spec(spec: LoadedSpec | str | Path, out_dir: str | Path | None = None,
                 progress: bool = True, resume: bool = False, force: bool = False) -> Profiled:
    """Profile conflicts on the spec's data; write conflicts.json and conflicts.png. The state
    is saved in ``checkpoints/resume.pt`` on the way; ``resume`` continues from it."""
    loaded = loaded_spec(spec)
    with outdir.writing(output_dir(loaded, out_dir), "profile", force) as out:
        return _profile(loaded, out, progress, resume)


def _profile(loaded: LoadedSpec, out: Path, progress: bool, resume: bool) -> Profiled:
    prepared = prepare(loaded, Stages(progress))
    s = loaded.spec
    require_data(loaded, "profiling")
    w = join(loaded)
    checkpoint = open_checkpoint(loaded, out, "profile", resume)
    result = profile_prepared(prepared, progress and w.main, checkpoint)
    cost = CostModel.measure(prepared.traced.module, prepared.examples[0])
    chosen = select_layers(prepared.layers, s.select, str(loaded.path), result.scores(),
                           len(s.tasks), cost) if s.select is not None else []
    written: list[Path] = []
    if w.main:  # every rank holds the same counters
        with artifacts.Staging(out) as staging:
            files = write_conflicts(staging, result, {layer.name for layer in chosen})
            written = staging.commit_with_manifest("profile", loaded.path, loaded.sha256,
                                                   s.train.seed, files, class_name(s.name))
        checkpoint.clear()
    w.barrier()
    notes = [checkpoint.note] if checkpoint.note else []
    return Profiled(prepared, result, chosen, written, result.warnings(), notes)


def profile_batches(dataset: torch.utils.data.Dataset, s: Spec) -> Batches:
    """Profiling's endless shuffled batches, reproducible for the spec's seed (a last partial
    batch is dropped unless the data set is smaller than a batch)."""
    return Batches(dataset, s.data.batch_size, s.train.seed,
                   drop_last=len(dataset) > s.data.batch_size, world=distributed.world())


@dataclass
class Sources:
    """The emitted review files, how model.py builds each module (path -> constructor /
    restored / factory / generated) and the compiled model's name of each tensor model.py
    names differently (a submodule copied whole per task: ``layer4.left.conv1.weight`` for the
    compiled ``layer4.conv1.left.weight``)."""

    model_py: str
    original_py: str
    diff: str
    built: dict[str, str]
    compiled_names: dict[str, str]


def emit_sources(compiled: Compiled) -> Sources:
    """``model.py``, ``original.py`` and ``branch.diff`` for ``compiled``."""
    prepared, branched = compiled.prepared, compiled.branched
    s = prepared.loaded.spec
    name = class_name(s.name)
    factory = FactorySource(*s.factory.call,
                            "backbone." if s.backbone is not None else "")
    tasks = ", ".join(s.task_names)
    layer_names = ", ".join(layer.name for layer in branched.layers) or "none"
    listing = textwrap.fill(f"Tasks: {tasks}. Branched layers (one copy per task): "
                            f"{layer_names}.", width=95, break_on_hyphens=False)
    doc_model = (f"{name}: generated by reconfx from spec '{s.name}'; do not edit.\n\n"
                 f"{listing}\n"
                 f'Weights: safetensors.torch.load_model(model, "weights.safetensors").\n')
    doc_original = (f"{name}: generated by reconfx from spec '{s.name}'; do not edit.\n\n"
                    f"The model before branching (tasks: {tasks}), for review against model.py.\n")
    scores = compiled.scores or {}
    notes = {layer.name: f" (conflict score {scores[layer.name]})" if layer.name in scores
             else " (selected in the spec)" for layer in branched.layers}
    settings = settings_in(prepared.model)
    called = functools.partial(calls.collapse, model=prepared.model, examples=prepared.examples,
                               buildable=functools.partial(buildable, settings=settings))
    emitted = called(branched.module, containers=branched.containers)
    copies = [p for p, m in emitted.named_modules() if isinstance(m, calls.TaskCopies)]
    streams = [p for p, m in emitted.named_modules() if isinstance(m, calls.TaskStream)]
    model_py = emit_python(
        emitted, name, doc_model,
        {c for c in branched.containers if not any(calls.under(c, p) for p in copies)}
        | set(copies), notes, factory, settings)
    # The original calls whole the submodules model.py calls whole or copies per task, writes
    # out the rest, and writes as classes of their own those model.py writes as generated
    # classes, so the diff shows only the surgery.
    inlined = {c for c in branched.containers
               if not any(calls.under(c, p) for p in [*streams, *copies])}
    original_py = emit_python(called(prepared.traced.module, containers=inlined,
                                     opened=streams), name, doc_original, set(), None, factory,
                              settings)
    diff = "".join(difflib.unified_diff(
        original_py.source.splitlines(keepends=True), model_py.source.splitlines(keepends=True),
        "original.py", "model.py"))
    return Sources(model_py.source, original_py.source, diff, model_py.built,
                   _compiled_names(emitted, branched.module))


def _compiled_names(emitted: nn.Module, compiled: nn.Module) -> dict[str, str]:
    """Each tensor name of ``emitted`` (which holds the compiled tensors themselves) that the
    compiled model names differently -> the compiled model's name."""
    by_id: dict[int, str] = {}
    for name, tensor in named_tensors(compiled):
        by_id.setdefault(id(tensor), name)
    own = {name for name, _t in named_tensors(compiled)}
    return {name: by_id[id(tensor)] for name, tensor in named_tensors(emitted)
            if name not in own and id(tensor) in by_id}


def onnx_cases(loaded: LoadedSpec, examples: list[dict[str, torch.Tensor]]
               ) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """What the ONNX check compares on: the example inputs, a second size of every dynamic
    axis, and a batch of the spec's test data when it has data."""
    s = loaded.spec

    def sizes(example: dict[str, torch.Tensor]) -> str:
        return ", ".join(f"{k} {tuple(v.shape)}" for k, v in example.items())

    cases = [(f"example {sizes(examples[0])}", examples[0]),
             (f"example {sizes(examples[1])}", examples[1])]
    if s.data is not None:
        dataset = call_data_factory(s.data, "test", s.train.seed, f"{loaded.path}: data",
                                    s.inputs)
        inputs, _targets = next(iter(torch.utils.data.DataLoader(
            dataset, batch_size=16, collate_fn=collate_of(dataset))))
        cases.append((f"test data, {len(next(iter(inputs.values())))} items", inputs))
    return cases


def onnx_for_spec(loaded: LoadedSpec, model: nn.Module, path: Path,
                  examples: list[dict[str, torch.Tensor]], task: str | None = None,
                  provider: str | None = None) -> OnnxExport:
    """Export and check ``model`` as the spec describes it (inputs, tasks, dynamic axes)."""
    s = loaded.spec
    tasks = [task] if task is not None else s.task_names
    clash = sorted({i.name for i in s.inputs} & set(tasks))
    if clash:
        raise SpecError(f"ONNX needs distinct input and output names, and '{clash[0]}' is both an "
                        "input and a task", where=f"{loaded.path}: tasks",
                        fix=f"rename the task (e.g. {clash[0]}_out), or leave onnx out of "
                            "export.formats")
    return export_onnx(model, [i.name for i in s.inputs], tasks,
                       {i.name: list(i.dynamic) for i in s.inputs}, onnx_cases(loaded, examples),
                       path, provider, every_task=task is None)


def export_spec(spec: LoadedSpec | str | Path, out_dir: str | Path | None = None,
                task: str | None = None, provider: str | None = None,
                progress: bool = False) -> OnnxExport:
    """``reconfx export``: ONNX from the model.py and weights already in the output folder
    (``model.onnx``, or ``model.<task>.onnx`` with only that task's output and what it needs);
    its section of report.md is replaced, nothing else is touched."""
    loaded = loaded_spec(spec)
    s = loaded.spec
    if task is not None and task not in s.task_names:
        raise SpecError(f"no task named '{task}'", where="--task",
                        fix=f"one of {', '.join(s.task_names)}")
    folder = output_dir(loaded, out_dir)
    if not (folder / artifacts.MANIFEST).is_file():  # (before the lock creates the folder)
        raise ModelError(f"{folder} holds no compiled model (no {artifacts.MANIFEST})",
                         where="export.dir", fix="run `reconfx compile` (or `run`) first")
    with outdir.writing(folder, "export") as out:
        return _export(loaded, out, task, provider, Stages(progress))


def _export(loaded: LoadedSpec, out: Path, task: str | None, provider: str | None,
            stages: Stages = QUIET) -> OnnxExport:
    s = loaded.spec
    with stages("loading model.py and its weights", "loaded (verified against manifest.json)"):
        model = artifacts.load(out)
    examples = spec_examples(s)
    name = "model.onnx" if task is None else f"model.{task}.onnx"
    with artifacts.Staging(out) as staging:
        with stages(f"exporting {name}", lambda: f"exported {name} ({exported.exporter} "
                    f"exporter), I5 holds on {exported.provider}"):
            exported = onnx_for_spec(loaded, model, staging.path / name, examples, task,
                                     provider)
        files = [staging.adopt(p.name).name for p in staging.path.glob(f"{name}*")]
        report = out / "report.md"
        text = report.read_text(encoding="utf-8") if report.is_file() else ""
        staging.write_text("report.md", replace_section(text, "## ONNX", exported.report()))
        files.append("report.md")
        written = staging.commit_with_manifest("export", loaded.path, loaded.sha256,
                                               s.train.seed, files, class_name(s.name))
    exported.path = next(p for p in written if p.name == name)
    return exported


def replace_section(text: str, heading: str, lines: list[str]) -> str:
    """``text`` with the markdown section under ``heading`` replaced by ``lines`` (appended
    when it has none)."""
    body = "\n".join(lines).rstrip("\n") + "\n"
    start = text.find(f"\n{heading}\n")
    if start < 0:
        return (text.rstrip("\n") + "\n\n" if text else "") + body
    end = text.find("\n## ", start + 1)
    return text[:start + 1] + body + ("\n" + text[end + 1:] if end >= 0 else "")


def tune_batching(compiled: Compiled, progress: bool = False) -> None:
    """``stream_batching: tuned``: measure each region's streams per call at the spec's tuning
    batch sizes (only the spec's own batch when no input has a dynamic batch axis) and keep the
    fastest caps; the measurements go into the report."""
    s = compiled.prepared.loaded.spec
    if s.branch.stream_batching != "tuned" or not regions_of(compiled.branched.module):
        return
    sizes = s.branch.tune_batches if any(0 in i.dynamic for i in s.inputs) else [
        next(iter(compiled.prepared.examples[0].values())).shape[0]]
    device = next(iter(compiled.branched.module.parameters())).device
    examples = {b: {k: v.to(device) for k, v in example_inputs(s.inputs, s.train.seed, b).items()}
                for b in sizes}
    compiled.tuning = tune(compiled.branched.module, examples, s.branch.tune_repeats, progress)


def _renaming(branched: Branched, original: nn.Module, compiled_names: dict[str, str]
              ) -> Callable[[str], str | None]:
    """Emitted tensor name -> the smallest of the original's names for that tensor (tied
    tensors have several; a task's copy may keep only some of them), None for tensors the
    original does not have (constants the tracer lifted). ``compiled_names``: the compiled
    name of each tensor the emitted model names differently."""
    names: dict[int, list[str]] = {}
    for name, tensor in named_tensors(original):
        names.setdefault(id(tensor), []).append(name)
    canonical = {name: min(group) for group in names.values() for name in group}

    def rename(name: str) -> str | None:
        return canonical.get(branched.original_name(compiled_names.get(name, name)))

    return rename


def _state_for(emitted: nn.Module, compiled: nn.Module, names: dict[str, str]
               ) -> dict[str, torch.Tensor]:
    """The compiled model's state under the emitted model's names (``names``: the compiled
    name of each the emitted model names differently). Left out: buffers the
    emitted classes compute and keep out of their state dicts (non-persistent, such as position
    ids) and constants the tracer lifted (``_tensor_constant0``) that a submodule called whole
    computes itself; I4 then checks the emitted model computes the same, and its parameter
    count."""
    state = compiled.state_dict()
    return {k: state[names.get(k, k)] for k in emitted.state_dict() if names.get(k, k) in state}


def _write(compiled: Compiled, out_dir: Path, command: str = "compile", progress: bool = False,
           stages: Stages = QUIET) -> list[Path]:
    prepared, branched = compiled.prepared, compiled.branched
    s = prepared.loaded.spec
    tune_batching(compiled, progress)
    name = class_name(s.name)
    with stages("emitting model.py", lambda: "emitted model.py "
                f"({len(sources.model_py.splitlines())} lines) and original.py"):
        sources = emit_sources(compiled)
    with artifacts.Staging(out_dir) as staging:
        staging.write_text("model.py", sources.model_py)
        staging.write_text("original.py", sources.original_py)
        staging.write_text("branch.diff", sources.diff)
        with stages("checking I4 (the emitted model against the compiled one)", "I4 holds"):
            emitted = artifacts.import_source(staging.path / "model.py", name)()
            emitted.load_state_dict(_state_for(emitted, branched.module, sources.compiled_names),
                                    strict=True)
            staging.write_with("weights.safetensors", lambda p: artifacts.save_weights(emitted, p))
            original_params = unique_parameters(prepared.traced.module)
            expected = original_params + branched.added_params
            reloaded = artifacts.load_emitted(staging.path, name)
            # After `run` the weights are trained: the compiled model is the reference then.
            original = prepared.model if command == "compile" else None
            compiled.checks.append(check_emit(
                reloaded, branched.module, prepared.examples, expected, original,
                prepared.task_paths, _renaming(branched, prepared.model, sources.compiled_names),
                1e-5 if regions_of(branched.module) else 0.0,
                lambda n: sources.compiled_names.get(n, n)))
        example = prepared.examples[0]
        lat = latencies([prepared.traced.module, branched.module], example)
        if compiled.selection is not None:  # (exact: see reconfx.cost)
            before = compiled.selection.flops
            after = before + compiled.selection.added_flops
        else:
            before, after = flops(prepared.traced.module, example), flops(branched.module, example)
        report = compile_report(
            command, s.name, prepared.traced.tier, prepared.traced.notes, prepared.layers,
            branched.layers, branched.per_task_norms, branched.shared_norms,
            Cost(original_params, before, lat[0]),
            Cost(unique_parameters(branched.module), after, lat[1]),
            compiled.checks, prepared.traced.ignored_outputs, sources.built, compiled.warnings,
            batching_section(regions_of(branched.module), compiled.tuning), compiled.selection)
        files = ["model.py", "original.py", "branch.diff", "weights.safetensors", "report.md"]
        results = list(compiled.results)
        if "onnx" in s.export.formats:
            with stages("exporting ONNX", lambda: f"exported model.onnx ({exported.exporter} "
                        f"exporter), I5 holds on {exported.provider}"):
                exported = onnx_for_spec(prepared.loaded, reloaded, staging.path / "model.onnx",
                                         prepared.examples)
            results += ["", *exported.report()]
            files += [staging.adopt(p.name).name for p in staging.path.glob("model.onnx*")]
        if results:
            report = report.replace("\n## Checks", "\n" + "\n".join(results).lstrip("\n")
                                    + "\n\n## Checks", 1)
        staging.write_text("report.md", report)
        chosen = {layer.name for layer in branched.layers}
        if compiled.profile is not None:
            files += write_conflicts(staging, compiled.profile, chosen)
        elif compiled.scores is not None and (out_dir / CONFLICTS).is_file():
            # compile selected other layers by an earlier profile: its flags and chart follow
            stored = json.loads((out_dir / CONFLICTS).read_text())
            data = rebranched(stored, chosen)
            if data != stored:
                staging.write_text(CONFLICTS, json.dumps(data, indent=1) + "\n")
                staging.write_with("conflicts.png", lambda p: chart_of(data, p))
                files += [CONFLICTS, "conflicts.png"]
        return staging.commit_with_manifest(command, prepared.loaded.path,
                                            prepared.loaded.sha256, s.train.seed, files, name,
                                            new_model=True)
