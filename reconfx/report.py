"""Tables for the terminal and ``report.md``: the layer inventory and what a compile did."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from reconfx.checks import Check
from reconfx.cost import Cost, Selection
from reconfx.layers import Layer
from reconfx.streams import BUDGET_BYTES, StreamRegion
from reconfx.tables import markdown_table
from reconfx.timing import Ratio
from reconfx.tuning import Tuned

__all__ = [
    "batching_section", "built_section", "compile_report", "latency_line", "LAYER_HEADERS",
    "layer_rows", "percent", "ReportFacts"
]


def latency_line(ratio: Ratio) -> str:
    """report.md's latency line: the ratio with its spread, or why it is left out."""
    spread = f"x{ratio.low:.2f}-x{ratio.high:.2f}"
    if not ratio.clear:
        return (f"- eval latency: not reported: the compiled/original time ratio varied "
                f"{spread} between quartiles over {ratio.rounds} interleaved rounds, more than "
                f"its median x{ratio.median:.2f} differs from x1 (this machine's noise; the FLOP "
                "count above is exact)")
    return (f"- eval latency (example inputs, {ratio.rounds} interleaved rounds): "
            f"{ratio.a_ms:.3f} ms -> {ratio.b_ms:.3f} ms, x{ratio.median:.2f} (quartiles "
            f"{spread})")


def layer_rows(layers: list[Layer], branched: set[str],
               scores: dict[str, int] | None = None) -> list[list[str]]:
    rows = []
    for layer in layers:
        row = [layer.name, layer.type, f"{layer.num_params:,}", ",".join(layer.tasks),
               "yes" if layer.shared else "no", "yes" if layer.name in branched else ""]
        if scores:
            row.append(str(scores[layer.name]) if layer.name in scores else "")
        rows.append(row)
    return rows


LAYER_HEADERS = ["layer", "type", "params", "tasks", "shared", "branched"]


def percent(new: float, old: float) -> str:
    return f"{100.0 * (new - old) / old:+.1f}%" if old else "n/a"


@dataclass(frozen=True)
class ReportFacts:
    """What ``report.md`` of compile and run says: the command and spec name, tracing (tier,
    notes, outputs no task uses), the layers and the branched ones, normalisation statistics,
    costs before and after, the checks, how model.py builds its modules, warnings, stream
    batching's section, the selection, and ``results``: run's and ONNX's sections, placed
    before the checks."""

    command: str
    name: str
    tier: str
    notes: Sequence[str]
    layers: list[Layer]
    branched: list[Layer]
    per_task_norms: list[str]
    shared_norms: list[str]
    original: Cost
    compiled: Cost
    ratio: Ratio
    checks: list[Check]
    ignored: Sequence[str]
    built: dict[str, str]
    warnings: list[str]
    batching: list[str]
    selection: Selection | None = None
    results: list[str] = field(default_factory=list)
    rows: bool = False  # model.py carries the task streams as one tensor (reconfx.rows)


def compile_report(facts: ReportFacts) -> str:
    f = facts
    branched, layers, original, compiled = f.branched, f.layers, f.original, f.compiled
    names = {layer.name for layer in branched}
    lines = [f"# reconfx {f.command}: {f.name}", "",
             f"- tracing tier: `{f.tier}`",
             f"- branched layers: {len(branched)} of {sum(1 for x in layers if x.shared)} shared "
             f"({len(layers)} layers in all)",
             f"- parameters: {original.params:,} -> {compiled.params:,} "
             f"({percent(compiled.params, original.params)})",
             f"- FLOPs per forward (example inputs): {original.flops:,} -> {compiled.flops:,} "
             f"({percent(compiled.flops, original.flops)})",
             latency_line(f.ratio), ""]
    if f.results:
        lines += ["\n".join(f.results).strip("\n"), ""]
    lines += ["## Checks", ""]
    lines += [f"- {c.name}: {c.detail}" for c in f.checks]
    warnings, notes, ignored, built, batching, selection = (
        f.warnings, f.notes, f.ignored, f.built, f.batching, f.selection)
    per_task_norms, shared_norms = f.per_task_norms, f.shared_norms
    if warnings:
        lines += ["", "## Warnings", "", *[f"- {w}" for w in warnings]]
    if notes:
        lines += ["", "## Tracing notes", "", *[f"- {n}" for n in notes]]
    if ignored:
        lines += ["", "## Ignored outputs", "",
                  f"- the model also returns {', '.join(ignored)}, which no task uses"]
    lines += built_section(built, f.rows)
    lines += ["", "## Branched layers", ""]
    if selection is not None and selection.layers:
        lines += [markdown_table(Selection.HEADERS, selection.rows()), "",
                  f"- cost of the selection: {selection.summary()}",
                  *(f"- {line}" for line in selection.budget)]
    else:
        rows = [[f"`{b.name}`", b.type, f"{b.num_params:,}", ", ".join(b.tasks)]
                for b in branched]
        lines.append(markdown_table(["layer", "type", "params per copy", "tasks"], rows)
                     if rows else "none")
    lines += batching
    if per_task_norms or shared_norms:
        lines += ["", "## Normalisation statistics", ""]
        lines += [f"- `{p}`: per-task running statistics, shared affine parameters"
                  for p in per_task_norms]
        lines += [f"- `{p}`: one set of statistics (it also runs before a branch point)"
                  for p in shared_norms]
    lines += ["", "## All layers", "",
              markdown_table(LAYER_HEADERS, layer_rows(layers, names)), ""]
    return "\n".join(lines)


