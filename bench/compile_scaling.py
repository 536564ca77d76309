"""What a compile costs as the model grows: wall time, peak memory (RSS, read by the kernel for
the whole process), peak memory over the model's weights, and the ratio to one plain
``torch.export`` of the same model, measured side by side in one run.

Each model is a Llama-style decoder from a transformers config, written with ``save_pretrained``
into a temporary folder (random weights) and compiled through ``backbone.hf`` with its last
decoder layer branched (python format), in a fresh process under ``/usr/bin/time -v``; the
export is timed in another fresh process. Sizes (``--sizes``):

* ``40m``: hidden 512, 8 layers; ``170m``: hidden 1024, 12 layers (vocabulary 32,000);
* ``1b``: Llama-3.2-1B's shape: hidden 2048, 16 layers, MLP 8192, vocabulary 128,256 (1.24
  billion parameters, 2.5 GB in bf16, 4.9 GB in fp32; minutes: run on demand,
  ``make bench-scale``);
* ``bert-base``: a ``BertModel`` of BERT-base's shape (hidden 768, 12 layers, MLP 3072,
  vocabulary 30,522) with its last three encoder layers branched (18 layers); ``bert-6`` and
  ``bert-24`` the same with 6 and 24 encoder layers (time against depth).

The baseline ("two exports") is what tracing needs at the least: a fresh process that loads the
same folder and calls ``torch.export.export`` twice, in train and in eval mode, with the
spec's dynamic axes (batch and sequence); its calls are also timed alone. Both processes pay
Python's start, the imports and loading the weights, so "compile / two exports" compares the
two commands a user would run.

``--dtype bfloat16`` saves the weights in bf16 (the compile keeps that dtype). ``--profile N``
also runs ``reconfx profile`` for N steps on each model (Adam, a tiny data set of random token
sequences, :func:`tokens`; ``--no-compile``: only that), under the default cap on the per-task
gradient matrix (``train.gradient_memory_gb``: 2), and reports its wall time and peak memory.
``--before DIR`` also times the compile of another checkout (a ``git worktree`` of an earlier
commit), alternated with this one's; ``--cprofile N`` prints the N functions of reconfx with
the most cumulative time in one compile of each under cProfile. Run:
``.venv/bin/python bench/compile_scaling.py [--sizes 40m,170m,bert-base] [--dtype float32]
[--profile 2] [--repeats 3] [--before DIR] [--cprofile 25]``.
"""

from __future__ import annotations

import argparse
import io
import os
import pstats
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"40m": (512, 8, 32000, 0), "170m": (1024, 12, 32000, 0),
         "1b": (2048, 16, 128256, 8192),  # hidden, layers, vocabulary, MLP (0: 8/3 hidden)
         "bert-6": (768, 6, 30522, 3072), "bert-base": (768, 12, 30522, 3072),
         "bert-24": (768, 24, 30522, 3072)}

MAKE = """
import sys, torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel
hidden, layers, vocab, mlp = map(int, sys.argv[1:5])
folder, dtype, kind = sys.argv[5], sys.argv[6], sys.argv[7]
torch.manual_seed(0)
if kind == "bert":
    model = BertModel(BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                 num_attention_heads=hidden // 64, intermediate_size=mlp),
                      add_pooling_layer=False)
else:
    model = LlamaModel(LlamaConfig(
        vocab_size=vocab, hidden_size=hidden,
        intermediate_size=mlp or int(hidden * 8 / 3) // 64 * 64, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=max(hidden // 256, 1),
        max_position_embeddings=512))
model.to(getattr(torch, dtype)).save_pretrained(folder)
print(sum(p.numel() for p in model.parameters()))
"""

EXPORT = """
import sys, time, torch
from torch.export import Dim
from transformers import AutoModel
model = AutoModel.from_pretrained(sys.argv[1], local_files_only=True)
ids = torch.randint(0, model.config.vocab_size, (2, 16))
kwargs = {"input_ids": ids} | ({} if model.config.model_type == "bert" else {"use_cache": False})
shapes = {"input_ids": {0: Dim.AUTO, 1: Dim.AUTO}} | {k: None for k in kwargs if k != "input_ids"}
start = time.perf_counter()
for training in (True, False):
    model.train(training)
    torch.export.export(model, (), kwargs, dynamic_shapes=shapes, strict=False)
print(time.perf_counter() - start)
"""

