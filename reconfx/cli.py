"""The `reconfx` command line: a thin layer over :mod:`reconfx.commands`.

Errors are printed as one line (file, field, fix); exit code 2 for bad input, 1 for failures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reconfx import __version__, interrupts
from reconfx.errors import ReconfxError, SelectionError, SpecError

__all__ = [
    "cmd_compile", "cmd_eval", "cmd_export", "cmd_inspect", "cmd_profile", "cmd_run", "cmd_schema",
    "cmd_validate", "DISTRIBUTED", "main", "out_of_memory", "parser"
]


def _say(args: argparse.Namespace, text: str) -> None:
    if not getattr(args, "quiet", False):
        print(text, flush=True)


def cmd_validate(args: argparse.Namespace) -> int:
    from reconfx.build import resolve_factory
    from reconfx.spec import load_spec_file
    from reconfx.train.objectives import check_objectives

    loaded = load_spec_file(args.spec)
    s = loaded.spec
    source = "model" if s.model is not None else "backbone"
    # (imported, not called: a missing package or misspelt name fails here, not at `run`)
    text, _kwargs = s.factory.call
    resolve_factory(text, f"{loaded.path}: {source}.{s.factory.source}")
    if s.data is not None:
        resolve_factory(s.data.factory, f"{loaded.path}: data.factory")
    check_objectives(list(s.tasks), str(loaded.path), run_code=False)
    named = {"factory": text, "hf": f"hf {s.factory.hf.path if s.factory.hf else ''}",
             "timm": f"timm {s.factory.timm.name if s.factory.timm else ''}"}[s.factory.source]
    print(f"{loaded.path}: ok ('{s.name}': {source} {named}, "
          f"{len(s.inputs)} input(s), tasks {', '.join(s.task_names)})")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    if args.markdown:
        from reconfx.specdoc import render

        print(render(), end="")
        return 0
    from reconfx.spec import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from reconfx.commands import stored_scores
    from reconfx.pipeline import prepare
    from reconfx.report import LAYER_HEADERS, layer_rows
    from reconfx.selection import select_layers
    from reconfx.tables import table

    prepared = prepare(args.spec)
    s = prepared.loaded.spec
    scores = stored_scores(s.export_dir())
    chosen: set[str] = set()
    problem = None
    try:
        chosen = {layer.name for layer in select_layers(prepared.layers, s.select,
                                                        where=str(prepared.loaded.path),
                                                        scores=scores, tasks=len(s.tasks),
                                                        notes=prepared.traced.notes)}
    except SelectionError as exc:
        problem = str(exc)
    if args.json:
        print(json.dumps({
            "tier": prepared.traced.tier, "notes": prepared.traced.notes,
            "selection_error": problem,
            "layers": [{"name": layer.name, "type": layer.type, "paths": list(layer.paths),
                        "params": layer.num_params, "tasks": list(layer.tasks),
                        "shared": layer.shared, "branched": layer.name in chosen,
                        "score": (scores or {}).get(layer.name)}
                       for layer in prepared.layers]}, indent=2))
        return 0
    print(f"{s.name}: traced with tier '{prepared.traced.tier}', {len(prepared.layers)} layers "
          f"({sum(1 for x in prepared.layers if x.shared)} shared)")
    for note in prepared.traced.notes:
        print(f"note: {note}")
    if problem:
        print(f"selection: {problem}")
    print(table(LAYER_HEADERS + (["score"] if scores else []),
                layer_rows(prepared.layers, chosen, scores)))
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from reconfx.commands import profile_spec

    _say(args, f"profiling {args.spec} ...")
    done = profile_spec(args.spec, args.out, progress=not args.quiet, resume=args.resume,
                        force=args.force)
    for note in done.notes:
        _say(args, note)
    scores = done.result.scores()
    top = sorted(scores.items(), key=lambda kv: -kv[1])[:5]
    _say(args, f"{done.result.steps} steps, {len(scores)} shared layers; highest scores: "
               + ", ".join(f"{name} {score}" for name, score in top))
    if done.chosen:
        _say(args, f"select.{done.prepared.loaded.spec.select.policy} would branch "
                   f"{len(done.chosen)} layer(s): {', '.join(x.name for x in done.chosen)}")
    for path in done.written:
        _say(args, f"wrote {path}")
    _warn(done.warnings)
    return 0


def _report(args: argparse.Namespace, compiled: Any) -> None:
    """The checks passed, the files written and any warnings of a compile or run."""
    for check in compiled.checks:
        _say(args, f"  {check.name}: {check.detail}")
    for path in compiled.written:
        _say(args, f"wrote {path}")
    _warn(compiled.warnings)


def _warn(warnings: list[str]) -> None:
    if os.environ.get("RANK", "0") != "0":
        return  # every rank found the same: rank 0 says it
    for warning in warnings:
        print(f"reconfx: warning: {warning}", file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    from reconfx.commands import run_spec

    _say(args, f"running {args.spec}: profile -> select -> branch -> train -> evaluate -> emit")
    compiled = run_spec(args.spec, args.out, progress=not args.quiet, resume=args.resume,
                        force=args.force)
    for note in compiled.notes:
        _say(args, note)
    from reconfx.tables import for_terminal

    for line in for_terminal(compiled.results):
        _say(args, line)
    _report(args, compiled)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from reconfx.commands import evaluate_spec

    for line in evaluate_spec(args.spec, args.out, args.split).lines():
        print(line)
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from reconfx.commands import compile_spec

    _say(args, f"compiling {args.spec} ...")
    compiled = compile_spec(args.spec, args.out, progress=not args.quiet, force=args.force)
    branched = compiled.branched
    _say(args, f"tier {compiled.prepared.traced.tier}; branched {len(branched.layers)} layer(s) "
               f"for {len(branched.tasks)} tasks (+{branched.added_params:,} parameters)")
    _report(args, compiled)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from reconfx.commands import export_hf, export_spec

    if args.format == "hf":
        onnx_only = [f"--{k}" for k in ("task", "opset", "dtype", "optimize", "atol", "rtol",
                                        "provider") if getattr(args, k) is not None]
        if onnx_only:
            raise SpecError(f"{', '.join(onnx_only)} apply to --format onnx only",
                            where="--format", fix=f"leave out {', '.join(onnx_only)}")
        for path in export_hf(args.spec, args.out, progress=not getattr(args, "quiet", False)):
            _say(args, f"wrote {path}")
        return 0
    options = {"opset": args.opset, "dtype": args.dtype, "optimize": args.optimize,
               "atol": args.atol, "rtol": args.rtol, "provider": args.provider}
    exported = export_spec(args.spec, args.out, args.task, options,
                           progress=not getattr(args, "quiet", False))
    _say(args, f"exported with the {exported.exporter} exporter; onnxruntime on "
               f"{exported.provider}")
    for name, why in exported.rejected.items():
        _say(args, f"  not used: {name}: {why}")
    for step in exported.steps:
        _say(args, f"  {step}")
    worst = max(exported.comparisons, key=lambda c: c.max_abs)
    atol, rtol = exported.options.tolerances
    _say(args, f"  I5 onnx parity ({exported.options.dtype}, opset {exported.options.opset}): "
               f"{len(exported.comparisons)} output comparison(s) within atol {atol:g}, rtol "
               f"{rtol:g} (largest abs diff {worst.max_abs:.3g}, {worst.task} on {worst.case})")
    _say(args, f"wrote {exported.path}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reconfx", description=(
        "Declarative model surgery for multi-task learning: branch the shared layers a spec "
        "names into per-task copies and emit readable PyTorch."))
    p.add_argument("--version", action="version", version=f"reconfx {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    v = sub.add_parser("validate", help="check a spec without running it")
    v.add_argument("spec", type=Path)
    v.set_defaults(run=cmd_validate)
    sc = sub.add_parser("schema", help="print the spec's JSON Schema")
    sc.add_argument("--markdown", action="store_true",
                    help="the spec reference as Markdown instead (docs/spec.md)")
    sc.set_defaults(run=cmd_schema)
    i = sub.add_parser("inspect", help="list the model's layers (path, type, params, tasks)")
    i.add_argument("spec", type=Path)
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    i.set_defaults(run=cmd_inspect)
    for name, text, run in (
            ("profile", "train briefly and count gradient conflicts per layer", cmd_profile),
            ("run", "profile, select, branch, train, evaluate and emit", cmd_run)):
        command = _command(sub, name, text, run)
        command.add_argument(
            "--resume", action="store_true", help="continue an interrupted run from "
            "export.dir/checkpoints/resume.pt (same spec): the result equals an uninterrupted "
            "run's")
        _force(command)
    e = _command(sub, "eval", "evaluate the emitted model in export.dir on a data split",
                 cmd_eval, quiet=False)
    e.add_argument("--split", default="test", choices=["train", "val", "test"])
    _force(_command(sub, "compile", "trace, branch, check invariants, write model.py etc.",
                    cmd_compile))
    x = _command(sub, "export", "write model.onnx from the model.py and weights in an output "
                 "folder (SPEC: a spec, or the output folder itself)", cmd_export)
    x.add_argument("--format", choices=["onnx", "hf"], default="onnx",
                   help="onnx: model.onnx; hf: the folder loads with transformers' "
                        "AutoModel.from_pretrained(dir, trust_remote_code=True)")
    x.add_argument("--opset", type=int, default=None,
                   help="ONNX opset, 17 to 21 (default: export.onnx.opset, 18)")
    x.add_argument("--dtype", choices=["fp32", "fp16"], default=None,
                   help="fp16: float16 weights and activations, float32 inputs and outputs")
    x.add_argument("--optimize", choices=["O1", "O2", "O3"], default=None,
                   help="onnxruntime graph optimisations, applied and saved")
    x.add_argument("--atol", type=float, default=None,
                   help="parity check's absolute tolerance (default 1e-4; fp16 1e-2)")
    x.add_argument("--rtol", type=float, default=None,
                   help="parity check's relative tolerance (default 1e-3; fp16 1e-2)")
    x.add_argument("--task", help="export only this task's output (model.<task>.onnx)")
    x.add_argument("--provider", choices=["cpu", "cuda"], default=None,
                   help="onnxruntime provider for the check (default: cuda when "
                        "onnxruntime-gpu sees a GPU, else cpu)")
    return p


def _command(sub: argparse._SubParsersAction, name: str, help: str, run: Any,
             quiet: bool = True) -> argparse.ArgumentParser:
    """A subcommand taking SPEC, --out and (unless told otherwise) --quiet."""
    p = sub.add_parser(name, help=help)
    p.add_argument("spec", type=Path)
    p.add_argument("--out", type=Path, default=None, help="output folder (default: export.dir)")
    if quiet:
        p.add_argument("--quiet", action="store_true", help="no progress bars, only errors")
    p.set_defaults(run=run)
    return p


def _force(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="write into an existing folder that "
                   "reconfx did not make (never the root, home or working directory)")


DISTRIBUTED = ("profile", "run")  # the commands that run on several ranks under torchrun


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else ""


def out_of_memory(exc: BaseException) -> bool:
    """An allocation failed: Python's MemoryError, CUDA's OutOfMemoryError, or the CPU
    allocator's RuntimeError."""
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or (
        isinstance(exc, RuntimeError) and ("not enough memory" in text
                                           or "can't allocate memory" in text
                                           or "out of memory" in text))


