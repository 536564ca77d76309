"""The reference experiment: Recon's comparison on a spec's model and data (see the README).

For every seed and aggregator: profile the unbranched model (joint training with that aggregator
from the initial weights), then train from the same initial weights

* ``joint``: the unbranched model;
* ``reconfx``: the spec's selection (e.g. top-K by conflict score) branched, per-task norm stats;
* ``reconfx-shared``: the same layers, with Recon's shared normalisation statistics;
* ``random``: random layers (seeded) whose added parameters are within 10% of ``reconfx``'s,
  per-task norm stats (the ablation, parameter-matched);
* with ``--budgets 10 25 50``, for each budget B: ``budget-B``, the layers
  ``select: {flops_budget: B}`` buys by the profile's scores (the most conflict it finds within
  +B% FLOPs), and ``random-budget-B``, random layers (seeded) within the same FLOP budget and
  ``budget-B``'s added parameters (Recon under a compute budget, against chance at equal cost);

plus one single-task model per task (the Δm baselines). Every run sees the same batches in the
same order for a seed. The conflict column is the share of strongly conflicting gradient pairs
(cos ≤ −0.01) over the whole training run in the layers that stay shared in that variant,
measured on the unbranched model (``joint``) and on the variant itself. A second table gives,
per aggregator, the Spearman rank correlation of the layers' conflict scores between seeds and
the overlap of their top-K sets: whether the conflicting layers are a property of the
architecture.

Run: ``python -m reconfx.experiments.recon_table [--spec specs/multidigits.yaml]``. Results are
kept in ``<out>/results.json`` after every run, so an interrupted experiment continues where it
stopped; ``<out>/table.md`` holds the table and ``--readme`` writes it into a README between
``<!-- recon-table:start -->`` and ``<!-- recon-table:end -->``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from reconfx import artifacts
from reconfx.build import call_data_factory
from reconfx.cost import CostModel, flops
from reconfx.errors import ReconfxError, SpecError
from reconfx.graph import unique_parameters
from reconfx.layers import Layer
from reconfx.pipeline import (
    Prepared,
    branch_checked,
    prepare,
    profile_prepared,
    require_data,
    train_batches,
    train_compiled,
)
from reconfx.selection import candidates, matched_random, random_within, select_layers
from reconfx.spec import LoadedSpec, SelectSpec, load_spec_file
from reconfx.train.aggregators import aggregator
from reconfx.train.loop import delta_m, evaluate, fit
from reconfx.train.objectives import loss_functions, metric_functions

__all__ = [
    "AGGREGATORS", "budget_variants", "Experiment", "layers_spec", "main", "MARKER", "markers",
    "score_consistency", "table", "variant_spec", "VARIANTS", "with_settings", "write_readme"
]

VARIANTS = ("joint", "reconfx", "reconfx-shared", "random")
AGGREGATORS = ("ew", "pcgrad", "cagrad", "mgda", "graddrop")
MARKER = "recon-table"  # the README's default markers


def markers(marker: str = MARKER) -> tuple[str, str]:
    """The README lines the table is written between."""
    return f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"


def with_settings(loaded: LoadedSpec, **changes: dict) -> LoadedSpec:
    """The spec with some sections' fields replaced (``train={"seed": 1}``, ``select=None``)."""
    s = loaded.spec
    update = {}
    for section, fields in changes.items():
        update[section] = None if fields is None else getattr(s, section).model_copy(
            update=fields)
    return LoadedSpec(spec=s.model_copy(update=update), path=loaded.path, sha256=loaded.sha256)


def variant_spec(loaded: LoadedSpec, variant: str, random: list[Layer]) -> LoadedSpec:
    """The spec of one variant; ``random`` holds the random variant's layers."""
    if variant == "joint":
        return with_settings(loaded, select=None)
    if variant == "reconfx-shared":
        return with_settings(loaded, branch={"norm_stats": "shared"})
    if variant == "random":
        return layers_spec(loaded, random)
    return loaded


def layers_spec(loaded: LoadedSpec, layers: list[Layer]) -> LoadedSpec:
    """The spec branching exactly ``layers`` (none: the joint model)."""
    select = SelectSpec(layers=[layer.name for layer in layers]) if layers else None
    return LoadedSpec(spec=loaded.spec.model_copy(update={"select": select}), path=loaded.path,
                      sha256=loaded.sha256)


