#!/usr/bin/env bash
# Quickstart command 1: set up (once) and run the main job on the embedded default.
#
#   bash launch/quickstart.sh [section.field=value ...]
#
# Builds the tiny random LLaVA (cached in runs/models/tiny-llava), generates scenes and runs
# a short SARE training; the run directory is runs/quickstart. Extra arguments are config
# overrides passed to launch/train.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash launch/setup_env.sh
PY="${SARE_VENV:-$ROOT/.venv}/bin/python"
export DS_ACCELERATOR="${DS_ACCELERATOR:-$("$PY" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}"

MODEL=runs/models/tiny-llava
if [ ! -f "$MODEL/config.json" ]; then
  "$PY" -m sare_ds.models.tiny "$MODEL"
fi
"$PY" launch/train.py --config launch/configs/quickstart.yaml "$@"
