#!/usr/bin/env bash
# Quickstart command 1: set up (once) and run the main job on the embedded default.
#
#   bash launch/quickstart.sh [section.field=value ...]
#
# 1. builds the tiny random LLaVA (cached in runs/models/tiny-llava);
# 2. draws generated scenes as a COCO-style folder (cached) and curates them with
#    launch/curate.py (tiny random CLIP, toy thresholds) into WebDataset shards;
# 3. trains SARE with `deepspeed launch/train.py` under ZeRO-3: 2 CPU ranks (gloo, fp32) on a
#    machine without GPUs, every GPU (bf16) on one with them;
# 4. evaluates the base and the trained model (CHAIR, POPE, BLEU, perplexity) on held-out scenes.
# Extra arguments are config overrides for launch/train.py. Outputs: runs/quickstart/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash launch/setup_env.sh
VENV="${SARE_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
step() { echo -e "\n== $* ==" >&2; }

NUM_GPUS="$("$PY" -c 'import torch; print(torch.cuda.device_count())')"
if [ "$NUM_GPUS" -gt 0 ]; then
  export DS_ACCELERATOR=cuda
  RANKS="$NUM_GPUS"; DS_CONFIG=ds_configs/zero3_bf16.json; DTYPE=bfloat16
else
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
  RANKS=2; DS_CONFIG=ds_configs/zero3_cpu_fp32.json; DTYPE=float32
fi

MODEL=runs/models/tiny-llava
DATA=runs/quickstart-data
if [ ! -f "$MODEL/config.json" ]; then
  step "building the tiny LLaVA"
  "$PY" -m sare_ds.models.tiny "$MODEL"
fi
if [ ! -f "$DATA/scenes/instances.json" ]; then
  step "drawing scenes"
  "$PY" -m sare_ds.curation.synthetic_coco "$DATA/scenes" --num-images 64 --image-size 96
fi
step "curating (launch/curate.py)"
"$PY" launch/curate.py input.path="$DATA/scenes/images" input.annotations="$DATA/scenes/instances.json" \
  caption.source=annotations caption.captions_file="$DATA/scenes/captions.json" \
  clip.model=sare-tiny-clip clip.pretrained= clip.patch_size=24 clip.window_patches=2 \
  split.t0=36 split.t1=32 split.t2=34 output.images_per_chunk=16 output.dir="$DATA/curated" \
  output.resume=false  # ~10 s: always curate afresh, so a changed curation config never meets old shards

step "training SARE: deepspeed, $RANKS ranks, ZeRO-3 ($DS_CONFIG)"
"$VENV/bin/deepspeed" --num_gpus "$RANKS" launch/train.py --config launch/configs/quickstart.yaml \
  distributed.ds_config="$DS_CONFIG" model.dtype="$DTYPE" data.shards="$DATA/curated" "$@"

step "evaluating base and SARE"
"$PY" launch/evaluate.py --run base --run sare=runs/quickstart --scenes "$DATA/eval-scenes" \
  --max-new-tokens 32 --out runs/quickstart/eval
echo -e "\nDone. Run directory: runs/quickstart  (config.yaml, metrics.jsonl, tb/, hf/, trainable.safetensors)"
echo "Evaluation report: runs/quickstart/eval/summary.md  (per model: runs/quickstart/eval/<name>/eval.md)"
