"""onnxruntime latency of the exported multi-task models vs eager PyTorch, side by side.

For each model: compile a spec with branched layers and ``export.formats: [python, onnx]``
(recording the ONNX export time, checks included), then time the emitted PyTorch model
(``torch.no_grad``, eval mode) and an onnxruntime session of ``model.onnx`` on the same inputs at
batch 1, 8 and 64, alternating the two, median of ``--repeats`` timed calls after warm-up.
Reported: ms per call and the ratio onnxruntime / eager (target <= 1.0).

``--variants`` re-exports each model as asked (``reconfx export --dtype/--optimize``) and times
every variant's file against the same eager model: ``fp32`` (the default export), ``fp16``,
``O1``/``O2``/``O3`` (onnxruntime's graph optimisations, saved), ``fp16-O2``.
Run: ``.venv/bin/python bench/onnx_latency.py [--provider cpu|cuda] [--variants fp32 fp16 O2]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import onnxruntime
import torch
import yaml

import reconfx
from reconfx.build import example_inputs
from reconfx.commands import compile_spec, export_spec

TOKENS = {"name": "input_ids", "dtype": "int64", "dynamic": [0, 1]}
MODELS = {
    "small ResNet (MultiDigits)": dict(
        model={"factory": "reconfx.zoo:small_resnet", "kwargs": {"num_classes": 10}},
        inputs=[{"name": "image", "shape": [8, 1, 12, 12]}],
        tasks=[{"name": "left"}, {"name": "right"}],
        select={"layers": ["layer3.*", "layer4.*"]}),
    "TransformerEncoder": dict(
        model={"factory": "reconfx.zoo:EncoderClassifier",
               "kwargs": {"dim": 64, "layers": 2, "tasks": ["per_token", "sequence"]}},
        inputs=[{**TOKENS, "name": "tokens", "shape": [8, 32], "high": 30}],
        tasks=[{"name": "per_token"}, {"name": "sequence"}],
        select={"layers": ["encoder.layers.1.*"]}),
    "BERT-small (HF config)": dict(
        backbone={"factory": "reconfx.zoo:hf_model", "feature": "last_hidden_state",
                  "kwargs": {"arch": "BertModel", "config": dict(
                      hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                      intermediate_size=2048)}},
        inputs=[{**TOKENS, "shape": [8, 32], "high": 30522}],
        tasks=[{"name": "a", "head": {"out_features": 3, "pool": "cls"}},
               {"name": "b", "head": {"out_features": 2, "pool": "mean"}}],
        select={"layers": ["backbone.encoder.layer.3.*"]}),
    "ViT (HF config)": dict(
        backbone={"factory": "reconfx.zoo:hf_model", "feature": "last_hidden_state",
                  "kwargs": {"arch": "ViTModel", "config": dict(
                      image_size=32, patch_size=4, hidden_size=192, num_hidden_layers=4,
                      num_attention_heads=3, intermediate_size=768)}},
        inputs=[{"name": "pixel_values", "shape": [8, 3, 32, 32]}],
        tasks=[{"name": "a", "head": {"out_features": 10, "pool": "cls"}},
               {"name": "b", "head": {"out_features": 5, "pool": "mean"}}],
        select={"layers": ["backbone.layers.3.*"]}),
    "MiniLM (pretrained)": dict(
        backbone={"factory": "reconfx.zoo:minilm", "feature": "last_hidden_state"},
        inputs=[{**TOKENS, "shape": [8, 32], "high": 30522}],
        tasks=[{"name": "ner", "head": {"out_features": 9}},
               {"name": "sentiment", "head": {"out_features": 2, "pool": "mean"}}],
        select={"layers": ["backbone.encoder.layer.5.*"]}),
}


VARIANTS = {"fp32": {}, "fp16": {"dtype": "fp16"}, "O1": {"optimize": "O1"},
            "O2": {"optimize": "O2"}, "O3": {"optimize": "O3"},
            "fp16-O2": {"dtype": "fp16", "optimize": "O2"}}


def timed_pair(eager, ort, repeats: int) -> tuple[float, float]:
    for _ in range(3):
        eager()
        ort()
    a, b = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        eager()
        a.append(time.perf_counter() - start)
        start = time.perf_counter()
        ort()
        b.append(time.perf_counter() - start)
    return statistics.median(a) * 1e3, statistics.median(b) * 1e3


def eager_call(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict:
    with torch.no_grad():
        out = model(**inputs)
    if next(iter(inputs.values())).is_cuda:
        torch.cuda.synchronize()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["fp32"])
    args = parser.parse_args()
    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, provider "
          f"{args.provider}, torch threads {torch.get_num_threads()}")
    print("| model | variant | export s | exporter | batch | eager ms | onnxruntime ms | "
          "ort / eager |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            spec = Path(tmp) / "spec.yaml"
            fields = {"name": "bench", **MODELS[name],
                      "export": {"formats": ["python", "onnx"], "dir": str(Path(tmp) / "out")}}
            spec.write_text(yaml.safe_dump(fields, sort_keys=False))
            compiled = compile_spec(spec)
            model = reconfx.load(Path(tmp) / "out").eval()
            device = "cuda" if args.provider == "cuda" else "cpu"
            model.to(device)
            for variant in args.variants:
                if variant != "fp32":
                    export_spec(spec, options={**VARIANTS[variant], "provider": args.provider})
                report = (Path(tmp) / "out" / "report.md").read_text()
                line = next(x for x in report.splitlines() if x.startswith("- `model.onnx`"))
                seconds = float(line.split(" in ")[1].split(" s,")[0])
                exporter = line.split("exported by the ")[1].split(" exporter")[0]
                run = reconfx.onnx_session(Path(tmp) / "out" / "model.onnx", args.provider)
                for batch in args.batches:
                    inputs = example_inputs(compiled.prepared.loaded.spec.inputs, seed=0,
                                            batch=batch)
                    on_device = {k: v.to(device) for k, v in inputs.items()}
                    e, o = timed_pair(lambda m=model, x=on_device: eager_call(m, x),
                                      lambda r=run, x=inputs: r(**x), args.repeats)
                    print(f"| {name} | {variant} | {seconds:.1f} | {exporter} | {batch} | "
                          f"{e:.2f} | {o:.2f} | {o / e:.2f} |", flush=True)


if __name__ == "__main__":
    main()
