"""The training loop in one process: model, data, parameter space, step, logs, weights.

    run_dir = train(load_config("launch/configs/quickstart.yaml"))

Writes into `output.run_dir`: config.yaml (resolved), metrics.jsonl, tb/ (TensorBoard),
data.json (sample counts and skipped samples by reason), trainable.safetensors (the trained
parameters, by name) and summary.json.
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from sare_ds.config import TrainConfig, save_config
from sare_ds.data.samples import KINDS, BadSampleError
from sare_ds.data.steps import StepComposer
from sare_ds.data.tokenize import tokenize_sample
from sare_ds.models import DTYPES, load_mllm, select_trainable
from sare_ds.train.logging import MetricLogger
from sare_ds.train.params import NonFiniteError, PlainParameterSpace
from sare_ds.train.step import UnlearningStep, collate_groups

log = logging.getLogger("sare_ds.train")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_run_dir(cfg: TrainConfig) -> Path:
    run_dir = Path(cfg.output.run_dir)
    if run_dir.exists() and any(run_dir.iterdir()) and not cfg.output.overwrite:
        raise FileExistsError(f"output.run_dir = {run_dir} exists and output.overwrite is false; "
                              "fix: choose a new run_dir or set output.overwrite=true")
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("metrics.jsonl",):
        (run_dir / stale).unlink(missing_ok=True)
    return run_dir


def build_optimizer(params: list[torch.nn.Parameter], optim_cfg) -> torch.optim.Optimizer:
    if optim_cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas),
                                 eps=optim_cfg.adam_eps, weight_decay=optim_cfg.weight_decay)
    return torch.optim.SGD(params, lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay)


def lr_multiplier(optim_cfg, total_steps: int):
    """Linear warm-up, then constant or cosine decay to 0 (a function of the step index)."""
    warm = optim_cfg.warmup_steps

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if optim_cfg.schedule == "cosine":
            progress = (step - warm) / max(1, total_steps - warm)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


def load_samples(cfg: TrainConfig):
    if cfg.data.source == "synthetic":
        from sare_ds.data.synthetic import generate_samples

        return generate_samples(cfg.data.num_images, cfg.data.image_size, cfg.data.prompt, cfg.optim.seed)
    raise ValueError(f"data.source = {cfg.data.source!r}: unknown; use synthetic")


def tokenize_all(samples, adapter, max_length: int):
    """Tokenised samples by kind; bad samples are skipped, counted by reason and logged."""
    by_kind = {k: [] for k in KINDS}
    skipped: dict[str, int] = {}
    for s in samples:
        try:
            t = tokenize_sample(s, adapter, max_length)
        except BadSampleError as e:
            reason = str(e).split(":", 1)[-1].split(";")[0].strip()
            skipped[reason] = skipped.get(reason, 0) + 1
            log.warning("skipping %s", e)
            continue
        by_kind[s.kind].append(t)
    return by_kind, skipped


def save_trainable(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(tensors, str(path))


def train(cfg: TrainConfig) -> Path:
    run_dir = prepare_run_dir(cfg)
    save_config(cfg, run_dir / "config.yaml")
    seed_everything(cfg.optim.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[cfg.model.dtype]

    adapter = load_mllm(cfg.model)
    trainable_names = select_trainable(adapter, cfg.model)
    model = adapter.model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    by_kind, skipped = tokenize_all(load_samples(cfg), adapter, cfg.data.max_length)
    per_step = {"pos": cfg.data.pos_per_step, "neg": cfg.data.neg_per_step, "sent": cfg.data.sent_per_step}
    if cfg.method.name == "ft":
        per_step["neg"] = 0  # plain fine-tuning never sees hallucinated spans
    composer = StepComposer(by_kind, per_step, cfg.optim.grad_accum_steps, cfg.optim.epochs,
                            cfg.optim.seed, cfg.optim.max_steps)
    (run_dir / "data.json").write_text(json.dumps({
        "samples": {k: len(v) for k, v in by_kind.items()}, "skipped": skipped,
        "steps": len(composer), "trainable": trainable_names,
    }, indent=1))

    optimizer = build_optimizer(params, cfg.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg.optim, len(composer)))
    space = PlainParameterSpace(params, optimizer, scheduler, cfg.optim.clip_grad_norm)
    step_fn = UnlearningStep(model, adapter.forward_inputs, space, cfg.method, device=device, dtype=dtype,
                             check_finite=cfg.optim.check_finite)
    pad_id = adapter.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = adapter.tokenizer.eos_token_id

    logger = MetricLogger(run_dir, cfg.logging, len(composer))
    status, last = "completed", {}
    t_last, samples_since, tokens_since = time.perf_counter(), 0, 0
    try:
        for step_idx, micro in enumerate(composer, start=1):
            groups = [collate_groups(mb, cfg.method.name, pad_id) for mb in micro]
            samples_since += sum(len(v) for mb in micro for v in mb.values())
            tokens_since += sum(int(len(s.input_ids)) for mb in micro for v in mb.values() for s in v)
            lr = space.lr
            metrics = step_fn(groups)
            logger.advance()
            if step_idx % cfg.logging.log_every == 0 or step_idx == len(composer):
                elapsed = time.perf_counter() - t_last
                n = step_idx % cfg.logging.log_every or cfg.logging.log_every
                last = logger.log(step_idx, {
                    **metrics, "train/lr": lr, "perf/step_time_s": elapsed / n,
                    "perf/samples_per_s": samples_since / elapsed, "perf/tokens_per_s": tokens_since / elapsed,
                })
                t_last, samples_since, tokens_since = time.perf_counter(), 0, 0
    except NonFiniteError:
        status = "stopped: non-finite loss"
        raise
    finally:
        logger.close()
        # Also on a NaN stop: the optimizer refused the bad update, so these are good weights.
        save_trainable(model, run_dir / "trainable.safetensors")
        (run_dir / "summary.json").write_text(json.dumps({
            "status": status, "steps": len(composer), "method": cfg.method.name, "last_metrics": last,
        }, indent=1))
    return run_dir
