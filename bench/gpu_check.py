"""The one prepared GPU check (`bench/gpu_check.sh` runs it): every CUDA path reconfx has,
measured in one go on a lent GPU, ending with a table of what it saw.

1. `reconfx run` on the default spec (`specs/multidigits.yaml`, ONNX left out) on the CPU and
   with `train.device: cuda` in fp32, bf16 and fp16: time, test accuracy, and the conflict
   scores against the CPU run's (equal counts expected in fp32 up to float rounding near the
   threshold; the table gives how many layers differ and by how much).
2. The same spec under `torchrun --nproc_per_node=1` with `train.backend: nccl`.
3. onnxruntime's CUDA provider: the demo's `model.onnx` checked on it (parity with eager CUDA
   PyTorch), its latency against eager CUDA PyTorch (interleaved rounds), and the README's IO
   binding lines. Skipped, and said so, when onnxruntime has no CUDAExecutionProvider.
4. The stream-batching grid on the GPU at batch 1, 16 and 128 (`bench/stream_batching.py
   --device cuda`).

Each part runs on its own: a failing part is reported in the table and the others go on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
ROWS: list[tuple[str, str, str]] = []  # part, what, result


def row(part: str, what: str, result: str) -> None:
    ROWS.append((part, what, result))
    print(f"[gpu_check] {part}: {what}: {result}", flush=True)


def spec_file(folder: Path, name: str, backend: str | None = None, **train) -> Path:
    spec = yaml.safe_load((ROOT / "specs" / "multidigits.yaml").read_text())
    spec["name"] = name
    spec["export"] = {"formats": ["python"], "dir": str(folder / name)}
    spec["train"] = {**spec["train"], **train}
    if backend is not None:
        spec["distributed"] = {"backend": backend}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def scores(folder: Path) -> dict[str, int]:
    data = json.loads((folder / "conflicts.json").read_text())
    return {layer["name"]: layer["score"] for layer in data["layers"]}


def accuracy(folder: Path) -> str:
    lines = (folder / "report.md").read_text().splitlines()
    return " / ".join(line.split("|")[3].strip() for line in lines
                      if line.startswith("| left |") or line.startswith("| right |"))


def runs(work: Path) -> None:
    from reconfx.commands import run_spec

    reference = None
    for device, precision in (("cpu", "fp32"), ("cuda", "fp32"), ("cuda", "bf16"),
                              ("cuda", "fp16")):
        name = f"demo-{device}-{precision}"
        try:
            started = time.perf_counter()
            run_spec(spec_file(work, name, device=device, precision=precision),
                     progress=False, force=True)
            seconds = time.perf_counter() - started
            got = scores(work / name)
            if reference is None:
                reference = got
                versus = "the reference"
            else:
                differ = {k: got[k] - reference[k] for k in got if got[k] != reference[k]}
                worst = max((abs(v) for v in differ.values()), default=0)
                versus = (f"{len(differ)} of {len(got)} layer scores differ from the CPU's "
                          f"(largest by {worst})")
            row("run", f"{device} {precision}", f"{seconds:.1f} s, test accuracy "
                f"{accuracy(work / name)}, {versus}")
        except Exception as exc:  # noqa: BLE001 (the table says what failed)
            row("run", f"{device} {precision}", f"FAILED: {type(exc).__name__}: {exc}"[:400])
            traceback.print_exc()


def nccl(work: Path) -> None:
    spec = spec_file(work, "demo-nccl", device="cuda", backend="nccl")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1",
                           "-m", "reconfx", "run", str(spec), "--quiet", "--force"],
                          capture_output=True, text=True, timeout=240, check=False)
    seconds = time.perf_counter() - started
    if done.returncode == 0:
        row("torchrun", "1 process, nccl", f"{seconds:.1f} s, test accuracy "
            f"{accuracy(work / 'demo-nccl')}")
    else:
        row("torchrun", "1 process, nccl", f"FAILED (exit {done.returncode}): "
            f"{(done.stderr.strip().splitlines() or [''])[-1][:300]}")


def onnx_cuda(work: Path) -> None:
    import numpy as np
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        row("onnxruntime", "CUDA provider", "not measured: this onnxruntime "
            f"{ort.__version__} has only {', '.join(ort.get_available_providers())} "
            "(carry onnxruntime-gpu to measure it)")
        return
    import reconfx
    from reconfx.commands import compile_spec, export_spec
    from reconfx.timing import interleaved_ratio

    spec = spec_file(work, "demo-onnx", device="cuda")
    compile_spec(spec, progress=False, force=True)
    for dtype in ("fp32", "fp16"):
        exported = export_spec(spec, options={"provider": "cuda", "dtype": dtype})
        worst = max(exported.comparisons, key=lambda c: c.max_abs)
        row("onnxruntime", f"CUDA provider parity, {dtype}", f"{len(exported.comparisons)} "
            f"comparisons within tolerance, largest abs diff {worst.max_abs:.3g} on "
            f"{exported.provider}")
    exported = export_spec(spec, options={"provider": "cuda"})
    model = reconfx.load(work / "demo-onnx").cuda()
    session = ort.InferenceSession(str(exported.path), providers=["CUDAExecutionProvider"])
    for batch in (1, 16, 128):
        image = torch.rand(batch, 1, 12, 12)
        on_gpu = image.cuda()

        def eager(x=on_gpu) -> None:
            with torch.no_grad():
                model(image=x)

        binding = session.io_binding()
        binding.bind_ortvalue_input("image", ort.OrtValue.ortvalue_from_numpy(
            image.numpy(), "cuda", 0))
        for name in ("left", "right"):
            binding.bind_output(name, "cuda")

        def onnx(binding=binding) -> None:
            session.run_with_iobinding(binding)

        ratio = interleaved_ratio(eager, onnx, rounds=15, cuda=True)
        outputs = dict(zip([o.name for o in session.get_outputs()],
                           (v.numpy() for v in binding.copy_outputs_to_cpu()), strict=True))
        with torch.no_grad():
            want = model(image=on_gpu)
        diff = max(float(np.abs(outputs[t] - want[t].cpu().numpy()).max()) for t in outputs)
        row("onnxruntime", f"latency, batch {batch}", f"eager {ratio.a_ms:.3f} ms, onnxruntime "
            f"IO binding {ratio.b_ms:.3f} ms (x{ratio.median:.2f}, quartiles "
            f"{ratio.low:.2f}-{ratio.high:.2f}); max abs diff {diff:.3g}")


def stream_batching() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "stream_batching.py"),
                           "--device", "cuda", "--batches", "1", "16", "128", "--tasks", "2",
                           "4", "--repeats", "5"], capture_output=True, text=True,
                          timeout=200, check=False)
    if done.returncode != 0:
        row("stream batching", "grid", f"FAILED: {(done.stderr.strip().splitlines() or [''])[-1]}")
        return
    for line in done.stdout.splitlines():
        if line.startswith("| ") and not line.startswith("| model"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            row("stream batching", f"{cells[0]}, T={cells[1]}, batch {cells[2]}",
                f"{cells[4]} ms unbatched / batched, {cells[5]}")


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA GPU here: nothing measured", file=sys.stderr)
        return 2
    print(f"gpu_check: torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for part in (runs, nccl, onnx_cuda):
            try:
                part(work)
            except Exception as exc:  # noqa: BLE001
                row(part.__name__, "part", f"FAILED: {type(exc).__name__}: {exc}"[:400])
                traceback.print_exc()
    try:
        stream_batching()
    except Exception as exc:  # noqa: BLE001
        row("stream batching", "grid", f"FAILED: {type(exc).__name__}: {exc}"[:400])
    table = ["| part | what | result |", "|---|---|---|"]
    table += [f"| {a} | {b} | {c} |" for a, b, c in ROWS]
    print("\n".join(table))
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / "gpu_check.md").write_text("\n".join(table) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