def budget_variants(budgets: Sequence[float]) -> tuple[str, ...]:
    """The variants ``--budgets`` adds: per budget, the budgeted choice and its random
    ablation."""
    return tuple(v for b in budgets for v in (f"budget-{b:g}", f"random-budget-{b:g}"))


class Experiment:
    """Runs the grid for one spec, keeping every finished run in ``results.json``."""

    def __init__(self, spec: str | Path, out: Path, *, seeds: list[int], aggregators: list[str],
                 epochs: int | None = None, size: int | None = None, progress: bool = True,
                 variants: tuple[str, ...] = VARIANTS, budgets: Sequence[float] = ()):
        loaded = load_spec_file(spec)
        s = loaded.spec
        where = str(loaded.path)
        require_data(loaded, "the experiment")
        if s.select is None or not s.select.needs_scores:
            raise SpecError("the experiment branches the layers a profile selects, and this "
                            "spec's select is not a score-based policy",
                            where=f"{where}: select",
                            fix="use select: {top_k: 12} (or fraction, param_budget, min_score)")
        for name in aggregators:
            aggregator(name, len(s.tasks), where)  # fails early on an unknown name
        kwargs = dict(s.data.kwargs) | ({"size": size} if size is not None else {})
        self.loaded = with_settings(loaded, data={"kwargs": kwargs},
                                    train={"epochs": epochs or s.train.epochs})
        self.out, self.seeds, self.aggregators = out, seeds, aggregators
        self.variants = tuple(v for v in VARIANTS if v in variants)  # (joint always first)
        if any(b <= 0 for b in budgets):
            raise SpecError("a FLOP budget is a positive percent", where="--budgets",
                            fix="e.g. --budgets 10 25 50")
        self.budgets = tuple(budgets)
        self.progress = progress
        # Finished runs are reused while everything that shapes them is unchanged (the export
        # section and the name are not part of that).
        shaping = self.loaded.spec.model_dump(mode="json", exclude={"name", "export"})
        self.settings = {"spec": str(loaded.path), "training_sha256": hashlib.sha256(
            json.dumps(shaping, sort_keys=True).encode()).hexdigest()}
        self.rows = self._load()

    def _load(self) -> list[dict]:
        path = self.out / "results.json"
        if not path.is_file():
            return []
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            return []
        if saved.get("settings") != self.settings:
            print(f"reconfx: {path} is from other settings; starting afresh", file=sys.stderr)
            return []
        return saved["rows"]

    def _save(self) -> None:
        with artifacts.Staging(self.out) as staging:
            staging.write_text("results.json", json.dumps(
                {"settings": self.settings, "rows": self.rows}, indent=1) + "\n")
            staging.write_text("table.md", table(self.rows, self.loaded) + "\n")
            staging.commit()

    def _done(self, **key) -> bool:
        return any(all(row.get(k) == v for k, v in key.items()) for row in self.rows)

    def run(self) -> list[dict]:
        tasks = self.loaded.spec.task_names
        total = len(self.seeds) * (len(tasks) + len(self.aggregators) * (
            len(self.variants) + 2 * len(self.budgets) + 1))
        bar = tqdm(total=total, desc="recon table", disable=not self.progress)
        for seed in self.seeds:
            seeded = with_settings(self.loaded, train={"seed": seed})
            prepared = prepare(seeded)
            initial = copy.deepcopy(prepared.traced.module.state_dict())
            cost = CostModel.measure(prepared.traced.module, prepared.examples[0]) \
                if self.budgets else None
            data = {split: call_data_factory(seeded.spec.data, split, seed, "data",
                                                seeded.spec.inputs)
                    for split in ("train", "val", "test")}
            for task in tasks:
                bar.set_postfix_str(f"seed {seed} single-task {task}")
                if not self._done(seed=seed, variant="single-task", task=task):
                    prepared.traced.module.load_state_dict(initial)
                    self._record(self._single_task(prepared, task, data), seed=seed,
                                 variant="single-task", task=task)
                bar.update(1)
            for name in self.aggregators:
                self._aggregator(seeded, prepared, initial=initial, data=data, name=name,
                                 seed=seed, bar=bar, cost=cost)
        bar.close()
        return self.rows

    def _aggregator(self, seeded: LoadedSpec, prepared: Prepared, *, initial: dict, data: dict,
                    name: str, seed: int, bar: tqdm, cost: CostModel | None) -> None:
        budgeted = budget_variants(self.budgets)
        todo = [v for v in (*self.variants, *budgeted)
                if not self._done(seed=seed, aggregator=name, variant=v)]
        bar.set_postfix_str(f"seed {seed} {name} profile")
        if not todo:
            bar.update(len(self.variants) + len(budgeted) + 1)
            return
        loaded = with_settings(seeded, train={"aggregator": name})
        prepared.traced.module.load_state_dict(initial)
        scores = profile_prepared(replace(prepared, loaded=loaded), progress=False).scores()
        s = loaded.spec
        top = select_layers(prepared.layers, s.select, where=str(loaded.path), scores=scores,
                            tasks=len(s.tasks))
        added = (len(s.tasks) - 1) * sum(layer.num_params for layer in top)
        random = matched_random(candidates(prepared.layers, s.select), added, seed=seed,
                                tasks=len(s.tasks))
        bar.update(1)
        cells = [(variant, variant_spec(loaded, variant, random)) for variant in self.variants]
        for budget in self.budgets:
            spec = SelectSpec(flops_budget=budget, include=s.select.include,
                              exclude=s.select.exclude)
            bought = select_layers(prepared.layers, spec, where=str(loaded.path), scores=scores,
                                   tasks=len(s.tasks), cost=cost)
            drawn = random_within(
                candidates(prepared.layers, spec), cost, flops_limit=budget / 100 * cost.total,
                params_limit=(len(s.tasks) - 1) * sum(x.num_params for x in bought), seed=seed,
                tasks=len(s.tasks))
            cells += zip(budget_variants([budget]),
                         (layers_spec(loaded, bought), layers_spec(loaded, drawn)), strict=True)
        for variant, chosen in cells:
            bar.set_postfix_str(f"seed {seed} {name} {variant}")
            if variant in todo:
                prepared.traced.module.load_state_dict(initial)
                row = self._train(replace(prepared, loaded=chosen), scores, data)
                if variant == "joint":
                    row["scores"] = scores  # (the profile's, for the rank correlations)
                self._record(row, seed=seed, aggregator=name, variant=variant)
            bar.update(1)

    def _record(self, row: dict, **key) -> None:
        self.rows.append(key | row)
        self._save()

    def _train(self, prepared: Prepared, scores: dict[str, int], data: dict) -> dict:
        started = time.perf_counter()
        compiled = branch_checked(prepared, scores)  # raises when I1-I3 do not hold
        trained = train_compiled(compiled, progress=False, data=data)
        counter = trained.fitted.conflicts
        return {
            "branched": [layer.name for layer in compiled.branched.layers],
            "params": unique_parameters(compiled.branched.module),
            "original_params": unique_parameters(prepared.traced.module),
            "flops": flops(compiled.branched.module, prepared.examples[0]),
            "original_flops": flops(prepared.traced.module, prepared.examples[0]),
            "test": trained.test,
            "best_epoch": trained.fitted.best_epoch,
            "strong": {layer.name: [int(counter.strong[i].sum()), int(counter.valid[i].sum())]
                       for i, layer in enumerate(trained.shared)},
            "seconds": round(time.perf_counter() - started, 1),
        }

    def _single_task(self, prepared: Prepared, task: str, data: dict) -> dict:
        """The original model trained on one task's loss only (its other heads get no
        gradient); the task's test metric."""
        s, where = prepared.loaded.spec, str(prepared.loaded.path)
        started = time.perf_counter()
        spec_task = next(t for t in s.tasks if t.name == task)
        module = copy.deepcopy(prepared.traced.module)
        metrics = metric_functions([spec_task], where)
        fitted = fit(module, shared=[], tasks=[task], loss_fns=loss_functions([spec_task], where),
                     metrics=metrics, aggregate=aggregator("ew", 1),
                     batches=train_batches(data["train"], s), val_data=data["val"],
                     settings=s.train, progress=False)
        test = evaluate(module, data["test"], tasks=[task], metrics=metrics)
        return {"test": test, "best_epoch": fitted.best_epoch,
                "seconds": round(time.perf_counter() - started, 1)}


