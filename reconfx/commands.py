"""The commands that read and write output folders: ``compile``, ``profile``, ``run``,
``export`` and ``eval``, on top of the passes that :mod:`reconfx.pipeline` composes in memory.

Every command writes through a staging folder and commits only after its checks passed
(:mod:`reconfx.artifacts`), into a folder reconfx owns (:mod:`reconfx.outdir`).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reconfx import artifacts, outdir
from reconfx.build import call_data_factory
from reconfx.checks import Check
from reconfx.cost import CostModel, Selection
from reconfx.emit import hf
from reconfx.emit.onnx import OnnxExport, OnnxOptions
from reconfx.errors import CheckError, ModelError, OutputError, SpecError, located
from reconfx.layers import Layer
from reconfx.modes import restored, reusing
from reconfx.outdir import CHECKPOINTS, TENSORBOARD
from reconfx.pipeline import (
    Compiled,
    Prepared,
    branch_checked,
    check_emitted,
    emit_sources,
    join,
    load_compiled_state,
    loaded_spec,
    measure_costs,
    onnx_for_spec,
    prepare,
    profile_prepared,
    require_data,
    spec_examples,
    train_compiled,
    tune_batching,
)
from reconfx.profiling import (
    Profile,
    chart,
    rebranched,
    scores_of,
    strong_shares,
)
from reconfx.report import ReportFacts, batching_section, compile_report
from reconfx.rewrite import Branched
from reconfx.selection import select_layers
from reconfx.spec import LoadedSpec, Spec, class_name, load_spec_file
from reconfx.stages import QUIET, Stages
from reconfx.streams import regions_of
from reconfx.tables import markdown_table, table
from reconfx.train.loop import FitResult, delta_m, evaluate
from reconfx.train.objectives import metric_functions
from reconfx.train.resume import Checkpoint
from reconfx.train.scalars import csv_text, require_tensorboard
from reconfx.tuning import Tuned

__all__ = [
    "all_warnings", "check_hf", "compile_spec", "CONFLICTS", "Emitted", "evaluate_spec",
    "Evaluation", "export_hf", "export_spec", "open_checkpoint", "output_dir", "profile_spec",
    "Profiled", "Ran", "replace_section", "run_emitted", "run_report", "run_spec",
    "spec_and_folder", "stored_profile", "stored_scores", "threads", "write_conflicts", "write_hf",
    "write_model"
]

CONFLICTS = "conflicts.json"


def compile_spec(spec: LoadedSpec | str | Path, out_dir: str | Path | None = None,
                 progress: bool = False, force: bool = False) -> Emitted:
    """Trace, branch the selected layers, check I1-I4 and write the artifacts (into a folder
    reconfx owns, unless ``force``; see :mod:`reconfx.outdir`). With ``progress``, each stage
    is printed as it starts and finishes."""
    loaded = loaded_spec(spec)
    stages = Stages(progress)
    with outdir.writing(output_dir(loaded, out_dir), "compile", force) as out, reusing():
        prepared = prepare(loaded, stages)
        compiled = branch_checked(prepared, stored_scores(out), stages)
        return write_model(compiled, out, progress=progress, stages=stages)


@dataclass(frozen=True)
class Ran:
    """What ``run`` learnt beside the trained weights, written with them."""

    fitted: FitResult  # metrics.csv, steps.csv
    results: tuple[str, ...]  # report.md's lines on training and evaluation
    profile: Profile | None  # conflicts.json and .png (None: nothing profiled)
    after_branching: dict | None  # strong-conflict shares before and after branching
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()  # e.g. where a resumed run picked up


@dataclass(frozen=True)
class Emitted:
    """What ``compile`` and ``run`` wrote: the compiled model, the files, every check (I1-I4)
    and the stream-batching tuning measured; ``ran``: run's results (None for compile)."""

    compiled: Compiled
    out_dir: Path
    written: tuple[Path, ...]
    checks: tuple[Check, ...]
    tuning: tuple[Tuned, ...] = ()
    ran: Ran | None = None

    @property
    def prepared(self) -> Prepared:
        return self.compiled.prepared

    @property
    def branched(self) -> Branched:
        return self.compiled.branched

    @property
    def selection(self) -> Selection | None:
        return self.compiled.selection

    @property
    def warnings(self) -> tuple[str, ...]:
        return all_warnings(self.compiled, self.ran)

    @property
    def notes(self) -> tuple[str, ...]:
        return self.ran.notes if self.ran else ()

    @property
    def results(self) -> tuple[str, ...]:
        return self.ran.results if self.ran else ()