def built_section(built: dict[str, str], rows: bool = False) -> list[str]:
    """How model.py's ``__init__`` builds the modules it creates (counts, and the paths of those
    not built by their own class's constructor) and how its forward carries the task streams."""
    by_how = {how: [p for p, h in built.items() if h == how]
              for how in ("constructor", "restored", "generated", "traced")}
    lines = ["", "## How model.py builds its modules", "",
             f"- {len(by_how['constructor'])} by their own class's constructor"]
    if by_how["restored"]:
        lines.append(f"- {len(by_how['restored'])} restored from their recorded attributes and "
                     "tensors (no constructor call rebuilds them): "
                     + ", ".join(f"`{p}`" for p in by_how["restored"]))
    if by_how["generated"]:
        lines.append(f"- {len(by_how['generated'])} as a class generated for a submodule run per "
                     "task stream (its own modules counted above): "
                     + ", ".join(f"`{p}`" for p in by_how["generated"]))
    if by_how["traced"]:
        lines.append(f"- {len(by_how['traced'])} as a class holding its own traced code (an "
                     "attribute has no source form, so no call of its class rebuilds it): "
                     + ", ".join(f"`{p}`" for p in by_how["traced"]))
    if rows:
        lines.append("- the forward carries the task streams as one tensor, the tasks' batches "
                     "one after another: shared modules run once on all of them, per-task ones "
                     "(`PerTask`) each on its task's rows")
    return lines


def batching_section(regions: Sequence[StreamRegion], tuning: Sequence[Tuned]) -> list[str]:
    """Report lines on stream batching: each region and its row cap; with measured tuning, the
    timings behind each cap (a measured choice is recorded with its measurements)."""
    if not regions:
        return []
    lines = ["", "## Stream batching", "",
             "In eval mode each region runs its task streams through the shared layers it names "
             "concatenated along the batch axis, as many streams per call as its row cap allows "
             "(model.py: `self.stream_rows`; ONNX holds all streams in one call)."
             + (" Caps measured on this machine (`stream_batching: tuned`)." if tuning else
                " Caps from the cost rule: the largest intermediate value of a call holds at "
                f"most {BUDGET_BYTES // 1024} KiB, or the region's weight bytes where larger."),
             ""]
    rows = [[f"`{r.method}`", _span(r.modules_called), ", ".join(r.tasks),
             f"{r.bytes_per_row:,}", f"{r.weight_bytes:,}", str(r.max_rows)] for r in regions]
    lines.append(markdown_table(["region", "shared layers", "streams", "bytes per row",
                                 "weight bytes", "row cap"], rows))
    if tuning:
        lines += ["", "Measured: median ms of one region call per streams-per-call option, and "
                  "the streams per call the cost rule and the tuned cap give at that batch.", "",
                  "| region | batch | ms by streams per call | rule | tuned |",
                  "|---|---|---|---|---|", *_tuning_rows(tuning)]
    return lines


def _span(modules: Sequence[str]) -> str:
    if len(modules) <= 2:
        return ", ".join(f"`{m}`" for m in modules)
    return f"`{modules[0]}` ... `{modules[-1]}` ({len(modules)})"


def _tuning_rows(tuning: Sequence[Tuned]) -> list[str]:
    rows = []
    for t in tuning:
        for batch, times in t.times.items():
            cells = ", ".join(f"{k}: {ms:.3f}" for k, ms in times.items())
            rows.append(f"| `{t.region}` | {batch} | {cells} | {t.choice(batch, t.rule_rows)} | "
                        f"{t.choice(batch)} |")
    return rows
