#!/usr/bin/env bash
# Quickstart command 2: set up (once) and run the whole test suite.
#
#   bash tests/run.sh [pytest args]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash launch/setup_env.sh
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
exec "${SARE_VENV:-$ROOT/.venv}/bin/python" -m pytest tests "$@"
