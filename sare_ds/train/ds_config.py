"""The DeepSpeed JSON, completed from (and checked against) the training config tree.

Batch sizes, accumulation, clipping, precision and the optimizer are defined once, in the
sare_ds config. The JSON files in ds_configs/ say "auto" for them; `build_ds_config` fills
them in. A JSON that states a value explicitly must agree, or this raises naming both.

Why DeepSpeed's `gradient_accumulation_steps` is always 1: a SARE step runs three backward
passes per micro-batch (neg at theta, neg at theta + eps*, capability at theta), so
DeepSpeed's own micro-step counting cannot describe it. sare_ds accumulates its
`optim.grad_accum_steps` micro-batches itself (each loss divided by the step's span counts) and calls
`engine.step()` once per optimizer step; every `engine.backward` is then a reduction
boundary, and ZeRO adds the reduced gradient partitions across backwards until
`optimizer.zero_grad()`.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from sare_ds.config import ConfigError, TrainConfig
from sare_ds.data.steps import per_step_counts

SUPPORTED_STAGES = (2, 3)


def _fill(ds: dict, key: str, value, source: str, path: str) -> None:
    """Set ds[key] = value if absent or "auto"; otherwise require equality."""
    current = ds.get(key, "auto")
    if current == "auto":
        ds[key] = value
    elif current != value:
        raise ConfigError(
            f"{path}: `{key}` = {current!r} disagrees with {source} = {value!r}. Fix: set `{key}` to \"auto\" "
            f"in the JSON (sare_ds fills it in) or change {source}."
        )


def samples_per_micro_batch(cfg: TrainConfig) -> int:
    return sum(per_step_counts(cfg.data, cfg.method.name).values())


def build_ds_config(cfg: TrainConfig, world_size: int, on_gpu: bool) -> dict:
    path = cfg.distributed.ds_config
    try:
        template = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"distributed.ds_config = {path!r}: cannot read it as JSON ({e}); fix the file") from e
    ds = copy.deepcopy(template)

    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"{path}: `zero_optimization` is a {type(zero).__name__}, not an object. Fix: "
                          "\"zero_optimization\": {\"stage\": 3} (see ds_configs/zero3_bf16.json)")
    stage = zero.get("stage", 0)
    if not isinstance(stage, int) or isinstance(stage, bool):
        raise ConfigError(
            f"{path}: zero_optimization.stage = {stage!r} is a {type(stage).__name__}; it must be an integer "
            f"(DeepSpeed compares it as a number). Fix: write \"stage\": "
            f"{stage.strip() if isinstance(stage, str) and stage.strip() in ('2', '3') else 3} without quotes "
            f"(ZeRO stages {SUPPORTED_STAGES} are supported)."
        )
    if stage not in SUPPORTED_STAGES:
        raise ConfigError(
            f"{path}: zero_optimization.stage = {stage} is not supported: SARE's perturbation is implemented for "
            f"ZeRO stages {SUPPORTED_STAGES}. Fix: use stage 3 (ds_configs/zero3_*.json) or 2."
        )

    micro = samples_per_micro_batch(cfg)
    _fill(ds, "train_micro_batch_size_per_gpu", micro, "data.captions_per_step (captions per micro-batch)", path)
    if ds.get("gradient_accumulation_steps", "auto") not in ("auto", 1):
        raise ConfigError(
            f"{path}: gradient_accumulation_steps = {ds['gradient_accumulation_steps']!r}; sare_ds accumulates "
            "micro-batches itself. Fix: set it to \"auto\" and use optim.grad_accum_steps."
        )
    ds["gradient_accumulation_steps"] = 1
    _fill(ds, "train_batch_size", micro * world_size, "samples per micro-batch x world size", path)
    # Always explicit: DeepSpeed would otherwise clip at 1.0 silently.
    _fill(ds, "gradient_clipping", float(cfg.optim.clip_grad_norm), "optim.clip_grad_norm", path)

    for key, dtype in (("bf16", "bfloat16"), ("fp16", "float16")):
        section = ds.setdefault(key, {})
        want = cfg.model.dtype == dtype
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = want
        elif section["enabled"] != want:
            raise ConfigError(
                f"{path}: {key}.enabled = {section['enabled']} disagrees with model.dtype = {cfg.model.dtype!r}. "
                f"Fix: set {key}.enabled to \"auto\" or model.dtype accordingly."
            )

    o = cfg.optim
    if ds.get("optimizer", "auto") == "auto":
        if o.optimizer == "adamw":
            ds["optimizer"] = {"type": "AdamW", "params": {
                "lr": o.lr, "betas": list(o.betas), "eps": o.adam_eps, "weight_decay": o.weight_decay,
                # torch's AdamW: no DeepSpeed op to JIT-compile (works on CPU and GPU alike).
                "torch_adam": True, "adam_w_mode": True}}
        else:
            ds.pop("optimizer")  # SGD is built by the trainer and passed as a client optimizer
            ds["zero_allow_untested_optimizer"] = True
    else:
        raise ConfigError(
            f"{path}: `optimizer` is set in the JSON; sare_ds builds it from optim.*. Fix: set \"optimizer\": \"auto\"."
        )
    offload = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if offload == "cpu" and "optimizer" in ds:
        # Offloaded states are updated on the CPU; DeepSpeed's CPU Adam is the fast path there.
        ds["optimizer"]["params"].pop("torch_adam", None)
    if ds.get("scheduler"):
        raise ConfigError(f"{path}: `scheduler` is set; sare_ds builds the schedule from optim.*. Fix: remove it.")
    if not on_gpu and any(ds.get(k, {}).get("enabled") for k in ("fp16",)):
        raise ConfigError(f"{path}: fp16 needs a GPU. Fix: model.dtype=float32 or bfloat16 on CPU.")
    return ds


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))