def all_warnings(compiled: Compiled, ran: Ran | None) -> tuple[str, ...]:
    """The warnings of selecting and branching, then those of profiling (``run``)."""
    return compiled.warnings + (ran.warnings if ran else ())


def output_dir(loaded: LoadedSpec, out_dir: str | Path | None) -> Path:
    """``--out`` when given, else the spec's ``export.dir``."""
    return Path(out_dir) if out_dir is not None else loaded.spec.export_dir()


@contextlib.contextmanager
def threads(count: int | None) -> Iterator[None]:
    """``train.threads``: PyTorch's CPU threads set to ``count`` for the block (None: as
    they are)."""
    saved = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def run_spec(spec: LoadedSpec | str | Path, out_dir: str | Path | None = None,
             progress: bool = True, resume: bool = False, force: bool = False) -> Emitted:
    """profile -> select -> branch -> train -> evaluate -> emit (trained weights). The state is
    saved in ``checkpoints/resume.pt`` on the way; ``resume`` continues from it."""
    loaded = loaded_spec(spec)
    require_data(loaded, "run")
    if loaded.spec.export.tensorboard:
        require_tensorboard(str(loaded.path))
    main = join(loaded).main  # (ranks but 0 write nothing: they neither check nor lock)
    with outdir.writing(output_dir(loaded, out_dir), "run", force, main) as out, \
            threads(loaded.spec.train.threads), reusing():
        return _run(loaded, out, progress, resume)


def _run(loaded: LoadedSpec, out: Path, progress: bool, resume: bool) -> Emitted:
    stages = Stages(progress)
    prepared = prepare(loaded, stages)
    loaded, s = prepared.loaded, prepared.loaded.spec
    w = join(loaded)
    progress = progress and w.main
    checkpoint = open_checkpoint(loaded, out, "run", resume)
    result = None
    if s.select is not None and s.select.needs_scores:
        retrain = s.train.init == "initial"  # the paper's protocol: retrain from the same start
        with restored(prepared.traced.module) if retrain else contextlib.nullcontext():
            result = profile_prepared(prepared, progress, checkpoint)
        checkpoint.extra["profile"] = result.counter.state_dict()
    compiled = branch_checked(prepared, stages=stages)  # (by the scores profiling wrote)
    board = out / TENSORBOARD if s.export.tensorboard else None
    trained = train_compiled(compiled, progress=progress, checkpoints=out / CHECKPOINTS if w.main
                             else None, resume=checkpoint, tensorboard=board)
    counter = trained.fitted.conflicts
    after = None
    if result is not None and counter is not None and counter.valid.numel():
        after = strong_shares(result, counter, [layer.name for layer in trained.shared])
    results = run_report(s, trained.metrics, trained.fitted, trained.test, after)
    if trained.sparse is not None:
        sparse = trained.sparse
        results.append(f"\n- sparse training: {100 * sparse.trainable_fraction:.1f}% of "
                       f"the encoder's weight entries trainable ({len(sparse.entries)} "
                       "weight tensors masked, heads and 1-D parameters fully trained)")
    if w.active:
        results.append(f"\n- data parallel on {w.size} ranks ({w.backend}): each "
                       "global batch sharded, per-task gradients all-reduced")
    ran = Ran(trained.fitted, tuple(results), result, after,
              tuple(result.warnings()) if result is not None else (),
              (checkpoint.note,) if checkpoint.note else ())
    if w.main:  # the other ranks hold the same weights and counters
        emitted = write_model(compiled, out, command="run", progress=progress, stages=stages,
                              ran=ran)
        checkpoint.clear()
    else:
        emitted = Emitted(compiled, out, (), compiled.checks, ran=ran)
    w.barrier()
    return emitted


