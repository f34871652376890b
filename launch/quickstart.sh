#!/usr/bin/env bash
# Quickstart command 1: set up (once) and run the whole method on the toy world (docs/toy_world.md).
#
#   bash launch/quickstart.sh [--ci] [--seed N] [--out DIR]
#
# 1. builds (or reuses) the toy world: a tiny LLaVA captioner trained from scratch on generated
#    scenes, which hallucinates co-occurring objects; a tiny open_clip CLIP trained on the same
#    scenes, with curation thresholds calibrated for it; curation and held-out evaluation scenes;
# 2. curates: the captioner describes the curation scenes, the CLIP scores every object
#    (launch/curate.py) -> caption-record WebDataset shards (spans pos / neg, sent flag);
# 3. trains FT, EFUF and SARE (one forward per caption) with `deepspeed launch/train.py` under ZeRO-3: 2 CPU ranks (gloo,
#    fp32) on a machine without GPUs, every GPU (bf16) on one with them;
# 4. evaluates base / FT / EFUF / SARE on the held-out scenes (launch/evaluate.py: CHAIR, POPE,
#    BLEU, perplexity);
# 5. attacks them (launch/attack.py): relearning with 60 / 100 / 140 hallucinated samples, LoRA,
#    sharpness probe; writes the report (table + relearning curve).
# --ci: the smaller world of the end-to-end test (tests/test_toy_world.py): EFUF and SARE only,
#       relearning with 60 samples, no LoRA attack, no probe, POPE on 120 questions a split.
# Seeds are fixed (--seed, default 0) and recorded in <out>/world.json and every run's
# config.yaml. Outputs: <out> (default runs/toy, runs/toy-ci).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PRESET=full SEED=0 OUT=""
need_value() { [ $# -ge 2 ] || { echo "quickstart.sh: $1 needs a value (--seed N, --out DIR)" >&2; exit 2; }; }
while [ $# -gt 0 ]; do
  case "$1" in
    --ci) PRESET=ci ;;
    --seed) need_value "$@"; SEED="$2"; shift ;;
    --out) need_value "$@"; OUT="$(realpath -m "$2")"; shift ;;  # relative to where it was called from
    *) echo "quickstart.sh: unknown argument $1 (use --ci, --seed N, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done
case "$SEED" in ''|*[!0-9]*) echo "quickstart.sh: --seed $SEED: use a whole number >= 0" >&2; exit 2 ;; esac
cd "$ROOT"
if [ "$PRESET" = ci ]; then
  OUT="${OUT:-runs/toy-ci}"; METHODS="efuf sare"; SIZES=60; LORA=false
  CI_ATTACK=(--probe false --pope-unattacked false)  # evaluate.py already ran POPE; saves ~15 s
  CI_EVAL=(--pope-limit 120 --perplexity false)
else
  OUT="${OUT:-runs/toy}"; METHODS="ft efuf sare"; SIZES=60,100,140; LORA=true; CI_ATTACK=() CI_EVAL=()
fi
SECONDS=0
step() { echo -e "\n== [$(printf '%3d' "$SECONDS") s] $* ==" >&2; }

step "set-up (launch/setup_env.sh; a no-op once done)"
bash launch/setup_env.sh
VENV="${SARE_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"

source launch/machine.sh  # DS_ACCELERATOR, RANKS, DS_CONFIG, DTYPE, PORT

step "toy world ($PRESET, seed $SEED): captioner, CLIP, scenes (cached in $OUT)"
env -u OMP_NUM_THREADS "$PY" -m sare_ds.toy.world "$OUT" --preset "$PRESET" --seed "$SEED"
CAPTIONER="$OUT/models/captioner"
mapfile -t CLIP_OVERRIDES < "$OUT/curate_overrides.txt"

step "curating the captioner's descriptions (launch/curate.py)"
# Always afresh (about 10 s): the models and scenes are what the cache keeps.
"$PY" launch/curate.py input.path="$OUT/scenes/curation/images" input.annotations="$OUT/scenes/curation/instances.json" \
  model.name_or_path="$CAPTIONER" caption.max_new_tokens=40 caption.batch_size=32 "${CLIP_OVERRIDES[@]}" \
  output.dir="$OUT/curated" output.images_per_chunk=100 output.resume=false

RUNS=(--run base) ATTACKED=(--method base)
for M in $METHODS; do
  NAME="$(echo "$M" | tr a-z A-Z)"
  step "training $NAME: deepspeed, $RANKS ranks, ZeRO-3 ($DS_CONFIG)"
  "$VENV/bin/deepspeed" --num_gpus "$RANKS" --master_port "$PORT" launch/train.py --config launch/configs/toy.yaml \
    model.name_or_path="$CAPTIONER" data.shards="$OUT/curated" method.name="$M" optim.seed="$SEED" \
    output.run_dir="$OUT/runs/$M" output.overwrite=true distributed.ds_config="$DS_CONFIG" model.dtype="$DTYPE" \
    logging.progress_bar=false
  RUNS+=(--run "$NAME=$OUT/runs/$M"); ATTACKED+=(--method "$NAME=$OUT/runs/$M")
done

step "evaluating base and unlearned models on held-out scenes (launch/evaluate.py)"
"$PY" launch/evaluate.py "${RUNS[@]}" --base "$CAPTIONER" --scenes "$OUT/scenes/eval" \
  --max-new-tokens 40 --batch-size 32 "${CI_EVAL[@]}" --out "$OUT/eval"

step "attacks and report (launch/attack.py)"
"$PY" launch/attack.py "${ATTACKED[@]}" --base "$CAPTIONER" --scenes "$OUT/scenes/eval" \
  --data "$OUT/curated" --relearn-sizes "$SIZES" --relearn-lr 1e-3 --lora "$LORA" --lora-lr 1e-3 \
  --adversarial false "${CI_ATTACK[@]}" --seed "$SEED" --eval-max-new-tokens 40 --eval-batch-size 32 --out "$OUT/report" >/dev/null

step "done"
cat "$OUT/report/report.md"
echo "Report: $OUT/report/report.md (table), $OUT/report/relearn_curve.png (relearning curve),"
echo "        $OUT/report/landscape.png (sharpness probe); metrics of every model: $OUT/eval/summary.md"
echo "Toy world (seeds, thresholds, timings): $OUT/world.json; runs: $OUT/runs/<method>/"
