"""The training loop: model, data, parameter space, step, logs, checkpoints, weights.

    run_dir = train(load_config("launch/configs/tiny_random.yaml"))

One process (`distributed.ds_config` empty: PlainBackend, PlainParameterSpace) or DeepSpeed ZeRO-2/3 on
any number of ranks (DeepSpeedBackend, Zero{2,3}ParameterSpace; sare_ds.train.backend); the step and the
loop are the same code. `train` is `build_run` (model, data, backend, step, resume point), `run_loop`
(the steps, logging, periodic checkpoints) and `finish_run` (weights, final checkpoint, hf/, summary),
each usable alone on the `Training` that build_run returns.
Writes into `output.run_dir` (rank 0), which belongs to this run (sare_ds.train.runs, docs/runs.md):
summary.json (`running` from the start; `completed`, a non-finite stop or `failed: <reason>`),
run.json (the run's identity), config.yaml (resolved), metrics.jsonl, tb/, data.json (samples per
kind, skipped samples by reason, final at the end), trainable.safetensors (the trained parameters
by name), hf/ (the full model in Hugging Face format; LoRA merged into the base weights) and with
DeepSpeed checkpoints/ (committed atomically, loaded weights-only: sare_ds.train.checkpoint).
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import sare_kernels as kernels
from sare_ds.config import ConfigError, TrainConfig
from sare_ds.data.samples import BadSampleError, Caption, skip_report
from sare_ds.data.steps import CAPTIONS, StepComposer, per_step_counts
from sare_ds.data.tokenize import TYPICAL_CAPTION_TOKENS, fixed_sample_tokens, tokenize_caption
from sare_ds.dist import DistInfo, barrier, init_distributed, mean_over_ranks
from sare_ds.models import DTYPES, load_mllm, select_trainable
from sare_ds.train import checkpoint as ckpt
from sare_ds.train.backend import (  # noqa: F401  (build_*, Runtime, lr_multiplier, merge_lora_state: re-exported)
    Backend, Runtime, backend_for, backend_of, build_deepspeed, build_optimizer, build_plain, lr_multiplier,
    merge_lora_state)
from sare_ds.train.logging import MetricLogger
from sare_ds.train.params import NonFiniteError
from sare_ds.train.runs import RUNNING, prepare_run_dir, run_record, shard_spec, write_summary
from sare_ds.train.step import UnlearningStep
from sare_ds.train.timing import PhaseTimer

log = logging.getLogger("sare_ds.train")
CHECKPOINTS = ckpt.CHECKPOINTS
# summary.json statuses (RUNNING from sare_ds.train.runs: written before anything else; FAILED + reason on
# any other exception)
COMPLETED = "completed"
REFUSED = "stopped: non-finite gradient, update refused (weights saved are those before the refused update)"
CORRUPT = "stopped: non-finite metrics without the per-step check (weights may be corrupt, not saved)"
CORRUPT_CHECKED = "stopped: non-finite metrics although every gradient was finite (weights may be corrupt, not saved)"
FAILED = "failed"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class CaptionTokenizer:
    """A caption (or a per-kind sample, as a caption of one span) -> the sequences it is trained on:
    one when packed, one per span otherwise (a class, not a closure, so DataLoader workers pickle it)."""

    def __init__(self, adapter, cfg: TrainConfig):
        self.adapter, self.max_length, self.packing = adapter, cfg.data.max_length, cfg.data.packing
        self.score_weighting = cfg.method.score_weighting

    def __call__(self, item):
        # Every kind is tokenised, whatever the method reads: the step's passes pick the method's kinds
        # (a caption with nothing for a method is never forwarded). Refusing such captions here would
        # make the stream's epoch and its resume position count different things.
        caption = item if isinstance(item, Caption) else Caption.from_sample(item)
        return tokenize_caption(caption, self.adapter, self.max_length, packing=self.packing,
                                score_weighting=self.score_weighting)


def sequences(micro_batch: dict[str, list]) -> list:
    """The sequences of one micro-batch of the stream ({stream kind: [the tokenizer's lists]})."""
    return [seq for items in micro_batch.values() for item in items for seq in item]


def tokenize_all(captions: list[Caption], tokenizer: CaptionTokenizer):
    """Tokenised captions (each a list of sequences); bad ones are skipped, counted by reason and logged."""
    out, skipped = [], {}
    for c in captions:
        try:
            out.append(tokenizer(c))
        except BadSampleError as e:
            skipped[e.reason] = skipped.get(e.reason, 0) + 1
            log.warning("skipping %s", e)
    return out, skipped


def build_data(cfg: TrainConfig, adapter, info: DistInfo, start_step: int):
    """The per-step micro-batches of this rank (from shards or generated scenes) and a data report."""
    tokenizer = CaptionTokenizer(adapter, cfg)
    if cfg.data.source == "shards":
        from sare_ds.data.shards import shard_format
        from sare_ds.data.stream import ShardStream

        shards = shard_spec(cfg.data.shards, cfg.data.allow_remote)  # shard_list: braces expanded before any split
        data_format = shard_format(shards)
        per_step = per_step_counts(cfg.data, cfg.method.name, data_format)
        if data_format != "captions":
            log.warning("%s holds per-kind samples (the format before caption records): each sample is its own "
                        "sequence, so packing has nothing to pack. Convert it with `python launch/curate.py convert "
                        "%s <new dir>` to train one forward per caption.", cfg.data.shards, cfg.data.shards)
        stream = ShardStream(
            shards, per_step=per_step, grad_accum_steps=cfg.optim.grad_accum_steps, epochs=cfg.optim.epochs,
            seed=cfg.optim.seed, max_steps=cfg.optim.max_steps, rank=info.rank,
            world_size=info.world_size, num_workers=cfg.data.num_workers, shuffle_buffer=cfg.data.shuffle_buffer,
            start_step=start_step, skip_corrupt=cfg.data.skip_corrupt, allow_remote=cfg.data.allow_remote,
            tokenize=tokenizer)
        report = {"source": "shards", "shards": cfg.data.shards, "format": data_format, "packing": cfg.data.packing,
                  "steps": len(stream), "dropped_per_epoch": stream.dropped_per_epoch,
                  "repeated_per_epoch": stream.repeated_per_epoch, "skipped": stream.skipped}
        return stream, report
    from sare_ds.data.synthetic import generate_captions

    captions = generate_captions(cfg.data.num_images, cfg.data.image_size, cfg.data.prompt, cfg.optim.seed)
    tokenized, skipped = tokenize_all(captions, tokenizer)
    if not tokenized:
        raise BadSampleError(f"no usable caption among the {len(captions)} generated ones: every one was skipped. "
                             f"Skipped, by reason: {skip_report(skipped)}; the warnings above name the fix")
    per_step = per_step_counts(cfg.data, cfg.method.name, "captions")
    composer = StepComposer({CAPTIONS: tokenized}, per_step, cfg.optim.grad_accum_steps, cfg.optim.epochs,
                            cfg.optim.seed, cfg.optim.max_steps, rank=info.rank, world_size=info.world_size,
                            start_step=start_step)
    report = {"source": "synthetic", "format": "captions", "packing": cfg.data.packing, "captions": len(tokenized),
              "sequences": sum(len(t) for t in tokenized), "skipped": skipped, "steps": len(composer)}
    return composer, report


def check_max_length(cfg: TrainConfig, adapter) -> dict[str, int]:
    """Refuse a data.max_length that no sample can fit (image + prompt + template before any caption)."""
    fixed = fixed_sample_tokens(adapter, cfg.data.prompt)
    least = fixed["text"] + fixed["image_min"] + 1  # at least one target token
    suggest = 1 << math.ceil(math.log2(fixed["text"] + fixed["image_max"] + TYPICAL_CAPTION_TOKENS + 64))
    if cfg.data.max_length < least:
        raise ConfigError(
            f"data.max_length = {cfg.data.max_length} is invalid: a sample of {cfg.model.name_or_path} needs at least "
            f"{least} tokens before any caption text ({fixed['image_min']} image tokens + {fixed['text']} of prompt and "
            f"chat template), so every sample would be skipped. Fix: data.max_length={suggest} (room for a 100-word "
            "caption; the recipes in launch/configs/ set it per model)")
    typical = fixed["text"] + fixed["image_max"] + TYPICAL_CAPTION_TOKENS
    if cfg.data.max_length < typical:
        log.warning("data.max_length = %d leaves %d tokens for caption text after the image (up to %d tokens) and "
                    "prompt (%d): long captions will be skipped (counted in data.json); data.max_length=%d fits a "
                    "100-word caption", cfg.data.max_length, cfg.data.max_length - fixed["text"] - fixed["image_max"],
                    fixed["image_max"], fixed["text"], suggest)
    return fixed


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process so far: the CUDA allocator's on a GPU, the resident set's on a CPU (GiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# ------------------------------------------------------------------------- weights out
# Runtime, build_plain, build_deepspeed, merge_lora_state: sare_ds.train.backend (re-exported here).

def _trainable_state(rt: Runtime) -> dict[str, torch.Tensor]:
    """Trained parameters by name, gathered to full tensors (every rank calls this)."""
    return backend_of(rt).trainable_state(rt)


def save_trainable(rt: Runtime, path: Path, backend: Backend | None = None) -> None:
    from safetensors.torch import save_file

    state = (backend or backend_of(rt)).trainable_state(rt)
    if rt.dist.is_main:
        save_file(state, str(path))


def export_hf(rt: Runtime, adapter, out_dir: Path, backend: Backend | None = None) -> None:
    """Full model in Hugging Face format (config, weights, processor), loadable without sare_ds."""
    (backend or backend_of(rt)).export_hf(rt, adapter, out_dir)


# ----------------------------------------------------------------------------- the loop

def _final_skips(batches, data_report: dict, source: str, complete: bool) -> dict:
    """Samples skipped by the data source, by reason, as the iteration left them (the stream's dict is final
    only after it). Shards: each rank reads its own share, so a completed run sums them over the ranks (a
    collective, on the success path only); after a failure rank 0's own counts, named so."""
    own = dict(getattr(batches, "skipped", None) or data_report.get("skipped") or {})
    if source != "shards":
        return {"skipped": own}  # the generated captions are tokenised alike on every rank
    if not complete:
        return {"skipped_rank0": own}
    total: dict[str, int] = {}
    for counts in ckpt.all_gather(own):
        for reason, n in counts.items():
            total[reason] = total.get(reason, 0) + n
    return {"skipped": total}


def _failure_status(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{FAILED}: {type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def train(cfg: TrainConfig) -> Path:
    """Run `cfg` and return its run directory. summary.json says `running` from the first moment, then
    `completed`, one of the non-finite stops (REFUSED / CORRUPT*), or `failed: <reason>` on any exception."""
    use_ds = bool(cfg.distributed.ds_config)
    info = init_distributed(cfg.distributed.backend) if use_ds else DistInfo(0, 1, 0, torch.device("cpu"))
    # Refusals (an occupied folder, a resume that does not match) leave the folder untouched.
    run_dir, identity, resume = prepare_run_dir(cfg, info)
    run = {"status": RUNNING, "step": resume.step if resume else 0, "summary": {}}
    try:
        return _train(cfg, info, run_dir, identity, resume, run)
    except BaseException as e:
        if run["status"] == RUNNING:
            # Every rank that fails records it (atomically, naming its rank): a rank-local failure (its shard,
            # its memory) leaves rank 0 waiting in a collective until the launcher kills it, so rank 0 alone
            # could not say `failed`.
            run["status"] = _failure_status(e)
            write_summary(run_dir, {**run["summary"], "status": run["status"], "step": run["step"],
                                    "method": cfg.method.name, "world_size": info.world_size, "rank": info.rank,
                                    "error": "".join(traceback.format_exception_only(type(e), e)).strip()})
            if info.is_main and run.get("write_data_json") is not None:
                # data.json of a failed run: this rank's own skip counts, named so (no collective here).
                run["write_data_json"](_final_skips(run["batches"], run["data_report"], cfg.data.source,
                                                    complete=False))
        raise


def _train(cfg: TrainConfig, info: DistInfo, run_dir: Path, identity: dict, resume, run: dict) -> Path:
    training = build_run(cfg, info, run_dir, identity, resume, run)
    run_loop(training)
    return finish_run(training)


@dataclass
class Training:
    """A built run (`build_run`): what the loop (`run_loop`) drives and the finish (`finish_run`) writes.
    `run` is train()'s record of the run's status, step and summary fields (read on a failure)."""

    cfg: TrainConfig
    info: DistInfo
    run_dir: Path
    run: dict
    backend: Backend
    adapter: object
    rt: Runtime
    step_fn: UnlearningStep
    timer: PhaseTimer
    batches: object
    data_report: dict
    data_json: dict
    record: dict
    total: int
    start: int
    last: dict = field(default_factory=dict)  # the last logged metrics
    dropped_spans: dict = field(default_factory=dict)  # spans left out of kept captions (e.g. beyond max_length)

    def write_data_json(self, skips: dict) -> None:
        if self.info.is_main:
            out = {k: v for k, v in self.data_json.items() if k != "skipped"}
            (self.run_dir / "data.json").write_text(json.dumps({**out, **skips}, indent=1, default=str))

    def summary(self, status: str, skips: dict) -> dict:
        return {**self.run["summary"], "status": status, "step": self.run["step"], "method": self.cfg.method.name,
                "world_size": self.info.world_size, "peak_memory_gb": peak_memory_gb(self.rt.device),
                "last_metrics": self.last, "dropped_spans_rank0": self.dropped_spans, **skips}


def build_run(cfg: TrainConfig, info: DistInfo, run_dir: Path, identity: dict, resume, run: dict) -> Training:
    """Model, data, backend (engine, parameter space), step and the checkpoint to resume from; writes data.json."""
    seed_everything(cfg.optim.seed)
    dtype = DTYPES[cfg.model.dtype]
    # data.max_length is checked on the model's shapes, processor and template before any weight is
    # loaded (a 13B checkpoint takes minutes to load); the meta build allocates nothing.
    shapes = load_mllm(cfg.model, device="meta")
    fixed_tokens = check_max_length(cfg, shapes) if shapes.processor is not None else None
    del shapes

    backend = backend_for(cfg, info)  # the DeepSpeed JSON is built and checked here
    adapter = backend.load_model(cfg.model)  # ZeRO-3: from_pretrained partitions over the ranks while it lives
    if fixed_tokens is None:  # no processor without the weights (e.g. a hub id's remote files): check now
        fixed_tokens = check_max_length(cfg, adapter)
    trainable_names = select_trainable(adapter, cfg.model)
    model = adapter.model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    # The step count fixes the LR schedule, so the data comes before the engine; on resume the
    # iterator is rebuilt at the checkpoint's step once that has been read.
    batches, data_report = build_data(cfg, adapter, info, 0)
    total = data_report["steps"]
    kernels.set_backend(cfg.optim.kernels)
    rt = backend.build(cfg, model, params, total)
    timer = PhaseTimer(rt.device)
    pad_id = adapter.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = adapter.tokenizer.eos_token_id
    step_fn = UnlearningStep(rt.model, adapter.forward_inputs, rt.space, cfg.method, device=rt.device, dtype=dtype,
                             pad_token_id=pad_id, check_finite=cfg.optim.check_finite, timer=timer,
                             head_chunks=cfg.model.lm_head_chunks)
    start = backend.load_checkpoint(rt, run_dir, resume.tag, resume.manifest) if resume else 0
    if start:
        batches, _ = build_data(cfg, adapter, info, start)  # the data position of the checkpoint
    data_json = {**data_report, "world_size": info.world_size, "fixed_sample_tokens": fixed_tokens,
                 "unused_checkpoint_weights": adapter.loading.get("unexpected", []), "trainable": trainable_names}
    training = Training(cfg, info, run_dir, run, backend, adapter, rt, step_fn, timer, batches, data_report,
                        data_json, {}, total, start)

    training.write_data_json({"skipped": data_report["skipped"]})  # rewritten at the end with the final counts
    run.update(write_data_json=training.write_data_json, data_report=data_report, batches=batches)
    training.record = run_record(cfg, identity)
    run["summary"] = {"steps": total, "config_sha256": identity["config_sha256"],
                      "resumed_from_step": start if resume else None}
    # method.ascent_every counts optimizer steps from the run's start. The eps* kept between two ascents is not
    # in the checkpoint: a resume between two ascents computes a new direction at its first step.
    step_fn.steps_done = start
    every = cfg.method.ascent_every
    if start and every > 1 and start % every and step_fn.method.sharpness_aware:
        note = (f"resumed at step {start}, between two ascents of method.ascent_every = {every}: the first resumed "
                "step computes a new ascent direction where the uninterrupted run reused the kept eps*, so the "
                f"weights differ from it (checkpoint at a multiple of {every} steps, output.save_every, to resume "
                "exactly)")
        log.warning(note)
        run["summary"]["resume_inexact"] = note
    return training


def run_loop(tr: Training) -> None:
    """Every step of the data: the step, logging at the interval, periodic checkpoints. A non-finite stop
    saves what it can, writes data.json and summary.json and raises NonFiniteError."""
    cfg, info, rt, run, run_dir = tr.cfg, tr.info, tr.rt, tr.run, tr.run_dir
    total, start, batches, timer = tr.total, tr.start, tr.batches, tr.timer
    logger = MetricLogger(run_dir, cfg.logging, total, enabled=info.is_main)
    logger.advance(start)
    status = RUNNING
    t_last, samples_since, tokens_since = time.perf_counter(), 0, 0
    dropped_spans = tr.dropped_spans

    # A non-finite stop's fix changes the config, which a resume refuses (docs/runs.md): a new run.
    again = "run again (a new output.run_dir, or output.overwrite=true)"
    kept = "an earlier checkpoint of this run, if any, holds the weights of its step"
    try:
        for step_idx, micro in enumerate(batches, start=start + 1):
            micro = [sequences(mb) for mb in micro]
            for seq in (s for mb in micro for s in mb):
                for reason, n in (seq.dropped or {}).items():
                    if reason not in dropped_spans:
                        log.warning("spans left out of captions: %s (counted in summary.json dropped_spans_rank0)",
                                    reason)
                    dropped_spans[reason] = dropped_spans.get(reason, 0) + n
            samples_since += sum(len(mb) for mb in micro)
            tokens_since += sum(len(s.input_ids) for mb in micro for s in mb)
            lr = rt.space.lr
            metrics = tr.step_fn(micro)
            run["step"] = step_idx
            logger.advance()
            if step_idx % cfg.logging.log_every == 0 or step_idx == total:
                # The logging interval: the only place the loop waits for the device.
                metrics = mean_over_ranks(metrics)
                phases = timer.read()
                elapsed = time.perf_counter() - t_last
                n = step_idx % cfg.logging.log_every or cfg.logging.log_every
                world = info.world_size
                last = tr.last = logger.log(step_idx, {
                    **metrics, "train/lr": lr, "perf/step_time_s": elapsed / n,
                    "perf/samples_per_s": world * samples_since / elapsed,  # sequences forwarded (a caption, packed)
                    "perf/tokens_per_s": world * tokens_since / elapsed,
                    **{f"perf/phase/{k}": v / n for k, v in phases.items()},
                    "perf/peak_mem_gb": peak_memory_gb(rt.device),
                })
                t_last, samples_since, tokens_since = time.perf_counter(), 0, 0
                bad = [k for k, v in last.items() if not math.isfinite(v)]
                if bad:
                    # The bad update may already be in the weights: stop, save nothing, point at the checkpoint.
                    if cfg.optim.check_finite:
                        # Every step's gradient norm was checked finite, so the update itself (the step size)
                        # made the weights or a logged value non-finite.
                        status = CORRUPT_CHECKED
                        raise NonFiniteError(
                            f"non-finite metrics at step {step_idx} ({', '.join(bad)}) although every gradient "
                            f"norm was finite (optim.check_finite=true): the optimizer step itself (optim.lr = "
                            f"{cfg.optim.lr:g}, optim.optimizer = {cfg.optim.optimizer}) made the weights or a logged "
                            f"value non-finite, so the weights may be corrupt and are not saved ({kept}). Fix: {again} "
                            "with a lower optim.lr (1e-5 in the paper).")
                    status = CORRUPT
                    raise NonFiniteError(
                        f"non-finite metrics at step {step_idx} ({', '.join(bad)}) with optim.check_finite=false "
                        f"(no per-step check): the weights may be corrupt and are not saved ({kept}). Fix: {again} "
                        "with optim.check_finite=true and a lower optim.lr / method.lambda1 / method.rho.")
            if tr.backend.checkpoints and cfg.output.save_every and step_idx % cfg.output.save_every == 0 \
                    and step_idx != total:
                tr.backend.save_checkpoint(rt, run_dir, step_idx, tr.record)
    except NonFiniteError:
        # Raised on every rank alike (the checked norm and the logged means are global), so the
        # collectives of the save below line up. Any other exception propagates without
        # collectives, so a failing rank cannot leave the others hanging.
        status = status if status != RUNNING else REFUSED
        if status == REFUSED:  # the optimizer refused the bad update: the weights before it
            save_trainable(rt, run_dir / "trainable.safetensors", tr.backend)
        skips = _final_skips(batches, tr.data_report, cfg.data.source, complete=False)
        tr.write_data_json(skips)
        run["status"] = status  # on every rank: train() then writes no `failed` over this stop's summary
        if info.is_main:
            write_summary(run_dir, tr.summary(status, skips))
        raise
    finally:
        logger.close()


def finish_run(tr: Training) -> Path:
    """After the last step: final skip counts, trainable.safetensors, the final checkpoint, hf/, then
    summary.json `completed` once every rank's files are written. Returns the run directory."""
    cfg, info, rt, run_dir = tr.cfg, tr.info, tr.rt, tr.run_dir
    skips = _final_skips(tr.batches, tr.data_report, cfg.data.source, complete=True)
    tr.write_data_json(skips)
    save_trainable(rt, run_dir / "trainable.safetensors", tr.backend)
    if tr.backend.checkpoints and cfg.output.save_final:
        tr.backend.save_checkpoint(rt, run_dir, tr.total, tr.record)
    if cfg.output.export_hf:
        export_hf(rt, tr.adapter, run_dir / "hf", tr.backend)
    barrier()  # every rank's files are written before the run is called completed
    tr.run["status"] = COMPLETED
    if info.is_main:
        write_summary(run_dir, tr.summary(COMPLETED, skips))
    return run_dir