def open_checkpoint(loaded: LoadedSpec, out: Path, command: str, resume: bool) -> Checkpoint:
    """The resume checkpoint of ``command`` in ``out/checkpoints`` (loaded with ``resume``)."""
    return Checkpoint(out / "checkpoints", command, loaded.sha256,
                      loaded.spec.train.checkpoint_every, resume)


@dataclass
class Evaluation:
    """``reconfx eval``'s result: each task's metric name and value on the split, and delta-m
    when the spec gives every task's single-task baseline."""

    split: str
    metrics: dict[str, tuple[str, float]]  # task -> (metric name, value)
    delta_m: float | None

    def lines(self) -> list[str]:
        """The result as an aligned table for the terminal."""
        rows = [[task, name, f"{value:.4f}"] for task, (name, value) in self.metrics.items()]
        out = table(["task", "metric", self.split], rows).splitlines()
        if self.delta_m is not None:
            out.append(f"delta-m vs the single-task baselines in the spec: {self.delta_m:+.2f}%")
        return out


def evaluate_spec(spec: LoadedSpec | str | Path, out_dir: str | Path | None = None,
                  split: str = "test") -> Evaluation:
    """Each task's metric of the emitted model in the output folder, and delta-m when the spec
    gives every task's single-task baseline."""
    loaded = loaded_spec(spec)
    s, where = loaded.spec, str(loaded.path)
    require_data(loaded, "eval")
    metrics = metric_functions(list(s.tasks), where)
    model = artifacts.load(output_dir(loaded, out_dir))
    data = call_data_factory(s.data, split, s.train.seed, f"{where}: data", s.inputs)
    with threads(s.train.threads), located(where):
        values = evaluate(model, data, tasks=s.task_names, metrics=metrics)
    baselines = {t.name: t.baseline for t in s.tasks if t.baseline is not None}
    named = {t: m for t, (_n, m) in zip(s.task_names, metrics, strict=True)}
    delta = delta_m(values, baselines, named) if len(baselines) == len(s.tasks) else None
    return Evaluation(split, {t: (name, values[t]) for t, (name, _m)
                              in zip(s.task_names, metrics, strict=True)}, delta)


def run_report(s: Spec, metrics: list, fitted: FitResult, test: dict[str, float],
               after: dict | None) -> list[str]:
    """report.md lines for run: test metrics, delta-m, conflict share before and after."""
    named = {t: m for t, (_n, m) in zip(s.task_names, metrics, strict=True)}
    ran = fitted.stopped_after or s.train.epochs
    stopped = (f" (stopped early: no better validation score in the last "
               f"{s.train.early_stopping} epochs)" if fitted.stopped_after else "")
    schedule = "" if s.train.schedule.kind == "constant" else f", {s.train.schedule.kind} schedule"
    kept = (f"best validation epoch {fitted.best_epoch + 1}" if s.train.keep == "best" else
            f"last epoch {fitted.kept_epoch + 1} (train.keep: last; best validation epoch "
            f"{fitted.best_epoch + 1})")
    every = s.train.conflict_every
    sampled = (f"; conflicts counted every {every} steps ({-(-len(fitted.steps) // every)} "
               f"of {len(fitted.steps)})" if every > 1 else "")
    lines = ["## Training and evaluation", "",
             f"- aggregator `{s.train.aggregator}`, {ran} of {s.train.epochs} epoch(s){stopped}, "
             f"optimiser {s.train.optimizer} (lr {s.train.lr}{schedule}), weights of the {kept}; "
             f"per-epoch losses and validation metrics in metrics.csv, per-step losses in "
             f"steps.csv{sampled}", ""]
    rows = [[t, name, f"{test[t]:.4f}", f"{fitted.kept.get(t, float('nan')):.4f}"]
            for t, (name, _m) in zip(s.task_names, metrics, strict=True)]
    lines.append(markdown_table(["task", "metric", "test", "val"], rows))
    baselines = {t.name: t.baseline for t in s.tasks if t.baseline is not None}
    if len(baselines) == len(s.tasks):
        lines += ["", f"- delta-m vs the single-task baselines in the spec: "
                      f"{delta_m(test, baselines, named):+.2f}%"]
    if after is not None:
        lines += ["", f"- strongly conflicting gradient pairs (cos <= -0.01) in the "
                      f"{after['layers']} remaining shared layers: {100 * after['before']:.1f}% "
                      f"while profiling the unbranched model ({after['profile_steps']} steps), "
                      f"{100 * after['after']:.1f}% while training the branched one "
                      f"({after['train_steps']} steps)"]
    return lines


