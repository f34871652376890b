#!/usr/bin/env bash
# Set up (once) the virtual environment sare_ds runs in, then leave it alone.
#
#   bash launch/setup_env.sh          # creates .venv/ (or $SARE_VENV) and installs sare_ds
#
# Sourced by launch/quickstart.sh and tests/run.sh. Safe to run again: a stamp records
# what was installed, and a second run with unchanged inputs only checks the stamp.
#
# torch: on a machine whose python already has torch (a GPU node with its own CUDA
# build) the venv sees the system site-packages and the constraint file pins that very
# version, so nothing replaces it. Otherwise torch==2.13.0 (the CPU wheel on these
# machines) is installed first and pinned, so no dependency can pull a CUDA build.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SARE_VENV:-$ROOT/.venv}"
BASE_PY="${PYTHON:-python3}"
TORCH_PIN_DEFAULT="2.13.0"

log() { echo "[setup_env] $*" >&2; }
# pip, minus the noise of this machine's index configuration (missing local index folders).
pip_q() { "$PY" -m pip "$@" 2> >(grep -v "^WARNING: Location" >&2); }

# Inputs that, when changed, require a re-install.
stamp_inputs() {
  cat "$ROOT/setup.py" "$ROOT/launch/setup_env.sh"
}
want_stamp="$(stamp_inputs | sha256sum | cut -d' ' -f1)"
if [ -f "$VENV/.sare_stamp" ] && [ "$(cat "$VENV/.sare_stamp")" = "$want_stamp" ]; then
  exit 0
fi

# 1. System packages: Open MPI for mpi4py and `mpirun` (multi-rank launches).
if ! command -v mpicc >/dev/null 2>&1 || ! command -v mpirun >/dev/null 2>&1; then
  if "$BASE_PY" -c 'import mpi4py' >/dev/null 2>&1; then
    # A machine that ships mpi4py (a GPU node's own Python) needs no build of it; only mpirun launches are off.
    log "mpi4py is already installed and mpicc/mpirun are not: skipping Open MPI (mpirun launches unavailable)"
  elif command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    log "installing Open MPI (libopenmpi-dev openmpi-bin) with apt-get"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenmpi-dev openmpi-bin >/dev/null
  else
    log "ERROR: Open MPI is missing (mpicc/mpirun) and apt-get as root is unavailable."
    log "       Install libopenmpi-dev and openmpi-bin (or load your cluster's MPI module) and re-run."
    exit 1
  fi
fi

# 2. The venv, and which torch it uses.
system_torch="$("$BASE_PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)"
if [ ! -x "$VENV/bin/python" ]; then
  if [ -n "$system_torch" ]; then
    log "python already has torch $system_torch: the venv reuses it (--system-site-packages)"
    "$BASE_PY" -m venv --system-site-packages "$VENV"
  else
    "$BASE_PY" -m venv "$VENV"
  fi
fi
PY="$VENV/bin/python"
if [ -z "${PIP_NO_INDEX:-}" ]; then  # offline (PIP_NO_INDEX=1, wheels in PIP_FIND_LINKS): keep the machine's pip
  pip_q install -q --upgrade pip setuptools wheel >/dev/null
fi

torch_version="$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)"
if [ -z "$torch_version" ]; then
  log "installing torch==$TORCH_PIN_DEFAULT"
  pip_q install -q "torch==$TORCH_PIN_DEFAULT"
  torch_version="$("$PY" -c 'import torch; print(torch.__version__)')"
fi
# Pin the torch that is there now (local tags like +cpu/+cu130 stripped for pip).
echo "torch==${torch_version%%+*}" > "$VENV/constraints.txt"
log "torch $torch_version pinned in $VENV/constraints.txt"

# 3. DeepSpeed builds no ops ahead of time (they are JIT-compiled on first use), and its
#    setup.py imports torch, so it is built against the pinned torch without isolation.
if ! "$PY" -c 'import deepspeed' >/dev/null 2>&1; then
  log "installing deepspeed (DS_BUILD_OPS=0)"
  DS_BUILD_OPS=0 pip_q install -q -c "$VENV/constraints.txt" --no-build-isolation deepspeed
fi

# 4. sare_ds itself, editable, with the test extras.
log "installing sare_ds and its dependencies"
pip_q install -q -c "$VENV/constraints.txt" -e "$ROOT[test]"

# 5. Without a GPU, DeepSpeed's first launch JIT-compiles its shared-memory all-reduce op for
#    CPU ranks (~35 s on 2 cores, cached in ~/.cache/torch_extensions); compile it here, once,
#    so no run or test pays for it. A failure only warns: DeepSpeed then builds it (or goes
#    without it) at the first launch.
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  log "building DeepSpeed's CPU shared-memory communication op"
  # torch's extension builder waits, without a timeout, while a `lock` file of an earlier build
  # exists; a build killed midway (a cancelled CI run) leaves one behind, and every later set-up
  # then hangs here. A build takes well under a minute: a lock older than 10 minutes is stale.
  ext_dir="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}"
  if [ -d "$ext_dir" ]; then
    { find "$ext_dir" -name lock -path '*deepspeed_shm_comm*' -mmin +10 -print -delete 2>/dev/null || true; } \
      | while read -r stale; do log "removed a stale build lock: $stale"; done
  fi
  DS_ACCELERATOR=cpu "$PY" -c 'from deepspeed.comm.torch import build_shm_op; build_shm_op()' >/dev/null 2>&1 \
    || log "warning: could not pre-build DeepSpeed's shm op; the first CPU launch will try again"
fi

echo "$want_stamp" > "$VENV/.sare_stamp"
log "environment ready: $VENV"
