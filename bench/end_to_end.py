"""End-to-end ``reconfx compile`` (python format, no training) against its own core, in one run.

The core is trace (with the module-call annotation) + branch + Python emit, timed exactly as
``bench/compile_time.py`` does. The end-to-end figure is ``commands.compile_spec`` on a spec
describing the same model and selection: building the model from its factory, running the
examples, tracing with the tier's own checks, the cost model, I1-I3, emission, I4 (with
perturbed weights), latency and the report, writing the folder. Target (issue #21): end to end
<= 5x the core, for

* a ResNet-50-sized CNN (``reconfx.zoo:BottleneckResNet``, last stage branched, tier 1);
* a BERT-base-sized transformer (random weights, last encoder layer branched, tier 2).

The two are timed alternately, ``--repeats`` times each (median). Each stage's time in the last
end-to-end run is printed too (from the stages ``compile`` prints). Run:
``.venv/bin/python bench/end_to_end.py [--repeats 3] [--models resnet50,bert]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compile_time import TASKS, compile_once  # noqa: E402

from reconfx import commands, pipeline  # noqa: E402
from reconfx.build import build_model  # noqa: E402
from reconfx.spec import load_spec_file  # noqa: E402
from reconfx.stages import Stages  # noqa: E402

BERT = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
            intermediate_size=3072)
SPECS = {
    "resnet50": {
        "model": {"factory": "reconfx.zoo:BottleneckResNet", "kwargs": {"tasks": TASKS}},
        "inputs": [{"name": "image", "shape": [2, 3, 64, 64]}],
        "tasks": [{"name": t} for t in TASKS],
        "select": {"layers": ["layer4.*"]},
        "trace": {"tier": "fx"},
    },
    "bert": {
        "backbone": {"factory": "reconfx.zoo:hf_model",
                     "kwargs": {"arch": "BertModel", "config": BERT},
                     "feature": "last_hidden_state"},
        "inputs": [{"name": "input_ids", "shape": [2, 16], "dtype": "int64", "high": 30522,
                    "dynamic": [0, 1]}],
        "tasks": [{"name": t, "head": {"out_features": 2, "pool": "mean"}} for t in TASKS],
        "select": {"layers": ["backbone.encoder.layer.11.*"]},
        "trace": {"tier": "export"},
    },
}


def core(loaded) -> float:
    s = loaded.spec
    torch.manual_seed(s.train.seed)
    model = build_model(s, loaded.path)
    example = pipeline.spec_examples(s)[0]
    dynamic = {i.name: list(i.dynamic) for i in s.inputs}
    clock = compile_once(model, example, {t: t for t in TASKS}, dynamic, s.trace.tier,
                         s.select.layers)
    return clock.phases["total"]


def end_to_end(loaded, out: Path, stages: Stages) -> float:
    start = time.perf_counter()
    with commands.outdir.writing(out, "compile", True) as folder:
        prepared = pipeline.prepare(loaded, stages)
        compiled = pipeline.branch_checked(prepared, None, stages)
        commands.write_model(compiled, folder, stages=stages)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default=",".join(SPECS))
    args = parser.parse_args()
    rows = []
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / f"{name}.yaml"
            path.write_text(yaml.safe_dump({"name": name, **SPECS[name],
                                            "export": {"formats": ["python"]}}))
            loaded = load_spec_file(path)
            cores, totals = [], []
            stages = Stages(False)
            for i in range(args.repeats):
                cores.append(core(loaded))
                stages = Stages(False)
                totals.append(end_to_end(loaded, Path(folder) / f"out{i}", stages))
            c, t = statistics.median(cores), statistics.median(totals)
            parts = ", ".join(f"{k} {v:.1f}" for k, v in stages.times.items())
            rows.append(f"| {name} | {c:.1f} s | {t:.1f} s | {t / c:.1f}x | {parts} |")
            print(rows[-1], flush=True)
    print("\n| model | core (trace+branch+emit) | end-to-end compile | ratio | stages of the "
          "last end-to-end run (s) |\n|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
