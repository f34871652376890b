"""Memory and cost plan of a training run, from the model's shapes alone (meta device, no weights).

    python launch/plan.py --model preset:llava-1.5-7b --gpus 8 --gpu-mem 80
    python launch/plan.py --config launch/configs/llava15_13b_sare.yaml --gpus 8 --gpu-mem 40 --json plan.json
    python launch/plan.py --model preset:llava-1.5-7b --captions-per-step 8 --packing false
    python launch/plan.py --table                       # THE TABLE of docs/memory_plan.md
    python launch/plan.py --list                        # the model presets

Per rank: weights, fp32 master + AdamW states, gradients, DeepSpeed's buffers, SARE's own buffers,
activations (with and without gradient checkpointing) and which pass of the step peaks (the loss's
fp32 logits over the labelled positions only, next to what they were over every position), which
ds_configs/ fit in --gpu-mem GiB, and FLOPs per optimizer step for FT / EFUF / SARE, packed and
unpacked. A step is data.captions_per_step captions per micro-batch, packed (one sequence per
caption) or not (one per span); --per-step plans the per-kind shards of the format before caption
records. Formulas, assumptions and their validation: docs/memory_plan.md, sare_ds/plan.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

START = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sare_ds  # noqa: E402,F401  (torchvision guard before transformers)
from sare_ds import plan  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="model presets:\n" + _presets(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="preset:<name>[,key=value...], a checkpoint directory or a hub id available offline "
                                   "(default: the recipe's model.name_or_path)")
    p.add_argument("--gpus", type=int, default=1, help="ranks (GPUs) in the run (default 1)")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")
    p.add_argument("--ds-config", help="plan only this DeepSpeed JSON (default: every GPU config in ds_configs/)")
    p.add_argument("--config", help="training recipe (YAML) whose model / data / optim settings to plan")
    p.add_argument("--seq-len", type=int, help="data.max_length: the longest sequence, image positions included "
                                              "(default: the recipe's; without a recipe LLaVA-1.5 1024, LLaVA-NeXT 3200, "
                                              "other families the default image + prompt + 400 caption tokens, "
                                              "rounded up to a multiple of 512)")
    p.add_argument("--captions-per-step", type=int,
                   help="captions per micro-batch, data.captions_per_step (default: the recipe's, else 4)")
    p.add_argument("--packing", choices=("true", "false"),
                   help="data.packing: true = one sequence per caption carrying all of its spans' losses; false = one "
                        "sequence per span, cut after it (default: the recipe's, else true)")
    p.add_argument("--caption-tokens", type=int, help="response tokens of a caption (default: as many as --seq-len "
                                                     "leaves after the image and the prompt, the worst case)")
    p.add_argument("--spans", help="pos,neg sub-sentence spans per caption (default 4,1)")
    p.add_argument("--neg-end", type=float, help="where a caption's last neg span ends, as a fraction of the caption: "
                                                 "the neg passes forward image + prompt + this much (default 0.5)")
    p.add_argument("--per-step", help="per-kind shards (the format before caption records) only: pos,neg,sent samples "
                                      "per micro-batch, each its own sequence; plans that format instead of captions")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default: the recipe's, else 1)")
    p.add_argument("--method", choices=("ft", "efuf", "sare"), help="default: the recipe's, else sare")
    p.add_argument("--trainable", choices=("mapping", "mapping+lora"), help="default: the recipe's, else mapping")
    p.add_argument("--gradient-checkpointing", choices=("true", "false"),
                   help="default: the recipe's model.gradient_checkpointing, else true")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), help="default: the recipe's, else bfloat16")
    p.add_argument("--image-size", default="640x480", help="WxH of the images (LLaVA-NeXT's tiles depend on it)")
    p.add_argument("--json", help="also write the plan (or the table's records) as JSON here")
    p.add_argument("--table", action="store_true", help="print THE TABLE (7B / 13B / 34B-class / NeXT and the other families' "
                                                        "7B-class on 1, 8, 16 GPUs of 40 and 80 GiB) instead of one plan")
    p.add_argument("--list", action="store_true", help="list the model presets and exit")
    args = p.parse_args(argv)
    if args.gpus < 1:
        p.error(f"--gpus {args.gpus}: must be >= 1")
    if args.gpu_mem <= 0:
        p.error(f"--gpu-mem {args.gpu_mem}: must be > 0 (GiB)")
    if args.per_step is not None:
        parts = args.per_step.split(",")
        if len(parts) != 3 or not all(x.strip().isdigit() for x in parts):
            p.error(f"--per-step {args.per_step!r}: write three whole numbers pos,neg,sent, e.g. 1,1,1")
    if args.spans is not None:
        parts = args.spans.split(",")
        if len(parts) != 2 or not all(x.strip().isdigit() for x in parts):
            p.error(f"--spans {args.spans!r}: write two whole numbers pos,neg, e.g. 2,1")
    if args.captions_per_step is not None and args.captions_per_step < 1:
        p.error(f"--captions-per-step {args.captions_per_step}: must be >= 1")
    if args.caption_tokens is not None and args.caption_tokens < 1:
        p.error(f"--caption-tokens {args.caption_tokens}: must be >= 1")
    if args.neg_end is not None and not 0.0 < args.neg_end <= 1.0:
        p.error(f"--neg-end {args.neg_end}: a fraction of the caption in (0, 1]")
    try:
        w, h = (int(x) for x in args.image_size.lower().split("x"))
        args.image_size = (w, h)
    except ValueError:
        p.error(f"--image-size {args.image_size!r}: write WIDTHxHEIGHT, e.g. 640x480")
    if not (args.table or args.list or args.model or args.config):
        p.error("name a model (--model preset:llava-1.5-7b) or a recipe (--config launch/configs/...yaml), or --table")
    return args


def _presets() -> str:
    from sare_ds.models import presets

    return presets.describe()


def resolve(args):
    """(model config, step shape, ds_config filter) from the recipe, the defaults and the flags."""
    from sare_ds.config import ModelConfig

    recipe_ds_config = ""
    if args.config:
        cfg, _ = plan.load_recipe(args.config)
        model_cfg, step = cfg.model, plan.step_from_config(cfg)
        recipe_ds_config = cfg.distributed.ds_config
    else:
        model_cfg = ModelConfig(dtype="bfloat16", gradient_checkpointing=True)
        step = plan.StepShape()
    name = args.model or model_cfg.name_or_path
    if not args.model and not Path(name).exists() and not name.startswith("preset:"):
        preset = plan.preset_for_hub_id(name)
        if preset:
            print(f"(the recipe's {name} is planned with {preset}: the same shapes, no download)")
            name = preset
    model_cfg = dataclasses.replace(model_cfg, name_or_path=name)
    if args.trainable:
        model_cfg.trainable = args.trainable
    if args.dtype:
        model_cfg.dtype = args.dtype
    changes = {}
    if args.method:
        changes["method"] = args.method
    if args.per_step:
        changes["per_step"] = dict(zip(plan.KINDS, (int(x) for x in args.per_step.split(","))))
        changes["data_format"] = "per_kind"
    if args.captions_per_step:
        changes["captions_per_step"] = args.captions_per_step
    if args.packing:
        changes["packing"] = args.packing == "true"
    if args.caption_tokens:
        changes["caption_tokens"] = args.caption_tokens
    if args.spans:
        changes["pos_spans"], changes["neg_spans"] = (int(x) for x in args.spans.split(","))
    if args.neg_end is not None:
        changes["neg_end"] = args.neg_end
    if args.grad_accum:
        changes["grad_accum_steps"] = args.grad_accum
    if args.gradient_checkpointing:
        changes["gradient_checkpointing"] = args.gradient_checkpointing == "true"
    if args.seq_len:
        changes["seq_len"] = args.seq_len
    return model_cfg, dataclasses.replace(step, **changes), recipe_ds_config


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        print(_presets())
        return 0
    try:
        if args.table:
            rows = plan.table_rows()
            text, records = plan.table([(label, m, step) for label, m, step, _ in rows])
            print(text)
            print()
            for label, model, step, origin in rows:
                gc = "on" if step.gradient_checkpointing else "off"
                print(f"- {label}: {step.method.upper()}, max_length {step.seq_len}, "
                      f"{step.captions_per_step} {'packed' if step.packing else 'unpacked'} caption(s) per micro-batch "
                      f"({step.caption_length(model.prefix_tokens)} caption tokens, {step.pos_spans} pos + "
                      f"{step.neg_spans} neg spans, the last neg token at {100 * step.neg_end:g} %), "
                      f"checkpointing {gc} ({origin})")
            out = records
        else:
            model_cfg, step, recipe_ds_config = resolve(args)
            model = plan.summarize(model_cfg, image_size=args.image_size)
            if not (args.seq_len or args.config):
                step = dataclasses.replace(step, seq_len=plan.default_seq_len(model))
            configs = [plan.ZeroSettings.from_json(args.ds_config)] if args.ds_config else None
            out = plan.plan_run(model, step, args.gpus, args.gpu_mem, configs, recipe_ds_config)
            print(plan.format_plan(out))
    except (plan.PlanError, ValueError, OSError) as e:
        print(f"plan.py: {e}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
        print(f"(written: {args.json})")
    print(f"(planned in {time.perf_counter() - START:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
