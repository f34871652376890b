"""Evaluate models: CHAIR, BLEU, perplexity, throughput on COCO-format captions; POPE.

    # a training run (base checkpoint + runs/<run>/trainable.safetensors) on the toy world's scenes
    python launch/evaluate.py --run base --run SARE=runs/toy/runs/sare --base runs/toy/models/captioner \
        --scenes runs/toy/scenes/eval
    # a model sharded over the ranks (ZeRO-3 inference; every rank joins every forward):
    deepspeed --num_gpus 8 launch/evaluate.py --run sare=runs/sare --synced-gpus true ...
    # LLaVA-1.5 on COCO val2014 (see docs/evaluation.md), 2 GPUs:
    deepspeed --num_gpus 2 launch/evaluate.py --base llava-hf/llava-1.5-7b-hf --run sare=runs/sare \
        --instances annotations/instances_val2014.json --captions annotations/captions_val2014.json \
        --image-dir val2014 --pope packaged --num-images 500 --max-new-tokens 512 --out runs/eval

Writes <out>/<name>/{eval.json, eval.md, captions.jsonl, pope_<split>.jsonl} and <out>/summary.md.
Several ranks: start with `deepspeed` (or mpirun); torchrun's own parser takes `--run` for its
`--run-path` option. Only wires sare_ds.eval together.
"""
import argparse
import os
from pathlib import Path

import torch

# DeepSpeed (ZeRO-3 inference, process groups) picks its accelerator at import.
os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")

import sare_ds  # noqa: F401  (torchvision guard before transformers)
from sare_ds.eval.distributed import rank_and_world
from sare_ds.eval.evaluate import EvalConfig, EvalData, evaluate_run, markdown_table, summary_row
from sare_ds.eval.pope import packaged_pope_files
from sare_ds.eval.runs import parse_runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", default=[], help="name=run_dir, run_dir, or `base` (repeatable)")
    ap.add_argument("--base", help="base checkpoint (default: each run's model.name_or_path)")
    ap.add_argument("--scenes", help="folder of a generated scene eval set (written if missing)")
    ap.add_argument("--scene-images", type=int, default=16, help="images of a newly written scene eval set")
    ap.add_argument("--instances", nargs="*", default=[], help="COCO instances_*.json")
    ap.add_argument("--captions", nargs="*", default=[], help="COCO captions_*.json (reference captions)")
    ap.add_argument("--image-dir", help="folder of the captioned images")
    ap.add_argument("--pope", nargs="*", default=[], help="`packaged` (COCO splits) or split=file ... ")
    ap.add_argument("--pope-image-dir", help="folder of the POPE images (default: --image-dir)")
    ap.add_argument("--out", default="runs/eval")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    for name, f in EvalConfig.__dataclass_fields__.items():
        ap.add_argument("--" + name.replace("_", "-"), type=type(f.default) if not isinstance(f.default, bool) else
                        (lambda s: s.lower() in ("1", "true", "yes")), default=f.default)
    a = ap.parse_args()
    runs = parse_runs(a.run or ["base"], "--run")  # before any model loads: a bad value fails fast
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from sare_ds.dist import init_distributed

        init_distributed()
    if a.scenes:
        from sare_ds.eval.scenes import write_scene_eval_set

        eval_set = Path(a.scenes) / "eval_set.json"
        if not eval_set.is_file() and rank_and_world()[0] == 0:
            write_scene_eval_set(a.scenes, a.scene_images, seed=1)
        if rank_and_world()[1] > 1:
            torch.distributed.barrier()  # the other ranks read what rank 0 wrote
        data = EvalData.from_eval_set(eval_set)
    else:
        pope = packaged_pope_files() if a.pope == ["packaged"] else dict(p.split("=", 1) for p in a.pope)
        data = EvalData.from_paths(a.instances, a.captions, a.image_dir, pope, a.pope_image_dir)
    cfg = EvalConfig(**{k: getattr(a, k) for k in EvalConfig.__dataclass_fields__})
    rows = {}
    for name, run_dir in runs.items():
        result = evaluate_run(run_dir, data, cfg=cfg, base=a.base, out_dir=Path(a.out) / name, name=name)
        rows[name] = summary_row(result)
    if rank_and_world()[0] == 0:  # every rank holds the same results; one writes
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "summary.md").write_text(markdown_table(rows) + "\n")
        print(markdown_table(rows))


if __name__ == "__main__":
    from sare_ds.dist import run_main

    # Tears the process groups down and leaves without the interpreter's teardown, which can
    # abort on gloo's threads after every file is written (sare_ds.dist.exit_process).
    run_main(main)
