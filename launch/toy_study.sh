#!/usr/bin/env bash
# The toy-world study (docs/toy_world.md, "The study"): relearning dose-response, comparisons at equal
# erasure and SARE's variants over 5 seeds, then the tables, curves and finding.
#
#   bash launch/toy_study.sh [--seeds "0 1 2 3 4"] [--parallel 2] [--bench FILE]
#
# Seed 0 uses the quickstart's world (runs/toy), seed N runs/toy-seedN: each is built on first use
# (~2.5 min) and reused after. Per seed about 8 min on one core; --parallel seeds run at once
# (one torch thread each). --bench: a `python -m sare_ds.bench --json` file for the variants' cost
# column (docs/performance.md has the command). Output: docs/toy_world_study.{md,png,json} and
# sare_ds/resources/toy_world_finding.txt (the sentence the quickstart's report prints).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SEEDS="0 1 2 3 4" PARALLEL=2 BENCH=""
while [ $# -gt 0 ]; do
  case "$1" in
    --seeds) SEEDS="$2"; shift ;;
    --parallel) PARALLEL="$2"; shift ;;
    --bench) BENCH="$(realpath "$2")"; shift ;;
    *) echo "toy_study.sh: unknown argument $1 (use --seeds \"0 1\", --parallel N, --bench FILE)" >&2; exit 2 ;;
  esac
  shift
done
cd "$ROOT"
bash launch/setup_env.sh
PY="${SARE_VENV:-$ROOT/.venv}/bin/python"
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}" OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
root_of() { if [ "$1" = 0 ]; then echo runs/toy; else echo "runs/toy-seed$1"; fi; }
mkdir -p runs/study-logs
ROOTS=()
for S in $SEEDS; do
  ROOTS+=("$(root_of "$S")")
  # At most PARALLEL seeds at once; each logs to runs/study-logs/seed<N>.log.
  while [ "$(jobs -rp | wc -l)" -ge "$PARALLEL" ]; do sleep 5; done
  echo "seed $S -> $(root_of "$S") (log: runs/study-logs/seed$S.log)"
  "$PY" -m sare_ds.toy.study run --root "$(root_of "$S")" --seed "$S" > "runs/study-logs/seed$S.log" 2>&1 &
done
FAILED=0
for job in $(jobs -p); do wait "$job" || FAILED=1; done
[ "$FAILED" = 0 ] || { echo "toy_study.sh: a seed failed; see runs/study-logs/" >&2; exit 1; }
"$PY" -m sare_ds.toy.study aggregate "${ROOTS[@]}" --out docs/toy_world_study --finding ${BENCH:+--bench "$BENCH"}
echo "docs/toy_world_study.md, docs/toy_world_study.png, sare_ds/resources/toy_world_finding.txt"
