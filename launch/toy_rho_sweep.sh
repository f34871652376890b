#!/usr/bin/env bash
# SARE's radius on the toy world (docs/toy_world.md, "rho"): for each quickstart output folder,
# train SARE with rho = 0.2 and 0.5 beside the default 0.05 (same data, seed, settings) and
# attack EFUF and the three SARE runs (relearning 60 / 100 / 140, sharpness probe).
#
#   bash launch/toy_rho_sweep.sh runs/toy runs/toy-seed1 ...
#   python -m sare_ds.toy.results runs/toy runs/toy-seed1 ... --report report-rho --out docs/toy_world_rho
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${SARE_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
# The machine's settings, as launch/quickstart.sh picks them (the runs compared must match).
source launch/machine.sh  # DS_ACCELERATOR, RANKS, DS_CONFIG, DTYPE, PORT
for OUT in "$@"; do
  [ -f "$OUT/world.json" ] || { echo "$OUT: no world.json; run bash launch/quickstart.sh --out $OUT first" >&2; exit 2; }
  SEED="$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1]))['seed'])" "$OUT/world.json")"
  METHODS=(--method "EFUF=$OUT/runs/efuf" --method "SARE=$OUT/runs/sare")
  for RHO in 0.2 0.5; do
    "$VENV/bin/deepspeed" --num_gpus "$RANKS" --master_port "$PORT" launch/train.py --config launch/configs/toy.yaml \
      model.name_or_path="$OUT/models/captioner" data.shards="$OUT/curated" method.name=sare method.rho="$RHO" \
      optim.seed="$SEED" output.run_dir="$OUT/runs/sare_rho$RHO" output.overwrite=true distributed.ds_config="$DS_CONFIG" model.dtype="$DTYPE" \
      logging.progress_bar=false
    METHODS+=(--method "SARE-rho$RHO=$OUT/runs/sare_rho$RHO")
  done
  "$PY" launch/attack.py "${METHODS[@]}" --base "$OUT/models/captioner" --scenes "$OUT/scenes/eval" \
    --data "$OUT/curated" --relearn-sizes 60,100,140 --relearn-lr 1e-3 --lora false --adversarial false \
    --seed "$SEED" --eval-max-new-tokens 40 --eval-batch-size 32 --out "$OUT/report-rho" > /dev/null
  echo "$OUT: $OUT/report-rho/report.md"
done