def stored_scores(out_dir: Path) -> dict[str, int] | None:
    """Conflict scores from an earlier ``reconfx profile`` in ``out_dir``, if there is one."""
    path = out_dir / CONFLICTS
    if not os.path.lexists(path):
        return None
    return scores_of(stored_profile(out_dir))


def stored_profile(out_dir: Path) -> dict:
    """``conflicts.json`` parsed: a regular file holding JSON, else one line naming it."""
    path = out_dir / CONFLICTS
    try:
        data = json.loads(outdir.read_regular(path, 64 << 20))
        scores_of(data)
    except (ValueError, RecursionError) as exc:
        raise ModelError(f"{path} is not a conflict profile reconfx wrote ({exc})",
                         where="export.dir", fix=f"re-run `reconfx profile`, or remove {path}"
                         ) from exc
    return data


@dataclass(frozen=True)
class Profiled:
    """``profile``'s result: the conflict statistics, the layers the spec's policy would branch
    and the files written."""

    prepared: Prepared
    result: Profile
    chosen: list[Layer]
    written: list[Path]
    warnings: list[str]
    notes: list[str]


def write_conflicts(staging: artifacts.Staging, result: Profile, branched: set[str],
                    after: dict | None = None) -> list[str]:
    """conflicts.json and conflicts.png; ``after``: the strong-conflict shares before and after
    branching (``run``), see :func:`reconfx.profiling.strong_shares`."""
    data = result.to_json(branched) | ({"after_branching": after} if after else {})
    staging.write_text(CONFLICTS, json.dumps(data, indent=1) + "\n")
    staging.write_with("conflicts.png", lambda p: chart(data, p))
    return [CONFLICTS, "conflicts.png"]


def profile_spec(spec: LoadedSpec | str | Path, out_dir: str | Path | None = None,
                 progress: bool = True, resume: bool = False, force: bool = False) -> Profiled:
    """Profile conflicts on the spec's data; write conflicts.json and conflicts.png. The state
    is saved in ``checkpoints/resume.pt`` on the way; ``resume`` continues from it."""
    loaded = loaded_spec(spec)
    require_data(loaded, "profiling")
    main = join(loaded).main
    with outdir.writing(output_dir(loaded, out_dir), "profile", force, main) as out, \
            threads(loaded.spec.train.threads):
        return _profile(loaded, out, progress, resume)