def main(argv: Sequence[str] | None = None) -> int:
    interrupts.install()
    rank = ""
    try:
        args = parser().parse_args(argv)
        from reconfx import distributed

        if distributed.launched():
            rank = f"rank {os.environ.get('RANK', '?')}: "
            if os.environ.get("RANK", "0") != "0":
                args.quiet = True  # rank 0 prints progress and results
        if getattr(args, "quiet", False):  # (and the libraries' own bars: transformers')
            os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
            if "transformers" in sys.modules:
                sys.modules["transformers"].utils.logging.disable_progress_bar()
        if rank and args.command not in DISTRIBUTED + ("validate", "schema"):
            raise SpecError(f"`reconfx {args.command}` runs in one process; only "
                            f"{' and '.join(DISTRIBUTED)} run on several ranks",
                            fix=f"run `reconfx {args.command}` without torchrun")
        return int(args.run(args))
    except ReconfxError as exc:
        if os.environ.get("RECONFX_DEBUG"):  # (the chain of causes that led to the line)
            import traceback

            traceback.print_exception(exc, file=sys.stderr)
        print(f"reconfx: error: {rank}{exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        # on a line of its own, also after a progress bar
        start = "\n" if sys.stderr.isatty() else ""
        name = "terminated (SIGTERM)" if isinstance(exc, interrupts.Terminated) else "interrupted"
        print(f"{start}reconfx: {name}; the output folder holds a complete set of files (this "
              "command's only if it had finished writing them); profile and run continue with "
              "--resume", file=sys.stderr)
        return 143 if isinstance(exc, interrupts.Terminated) else 130
    except Exception as exc:  # a bug in reconfx: one line unless asked for the traceback
        if os.environ.get("RECONFX_DEBUG"):
            raise
        if out_of_memory(exc):
            print(f"reconfx: error: {rank}ran out of memory ({type(exc).__name__}: "
                  f"{_first_line(exc)[:200]}) (fix: give smaller example shapes in "
                  "inputs[].shape, as the example batch need not be the training batch, or a "
                  "smaller data.batch_size)", file=sys.stderr)
            return 1
        first = _first_line(exc)
        print(f"reconfx: internal error: {rank}{type(exc).__name__}: {first} (set "
              "RECONFX_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    finally:
        if "reconfx.distributed" in sys.modules:
            sys.modules["reconfx.distributed"].finish()


if __name__ == "__main__":
    sys.exit(main())
