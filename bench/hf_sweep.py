"""The Hugging Face sweep: every transformers architecture the test suite builds from a small
config (``tests/test_hf_models.py``: CASES and MORE_CASES, random weights, 2 layers), compiled
with two selections each, and what a reviewer gets: the tracing tier, how ``model.py`` carries
the task streams, its length and the length of ``branch.diff``, and whether I1-I4 hold.

* ``late``: the layers the test suite branches in that architecture (inside its last layer, or
  the whole of it);
* ``early``: the backbone's first shared layer in graph order (the embedding or the stem, as
  Recon's selections put the stem first): everything after it runs per task.

Each compile runs in this process one after another; an architecture that fails to compile is
listed with its error's first line. Run: ``.venv/bin/python bench/hf_sweep.py [--cases
bert,gpt2,...] [--selections late,early]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # (the tests' configs)

from reconfx.commands import compile_spec  # noqa: E402
from reconfx.errors import ReconfxError  # noqa: E402
from reconfx.pipeline import prepare  # noqa: E402
from tests.test_hf_models import CASES, MORE_CASES, hf_spec  # noqa: E402


def early_layers(spec_path: Path) -> list[str]:
    """The backbone's first shared layer in graph order."""
    layers = prepare(spec_path).layers
    return [next(layer.name for layer in layers if layer.shared
                 and layer.name.startswith("backbone."))]


def measure(case: str, selection: str, folder: Path) -> list[str]:
    spec_path = hf_spec(folder, case, tasks=2, export={"formats": ["python"]})
    if selection == "early":
        data = yaml.safe_load(spec_path.read_text())
        data["select"] = {"layers": early_layers(spec_path)}
        spec_path.write_text(yaml.safe_dump(data, sort_keys=False))
    out = folder / "out"
    start = time.perf_counter()
    try:
        compiled = compile_spec(spec_path, out)
    except ReconfxError as exc:
        return [case, selection, "-", "-", "-", "-", "fails: " + str(exc).splitlines()[0][:120],
                f"{time.perf_counter() - start:.0f} s"]
    seconds = time.perf_counter() - start
    lines = {f: (out / f).read_text().count("\n") for f in ("model.py", "branch.diff")}
    report = (out / "report.md").read_text()
    form = "task rows" if "carries the task streams as one tensor" in report else "per stream"
    layers = ", ".join(layer.name.removeprefix("backbone.") for layer in compiled.branched.layers)
    checks = ", ".join(c.name.split()[0] for c in compiled.checks)  # (compile fails otherwise)
    return [case, selection, layers if len(layers) < 60 else layers[:57] + "...",
            compiled.prepared.traced.tier, form, f"{lines['model.py']} / {lines['branch.diff']}",
            f"{checks} hold", f"{seconds:.0f} s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join([*CASES, *MORE_CASES]))
    parser.add_argument("--selections", default="late,early")
    args = parser.parse_args()
    headers = ["architecture", "selection", "branched", "tier", "forward",
               "model.py / branch.diff lines", "checks", "compile"]
    rows = []
    for case in args.cases.split(","):
        for selection in args.selections.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                rows.append(measure(case, selection, Path(tmp)))
            print(" | ".join(rows[-1]), flush=True)
    print("\n| " + " | ".join(headers) + " |\n|" + "---|" * len(headers))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    passed = [row for row in rows if row[3] != "-"]
    lengths = [int(row[5].split(" / ")[0]) for row in passed]
    if lengths:
        print(f"\n{len(passed)} of {len(rows)} compile and pass I1-I4; model.py lines: median "
              f"{statistics.median(lengths):.0f}, max {max(lengths)}")


if __name__ == "__main__":
    main()