def _profile(loaded: LoadedSpec, out: Path, progress: bool, resume: bool) -> Profiled:
    prepared = prepare(loaded, Stages(progress))
    s = loaded.spec
    w = join(loaded)
    checkpoint = open_checkpoint(loaded, out, "profile", resume)
    result = profile_prepared(prepared, progress and w.main, checkpoint)
    cost = CostModel.measure(prepared.traced.module, prepared.examples[0])
    chosen = select_layers(prepared.layers, s.select, where=str(loaded.path),
                           scores=result.scores(), tasks=len(s.tasks),
                           cost=cost, notes=prepared.traced.notes) if s.select is not None else []
    written: list[Path] = []
    if w.main:  # every rank holds the same counters
        with artifacts.Staging(out) as staging:
            files = write_conflicts(staging, result, {layer.name for layer in chosen})
            written = staging.commit_with_manifest(
                "profile", spec_path=loaded.path, spec_sha=loaded.sha256, seed=s.train.seed,
                files=files, class_name=class_name(s.name))
        checkpoint.clear()
    w.barrier()
    notes = [checkpoint.note] if checkpoint.note else []
    return Profiled(prepared, result, chosen, written, result.warnings(), notes)


def export_spec(target: LoadedSpec | str | Path, out_dir: str | Path | None = None,
                task: str | None = None, options: dict[str, Any] | None = None,
                progress: bool = False) -> OnnxExport:
    """``reconfx export``: ONNX from the model.py and weights already in an output folder
    (``model.onnx``, or ``model.<task>.onnx`` with only that task's output and what it needs);
    its section of report.md is replaced, nothing else is touched. ``target`` is the spec, or
    the output folder itself (its manifest names the spec). ``options``: the opset, dtype,
    optimize, atol, rtol and provider asked for (None: the spec's ``export.onnx``)."""
    loaded, folder = spec_and_folder(target, out_dir)
    s = loaded.spec
    if task is not None and task not in s.task_names:
        raise SpecError(f"no task named '{task}'", where="--task",
                        fix=f"one of {', '.join(s.task_names)}")
    given = {k: v for k, v in (options or {}).items() if v is not None}
    OnnxOptions(**{**s.export.onnx.model_dump(), **given})  # (refuses bad flags before work)
    if not (folder / artifacts.MANIFEST).is_file():  # (before the lock creates the folder)
        raise ModelError(f"{folder} holds no compiled model (no {artifacts.MANIFEST})",
                         where="export.dir", fix="run `reconfx compile` (or `run`) first")
    with outdir.writing(folder, "export") as out:
        return _export(loaded, out, task, given, Stages(progress))


def spec_and_folder(target: LoadedSpec | str | Path, out_dir: str | Path | None
                    ) -> tuple[LoadedSpec, Path]:
    """The spec and output folder ``reconfx export TARGET`` means: TARGET a spec (the folder:
    ``--out`` or its ``export.dir``), or an output folder whose manifest names its spec."""
    if isinstance(target, LoadedSpec) or not Path(target).is_dir():
        loaded = loaded_spec(target)
        return loaded, output_dir(loaded, out_dir)
    folder = Path(target)
    manifest = folder / artifacts.MANIFEST
    try:
        recorded = outdir.read_manifest(folder)["spec"]
        path, sha = Path(recorded["path"]), recorded["sha256"]
    except (OSError, OutputError, KeyError, TypeError) as exc:
        raise ModelError(f"{folder} is a folder without a readable {artifacts.MANIFEST} naming "
                         "its spec", where=str(manifest),
                         fix="pass the spec instead, or a folder written by `reconfx compile`"
                         ) from exc
    if not path.is_file():
        raise SpecError(f"the spec {path} that {manifest} names is gone", where=str(manifest),
                        fix="pass the spec file itself: reconfx export SPEC --out FOLDER")
    loaded = load_spec_file(path)
    if loaded.sha256 != sha:
        raise SpecError(f"the spec {path} changed since it wrote {folder} (its sha256 differs "
                        f"from {manifest}'s)", where=str(path),
                        fix="re-run `reconfx compile` with it, or pass the spec explicitly: "
                            "reconfx export SPEC --out FOLDER")
    if out_dir is not None and Path(out_dir).resolve() != folder.resolve():
        raise SpecError("--out names another folder than the one given", where="--out",
                        fix="give the folder once")
    return loaded, folder