SPEC = """
name: scale
backbone: {{hf: {{path: {folder}}}, feature: last_hidden_state}}
inputs: [{{name: input_ids, shape: [2, 16], dtype: int64, high: {vocab}, dynamic: [0, 1]}}]
tasks: [{{name: a, head: {{out_features: 3}}}}, {{name: b, head: {{out_features: 2, pool: mean}}}}]
select: {{layers: {branched}}}
export: {{formats: [{formats}], dir: {out}}}
"""

PROFILE = """
name: scale-profile
backbone: {{hf: {{path: {folder}}}, feature: last_hidden_state}}
inputs: [{{name: input_ids, shape: [2, 16], dtype: int64, high: {vocab}, dynamic: [0, 1]}}]
tasks:
  - {{name: a, head: {{out_features: 3, pool: mean}}, loss: cross_entropy}}
  - {{name: b, head: {{out_features: 2, pool: mean}}, loss: cross_entropy}}
data: {{factory: "compile_scaling:tokens", kwargs: {{vocab: {vocab}}}, batch_size: 2}}
profile: {{steps: {steps}}}
export: {{dir: {out}}}
"""


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, seed: int, vocab: int, size: int, length: int):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (size, length), generator=g)
        self.a = torch.randint(0, 3, (size,), generator=g)
        self.b = torch.randint(0, 2, (size,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[dict, dict]:
        return {"input_ids": self.ids[i]}, {"a": self.a[i], "b": self.b[i]}


def tokens(split: str = "train", seed: int = 0, vocab: int = 32000, size: int = 8,
           length: int = 16) -> torch.utils.data.Dataset:
    """A tiny data set for the profiling run: ``size`` random token sequences of ``length``
    tokens, with random labels for task a (3 classes) and task b (2)."""
    return _Tokens(seed + (split != "train"), vocab, size, length)


def timed(command: list[str], env: dict | None = None, cwd: Path | None = None
          ) -> tuple[str, float, float]:
    """stdout, wall seconds and peak RSS (GB) of ``command`` under /usr/bin/time -v."""
    done = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True,
                          env=env, cwd=cwd)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    wall = re.search(r"Elapsed \(wall clock\) time .*: (?:(\d+):)?(\d+):([\d.]+)", done.stderr)
    hours, minutes, seconds = (float(x) if x else 0.0 for x in wall.groups())
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    return done.stdout, hours * 3600 + minutes * 60 + seconds, rss / 1024**2


def profiled(command: list[str], cwd: Path, stats: Path, top: int) -> str:
    """The ``top`` functions of reconfx by cumulative time in one run of ``command`` under
    cProfile (its times are inflated by the profiler, Python code most)."""
    subprocess.run([command[0], "-m", "cProfile", "-o", str(stats), *command[1:]], cwd=cwd,
                   check=True, capture_output=True)
    text = io.StringIO()
    pstats.Stats(str(stats), stream=text).sort_stats("cumulative").print_stats(
        r"/reconfx/(?!__main__|console|cli)", top)
    return "\n".join(line for line in text.getvalue().splitlines()
                     if line.strip() and "List reduced" not in line)


def measure(size: str, dtype: str, formats: str, root: Path, steps: int,
            compile_too: bool, repeats: int, before: Path | None = None,
            top: int = 0) -> list[str]:
    hidden, layers, vocab, mlp = SIZES[size]
    folder = root / f"llama-{size}"
    params = int(subprocess.run([sys.executable, "-c", MAKE, str(hidden), str(layers), str(vocab),
                                 str(mlp), str(folder), dtype, size.partition("-")[0]],
                                capture_output=True, text=True, check=True).stdout.split()[-1])
    weights = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1024**3
    spec = root / f"{size}.yaml"
    branched = (f"[backbone.encoder.layer.{layers - 3}, backbone.encoder.layer.{layers - 2}, "
                f"backbone.encoder.layer.{layers - 1}]" if size.startswith("bert") else
                f"[backbone.layers.{layers - 1}]")  # BERT: the last three layers, else the last
    spec.write_text(textwrap.dedent(SPEC.format(folder=folder, branched=branched, vocab=vocab,
                                                formats=formats, out=root / f"out-{size}")))
    row = [size, f"{params / 1e6:,.0f}M", dtype, formats.replace(",", "+"), f"{weights:.2f}"]
    if compile_too:
        exports, compiles, earlier = [], [], []
        command = [sys.executable, "-m", "reconfx", "compile", str(spec), "--quiet", "--force"]
        for _ in range(repeats):  # alternated, medians
            out, wall, rss = timed([sys.executable, "-c", EXPORT, str(folder)])
            exports.append((wall, float(out.split()[-1]), rss))
            compiles.append(timed(command, cwd=ROOT)[1:])
            if before is not None:  # (python -m reconfx imports the package in its cwd)
                earlier.append(timed(command, cwd=before)[1:])
        export_wall, export_calls, export_rss = (
            statistics.median(x) for x in zip(*exports, strict=True))
        compile_wall, compile_rss = (statistics.median(x) for x in zip(*compiles, strict=True))
        lines = (root / f"out-{size}" / "model.py").read_text().count("\n")
        row += [f"{compile_wall:.1f}", f"{compile_rss:.2f}", f"{compile_rss / weights:.1f}x",
                f"{export_calls:.1f}", f"{export_wall:.1f}", f"{export_rss:.2f}",
                f"{compile_wall / export_wall:.2f}x", str(lines)]
        if before is not None:
            wall, rss = (statistics.median(x) for x in zip(*earlier, strict=True))
            row += [f"{wall:.1f}", f"{rss:.2f}", f"{wall / export_wall:.2f}x"]
        for checkout in [before, ROOT] if top else []:
            if checkout is not None:
                print(f"\n{size}, compile of {checkout} under cProfile:\n"
                      f"{profiled(command, checkout, root / 'compile.prof', top)}", flush=True)
    if steps:
        spec = root / f"{size}-profile.yaml"
        spec.write_text(textwrap.dedent(PROFILE.format(folder=folder, vocab=vocab, steps=steps,
                                                       out=root / f"profile-{size}")))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
        _out, wall, rss = timed([sys.executable, "-m", "reconfx", "profile", str(spec),
                                 "--quiet"], env)
        row += [f"{wall:.0f}", f"{rss:.2f}", f"{rss / weights:.1f}x"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="40m,170m")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--formats", default="python", help="export.formats, e.g. python,onnx")
    parser.add_argument("--profile", type=int, default=0, help="profiling steps (0: none)")
    parser.add_argument("--no-compile", action="store_true", help="profile only")
    parser.add_argument("--repeats", type=int, default=1,
                        help="compiles and exports per size, alternated (medians)")
    parser.add_argument("--cprofile", type=int, default=0, metavar="N",
                        help="also print the N functions of reconfx with the most cumulative "
                        "time in one compile under cProfile (and in --before's)")
    parser.add_argument("--before", type=Path,
                        help="a checkout of reconfx (git worktree) whose compile is timed "
                        "beside this one's, alternated")
    args = parser.parse_args()
    headers = ["model", "parameters", "dtype", "formats", "weights GB"]
    if not args.no_compile:
        headers += ["compile s", "compile peak RSS GB", "RSS / weights", "two export calls s",
                    "two exports, process s", "export process peak RSS GB",
                    "compile / two exports", "model.py lines"]
        if args.before:
            headers += ["compile before s", "peak RSS before GB", "before / two exports"]
    if args.profile:
        headers += [f"profile {args.profile} steps s", "profile peak RSS GB",
                    "profile RSS / weights"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            rows.append(measure(size, args.dtype, args.formats, Path(tmp), args.profile,
                                not args.no_compile, args.repeats, args.before,
                                args.cprofile))
            print(" | ".join(rows[-1]), flush=True)
    print("\n| " + " | ".join(headers) + " |\n|" + "---|" * len(headers))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
