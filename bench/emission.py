"""What the emitted source looks like on a fixed set of models: line counts, how each module is
built, and how long the emitted class takes to construct next to the original.

* ``minilm``: the README's MiniLM spec (pretrained all-MiniLM-L6-v2, last encoder layer
  branched; tier 1 with its self-attention as coarse leaves); targets ``model.py`` <= 250
  lines, ``branch.diff`` <= 80;
* ``resnet50``: a ResNet-50-sized CNN (``reconfx.zoo:BottleneckResNet``) with its last stage
  branched (tier 1); target ``model.py`` <= 200 lines;
* ``library``: ``tests.library:LibraryNet``, modules written like a third-party library
  (subclasses of torch.nn classes with their own signatures, class arguments, settings objects,
  a module no constructor call rebuilds); targets: no factory call in ``model.py``, the emitted
  class constructed in <= 1.5x the original's time;
* ``minilm-mid``: the same MiniLM with encoder layer 2 branched, so that layers 3-5 are shared
  after the branch point and stream-batched in eval mode;
* ``demo``: the demo's small ResNet (``specs/multidigits.yaml``) with the 12 layers its profile
  picks branched, stream-batched in five regions;
* the reviewability corpus: ``wrapper`` (the pretrained MiniLM inside a user's own two-head
  module, ``tests.models:PretrainedTwoHeads``, last encoder layer branched), ``llama`` and
  ``gpt2`` (4-layer decoders from transformers configs, last layer branched), ``resnet18-early``
  (the Recon paper's ResNet-18 with a Recon-like early selection: the stem, the first block and
  three later convolutions) and ``densenet-early`` (``tests.library:DenseNetLike`` with its stem
  and two dense-layer parts branched); targets ``model.py`` <= 120 / ``branch.diff`` <= 80 for
  the first three, <= 200 / <= 150 for the early selections; ``llama-early`` (the same Llama
  with only layer 0's ``mlp.gate_proj`` branched: an early branch point through
  ``torch.export``).

"forward" says how ``model.py`` carries the task streams: ``task rows`` (one tensor, the
tasks' batches one after another, reconfx/rows.py) or ``per stream``. Construction times are
medians of ``--repeats`` constructions of each, alternated; eval-mode forward times (the spec's
first example, ``torch.no_grad``; with ``--batches``, also the example's inputs repeated to
each of those batch sizes) of the emitted model with its weights and of the compiled graph
module are medians of 4 x ``--repeats`` alternated calls. Run:
``.venv/bin/python bench/emission.py [--models minilm,resnet50,...] [--repeats 5]
[--batches 1,16,128]``.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from reconfx.artifacts import import_source, load
from reconfx.build import build_model
from reconfx.commands import compile_spec
from reconfx.spec import class_name

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.library for `library`

MINILM = {
    "backbone": {"factory": "reconfx.zoo:minilm", "feature": "last_hidden_state"},
    "inputs": [{"name": "input_ids", "shape": [2, 16], "dtype": "int64", "high": 30522,
                "dynamic": [0, 1]}],
    "tasks": [{"name": "ner", "head": {"type": "linear", "out_features": 9}},
              {"name": "sentiment", "head": {"type": "mlp", "hidden": [64], "out_features": 2,
                                             "pool": "mean"}}],
}
DECODER = {
    "inputs": [{"name": "input_ids", "shape": [2, 16], "dtype": "int64", "high": 100,
                "dynamic": [0, 1]}],
    "tasks": [{"name": "a", "head": {"out_features": 3}},
              {"name": "b", "head": {"out_features": 2, "pool": "mean"}}],
}
LLAMA = {"factory": "reconfx.zoo:hf_model", "feature": "last_hidden_state", "kwargs": {
    "arch": "LlamaModel", "config": {
        "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}}}
SPECS = {
    "minilm": {**MINILM, "select": {"layers": ["backbone.encoder.layer.5.*"]}},
    "resnet50": {
        "model": {"factory": "reconfx.zoo:BottleneckResNet"},
        "inputs": [{"name": "image", "shape": [2, 3, 64, 64]}],
        "tasks": [{"name": "left"}, {"name": "right"}],
        "select": {"layers": ["layer4.*"]},
    },
    "minilm-mid": {**MINILM, "select": {"layers": ["backbone.encoder.layer.2.*"]}},
    "demo": {
        "model": {"factory": "reconfx.zoo:small_resnet", "kwargs": {"num_classes": 10}},
        "inputs": [{"name": "image", "shape": [8, 1, 12, 12]}],
        "tasks": [{"name": "left"}, {"name": "right"}],
        "select": {"layers": ["bn1", "layer1.0.conv1", "layer1.0.bn1", "layer1.0.conv2",
                              "layer1.0.bn2", "layer2.0.conv1", "layer2.0.bn1", "layer2.0.conv2",
                              "layer2.0.bn2", "layer3.0.bn1", "layer3.0.bn2", "layer4.0.bn1"]},
    },
    "wrapper": {
        "model": {"factory": "tests.models:PretrainedTwoHeads"},
        "inputs": [dict(MINILM["inputs"][0])],
        "tasks": [{"name": "ner"}, {"name": "sentiment"}],
        "select": {"layers": ["encoder.encoder.layer.5"]},
    },
    "llama": {**DECODER, "backbone": LLAMA, "select": {"layers": ["backbone.layers.3"]}},
    "llama-early": {**DECODER, "backbone": LLAMA,
                    "select": {"layers": ["backbone.layers.0.mlp.gate_proj"]}},
    "gpt2": {**DECODER, "backbone": {
        "factory": "reconfx.zoo:hf_model", "feature": "last_hidden_state", "kwargs": {
            "arch": "GPT2Model", "config": {"vocab_size": 100, "n_embd": 64, "n_layer": 4,
                                            "n_head": 4, "n_positions": 64, "bos_token_id": 0,
                                            "eos_token_id": 0}}},
        "select": {"layers": ["backbone.h.3"]}},
    "resnet18-early": {
        "model": {"factory": "reconfx.zoo:resnet18"},
        "inputs": [{"name": "image", "shape": [2, 1, 36, 36]}],
        "tasks": [{"name": "left"}, {"name": "right"}],
        "select": {"layers": ["conv1", "bn1", "layer1.0.*", "layer2.1.conv1", "layer3.0.conv2",
                              "layer4.1.conv1"]},
    },
    "densenet-early": {
        "model": {"factory": "tests.library:DenseNetLike"},
        "inputs": [{"name": "image", "shape": [2, 1, 16, 16]}],
        "tasks": [{"name": "left"}, {"name": "right"}],
        "select": {"layers": ["stem.0", "stem.1", "features.0.0.conv1", "features.2.1.norm2"]},
    },
    "library": {
        "model": {"factory": "tests.library:LibraryNet"},
        "inputs": [{"name": "image", "shape": [2, 3, 8, 8]}],
        "tasks": [{"name": "a"}, {"name": "b"}],
        "select": {"layers": ["block.conv2.*", "attention.proj", "mixer", "scale"]},
    },
}
TARGETS = {"minilm": "model.py <= 250, branch.diff <= 80", "resnet50": "model.py <= 200",
           "library": "build <= 1.5x", "minilm-mid": "(stream batching)",
           "demo": "(stream batching)", "wrapper": "model.py <= 120, branch.diff <= 80",
           "llama": "model.py <= 120, branch.diff <= 80",
           "gpt2": "model.py <= 120, branch.diff <= 80", "llama-early": "(none)",
           "resnet18-early": "model.py <= 200, branch.diff <= 150",
           "densenet-early": "model.py <= 200, branch.diff <= 150"}


def median_times(builders: list[Callable[[], object]], repeats: int) -> list[float]:
    times: list[list[float]] = [[] for _ in builders]
    for _ in range(repeats):
        for i, build in enumerate(builders):
            start = time.perf_counter()
            build()
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def measure(name: str, folder: Path, repeats: int, batches: list[int]) -> list[str]:
    spec_path = folder / f"{name}.yaml"
    spec_path.write_text(yaml.safe_dump({"name": name, **SPECS[name],
                                         "export": {"formats": ["python"]}}, sort_keys=False))
    out = folder / name
    start = time.perf_counter()
    compiled = compile_spec(spec_path, out)
    seconds = time.perf_counter() - start
    lines = {f: (out / f).read_text().count("\n") for f in ("model.py", "original.py",
                                                            "branch.diff")}
    emitted = import_source(out / "model.py", class_name(name))
    spec, path = compiled.prepared.loaded.spec, compiled.prepared.loaded.path
    original_s, emitted_s = median_times([lambda: build_model(spec, path), emitted], repeats)
    loaded = load(out).eval()
    module = compiled.branched.module.eval()
    forwards = []
    for example in [compiled.prepared.examples[0], *(grown(compiled, b) for b in batches)]:
        runs = [functools.partial(loaded, **example), functools.partial(module, **example)]
        with torch.no_grad():
            for run in runs:
                run()  # warm-up
            forward_e, forward_c = median_times(runs, repeats * 4)
        forwards.append(f"{forward_e * 1e3:.2f} / {forward_c * 1e3:.2f} ms "
                        f"({forward_e / forward_c:.2f}x)")
    report = (out / "report.md").read_text()
    built = report.split("## How model.py builds its modules\n\n", 1)[1].split("\n\n", 1)[0]
    counts = "; ".join(line.removeprefix("- ").split(" (")[0].split(":")[0]
                       for line in built.splitlines() if not line.startswith("- the forward"))
    checks = ", ".join(c.name.split()[0] for c in compiled.checks)  # (compile fails otherwise)
    form = "task rows" if "carries the task streams as one tensor" in report else "per stream"
    return [name, compiled.prepared.traced.tier, form, f"{checks} hold", str(lines["model.py"]),
            str(lines["original.py"]), str(lines["branch.diff"]),
            counts,
            f"{emitted_s * 1e3:.1f} / {original_s * 1e3:.1f} ms ({emitted_s / original_s:.2f}x)",
            *forwards, f"{seconds:.0f} s", TARGETS[name]]


def grown(compiled: object, batch: int) -> dict[str, torch.Tensor]:
    """The spec's example inputs at another batch size (inputs with a dynamic batch axis)."""
    spec = compiled.prepared.loaded.spec
    dynamic = [i.name for i in spec.inputs if 0 in i.dynamic]
    example = compiled.prepared.examples[0]
    return {k: v[torch.arange(batch) % len(v)] if k in dynamic else v for k, v in example.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(SPECS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", default="",
                        help="also time the eval forward at these batch sizes (1,16,128)")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",") if b]
    headers = ["model", "tier", "forward", "checks", "model.py", "original.py", "branch.diff",
               "modules built", "construct emitted / original",
               "eval forward emitted / compiled",
               *(f"at batch {b}" for b in batches), "compile", "target"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            rows.append(measure(name, Path(tmp), args.repeats, batches))
            print(" | ".join(rows[-1]), flush=True)
    print("\n| " + " | ".join(headers) + " |\n|" + "---|" * len(headers))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
