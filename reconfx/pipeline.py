"""The passes composed in memory, in order: the only module that knows them all.

``prepare`` builds and traces the model a spec names; ``profile_prepared`` profiles it;
``branch_checked`` selects, branches and checks invariants I1-I3; ``train_compiled`` trains;
``emit_sources`` writes the review files' text; ``check_emitted`` checks I4 on the emitted model
and ``measure_costs`` measures what the branching costs. Each returns a frozen result.
:mod:`reconfx.commands` runs them for the command line and writes the output folders.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import operator
import textwrap
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reconfx import calls, distributed
from reconfx.artifacts import assign_state
from reconfx.batching import batch_streams
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
from reconfx.cost import Cost, CostModel, Selection, flops, latency, selection_lines
from reconfx.data.padding import collate_of
from reconfx.distributed import World
from reconfx.emit.constructors import remembered
from reconfx.emit.onnx import OnnxExport, OnnxOptions, export_onnx
from reconfx.emit.python import EmittedSource, emit_python
from reconfx.emit.tree import buildable
from reconfx.errors import CheckError, SpecError, located, unexpected
from reconfx.facts import facts
from reconfx.graph import named_tensors, unique_parameters
from reconfx.kinds import settings_in
from reconfx.layers import Layer, inventory
from reconfx.modes import ATOL
from reconfx.profiling import Profile, Scores, annotate_scores, profile, restore_profile, scores_in
from reconfx.rewrite import Branched, branch
from reconfx.rows import one_task, task_rows, whole_copies
from reconfx.selection import budget_lines, check_patterns, explicit_choice, select_layers
from reconfx.spec import LoadedSpec, Spec, class_name, load_spec_file
from reconfx.stages import QUIET, Stages
from reconfx.streams import regions_of
from reconfx.timing import Ratio
from reconfx.tracing import Traced, trace
from reconfx.train.aggregators import aggregator
from reconfx.train.loop import FitResult, evaluate, fit
from reconfx.train.objectives import check_objectives, loss_functions, metric_functions
from reconfx.train.precision import resolve_device
from reconfx.train.resume import Batches, Checkpoint
from reconfx.train.sparse import SparseMask, neuron_masks
from reconfx.train.step import layer_parameters
from reconfx.tuning import Tuned, tune

__all__ = [
    "branch_checked", "branch_model", "check_emitted", "Compiled", "Costs", "emit_sources",
    "encoder_mask", "join", "load_compiled_state", "loaded_spec", "measure_costs", "on_device",
    "onnx_cases", "onnx_for_spec", "original_names", "prepare", "Prepared", "profile_prepared",
    "require_data", "Sources", "spec_examples", "train_batches", "train_compiled", "Trained",
    "transformer_shape", "tune_batching"
]


@dataclass(frozen=True)
class Prepared:
    """``prepare``'s result: the model the spec builds, its trace and layer inventory."""

    loaded: LoadedSpec
    model: nn.Module
    traced: Traced
    layers: list[Layer]
    task_paths: dict[str, str]
    examples: list[dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Compiled:
    """``branch_checked``'s result: the selection, the branched model and I1-I3 on it."""

    prepared: Prepared
    branched: Branched
    checks: tuple[Check, ...]
    scores: dict[str, int] | None = None  # the conflict scores it selected by
    selection: Selection | None = None  # the chosen layers, their scores and cost
    warnings: tuple[str, ...] = ()


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
        traced = trace(model, examples[0], task_paths=paths, dynamic=dynamic, tier=s.trace.tier,
                       leaves=s.trace.leaves, verify_with=examples[1],
                       class_name=class_name(s.name), selected=explicit_choice(s.select))
        traced = replace(traced, ignored_outputs=tuple(ignored))
        try:
            calls.annotate_calls(traced.module, model, examples[0])
        except Exception as exc:  # model.py then writes the submodules' ops, not their calls
            unexpected(exc)
            traced = replace(traced, notes=(
                *traced.notes, "how the submodules were called could not be found "
                f"({type(exc).__name__}: {exc}); model.py writes out their ops"))
    layers = inventory(traced.module, s.task_names)
    return Prepared(loaded, model, traced, layers, paths, examples)


def _traced_line(traced: Traced) -> str:
    tier = {"fx": "torch.fx (tier 1)", "export": "torch.export (tier 2)",
            "fx-coarse": "torch.fx with coarse leaves"}.get(traced.tier, traced.tier)
    why = next((n for n in traced.notes if n.startswith("tier 2 used")), None)
    return f"traced with {tier}" + (f"; {why[:160]}" if why else "")


def spec_examples(s: Spec) -> list[dict[str, torch.Tensor]]:
    """The example inputs every check runs on: the spec's shapes, and every dynamic axis at a
    second size (:func:`reconfx.build.second_size`: a second batch size, sequence length or
    image side)."""
    return [example_inputs(s.inputs, seed=s.train.seed),
            example_inputs(s.inputs, seed=s.train.seed + 1, grown=True)]


def loaded_spec(spec: LoadedSpec | str | Path) -> LoadedSpec:
    """The spec, loaded from its file unless it already is."""
    return spec if isinstance(spec, LoadedSpec) else load_spec_file(spec)


def branch_checked(prepared: Prepared, scores: Scores | None = None,
                   stages: Stages = QUIET) -> Compiled:
    """Select (by the conflict scores on the graph's nodes: a profile's, or ``scores`` from an
    earlier one, written there first), branch and check I1-I3 against the original model."""
    s = prepared.loaded.spec
    if scores is not None:
        annotate_scores(prepared.traced.module, prepared.layers, scores)
    scores = scores_in(prepared.traced.module, prepared.layers)
    with stages("selecting", lambda: "\n  ".join(selection_lines(selection))):
        cost = CostModel.measure(prepared.traced.module, prepared.examples[0])
        chosen = select_layers(prepared.layers, s.select, where=str(prepared.loaded.path),
                               scores=scores, tasks=len(s.tasks), cost=cost,
                               notes=prepared.traced.notes)
        budget = budget_lines(prepared.layers, s.select, scores=scores, chosen=chosen,
                              tasks=len(s.tasks), cost=cost) \
            if s.select is not None and scores is not None else []
        selection = Selection.of(chosen, scores, cost, unique_parameters(prepared.traced.module),
                                 budget=tuple(budget))
    with stages("branching and checking I1-I3", "branched; I1-I3 hold"):
        return _branched_and_checked(prepared, chosen, scores, selection)


def _branched_and_checked(prepared: Prepared, chosen: list[Layer],
                          scores: dict[str, int] | None, selection: Selection) -> Compiled:
    branched = branch_model(prepared, chosen)
    warning = selection.warning()
    warnings = [warning] if warning else []
    try:
        parity = check_parity(prepared.model, branched.module, prepared.task_paths,
                              prepared.examples,
                              ATOL if regions_of(branched.module) else prepared.traced.atol)
    except CheckError as exc:
        if not regions_of(branched.module):
            raise
        # The batching planner checked its regions on the first example only; keep the model
        # correct rather than fast.
        branched = branch_model(prepared, chosen, batching=False)
        parity = check_parity(prepared.model, branched.module, prepared.task_paths,
                              prepared.examples, prepared.traced.atol)
        warnings.append(f"stream batching turned off: with it, {exc.message}; set "
                        "branch.stream_batching: off to silence this, and report the model")
    checks = [
        parity,
        check_sharing(branched.module, branched.copies),
        check_isolation(branched.module, prepared.examples[0], branched.copies),
    ]
    return Compiled(prepared, branched, tuple(checks), scores, selection, tuple(warnings))


def branch_model(prepared: Prepared, chosen: list[Layer], batching: bool | None = None
                 ) -> Branched:
    """The branching pass, then stream batching as the spec asks (or as ``batching`` says).
    I1 holds within ATOL (1e-5) with batching (batched kernels round differently)."""
    s = prepared.loaded.spec
    branched = branch(prepared.traced.module, chosen, s.task_names, s.branch.norm_stats)
    if batching if batching is not None else s.branch.stream_batching != "off":
        branched = replace(branched, module=batch_streams(
            branched.module, prepared.examples[0], [i.name for i in s.inputs if 0 in i.dynamic]))
    calls.contiguous_streams(branched.module, branched.containers)
    return branched


def join(loaded: LoadedSpec) -> World:
    """Join the torchrun process group when launched as one of several ranks."""
    s = loaded.spec
    return distributed.init(s.distributed.backend, s.distributed.timeout_s, s.train.device,
                            str(loaded.path))


@dataclass(frozen=True)
class Trained:
    """``train_compiled``'s result (the compiled model's weights are trained in place)."""

    fitted: FitResult
    test: dict[str, float]  # each task's test metric
    shared: list[Layer]  # the compiled model's shared layers, as its conflict counter orders them
    metrics: list
    sparse: SparseMask | None


def train_compiled(compiled: Compiled, *, progress: bool = True,
                   data: dict[str, torch.utils.data.Dataset] | None = None,
                   checkpoints: Path | None = None, resume: Checkpoint | None = None,
                   tensorboard: Path | None = None) -> Trained:
    """Train the compiled model in place with the spec's training settings on ``train.device``
    (best validation epoch kept, conflicts of its shared layers counted, checkpoints written
    to ``checkpoints``, TensorBoard scalars to ``tensorboard``) and evaluate it on the test
    split; the model ends on the CPU. ``data``
    maps split names to data sets already built (the experiment reuses them)."""
    loaded, s = compiled.prepared.loaded, compiled.prepared.loaded.spec
    where = str(loaded.path)
    data = data or {split: call_data_factory(s.data, split, s.train.seed, f"{where}: data",
                                             s.inputs)
                    for split in ("train", "val", "test")}
    module = compiled.branched.module
    shared = [layer for layer in inventory(module, s.task_names) if layer.shared]
    metrics = metric_functions(list(s.tasks), where)
    with on_device(module, resolve_device(s.train.device, where)), located(where):
        sparse = encoder_mask(compiled, s) if s.train.sparse is not None else None
        fitted = fit(module, shared=shared, tasks=s.task_names,
                     loss_fns=loss_functions(list(s.tasks), where), metrics=metrics,
                     aggregate=aggregator(s.train.aggregator, len(s.tasks), where),
                     batches=train_batches(data["train"], s), val_data=data["val"],
                     settings=s.train, progress=progress, threshold=s.profile.threshold,
                     sparse=sparse, checkpoints=checkpoints, resume=resume, tensorboard=tensorboard)
        test = evaluate(module, data["test"], tasks=s.task_names, metrics=metrics,
                        world=distributed.world())
    return Trained(fitted, test, shared, metrics, sparse)


def train_batches(dataset: torch.utils.data.Dataset, s: Spec) -> Batches:
    """The shuffled training batches the spec describes (``data.batch_size``, ``train.seed``,
    ``data.drop_last``, ``data.workers``), sharded over the torchrun ranks when there are
    several; profiling and training both take them."""
    return Batches(dataset, s.data.batch_size, s.train.seed, drop_last=s.data.drop_last,
                   world=distributed.world(), workers=s.data.workers)


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


def require_data(loaded: LoadedSpec, command: str) -> None:
    """The spec has data, and the losses and metrics its tasks name resolve (checked before
    anything is traced, so a misspelt name costs no time)."""
    if loaded.spec.data is None:
        raise SpecError(f"{command} trains on data, and the spec has none",
                        where=f"{loaded.path}: data",
                        fix='add data: {factory: "reconfx.data:multidigits", batch_size: 128}')
    check_objectives(list(loaded.spec.tasks), str(loaded.path))


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
        annotate_scores(prepared.traced.module, prepared.layers, result.scores())
        return result
    dataset = call_data_factory(s.data, "train", s.train.seed, f"{where}: data", s.inputs)
    module = prepared.traced.module
    with on_device(module, resolve_device(s.train.device, where)), located(where):
        result = profile(module, prepared.layers, tasks=s.task_names,
                         loss_fns=loss_functions(list(s.tasks), where),
                         batches=train_batches(dataset, s), steps=s.profile.steps,
                         threshold=s.profile.threshold, settings=s.train,
                         aggregate=aggregator(s.train.aggregator, len(s.tasks), where),
                         progress=progress, checkpoint=checkpoint)
        result.counter.to("cpu")
    annotate_scores(module, prepared.layers, result.scores())
    return result


@dataclass(frozen=True)
class Sources:
    """The emitted review files, how model.py builds each module (path -> constructor /
    restored / generated / traced) and the compiled model's name of each tensor model.py
    names differently (a submodule copied whole per task: ``layer4.left.conv1.weight`` for the
    compiled ``layer4.conv1.left.weight``)."""

    model_py: str
    original_py: str
    diff: str
    built: dict[str, str]
    compiled_names: dict[str, str]
    rows: bool = False  # model.py carries the task streams as one tensor (reconfx.rows)


def emit_sources(compiled: Compiled) -> Sources:
    """``model.py``, ``original.py`` and ``branch.diff`` for ``compiled``."""
    with remembered():  # (each form looks up the same modules' constructors)
        return _emit_sources(compiled)


def _emit_sources(compiled: Compiled) -> Sources:
    prepared, branched = compiled.prepared, compiled.branched
    s = prepared.loaded.spec
    name = class_name(s.name)
    tasks = ", ".join(s.task_names)
    layer_names = ", ".join(layer.name for layer in branched.layers) or "none"
    listing = textwrap.fill(f"Tasks: {tasks}. Branched layers (one copy per task): "
                            f"{layer_names}.", width=95, break_on_hyphens=False)
    doc_model = (f"{name}: generated by reconfx from spec '{s.name}'; do not edit.\n\n"
                 f"{listing}\n"
                 f'Weights: safetensors.torch.load_model(model, "weights.safetensors").\n')
    doc_original = (f"{name}: generated by reconfx from spec '{s.name}'; do not edit.\n\n"
                    f"The model before branching (tasks: {tasks}), for review against model.py.\n")
    scores = scores_in(prepared.traced.module, prepared.layers) or {}
    notes = {layer.name: f" (conflict score {scores[layer.name]})" if layer.name in scores
             else " (selected in the spec)" for layer in branched.layers}
    settings = settings_in(prepared.model)
    called = functools.partial(calls.collapse_calls, examples=prepared.examples,
                               buildable=functools.partial(buildable, settings=settings))
    emitted = called(branched.module, model=prepared.model, containers=branched.containers)
    forms = [(emitted, *_per_stream_sources(
        emitted, prepared, branched, called=called, name=name, docs=(doc_model, doc_original),
        notes=notes, settings=settings))]
    # Task rows join the streams in every mode and at any batch: only under the default
    # stream batching ("off" keeps them apart, "tuned" keeps measured row caps), and not where
    # every branched layer lies in a submodule the per-stream form copies whole per task
    # (``nn.ModuleDict({task: BertLayer(...) ...})``) and it writes no op per stream, only
    # calls: rows cannot be the shorter read there, and its checks would cost a compile as
    # much again for a file not written.
    copies = [p for p, m in emitted.named_modules() if isinstance(m, calls.TaskCopies)]
    copied_whole = all(any(calls.under(c, p) for p in copies) for c in branched.containers) \
        and not any(n.op in ("call_function", "call_method") and facts(n).task
                    and n.target is not operator.getitem
                    for _mode, graph in emitted.graphs() for n in graph.nodes)
    rows = task_rows(branched, traced=prepared.traced.module, model=prepared.model,
                     examples=prepared.examples,
                     batch_inputs=[i.name for i in s.inputs if 0 in i.dynamic]
                     ) if s.branch.stream_batching == "eval" and not copied_whole else None
    if rows is not None:
        on_rows = whole_copies(called(rows[0], model=rows[1], containers=set()),
                               reference=branched.module, examples=prepared.examples)
        forms.append((on_rows, emit_python(
            on_rows, name, doc=doc_model, task_containers=branched.containers,
            branch_notes=notes, settings=settings), emit_python(
                called(prepared.traced.module, model=prepared.model, containers=set()), name,
                doc=doc_original, task_containers=set(), branch_notes=None,
                settings=settings)))
    # The shorter source for review: task rows where blocks hold per-task layers, per stream
    # where whole submodules are copied per task (a PerTask per leaf would repeat each copy).
    emitted, model_py, original_py = min(forms, key=lambda f: _review_lines(f[2], f[1]))
    diff = "".join(difflib.unified_diff(
        original_py.source.splitlines(keepends=True), model_py.source.splitlines(keepends=True),
        "original.py", "model.py"))
    return Sources(model_py.source, original_py.source, diff, model_py.built,
                   _compiled_names(emitted, branched.module), rows=emitted is not forms[0][0])


def _review_lines(original_py: EmittedSource, model_py: EmittedSource) -> int:
    """What a reviewer reads: model.py's lines and those of its diff against original.py."""
    diff = difflib.unified_diff(original_py.source.splitlines(), model_py.source.splitlines())
    return len(model_py.source.splitlines()) + sum(1 for _line in diff)


def _per_stream_sources(emitted: nn.Module, prepared: Prepared, branched: Branched, *,
                        called: Any, name: str, docs: tuple[str, str], notes: dict[str, str],
                        settings: Sequence[Any]) -> tuple[EmittedSource, EmittedSource]:
    """``model.py`` and ``original.py`` with a forward that runs each task stream on its own
    (the compiled graph's form, where the task-rows form does not hold)."""
    copies = [p for p, m in emitted.named_modules() if isinstance(m, calls.TaskCopies)]
    streams = [p for p, m in emitted.named_modules() if isinstance(m, calls.TaskStream)]
    model_py = emit_python(
        emitted, name, doc=docs[0],
        task_containers={c for c in branched.containers
                         if not any(calls.under(c, p) for p in copies)} | set(copies),
        branch_notes=notes, settings=settings)
    # The original calls whole the submodules model.py calls whole or copies per task (opening
    # the modules around them as model.py does), writes out the rest, and writes as classes of
    # their own those model.py writes as generated classes, so the diff shows only the surgery.
    inlined = {c for c in branched.containers
               if not any(calls.under(c, p) for p in [*streams, *copies])} | set(copies)
    original_py = emit_python(called(prepared.traced.module, model=prepared.model,
                                     containers=inlined, opened=streams), name, doc=docs[1],
                              task_containers=set(), branch_notes=None, settings=settings)
    return model_py, original_py


def check_emitted(compiled: Compiled, reloaded: nn.Module, sources: Sources,
                  trained: bool = False) -> Check:
    """I4: the emitted model, reloaded from its folder, against the compiled model (and the
    original, unless ``trained``: after ``run`` the compiled model is the reference)."""
    prepared, branched = compiled.prepared, compiled.branched
    expected = unique_parameters(prepared.traced.module) + branched.added_params
    return check_emit(reloaded, branched.module, examples=prepared.examples,
                      expected_params=expected, original=None if trained else prepared.model,
                      task_paths=prepared.task_paths,
                      rename=original_names(branched, prepared.model, sources.compiled_names),
                      atol=ATOL if regions_of(branched.module) or prepared.traced.atol
                      or sources.rows else 0.0,
                      exact=not (prepared.traced.atol or sources.rows),
                      compiled_name=lambda n: sources.compiled_names.get(n, n),
                      rows=sources.rows)


@dataclass(frozen=True)
class Costs:
    """What the compiled model costs beside the original."""

    original: Cost
    compiled: Cost
    latency: Ratio  # the compiled model's eval forward time over the original's


def measure_costs(compiled: Compiled) -> Costs:
    """Parameters, FLOPs of one forward (exact from the selection's cost model when there is
    one, see :mod:`reconfx.cost`) and the eval latency ratio, on the first example input."""
    prepared, branched = compiled.prepared, compiled.branched
    example = prepared.examples[0]
    if compiled.selection is not None:
        before = compiled.selection.flops
        after = before + compiled.selection.added_flops
    else:
        before, after = flops(prepared.traced.module, example), flops(branched.module, example)
    return Costs(Cost(unique_parameters(prepared.traced.module), before),
                 Cost(unique_parameters(branched.module), after),
                 latency(prepared.traced.module, branched.module, example))


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


def onnx_for_spec(loaded: LoadedSpec, model: nn.Module, *, path: Path,
                  examples: list[dict[str, torch.Tensor]], task: str | None = None,
                  overrides: dict[str, Any] | None = None) -> OnnxExport:
    """Export and check ``model`` as the spec describes it (inputs, tasks, dynamic axes and
    their names, ``export.onnx``), with ``overrides`` (the CLI's flags: opset, dtype, optimize,
    atol, rtol, provider) taking precedence."""
    s = loaded.spec
    tasks = [task] if task is not None else s.task_names
    clash = sorted({i.name for i in s.inputs} & set(tasks))
    if clash:
        raise SpecError(f"ONNX needs distinct input and output names, and '{clash[0]}' is both an "
                        "input and a task", where=f"{loaded.path}: tasks",
                        fix=f"rename the task (e.g. {clash[0]}_out), or leave onnx out of "
                            "export.formats")
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    chosen = {**s.export.onnx.model_dump(), **given}
    options = OnnxOptions(**chosen, transformer=transformer_shape(loaded)
                          if chosen.get("optimize") else None)
    if task is not None:  # (on task rows: the other tasks' streams left out)
        model = one_task(model, task, examples)
    return export_onnx(model, [i.name for i in s.inputs], tasks=tasks,
                       dynamic={i.name: i.dynamic for i in s.inputs},
                       cases=onnx_cases(loaded, examples), path=path, options=options,
                       every_task=task is None)


def transformer_shape(loaded: LoadedSpec) -> tuple[str, int, int] | None:
    """(model type, attention heads, hidden size) of the spec's model when it holds a Hugging
    Face model whose type onnxruntime's transformer optimizer knows, else None. The spec's
    model is built to read its configuration (only for ``optimize``)."""
    from onnxruntime.transformers.optimizer import MODEL_TYPES

    model = build_model(loaded.spec, loaded.path)
    configs = [m.config for m in model.modules() if hasattr(m, "config")
               and hasattr(m.config, "model_type")]
    for config in configs[:1]:
        heads = getattr(config, "num_attention_heads", None)
        hidden = getattr(config, "hidden_size", None)
        if config.model_type in MODEL_TYPES and heads and hidden:
            return config.model_type, int(heads), int(hidden)
    return None


def tune_batching(compiled: Compiled, progress: bool = False) -> tuple[Tuned, ...]:
    """``stream_batching: tuned``: measure each region's streams per call at the spec's tuning
    batch sizes (only the spec's own batch when no input has a dynamic batch axis) and keep the
    fastest caps; the measurements go into the report."""
    s = compiled.prepared.loaded.spec
    if s.branch.stream_batching != "tuned" or not regions_of(compiled.branched.module):
        return ()
    sizes = s.branch.tune_batches if any(0 in i.dynamic for i in s.inputs) else [
        next(iter(compiled.prepared.examples[0].values())).shape[0]]
    device = next(iter(compiled.branched.module.parameters())).device
    examples = {b: {k: v.to(device) for k, v in example_inputs(s.inputs, s.train.seed, b).items()}
                for b in sizes}
    return tuple(tune(compiled.branched.module, examples, s.branch.tune_repeats, progress))


def original_names(branched: Branched, original: nn.Module, compiled_names: dict[str, str]
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


def load_compiled_state(emitted: nn.Module, compiled: nn.Module, names: dict[str, str]) -> None:
    """Give the emitted model the compiled model's tensors themselves, not copies (``names``:
    the compiled name of each tensor the emitted model names differently), so that checking and
    writing it costs no second copy of the weights. Left out: buffers the emitted classes
    compute and keep out of their state dicts (non-persistent, such as position ids) and
    constants the tracer lifted (``_tensor_constant0``) that a submodule called whole computes
    itself; I4 then checks the emitted model computes the same, and its parameter count. An
    emitted tensor the compiled model has no counterpart for fails I4 here, naming it."""
    state = compiled.state_dict(keep_vars=True)
    wanted = emitted.state_dict(keep_vars=True)
    missing = [k for k in wanted if names.get(k, k) not in state]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckError(f"I4 emit parity failed: model.py holds {', '.join(missing[:3])}{more}, "
                         "which the compiled model has no tensor for",
                         fix="report this model as a reconfx bug")
    given: dict[str, torch.Tensor] = {}
    taken: dict[int, int] = {}  # compiled tensor -> the emitted tensor given it
    for name, tensor in wanted.items():
        value = state[names.get(name, name)]
        if taken.setdefault(id(value), id(tensor)) != id(tensor):
            value = value.clone()  # (two tensors of model.py that the compiled model holds as one)
        given[name] = value.detach()
    try:
        assign_state(emitted, given)
    except ValueError as exc:
        raise CheckError(f"I4 emit parity failed: {exc}",
                         fix="report this model as a reconfx bug") from exc