def _mean_std(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def _share(strong: dict[str, list[int]], names: list[str]) -> float | None:
    hits = sum(strong[n][0] for n in names if n in strong)
    valid = sum(strong[n][1] for n in names if n in strong)
    return hits / valid if valid else None


def table(rows: list[dict], loaded: LoadedSpec) -> str:
    """The markdown table: mean ± std over seeds of each task's test metric, Δm% against the
    same seed's single-task models, parameter increase and the strong-conflict share."""
    s = loaded.spec
    tasks = s.task_names
    named = metric_functions(list(s.tasks), str(loaded.path))
    metrics = {t.name: m for t, (_n, m) in zip(s.tasks, named, strict=True)}
    labels = {t.name: f"{t.name} {n}" for t, (n, _m) in zip(s.tasks, named, strict=True)}
    single = {(r["seed"], r["task"]): r["test"][r["task"]] for r in rows
              if r["variant"] == "single-task"}
    seeds = sorted({r["seed"] for r in rows})
    header = ["method", "variant", *(labels[t] for t in tasks), "Δm %",
              "params +%", "FLOPs +%", "strong conflicts, joint → variant", "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base = [statistics.fmean(v) for t in tasks
            if (v := [single[(seed, t)] for seed in seeds if (seed, t) in single])]
    if len(base) == len(tasks):
        lines.append("| single-task | one model per task | "
                     + " | ".join(_mean_std([single[(sd, t)] for sd in seeds if (sd, t) in single],
                                            100) for t in tasks)
                     + f" | 0 | +{100 * (len(tasks) - 1):.0f} | +{100 * (len(tasks) - 1):.0f} | "
                     f"– | {len(seeds)} |")
    names = list(dict.fromkeys(r["aggregator"] for r in rows if "aggregator" in r))
    budgets = sorted({float(r["variant"].removeprefix("budget-")) for r in rows
                      if r["variant"].startswith("budget-")})
    for name in names:
        for variant in (*VARIANTS, *budget_variants(budgets)):
            runs = [r for r in rows if r.get("aggregator") == name and r["variant"] == variant]
            if not runs:
                continue
            deltas, before, after = [], [], []
            for r in runs:
                if all((r["seed"], t) in single for t in tasks):
                    deltas.append(delta_m(r["test"], {t: single[(r["seed"], t)] for t in tasks},
                                          metrics))
                joint = next((j for j in rows if j.get("aggregator") == name
                              and j["variant"] == "joint" and j["seed"] == r["seed"]), None)
                remaining = list(r["strong"])
                if joint is not None and (b := _share(joint["strong"], remaining)) is not None:
                    before.append(b)
                if (a := _share(r["strong"], remaining)) is not None:
                    after.append(a)
            added = [100 * (r["params"] - r["original_params"]) / r["original_params"]
                     for r in runs]
            more = [100 * (r["flops"] - r["original_flops"]) / r["original_flops"]
                    for r in runs if "flops" in r]
            conflict = (f"{_mean_std(before, 100, 1)}% → {_mean_std(after, 100, 1)}%"
                        if before and after else "–")
            cells = [name, variant,
                     *(_mean_std([r["test"][t] for r in runs], 100) for t in tasks),
                     _mean_std(deltas) if deltas else "–", f"+{statistics.fmean(added):.1f}",
                     f"+{statistics.fmean(more):.1f}" if more else "–", conflict, str(len(runs))]
            lines.append("| " + " | ".join(cells) + " |")
    consistency = score_consistency(rows, s.select.top_k if s.select else None)
    return "\n".join(lines) + ("\n\n" + consistency if consistency else "")


def score_consistency(rows: list[dict], k: int | None) -> str:
    """Per aggregator, over every pair of seeds: the Spearman rank correlation of the layers'
    conflict scores and the overlap (shared / K) of the two top-K sets, mean ± std."""
    from itertools import combinations

    from scipy.stats import spearmanr

    lines = []
    for name in dict.fromkeys(r["aggregator"] for r in rows if "scores" in r):
        profiles = [r["scores"] for r in rows if r.get("aggregator") == name and "scores" in r]
        pairs = list(combinations(profiles, 2))
        if not pairs:
            continue
        rhos, overlaps = [], []
        for a, b in pairs:
            layers = sorted(a)
            rhos.append(float(spearmanr([a[n] for n in layers], [b[n] for n in layers])[0]))
            if k:
                top = [set(sorted(layers, key=lambda n, p=p: (-p[n], layers.index(n)))[:k])
                       for p in (a, b)]
                overlaps.append(len(top[0] & top[1]) / k)
        lines.append(f"| {name} | {len(profiles)} | {_mean_std(rhos)} | "
                     f"{_mean_std(overlaps, 100, 0) + '%' if overlaps else '–'} |")
    if not lines:
        return ""
    return "\n".join(["| method | seeds | Spearman ρ of layer scores, seed pairs | top-K "
                      "overlap |", "|---|---|---|---|", *lines])


def write_readme(path: Path, text: str, command: str, marker: str = MARKER) -> None:
    """``text`` written into the README at ``path`` between ``<!-- MARKER:start -->`` and
    ``<!-- MARKER:end -->``, after a line naming the command that produced it."""
    start, end = markers(marker)
    readme = path.read_text()
    if start not in readme or end not in readme:
        raise SpecError(f"{path} has no {start} ... {end} markers", where=str(path),
                        fix="add the two marker lines where the table belongs")
    head, rest = readme.split(start, 1)
    tail = rest.split(end, 1)[1]
    body = f"{start}\nProduced by `{command}`:\n\n{text}\n{end}"
    artifacts.replace_text(path, head + body + tail)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reconfx.experiments.recon_table",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="specs/multidigits.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--aggregators", nargs="+", default=list(AGGREGATORS))
    parser.add_argument("--epochs", type=int, help="override train.epochs")
    parser.add_argument("--size", type=int, help="override data.kwargs.size (a quick run)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="which variants to train (joint is always trained: the conflict "
                        "column's reference)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[], metavar="PERCENT",
                        help="also train, per FLOP budget, the layers select.flops_budget buys "
                        "and random layers within the same FLOP and parameter budget")
    parser.add_argument("--out", type=Path, default=Path("exported/recon-table"))
    parser.add_argument("--readme", type=Path, nargs="+", default=[],
                        help="write the table into these Markdown files (README.md, a docs "
                        "page), between their markers")
    parser.add_argument("--marker", default=MARKER,
                        help="the README's markers to write between: <!-- MARKER:start --> and "
                        "<!-- MARKER:end -->")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    try:
        experiment = Experiment(args.spec, args.out, seeds=args.seeds,
                                aggregators=args.aggregators, epochs=args.epochs, size=args.size,
                                progress=not args.quiet, variants=("joint", *args.variants),
                                budgets=args.budgets)
        rows = experiment.run()
        text = table(rows, experiment.loaded)
        print(text)
        print(f"wrote {(args.out / 'results.json').resolve()}, "
              f"{(args.out / 'table.md').resolve()}", file=sys.stderr)
        if args.readme:
            command = (f"python -m reconfx.experiments.recon_table --spec {args.spec} --seeds "
                       f"{' '.join(map(str, args.seeds))} --aggregators "
                       f"{' '.join(args.aggregators)}"
                       + (f" --epochs {args.epochs}" if args.epochs else "")
                       + (f" --size {args.size}" if args.size else "")
                       + (f" --variants {' '.join(args.variants)}"
                          if tuple(args.variants) != VARIANTS else "")
                       + (f" --budgets {' '.join(f'{b:g}' for b in args.budgets)}"
                          if args.budgets else ""))
            if args.out != Path("exported/recon-table"):
                command += f" --out {args.out}"
            for path in args.readme:
                write_readme(path, text, command, args.marker)
                print(f"wrote {path.resolve()}", file=sys.stderr)
    except ReconfxError as exc:
        print(f"reconfx: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
