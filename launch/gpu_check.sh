#!/usr/bin/env bash
# One GPU check of sare_ds (one H100/H200, at most 8 minutes): compiled Triton kernel tests, the kernel
# benchmark (GB/s, % of peak), bf16 ZeRO-3 training of the 7B preset (FT / EFUF / SARE: step times,
# MFU, peak memory against the memory plan) and the quickstart's GPU branch; one summary,
# <out>/gpu_check.md. Each part has a time budget; a failing part is reported and the next one runs.
#
#   bash launch/gpu_check.sh [--out runs/gpu_check] [--minutes 8] [--steps 8] [--methods ft,efuf,sare]
#                            [--parts env,kernels,bench,train,quickstart] [--dry-run] [--allow-cpu]
#   bash launch/gpu_check.sh --build-wheels   # where pip reaches an index: fill .whl/ for an offline GPU machine
#
# The GPU machine may lack deepspeed, open_clip_torch, webdataset (and have no network): wheels found
# in .whl/ are installed (--no-deps, offline) for every package that is missing there. All logic is in
# sare_ds/gpu_check.py (tested on the CPU by tests/test_gpu_check.py); this script only picks a Python.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# A Python with torch: $SARE_PY, the project's venv ($SARE_VENV or .venv) if it has one, else python3.
PY="${SARE_PY:-}"
if [ -z "$PY" ]; then
  for candidate in "${SARE_VENV:-$ROOT/.venv}/bin/python" python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import torch' >/dev/null 2>&1; then
      PY="$candidate"; break
    fi
  done
fi
if [ -z "$PY" ]; then
  echo "gpu_check.sh: no Python with torch found (tried \$SARE_PY, ${SARE_VENV:-$ROOT/.venv}/bin/python, python3)." >&2
  echo "              Fix: SARE_PY=/path/to/python bash launch/gpu_check.sh ..." >&2
  exit 2
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # the checkout is importable without an install
exec "$PY" -m sare_ds.gpu_check "$@"