def _export(loaded: LoadedSpec, out: Path, task: str | None, options: dict[str, Any],
            stages: Stages = QUIET) -> OnnxExport:
    s = loaded.spec
    with stages("loading model.py and its weights", "loaded (verified against manifest.json)"):
        model = artifacts.load(out)
    examples = spec_examples(s)
    name = "model.onnx" if task is None else f"model.{task}.onnx"
    with artifacts.Staging(out) as staging:
        with stages(f"exporting {name}", lambda: f"exported {name} ({exported.exporter} "
                    f"exporter), I5 holds on {exported.provider}"):
            exported = onnx_for_spec(loaded, model, path=staging.path / name, examples=examples,
                                     task=task, overrides=options)
        files = [staging.adopt(p.name).name for p in staging.path.glob(f"{name}*")]
        report = out / "report.md"
        text = outdir.read_regular(report, 64 << 20).decode("utf-8", errors="replace") \
            if os.path.lexists(report) else ""
        staging.write_text("report.md", replace_section(text, "## ONNX", exported.report()))
        files.append("report.md")
        written = staging.commit_with_manifest(
            "export", spec_path=loaded.path, spec_sha=loaded.sha256, seed=s.train.seed,
            files=files, class_name=class_name(s.name))
    exported.path = next(p for p in written if p.name == name)
    return exported


def export_hf(target: LoadedSpec | str | Path, out_dir: str | Path | None = None,
              progress: bool = False) -> list[Path]:
    """``reconfx export --format hf``: the Hugging Face format (:func:`write_hf`) from the
    model.py and weights already in an output folder (verified against its manifest), with
    the model card made from its report.md. ``target`` as for :func:`export_spec`."""
    loaded, folder = spec_and_folder(target, out_dir)
    if not (folder / artifacts.MANIFEST).is_file():
        raise ModelError(f"{folder} holds no compiled model (no {artifacts.MANIFEST})",
                         where="export.dir", fix="run `reconfx compile` (or `run`) first")
    stages = Stages(progress)
    with outdir.writing(folder, "export") as out:
        with stages("loading model.py and its weights", "loaded (verified against "
                    "manifest.json)"):
            model = artifacts.load(out)
            model_py = artifacts.read_source(out / "model.py").decode("utf-8")
        report = out / "report.md"
        text = outdir.read_regular(report, 64 << 20).decode("utf-8", errors="replace") \
            if os.path.lexists(report) else ""
        with artifacts.Staging(out) as staging:
            with stages("writing the Hugging Face format", "wrote the Hugging Face format "
                        "(AutoModel.from_pretrained loads it and matches model.py)"):
                files = write_hf(staging, loaded, model=model, model_py=model_py, report=text,
                                 examples=spec_examples(loaded.spec))
            return staging.commit_with_manifest(
                "export", spec_path=loaded.path, spec_sha=loaded.sha256,
                seed=loaded.spec.train.seed, files=files, class_name=class_name(loaded.spec.name))


