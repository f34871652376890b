"""Attack unlearned models (relearning, LoRA, adversarial prompts), probe sharpness, write the report.

    python launch/attack.py --base runs/toy/models/captioner --method base=base --method SARE=runs/toy/runs/sare \
        --scenes runs/toy/scenes/eval --data runs/toy/curated --relearn-lr 1e-3 --out runs/toy/report
    # real models: --data runs/curated (neg shards), --instances/--captions/--image-dir as in evaluate.py

Writes <out>/report.md (one table: every method under every attack, with changes),
report.json, relearn_curve.png (CHAIR_S against relearning samples, one line per method),
landscape.png (the sharpness probe) and config.json. Several ranks (`deepspeed --num_gpus N
launch/attack.py ...`): caption generation is spread over them, each rank repeats the
fine-tunes (docs/evaluation.md, "Not covered"), rank 0 writes. Only wires sare_ds.eval together.
"""
import argparse
import dataclasses
import os
from pathlib import Path

import torch

# DeepSpeed (process groups) picks its accelerator at import.
os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")

import sare_ds  # noqa: F401  (torchvision guard before transformers)
from sare_ds.eval.distributed import rank_and_world
from sare_ds.eval.evaluate import EvalConfig, EvalData
from sare_ds.eval.images import read_image_list
from sare_ds.eval.pope import packaged_pope_files
from sare_ds.eval.runs import parse_runs
from sare_ds.eval.scenes import add_scene_arguments, scene_data_of_args, scene_set_of_args
from sare_ds.eval.suite import AttackConfig, run_attack_suite


def _flag_type(default):
    if isinstance(default, bool):
        return lambda s: s.lower() in ("1", "true", "yes")
    if isinstance(default, list):  # comma-separated numbers: sizes (int) or learning rates (float)
        return lambda s: [int(x) if x.strip().isdigit() else float(x) for x in s.split(",") if x.strip()]
    return type(default)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", action="append", required=True,
                    help="name=run_dir, run_dir (named after its folder), or `base` / name=base for the "
                         "base checkpoint (repeatable, report order)")
    ap.add_argument("--base", help="base checkpoint (needed for name=base; default: each run's own)")
    add_scene_arguments(ap)
    ap.add_argument("--instances", nargs="*", default=[])
    ap.add_argument("--captions", nargs="*", default=[])
    ap.add_argument("--image-dir")
    ap.add_argument("--pope", nargs="*", default=[], help="`packaged` or split=file ... (unattacked models only)")
    ap.add_argument("--images", help="COCO image ids to caption, one a line (default: the 500 images of the shipped "
                                     "POPE files)")
    ap.add_argument("--out", default="runs/report")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    groups = {"eval": EvalConfig, "attack": AttackConfig}
    for prefix, cls in groups.items():
        for f in dataclasses.fields(cls):
            flag = f"--{f.name.replace('_', '-')}" if prefix == "attack" else f"--eval-{f.name.replace('_', '-')}"
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            ap.add_argument(flag, dest=f"{prefix}__{f.name}", type=_flag_type(default), default=default)
    a = ap.parse_args()
    methods = parse_runs(a.method, "--method")  # before any model loads: a bad value fails fast
    cfgs = {p: cls(**{f.name: getattr(a, f"{p}__{f.name}") for f in dataclasses.fields(cls)}) for p, cls in groups.items()}
    if a.images and a.scenes:
        ap.error("--images: a scene eval set (--scenes) captions all its own images; drop --images")
    try:
        images = read_image_list(a.images) if a.images else None
        if a.scenes:
            eval_set, make = scene_set_of_args(a)
    except (ValueError, OSError) as e:
        ap.error(str(e))
    chair_mode = cfgs["eval"].chair_mode
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from sare_ds.dist import init_distributed

        init_distributed()  # generation is spread over the ranks; rank 0 writes the report
    if a.scenes:
        data = scene_data_of_args(a, eval_set, make, chair_mode)
    else:
        pope = packaged_pope_files() if a.pope == ["packaged"] else dict(p.split("=", 1) for p in a.pope)
        data = EvalData.from_paths(a.instances, a.captions, a.image_dir, pope, images=images, chair_mode=chair_mode)
    # A scene eval set is the toy world's: its report also prints the study's seed-averaged finding.
    run_attack_suite(methods, data, cfgs["attack"], eval_cfg=cfgs["eval"], out_dir=a.out, base=a.base,
                     toy_world=bool(a.scenes))
    if rank_and_world()[0] == 0:  # only rank 0 wrote the report
        print((Path(a.out) / "report.md").read_text())


if __name__ == "__main__":
    from sare_ds.dist import run_main

    # Tears the process groups down and leaves without the interpreter's teardown, which can
    # abort on gloo's threads after every file is written (sare_ds.dist.exit_process).
    run_main(main)
