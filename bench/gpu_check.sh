#!/usr/bin/env bash
# The one prepared GPU check (see bench/gpu_check.py for what it measures). Run it from the
# repository root on a machine with a CUDA GPU; it ends in about 8 minutes at most and prints a
# table (also written to $OUT/gpu_check.md when OUT is set). Without a GPU it exits at once.
#
# On a lent machine whose Python lacks reconfx's pure-Python dependencies, carry them as wheels
# in .whl/ (pydantic, pydantic-core, annotated-types, typing-inspection, torchjd): they are
# installed into /tmp/site first. PYTHON picks the interpreter (default: python3).
set -u
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null
then
  echo "gpu_check: no CUDA GPU visible to $PY's torch (or no torch): nothing measured" >&2
  exit 2
fi
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
exec timeout 480 "$PY" bench/gpu_check.py
