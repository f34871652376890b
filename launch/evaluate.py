"""Evaluate models: CHAIR, BLEU, perplexity, throughput on COCO-format captions; POPE.

    # a training run (base checkpoint + runs/<run>/trainable.safetensors) on the toy world's scenes
    python launch/evaluate.py --run base --run SARE=runs/toy/runs/sare --base runs/toy/models/captioner \
        --scenes runs/toy/scenes/eval
    # a model sharded over the ranks (ZeRO-3 inference; every rank joins every forward):
    deepspeed --num_gpus 8 launch/evaluate.py --run sare=runs/sare --synced-gpus true ...
    # LLaVA-1.5 on COCO val2014 in the published setting (see docs/evaluation.md), 2 GPUs:
    deepspeed --num_gpus 2 launch/evaluate.py --base llava-hf/llava-1.5-7b-hf --run sare=runs/sare \
        --instances annotations/instances_val2014.json --captions annotations/captions_val2014.json \
        --image-dir val2014 --protocol coco-chair-pope --out runs/eval
    # other images: --images my_ids.txt (COCO ids, one a line; default: the 500 POPE images)

Writes <out>/<name>/{eval.json, eval.md, captions.jsonl, pope_<split>.jsonl} and <out>/summary.md;
eval.json records the protocol, the CHAIR mode and the image ids.
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
from sare_ds.eval.images import read_image_list
from sare_ds.eval.pope import packaged_pope_files
from sare_ds.eval.protocol import ProtocolError, load_protocol
from sare_ds.eval.runs import parse_runs
from sare_ds.eval.scenes import add_scene_arguments, scene_data_of_args, scene_set_of_args


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", default=[], help="name=run_dir, run_dir, or `base` (repeatable)")
    ap.add_argument("--base", help="base checkpoint (default: each run's model.name_or_path)")
    add_scene_arguments(ap)
    ap.add_argument("--instances", nargs="*", default=[], help="COCO instances_*.json")
    ap.add_argument("--captions", nargs="*", default=[], help="COCO captions_*.json (reference captions)")
    ap.add_argument("--image-dir", help="folder of the captioned images")
    ap.add_argument("--pope", nargs="*", default=[], help="`packaged` (COCO splits) or split=file ... ")
    ap.add_argument("--pope-image-dir", help="folder of the POPE images (default: --image-dir)")
    ap.add_argument("--images", help="COCO image ids to caption, one a line (default: the 500 images of the "
                                     "shipped POPE files, `pope-coco-val2014-500`)")
    ap.add_argument("--protocol", help="`coco-chair-pope` (the published setting) or a protocol .json: fixes "
                                       "prompt, decoding, tokens, images, CHAIR mode and POPE splits")
    ap.add_argument("--out", default="runs/eval")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    for name, f in EvalConfig.__dataclass_fields__.items():
        ap.add_argument("--" + name.replace("_", "-"), type=type(f.default) if not isinstance(f.default, bool) else
                        (lambda s: s.lower() in ("1", "true", "yes")), default=f.default)
    a = ap.parse_args()
    runs = parse_runs(a.run or ["base"], "--run")  # before any model loads: a bad value fails fast
    cfg = EvalConfig(**{k: getattr(a, k) for k in EvalConfig.__dataclass_fields__})
    try:
        protocol, images = (load_protocol(a.protocol) if a.protocol else None), None
        if protocol is not None:
            if a.scenes or a.images or a.pope not in ([], ["packaged"]):
                ap.error(f"--protocol {protocol.name} fixes the images and POPE files (COCO val2014, packaged POPE); "
                         "drop --scenes / --images / --pope, or drop --protocol")
            cfg = protocol.apply(cfg, {k: v for k, v in vars(cfg).items() if v != getattr(EvalConfig(), k)})
            images, a.pope = protocol.images(), ["packaged"]
        elif a.images:
            if a.scenes:
                ap.error("--images: a scene eval set (--scenes) captions all its own images; drop --images")
            images = read_image_list(a.images)
        if a.scenes:
            eval_set, make = scene_set_of_args(a)
    except (ProtocolError, ValueError, OSError) as e:
        ap.error(str(e))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from sare_ds.dist import init_distributed

        init_distributed()
    if a.scenes:
        data = scene_data_of_args(a, eval_set, make, cfg.chair_mode)
    else:
        pope = packaged_pope_files() if a.pope == ["packaged"] else dict(p.split("=", 1) for p in a.pope)
        if protocol is not None:
            pope = {split: pope[split] for split in protocol.data["pope"]["splits"]}
        data = EvalData.from_paths(a.instances, a.captions, a.image_dir, pope, a.pope_image_dir, images=images,
                                   chair_mode=cfg.chair_mode)
    rows = {}
    for name, run_dir in runs.items():
        result = evaluate_run(run_dir, data, cfg=cfg, base=a.base, out_dir=Path(a.out) / name, name=name,
                              protocol=protocol)
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