def write_hf(staging: artifacts.Staging, loaded: LoadedSpec, *, model: nn.Module, model_py: str,
             report: str, examples: list[dict[str, torch.Tensor]]) -> list[str]:
    """The Hugging Face format's files (:mod:`reconfx.emit.hf`) for the emitted ``model``
    (its ``model.py`` text ``model_py``), staged and checked: transformers'
    ``AutoModel.from_pretrained`` loads the staged folder, and its outputs equal ``model``'s
    bit for bit on the examples."""
    s = loaded.spec
    try:
        import transformers
    except ImportError as exc:
        raise SpecError("export.formats has hf, which needs transformers",
                        where=f"{loaded.path}: export.formats",
                        fix="pip install 'reconfx[hf]', or leave hf out") from exc
    name, inputs = class_name(s.name), [i.name for i in s.inputs]
    f = s.factory
    source = hf.source_model(f.hf.path if f.hf else None)
    made_from = (f"the Hugging Face model `{f.hf.path}`" if f.hf else
                 f"the timm model `{f.timm.name}`" if f.timm else f"`{f.call[0]}`")
    texts = {
        "config.json": hf.config_json(name, s.task_names, inputs, transformers.__version__),
        f"{hf.CONFIG_MODULE}.py": hf.CONFIGURATION,
        f"{hf.MODELING_MODULE}.py": hf.modeling_source(model_py, name, inputs),
        "README.md": hf.model_card(report, name, spec_name=s.name, tasks=s.task_names,
                                   inputs=inputs, made_from=made_from, source=source,
                                   chart=os.path.lexists(staging.path / "conflicts.png")
                                   or os.path.lexists(staging.out_dir / "conflicts.png")),
    }
    for file, text in texts.items():
        staging.write_text(file, text)
    state = hf.hf_state(model)
    shards = hf.weight_files(state, int(s.export.hf.max_shard_mb * 1e6))
    from safetensors.torch import save_file

    for file, names in shards:
        staging.write_with(file, lambda p, names=names: save_file(
            {n: state[n] for n in names}, str(p), metadata={"format": "pt"}))
    if len(shards) > 1:
        staging.write_text("model.safetensors.index.json", hf.index_json(state, shards))
    check_hf(staging.path, model, examples)
    return [*texts, *(f for f, _ in shards)] + (
        ["model.safetensors.index.json"] if len(shards) > 1 else [])


def check_hf(folder: Path, model: nn.Module, examples: list[dict[str, torch.Tensor]]) -> None:
    """transformers loads ``folder`` and computes what ``model`` does, bit for bit (eval)."""
    from transformers import AutoModel

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            loaded = AutoModel.from_pretrained(str(folder), trust_remote_code=True,
                                               local_files_only=True).eval()
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise CheckError(f"the Hugging Face format does not load with AutoModel.from_pretrained "
                         f"({type(exc).__name__}: {first})",
                         fix="report this model as a reconfx bug, or leave hf out of "
                             "export.formats") from exc
    model.eval()
    with torch.no_grad():
        for example in examples:
            got, want = loaded(**example), model(**example)
            for task in want:
                if not torch.equal(got[task], want[task]):
                    raise CheckError(f"the Hugging Face format computes task '{task}' "
                                     "differently from model.py",
                                     fix="report this model as a reconfx bug, or leave hf out "
                                         "of export.formats")


def run_emitted(path: Path, name: str) -> nn.Module:
    """The emitted class, imported and built with its parameters on the meta device
    (:func:`reconfx.artifacts.built_light`); model.py that does not import or build is
    reconfx's fault (it imports what the model was built with), so it fails I4."""
    try:
        cls = artifacts.import_source(path, name)
        return artifacts.built_light(cls)
    except Exception as exc:
        what = exc.message if isinstance(exc, ModelError) else (
            f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}")
        raise CheckError(f"I4 emit parity failed: the emitted model.py does not run ({what})",
                         fix="report this model as a reconfx bug") from exc


def replace_section(text: str, heading: str, lines: list[str]) -> str:
    """``text`` with the markdown section under ``heading`` replaced by ``lines`` (appended
    when it has none)."""
    body = "\n".join(lines).rstrip("\n") + "\n"
    start = text.find(f"\n{heading}\n")
    if start < 0:
        return (text.rstrip("\n") + "\n\n" if text else "") + body
    end = text.find("\n## ", start + 1)
    return text[:start + 1] + body + ("\n" + text[end + 1:] if end >= 0 else "")


def write_model(compiled: Compiled, out_dir: Path, *, command: str = "compile",
                progress: bool = False, stages: Stages = QUIET, ran: Ran | None = None
                ) -> Emitted:
    """Emit ``compiled`` (after ``run``: with its trained weights and ``ran``'s results), check
    I4, measure its cost and write the output folder."""
    prepared, branched = compiled.prepared, compiled.branched
    s = prepared.loaded.spec
    tuning = tune_batching(compiled, progress)
    name = class_name(s.name)
    # the working folders this command filled: run's checkpoints and TensorBoard scalars
    working = ((CHECKPOINTS,) + ((TENSORBOARD,) if s.export.tensorboard else ())
               if command == "run" else ())
    with stages("emitting model.py", lambda: "emitted model.py "
                f"({len(sources.model_py.splitlines())} lines) and original.py"):
        sources = emit_sources(compiled)
    with artifacts.Staging(out_dir) as staging:
        staging.write_text("model.py", sources.model_py)
        staging.write_text("original.py", sources.original_py)
        staging.write_text("branch.diff", sources.diff)
        with stages("checking I4 (the emitted model against the compiled one)", "I4 holds"):
            # model.py's class holding the compiled tensors themselves (nothing is copied),
            # and the weights file checked to hold the same, as reconfx.load would give them
            reloaded = run_emitted(staging.path / "model.py", name)
            load_compiled_state(reloaded, branched.module, sources.compiled_names)
            weights = staging.write_with("weights.safetensors",
                                         functools.partial(artifacts.save_weights, reloaded))
            try:
                artifacts.verify_weights(weights, reloaded)
            except ValueError as exc:
                raise CheckError(f"I4 emit parity failed: {exc}",
                                 fix="report this model as a reconfx bug") from exc
            checks = (*compiled.checks,
                      check_emitted(compiled, reloaded, sources, trained=command == "run"))
        costs = measure_costs(compiled)
        files = ["model.py", "original.py", "branch.diff", "weights.safetensors", "report.md"]
        results = list(ran.results) if ran else []
        if "onnx" in s.export.formats:
            with stages("exporting ONNX", lambda: f"exported model.onnx ({exported.exporter} "
                        f"exporter), I5 holds on {exported.provider}"):
                exported = onnx_for_spec(prepared.loaded, reloaded,
                                         path=staging.path / "model.onnx",
                                         examples=prepared.examples)
            results += ["", *exported.report()]
            files += [staging.adopt(p.name).name for p in staging.path.glob("model.onnx*")]
        report = compile_report(ReportFacts(
            command, s.name, prepared.traced.tier, prepared.traced.notes, prepared.layers,
            branched.layers, branched.per_task_norms, branched.shared_norms,
            costs.original, costs.compiled, costs.latency,
            list(checks), prepared.traced.ignored_outputs, sources.built,
            list(all_warnings(compiled, ran)),
            batching_section(regions_of(branched.module), list(tuning)), compiled.selection,
            results, rows=sources.rows))
        staging.write_text("report.md", report)
        if "hf" in s.export.formats:
            with stages("writing the Hugging Face format", "wrote the Hugging Face format "
                        "(AutoModel.from_pretrained loads it and matches model.py)"):
                files += write_hf(staging, prepared.loaded, model=reloaded,
                                  model_py=sources.model_py, report=report,
                                  examples=prepared.examples)
        if ran is not None:
            files.append(staging.write_text("metrics.csv", csv_text(ran.fitted.history)).name)
            files.append(staging.write_text("steps.csv", csv_text(ran.fitted.steps)).name)
        chosen = {layer.name for layer in branched.layers}
        if ran is not None and ran.profile is not None:
            files += write_conflicts(staging, ran.profile, chosen, ran.after_branching)
        elif compiled.scores is not None and os.path.lexists(out_dir / CONFLICTS):
            # compile selected other layers by an earlier profile: its flags and chart follow
            stored = stored_profile(out_dir)
            data = rebranched(stored, chosen)
            if data != stored:
                staging.write_text(CONFLICTS, json.dumps(data, indent=1) + "\n")
                staging.write_with("conflicts.png", lambda p: chart(data, p))
                files += [CONFLICTS, "conflicts.png"]
        written = staging.commit_with_manifest(
            command, spec_path=prepared.loaded.path, spec_sha=prepared.loaded.sha256,
            seed=s.train.seed, files=files, class_name=name, new_model=True, working=working)
    return Emitted(compiled, out_dir, tuple(written), checks, tuning, ran)
