"""Step benchmark: FT / EFUF / SARE x packed / unpacked per epoch of the same curated data.

    python -m sare_ds.bench                              # a few minutes on 2 CPU cores
    python -m sare_ds.bench --quick                      # a smoke run of seconds
    python -m sare_ds.bench --zero3 --json b.json --png b.png   # + ZeRO-3 gather bytes on 2 CPU ranks

The model is a randomly initialised LLaVA-1.5 of the real token structure (the `llava-1.5-7b`
preset: CLIP preprocessing at 336 px, patch 14 -> 576 image tokens, the 32,064-piece vocabulary,
LLaVA-1.5's chat template and EFUF's caption prompt) with a configurable LLM width / depth and
vision tower. The data are generated captions (`--words` words, `--objects` object spans a
caption, `--neg-share` of the spans hallucinated; a caption without a neg span is also a sent
sample), built as `Caption` records with random images, so packed and unpacked training see the
same curated samples.

What is measured, with the library's own code paths (`tokenize_caption`, `UnlearningStep`,
`PlainParameterSpace`, the step's `PhaseTimer`; under `--zero3` the DeepSpeed backend's build and the ZeRO-3
parameter space):
- the wall time of one EPOCH over the captions per configuration, repetitions interleaved step by
  step (step 1 of A, B, C, step 2 of A, B, C, ...: every configuration runs the same steps), medians,
  and ratios taken per repetition then the median;
- per-phase medians (the step's PhaseTimer);
- tokens forwarded per curated sample (every position of every forward, padding included, over
  the epoch, divided by the curated samples: pos + neg spans + sent responses), which sets the
  token floor of each configuration;
- the peak memory of the loss path (LM head + NLL + its backward, from the final hidden states)
  with today's per-sample path (`per_sample_nll`: fp32 logits over the vocabulary at every
  position) and the labelled-only head (`span_sums` on the kept positions), by torch's profiler;
- with `--zero3`: the bytes of every parameter all-gather per optimizer step, FT / EFUF / SARE
  packed and unpacked, ZeRO-3 on 2 CPU ranks (gloo) started with the deepspeed launcher, counted by
  wrapping torch.distributed's collectives (DeepSpeed's stage-3 fetch goes through
  `deepspeed.comm.allgather_fn` -> `all_gather_into_tensor`), per phase and forward / backward, in
  several settings (partitioned ZeRO-3, reuse distance 0, persistence budgets, ZeRO++ hpZ, ZeRO-2),
  and what the trainable weights are in SARE's perturbed forward (it must see all of eps*).

Results: JSON (`--json`), a PNG chart (`--png`), and a table on stdout. docs/performance.md has the
figures of one run and the commands.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

import sare_ds  # noqa: F401  (torchvision guard before transformers)

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Please describe the image in great detail. Your response should have at least 100 words."
PRESET = "llava-1.5-7b"
LLAMA_MLP_RATIO = 11008 / 4096  # Llama-2's intermediate / hidden
METHODS = ("ft", "efuf", "sare")

# Words of the generated captions: single pieces of the preset's tokenizer, none of them an object.
FILLER = (
    "the a of with on in near next to and its some two three large small white black red blue green brown wooden "
    "metal old young bright dark sunny open street room wall floor grass water sky light shadow corner side front "
    "back left right top middle area scene view shows appears standing sitting lying resting parked placed visible "
    "there is are also which while under over behind beside along across around quiet busy warm soft tall short "
    "round flat clean empty full window door road field tree building fence path hill house garden"
).split()
OBJECTS = (
    "dog cat car bird cup chair person bicycle bus truck boat horse sheep cow elephant bear zebra giraffe umbrella "
    "kite bottle bowl banana apple orange pizza cake couch laptop clock vase book train airplane motorcycle bench"
).split()
PRESENT_SCORE, ABSENT_SCORE = 35.0, 15.0  # CLIP scores (100 x cosine) on either side of EFUF's thresholds


# ------------------------------------------------------------------------------ model

@dataclass
class ModelShape:
    text_hidden: int = 256
    text_layers: int = 4
    text_intermediate: int = 0  # 0: Llama's ratio to the width
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_intermediate: int = 0  # 0: CLIP's 4 x width
    image_size: int = 336  # CLIP-L/14-336 preprocessing; (image_size // 14)^2 image tokens

    def spec(self) -> str:
        th, vh = self.text_hidden, self.vision_hidden
        ti = self.text_intermediate or int(round(th * LLAMA_MLP_RATIO))
        vi = self.vision_intermediate or 4 * vh
        heads, vheads = max(1, th // 64), max(1, vh // 32)
        return (f"preset:{PRESET},text_layers={self.text_layers},text_hidden={th},text_intermediate={ti},"
                f"text_heads={heads},text_kv_heads={heads},vision_layers={self.vision_layers},vision_hidden={vh},"
                f"vision_intermediate={vi},vision_heads={vheads}")


def build_adapter(shape: ModelShape, dtype: torch.dtype = torch.float32):
    """The preset's adapter at `shape` (random weights, fixed seed), projector trainable, rest frozen.
    Under a live HfDeepSpeedConfig (ZeRO-3) the model is built partitioned (as load_mllm does)."""
    from sare_ds.config import ModelConfig
    from sare_ds.models import presets, resolve_adapter, select_trainable

    spec = shape.spec()
    config = presets.hf_config(spec)
    if shape.image_size != config.vision_config.image_size:
        config.vision_config.image_size = shape.image_size
        config.image_seq_length = (shape.image_size // config.vision_config.patch_size) ** 2
    processor = presets.build_processor(spec, config)
    model_cfg = ModelConfig(name_or_path=spec, dtype={torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype])
    adapter = resolve_adapter(model_cfg).from_config(config, processor, dtype, spec, attn_implementation="sdpa")
    select_trainable(adapter, model_cfg)
    return adapter


def model_facts(adapter) -> dict:
    m = adapter.model
    numel = lambda p: p.ds_numel if hasattr(p, "ds_numel") else p.numel()  # noqa: E731
    total = sum(numel(p) for p in m.parameters())
    trainable = sum(numel(p) for p in m.parameters() if p.requires_grad)
    vision = sum(numel(p) for n, p in m.named_parameters() if "vision_tower" in n)
    cfg = m.config
    return {"spec": adapter.source, "parameters": total, "trainable": trainable, "vision_tower": vision,
            "llm": total - trainable - vision, "vocab": cfg.text_config.vocab_size,
            "text_hidden": cfg.text_config.hidden_size, "text_layers": cfg.text_config.num_hidden_layers,
            "vision_hidden": cfg.vision_config.hidden_size, "vision_layers": cfg.vision_config.num_hidden_layers,
            "image_size": cfg.vision_config.image_size,
            "image_tokens": (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2}


# ------------------------------------------------------------------------------ data

def caption_texts(n: int, words: int, objects: int, seed: int) -> list[tuple[str, list[str]]]:
    """n (text, objects) pairs of `words` words: "The image shows", then fragments of 4-10 filler words
    separated by `,` / `.`, `objects` of them naming one distinct object each ("a dog"; EFUF's
    sub-sentence of that object is its fragment)."""
    rng = random.Random(seed)
    if objects > len(OBJECTS):
        raise ValueError(f"--objects {objects}: at most {len(OBJECTS)}")
    filler = max(objects, words - 3 - 2 * objects)  # "The image shows" and "a <object>" are words too
    out = []
    for _ in range(n):
        lengths = []
        while sum(lengths) < filler:
            lengths.append(rng.randint(4, 10))
        lengths[-1] -= sum(lengths) - filler  # the overshoot is less than the last fragment
        while len(lengths) < objects:  # short captions with many objects: more, shorter fragments
            i = max(range(len(lengths)), key=lengths.__getitem__)
            half = lengths[i] // 2
            lengths[i:i + 1] = [max(1, half), max(1, lengths[i] - half)]
        names = rng.sample(OBJECTS, objects)
        holders = dict(zip(sorted(rng.sample(range(len(lengths)), objects)), names))
        parts = []
        for i, length in enumerate(lengths):
            ws = [rng.choice(FILLER) for _ in range(length)]
            if i in holders:
                ws.insert(rng.randint(0, len(ws)), f"a {holders[i]}")
            if i == 0:
                ws = ["The", "image", "shows"] + ws
            sep = "." if (i + 1) % 3 == 0 or i == len(lengths) - 1 else ","
            parts.append(" ".join(ws) + sep)
        out.append((" ".join(parts), [holders[i] for i in sorted(holders)]))
    return out


def negs_per_caption(n: int, objects: int, neg_share: float) -> list[int]:
    """Neg spans of each of n captions: round(neg_share * n * objects) in all, spread evenly."""
    total = min(n * objects, int(round(neg_share * n * objects)))
    return [min(objects, total * (i + 1) // n - total * i // n) for i in range(n)]


def synthetic_captions(n: int = 8, words: int = 90, objects: int = 5, neg_share: float = 0.2, *,
                       image_size: int = 336, seed: int = 0, prompt: str = PROMPT):
    """Caption records with random images: the same texts and objects for a seed whatever the neg
    share; which spans are neg is drawn per caption (`negs_per_caption`). A caption with no neg span
    is also a sent sample (D_sent needs every object score above T1)."""
    import numpy as np
    from PIL import Image

    from sare_ds.data.samples import Caption, Span
    from sare_ds.data.subsentence import object_span

    texts = caption_texts(n, words, objects, seed)
    counts = negs_per_caption(n, objects, neg_share)
    rng = random.Random(seed + 1)
    pixels = np.random.default_rng(seed)
    captions = []
    for idx, ((text, names), n_neg) in enumerate(zip(texts, counts)):
        neg = set(rng.sample(range(len(names)), n_neg))
        spans = []
        for j, name in enumerate(names):
            context, target = object_span(text, name)
            kind = "neg" if j in neg else "pos"
            spans.append(Span(len(context), len(context) + len(target), kind, name,
                              ABSENT_SCORE if kind == "neg" else PRESENT_SCORE))
        image = Image.fromarray(pixels.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8))
        captions.append(Caption(image, prompt, text, spans, sent=not neg, sent_score=PRESENT_SCORE,
                                sent_min_score=PRESENT_SCORE, image_id=f"bench-{idx:04d}"))
    return captions


def curated_samples(captions) -> dict[str, int]:
    """The curated samples of the captions by kind (EFUF's unit: a span, or a whole response)."""
    out = {"pos": 0, "neg": 0, "sent": 0}
    for c in captions:
        for k, v in c.kind_counts().items():
            out[k] += v
    return out


def tokenize(captions, adapter, method: str, packing: bool, max_length: int):
    """Per caption, the sequences the method trains on (one packed, or one per sample); skips counted."""
    from sare_ds.data.samples import BadSampleError
    from sare_ds.data.tokenize import tokenize_caption
    from sare_ds.methods import get_method

    kinds = get_method(method).kinds
    out, skipped = [], {}
    for c in captions:
        try:
            out.append(tokenize_caption(c, adapter, max_length, packing=packing, kinds=kinds))
        except BadSampleError as e:
            skipped[e.reason] = skipped.get(e.reason, 0) + 1
    return out, skipped


def schedule(tokenized, captions_per_step: int, micro_captions: int):
    """Optimizer steps -> micro-batches -> sequences: `captions_per_step` captions a step, the
    sequences of `micro_captions` captions collated into one micro-batch (as the trainer does)."""
    steps = []
    for i in range(0, len(tokenized), captions_per_step):
        group = tokenized[i:i + captions_per_step]
        steps.append([[s for cap in group[j:j + micro_captions] for s in cap]
                      for j in range(0, len(group), micro_captions)])
    return steps


# ------------------------------------------------------------------------------ counting

class ForwardCounter:
    """Counts what the model forwards: calls, positions (padding included), real tokens; `head`, the
    positions the LM head computes logits for, is added by the Runner from its step's own count."""

    def __init__(self):
        self.reset()

    @contextmanager
    def attached(self, model, reset: bool = True):
        """Count the forwards of `model` inside the block (counters reset on entry unless reset=False)."""
        if reset:
            self.reset()
        handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)
        try:
            yield self
        finally:
            handle.remove()

    def reset(self):
        self.forwards = self.positions = self.real = self.head = 0

    def _hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return
        mask = kwargs.get("attention_mask")
        self.forwards += 1
        self.positions += ids.numel()
        self.real += int(mask.sum()) if mask is not None else ids.numel()

    def read(self) -> dict[str, int]:
        return {"forwards": self.forwards, "positions": self.positions, "real": self.real, "head": self.head}


def hand_count(steps, method: str) -> int:
    """Positions the one-process step forwards over `steps`, counted from the sequences' loss weights
    alone: per micro-batch and pass, rows x (the last weighted position of the pass's kinds + 1)."""
    from sare_ds.data.samples import KIND_INDEX
    from sare_ds.methods import get_method

    m = get_method(method)
    passes = [tuple(dict.fromkeys([*m.sharp, *m.at_theta]))]  # one forward at theta (shared when sharp)
    if m.sharp:
        passes.append(tuple(m.sharp))  # the perturbed pass: the sharp kinds only

    def last(seq, kinds):
        rows = seq.weights[[KIND_INDEX[k] for k in kinds]].sum(0)
        hit = [t for t in range(rows.numel()) if rows[t] != 0]
        return hit[-1] if hit else -1

    total = 0
    for micro in steps:
        for items in micro:
            for kinds in passes:
                ends = [last(s, kinds) for s in items]
                rows = [e for e in ends if e >= 0]
                if rows:
                    total += len(rows) * (max(rows) + 1)
    return total


# ------------------------------------------------------------------------------ memory

def profiled_peak_bytes(fn) -> int:
    """Peak bytes allocated above the level at entry while `fn` runs (CPU allocator, torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    mem = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    if not mem:
        return 0
    base = mem[0]["args"]["Total Allocated"] - mem[0]["args"]["Bytes"]
    return int(max(e["args"]["Total Allocated"] for e in mem) - base)


def loss_path_memory(adapter, seq, chunks: int = 8) -> dict:
    """Peak bytes of the loss path of one sequence (from its final hidden states: LM head, NLL, backward
    to the hidden states) with the full-vocabulary per-sample NLL (the old path), the labelled-only head
    in one piece, and the labelled-only head in `chunks` chunks (what training runs)."""
    from sare_ds.data.samples import KINDS
    from sare_ds.data.tokenize import collate_captions
    from sare_ds.train.losses import chunked_span_sums, per_sample_nll, span_sums

    head = adapter.model.get_output_embeddings()
    vocab, hidden = head.weight.shape
    batch = collate_captions([seq], adapter.tokenizer.pad_token_id, KINDS, trim=False)
    t = batch["input_ids"].shape[1]
    g = torch.Generator().manual_seed(0)
    h0 = torch.randn(1, t, hidden, generator=g, dtype=head.weight.dtype)
    labels = seq.labels[None, :t]

    def full():
        h = h0.clone().requires_grad_()
        per_sample_nll(head(h), labels).sum().backward()

    def kept():
        h = h0.clone().requires_grad_()
        span_sums(head(h[:, batch["keep"]]), batch["targets"], batch["weights"]).sum().backward()

    def chunked():
        h = h0.clone().requires_grad_()
        chunked_span_sums(head, h[:, batch["keep"]], batch["targets"], batch["weights"], chunks).sum().backward()

    k = int(batch["keep"].numel())
    esize = torch.finfo(torch.float32).bits // 8
    out = {"positions": t, "labelled": k, "vocab": vocab,
           "full_logits_bytes": t * vocab * esize, "kept_logits_bytes": k * vocab * esize,
           "full_peak_bytes": profiled_peak_bytes(full), "kept_peak_bytes": profiled_peak_bytes(kept),
           "chunks": chunks, "chunked_peak_bytes": profiled_peak_bytes(chunked)}
    out["peak_ratio"] = out["kept_peak_bytes"] / max(1, out["full_peak_bytes"])
    out["chunked_peak_ratio"] = out["chunked_peak_bytes"] / max(1, out["full_peak_bytes"])
    return out


# ------------------------------------------------------------------------------ timing

@dataclass
class Config:
    method: str
    packing: bool
    full_head: bool = False  # the LM head at every position (EFUF's code), not the labelled ones only
    rho_mode: str = "absolute"  # SARE's variants (method.rho_mode, method.ascent_every)
    ascent_every: int = 1

    @property
    def name(self) -> str:
        variant = ("+adaptive" if self.rho_mode == "adaptive" else "") + (
            f"+every{self.ascent_every}" if self.ascent_every > 1 else "")
        return (f"{self.method}/{'packed' if self.packing else 'unpacked'}{'+fullhead' if self.full_head else ''}"
                f"{variant}")


# SARE's variants timed beside the paper's step (docs/toy_world.md: what they buy in flatness).
VARIANTS = (Config("sare", True, rho_mode="adaptive"), Config("sare", True, ascent_every=2),
            Config("sare", True, ascent_every=4))


class Runner:
    """One configuration's step over the shared model: its own optimizer, space, timer and data."""

    def __init__(self, adapter, cfg: Config, captions, args):
        from sare_ds.config import MethodConfig
        from sare_ds.train.params import PlainParameterSpace
        from sare_ds.train.step import UnlearningStep
        from sare_ds.train.timing import PhaseTimer

        self.cfg = cfg
        params = [p for p in adapter.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.05)
        self.timer = PhaseTimer(torch.device("cpu"))
        self.step = UnlearningStep(adapter.model, adapter.forward_inputs, PlainParameterSpace(params, optimizer),
                                   MethodConfig(name=cfg.method, rho_mode=cfg.rho_mode, ascent_every=cfg.ascent_every),
                                   device=torch.device("cpu"), dtype=torch.float32,
                                   pad_token_id=adapter.tokenizer.pad_token_id, timer=self.timer,
                                   keep_logits=not cfg.full_head, head_chunks=args.head_chunks)
        tokenized, self.skipped = tokenize(captions, adapter, cfg.method, cfg.packing, args.max_length)
        self.steps = schedule(tokenized, args.captions_per_step, args.micro_captions)
        self.sequences = sum(len(s) for s in tokenized)
        self.counter = ForwardCounter()
        self.tokens = None

    def run_step(self, model, i: int) -> float:
        """Optimizer step i of the epoch; its wall time (forwards counted, phases kept in the timer)."""
        head = self.step.head_positions
        with self.counter.attached(model, reset=False):
            t0 = time.perf_counter()
            self.step(self.steps[i])
            dt = time.perf_counter() - t0
        self.counter.head += self.step.head_positions - head
        return dt

    def epoch(self, model) -> tuple[float, dict[str, float]]:
        """One whole epoch on its own (not interleaved); its wall time and phases."""
        self.timer.read()
        self.counter.reset()
        dt = sum(self.run_step(model, i) for i in range(len(self.steps)))
        self.tokens = self.counter.read()
        return dt, self.timer.read()


def _stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "reps": xs}


def interleaved(adapter, runners: list[Runner], reps: int, log) -> dict[str, dict]:
    """A warm-up step of each configuration, then `reps` epochs of each, interleaved step by step:
    step 1 of A, of B, of C, step 2 of A, ... (every configuration has the same steps: the same
    captions a step), so the configurations compared share the machine's state at every moment."""
    model = adapter.model
    n_steps = {len(r.steps) for r in runners}
    if len(n_steps) != 1:
        raise RuntimeError(f"configurations with different step counts {n_steps}: a caption was skipped")
    n_steps = n_steps.pop()
    for r in runners:
        r.run_step(model, 0)
        r.timer.read()
    times = {r.cfg.name: [] for r in runners}
    phases = {r.cfg.name: {} for r in runners}
    for rep in range(reps):
        spent = {r.cfg.name: 0.0 for r in runners}
        for r in runners:
            r.counter.reset()
        for i in range(n_steps):
            for r in runners:
                spent[r.cfg.name] += r.run_step(model, i)
        for r in runners:
            r.tokens = r.counter.read()
            times[r.cfg.name].append(spent[r.cfg.name])
            for k, v in r.timer.read().items():
                phases[r.cfg.name].setdefault(k, []).append(v)
        log(f"  rep {rep + 1}/{reps}: " + ", ".join(f"{n} {t:.2f} s" for n, t in spent.items()))
    return {name: {"epoch_s": _stats(ts), "phases_s": {k: statistics.median(v) for k, v in phases[name].items()}}
            for name, ts in times.items()}


def ratio(results: dict, a: str, b: str) -> dict:
    """a / b per repetition (neighbours in time), then median, min and max over repetitions."""
    xs = [x / y for x, y in zip(results[a]["epoch_s"]["reps"], results[b]["epoch_s"]["reps"])]
    return {**_stats(xs), "of": f"{a} / {b}"}


def run_timing(args, log) -> dict:
    torch.manual_seed(args.seed)
    shape = ModelShape(args.text_hidden, args.text_layers, args.text_intermediate, args.vision_hidden,
                       args.vision_layers, 0, args.image_size)
    adapter = build_adapter(shape)
    adapter.model.train()
    facts = model_facts(adapter)
    log(f"model: {facts['parameters'] / 1e6:.1f}M parameters (LLM {facts['llm'] / 1e6:.1f}M, vision "
        f"{facts['vision_tower'] / 1e6:.2f}M, projector {facts['trainable'] / 1e6:.2f}M), vocabulary {facts['vocab']}, "
        f"{facts['image_tokens']} image tokens")
    captions = synthetic_captions(args.captions, args.words, args.objects, args.neg_share,
                                  image_size=args.image_size, seed=args.seed)
    samples = curated_samples(captions)
    n_samples = sum(samples.values())

    # The order puts SARE packed between the two EFUF baselines it is compared with.
    configs = [Config("ft", True), Config("ft", False), Config("efuf", False, full_head=True), Config("efuf", False),
               Config("sare", True), Config("efuf", True), Config("sare", False), *VARIANTS]
    runners = [Runner(adapter, c, captions, args) for c in configs]
    log(f"timing {len(configs)} configurations x {args.reps} repetitions, {args.captions} captions an epoch "
        f"({samples}), neg share {args.neg_share}")
    results = interleaved(adapter, runners, args.reps, log)
    for r in runners:
        tok = r.tokens
        results[r.cfg.name].update({
            "method": r.cfg.method, "packing": r.cfg.packing, "full_head": r.cfg.full_head,
            "steps": len(r.steps), "sequences": r.sequences, "skipped": r.skipped, "tokens": tok,
            "tokens_per_curated_sample": tok["positions"] / n_samples,
            "real_tokens_per_curated_sample": tok["real"] / n_samples,
            "head_positions_per_curated_sample": tok["head"] / n_samples,
            "hand_count_positions": hand_count(r.steps, r.cfg.method)})
    ratios = {key: ratio(results, a, b) for key, (a, b) in {
        "sare_packed/efuf_unpacked": ("sare/packed", "efuf/unpacked"),
        "sare_packed/efuf_unpacked_fullhead": ("sare/packed", "efuf/unpacked+fullhead"),
        "sare_packed/efuf_packed": ("sare/packed", "efuf/packed"),
        "sare_unpacked/efuf_unpacked": ("sare/unpacked", "efuf/unpacked"),
        "efuf_packed/efuf_unpacked": ("efuf/packed", "efuf/unpacked"),
        "ft_packed/ft_unpacked": ("ft/packed", "ft/unpacked"),
        "efuf_unpacked/efuf_unpacked_fullhead": ("efuf/unpacked", "efuf/unpacked+fullhead"),
        **{f"{v.name.replace('/', '_')}/efuf_packed": (v.name, "efuf/packed") for v in VARIANTS},
        **{f"{v.name.replace('/', '_')}/sare_packed": (v.name, "sare/packed") for v in VARIANTS},
    }.items()}

    sweep = []
    for share in args.sweep:
        if abs(share - args.neg_share) < 1e-9:
            sub, caps = results, captions
        else:
            caps = synthetic_captions(args.captions, args.words, args.objects, share, image_size=args.image_size,
                                      seed=args.seed)
            pair = [Runner(adapter, Config(m, True), caps, args) for m in ("sare", "efuf")]
            log(f"neg share {share}:")
            sub = interleaved(adapter, pair, args.reps, log)
            for r in pair:
                sub[r.cfg.name]["tokens_per_curated_sample"] = r.tokens["positions"] / sum(curated_samples(caps).values())
        sweep.append({"neg_share": share, "samples": curated_samples(caps),
                      "negs_per_caption": statistics.mean(negs_per_caption(args.captions, args.objects, share)),
                      "sare_packed_s": sub["sare/packed"]["epoch_s"]["median"],
                      "efuf_packed_s": sub["efuf/packed"]["epoch_s"]["median"],
                      "sare_packed/efuf_packed": ratio(sub, "sare/packed", "efuf/packed"),
                      "tokens_per_curated_sample": {k: sub[k]["tokens_per_curated_sample"]
                                                    for k in ("sare/packed", "efuf/packed")}})

    first = tokenize(captions[:1], adapter, "efuf", True, args.max_length)[0][0][0]
    longest = max(tokenize(captions[:1], adapter, "efuf", False, args.max_length)[0][0],
                  key=lambda s: len(s.input_ids))
    log("loss-path memory (torch profiler) ...")
    sent_caption = synthetic_captions(1, args.words, args.objects, 0.0, image_size=args.image_size, seed=args.seed)
    whole = tokenize(sent_caption, adapter, "efuf", True, args.max_length)[0][0][0]
    chunks = args.head_chunks or 8
    memory = {"packed_caption": loss_path_memory(adapter, first, chunks),
              "unpacked_sample": loss_path_memory(adapter, longest, chunks),
              "packed_sent_caption": loss_path_memory(adapter, whole, chunks)}
    memory["packed_kept/unpacked_full"] = memory["packed_caption"]["kept_peak_bytes"] / max(
        1, memory["unpacked_sample"]["full_peak_bytes"])
    return {"model": facts, "data": {"captions": args.captions, "words": args.words, "objects": args.objects,
                                     "neg_share": args.neg_share, "samples": samples, "curated_samples": n_samples,
                                     "prompt": PROMPT},
            "schedule": {"captions_per_step": args.captions_per_step, "micro_captions": args.micro_captions,
                         "reps": args.reps, "max_length": args.max_length},
            "configs": results, "ratios": ratios, "neg_share_sweep": sweep, "memory": memory}


# ------------------------------------------------------------------------------ ZeRO-3 traffic

_GATHER = ("all_gather_into_tensor", "_all_gather_base", "all_gather", "all_gather_coalesced",
           "all_gather_into_tensor_coalesced")
_REDUCE = ("all_reduce", "reduce_scatter_tensor", "_reduce_scatter_base", "reduce_scatter", "all_reduce_coalesced",
           "reduce", "broadcast")


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return 0


class CommCounter:
    """Bytes of torch.distributed collectives by (phase, region, kind), installed before DeepSpeed
    initialises its backend (which keeps references to these functions). A gather counts its output
    (the full tensors materialised), a reduction its input; nested calls count once. Kinds: `gather`
    (over the data-parallel group), `gather_hpz` (ZeRO++ hpZ's secondary partition, inside a node),
    `reduce` (all-reduce, reduce-scatter, broadcast)."""

    def __init__(self):
        self.bytes: dict[tuple[str, str, str], int] = {}
        self.calls: dict[tuple[str, str, str], int] = {}
        self.phase, self.region = "setup", "-"
        self.enabled = False
        self._depth = threading.local()

    def install(self) -> None:
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        for kind, names in (("gather", _GATHER), ("reduce", _REDUCE)):
            for name in names:
                original = getattr(c10d, name, None)
                if original is None:
                    continue
                wrapped = self._wrap(original, kind, name)
                for ns in (dist, c10d):
                    if getattr(ns, name, None) is original:
                        setattr(ns, name, wrapped)

    def _wrap(self, fn, kind: str, name: str):
        counter = self

        def wrapper(*args, **kwargs):
            depth = getattr(counter._depth, "n", 0)
            if depth == 0 and counter.enabled:
                if kind == "gather":
                    out = kwargs.get("output_tensor", kwargs.get("tensor_list", kwargs.get("output_tensors",
                                                                                          args[0] if args else None)))
                else:
                    scatter = "reduce_scatter" in name and len(args) > 1
                    out = kwargs.get("tensor", kwargs.get("input", args[1] if scatter else (args[0] if args else None)))
                group = kwargs.get("group", args[2] if name in ("all_gather_into_tensor", "_all_gather_base",
                                                                   "all_gather") and len(args) > 2 else None)
                sub = kind
                if kind == "gather" and group is not None and group is counter.secondary_group():
                    sub = "gather_hpz"  # ZeRO++ hpZ: from the secondary partition, inside the node
                key = (counter.phase, counter.region, sub)
                counter.bytes[key] = counter.bytes.get(key, 0) + _nbytes(out)
                counter.calls[key] = counter.calls.get(key, 0) + 1
            counter._depth.n = depth + 1
            try:
                return fn(*args, **kwargs)
            finally:
                counter._depth.n = depth

        wrapper.__wrapped__ = fn
        return wrapper

    @staticmethod
    def secondary_group():
        try:
            from deepspeed.utils import groups

            return groups._ZERO_PARAM_INTRA_PARALLEL_GROUP
        except ImportError:
            return None

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()

    def snapshot(self) -> dict:
        return {"bytes": {"|".join(k): v for k, v in self.bytes.items()},
                "calls": {"|".join(k): v for k, v in self.calls.items()}}


class PerturbationProbe:
    """What the trainable weights are in the first forward of SARE's passes (hooks on the modules that own
    them, after DeepSpeed gathered them): the perturbed pass must see theta + eps*, the capability pass
    theta. `result` is ||w(neg_at_eps) - w(at theta)|| / eps_norm (1: the forward sees the whole
    perturbation, 0: none of it) and, in the separate-pass schedule, ||w(capability) - w(neg_at_theta)||
    (0: restored; the shared schedule has no forward after the restore, tests/zero_worker.py checks it
    bitwise)."""

    def __init__(self, module, counter: CommCounter):
        self.counter, self.armed, self.seen = counter, False, {}
        owners = [m for m in module.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
        self.hooks = [m.register_forward_pre_hook(self._hook) for m in owners]

    def _hook(self, mod, _args):
        if not self.armed:
            return
        slot = self.seen.setdefault(self.counter.phase, {})
        for name, p in mod.named_parameters(recurse=False):
            if p.requires_grad and (id(mod), name) not in slot:
                slot[(id(mod), name)] = p.data.detach().float().clone()

    def result(self, metrics: dict) -> dict | None:
        a = self.seen.get("neg_at_theta") or self.seen.get("theta")
        b, c = self.seen.get("neg_at_eps"), self.seen.get("capability")
        if not (a and b) or not metrics.get("sam/eps_norm"):
            return None

        def dist(x, y):
            return math.sqrt(sum(float((x[k] - y[k]).double().pow(2).sum()) for k in x if k in y))

        # Each rank sees its own gathered copy: the full perturbation over all trainable elements.
        return {"eps_seen/eps_norm": dist(b, a) / float(metrics["sam/eps_norm"]), "restored_distance": dist(c, a) if c else None,
                "eps_norm": float(metrics["sam/eps_norm"])}


def _zero_variants(args, vector_threshold: int) -> list[dict]:
    """(name, ds_config file, zero_optimization overrides, configurations) of the 2-rank measurement."""
    combos = [(m, p) for m in METHODS for p in (True, False)]
    z3 = str(ROOT / "ds_configs/zero3_cpu_fp32.json")
    z2 = str(ROOT / "ds_configs/zero2_cpu_fp32.json")
    base = {"stage3_param_persistence_threshold": vector_threshold}
    variants = [
        {"name": "zero3", "file": z3, "zero": dict(base), "combos": combos,
         "about": "ds_configs/zero3_cpu_fp32.json; matrices partitioned, vectors persistent (as 7B at 1e5)"},
        {"name": "zero3-separate", "file": z3, "zero": dict(base), "combos": [("efuf", True), ("sare", True)],
         "overrides": ["distributed.zero3_shared_forward=false"],
         "about": "SARE as three separate passes (no direction buffer; what ZeRO-3 ran before the shared forward)"},
        {"name": "zero3-reuse0", "file": z3, "zero": {**base, "stage3_max_reuse_distance": 0,
                                                      "stage3_prefetch_bucket_size": 0},
         "combos": [("efuf", True), ("sare", True)],
         "about": "every module releases its parameters after use: the backward gathers again"},
        {"name": "zero3-persist25", "file": z3, "zero": {"stage3_param_persistence_threshold": 10 ** 12,
                                                         "stage3_model_persistence_threshold": "0.25"},
         "combos": [("efuf", True), ("sare", True)],
         "about": "a quarter of the weights persistent (kept gathered; re-gathered once after each optimizer step)"},
        {"name": "zero3-persist50", "file": z3, "zero": {"stage3_param_persistence_threshold": 10 ** 12,
                                                         "stage3_model_persistence_threshold": "0.5"},
         "combos": [("efuf", True), ("sare", True)],
         "about": "half of the weights persistent"},
        {"name": "zero3-allpersist", "file": z3, "zero": {"stage3_param_persistence_threshold": 10 ** 12,
                                                          "stage3_model_persistence_threshold": 10 ** 12},
         "combos": [("efuf", True), ("sare", True)],
         "about": "every parameter persistent (gathered once, kept): ZeRO-2's weight memory"},
        {"name": "zero3-hpz2", "file": z3, "zero": {**base, "zero_hpz_partition_size": 2},
         "combos": [("efuf", True), ("sare", True)],
         "about": "ZeRO++ hpZ, secondary partition over both ranks (one 'node')"},
        {"name": "zero2", "file": z2, "zero": {}, "combos": [("efuf", True), ("sare", True)],
         "about": "ds_configs/zero2_cpu_fp32.json: weights replicated"},
    ]
    if args.quick or args.quick_zero:
        variants = [v for v in variants if v["name"] in ("zero3", "zero3-hpz2")]
        variants[0]["combos"] = [("efuf", True), ("sare", True), ("efuf", False), ("sare", False)]
    return variants


def model_numel(shape: ModelShape) -> int:
    """Parameters of the model at `shape`, from its config on the meta device (nothing allocated)."""
    from sare_ds.models import presets
    from transformers import LlavaForConditionalGeneration

    config = presets.hf_config(shape.spec())
    if shape.image_size != config.vision_config.image_size:
        config.vision_config.image_size = shape.image_size
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    return sum(p.numel() for p in model.parameters())


def _vector_threshold(shape: ModelShape) -> int:
    """The largest 1-D parameter of the model: persistent below it keeps vectors whole and partitions
    every matrix, as ZeRO-3's default 1e5 does on a 7B model."""
    th, vh = shape.text_hidden, shape.vision_hidden
    return max(int(round(th * LLAMA_MLP_RATIO)) if not shape.text_intermediate else shape.text_intermediate,
               4 * vh, th, vh) + 1


def zero3_worker(args) -> None:
    """One rank of the 2-rank measurement (started by `run_zero3` through the deepspeed launcher)."""
    counter = CommCounter()
    counter.install()
    from sare_ds.config import load_config
    from sare_ds.dist import init_distributed
    from sare_ds.train.backend import DeepSpeedBackend
    from sare_ds.train.ds_config import build_ds_config
    from sare_ds.train.step import UnlearningStep
    from sare_ds.train.timing import PhaseTimer

    from deepspeed.utils import groups as ds_groups

    info = init_distributed("gloo")
    shape = ModelShape(args.text_hidden, args.text_layers, args.text_intermediate, args.vision_hidden,
                       args.vision_layers, 0, args.image_size)
    per_rank = args.captions_per_step
    steps_total = args.zero_warmup + args.zero_steps
    captions = synthetic_captions(per_rank * steps_total * info.world_size, args.words, args.objects, args.neg_share,
                                  image_size=args.image_size, seed=args.seed)
    mine = captions[info.rank::info.world_size]

    class CountingTimer(PhaseTimer):
        @contextmanager
        def __call__(self, name):
            counter.phase, counter.region = name, "-"
            with PhaseTimer.__call__(self, name):
                yield
            counter.phase, counter.region = "between", "-"

    out = {"world_size": info.world_size, "captions_per_rank_step": per_rank, "runs": []}
    for variant in _zero_variants(args, _vector_threshold(shape)):
        for method, packing in variant["combos"]:
            cfg = load_config(None, ["model.dtype=float32", f"distributed.ds_config={variant['file']}",
                                     f"method.name={method}", f"data.packing={str(packing).lower()}",
                                     f"data.captions_per_step={per_rank}", "optim.clip_grad_norm=0.0",
                                     *variant.get("overrides", [])])
            ds = build_ds_config(cfg, info.world_size, False)
            zero = dict(variant["zero"])
            if isinstance(zero.get("stage3_model_persistence_threshold"), str):  # a share of the model's parameters
                zero["stage3_model_persistence_threshold"] = int(float(zero["stage3_model_persistence_threshold"])
                                                                 * model_numel(shape))
            ds["zero_optimization"].update(zero)
            backend = DeepSpeedBackend(ds, info)  # the trainer's build (sare_ds.train.backend)
            backend.before_model_load()  # ZeRO-3: the model is built under zero.Init while `backend` lives
            # zero.Init creates hpZ's intra-node group and refuses a second one in the process (a training
            # run builds one model): forget the previous model's group before building the next.
            ds_groups._ZERO_PARAM_INTRA_PARALLEL_GROUP = None
            counter.enabled = False
            adapter = build_adapter(shape)
            adapter.model.train()
            facts = model_facts(adapter)
            params = [p for p in adapter.model.parameters() if p.requires_grad]
            rt = backend.build(cfg, adapter.model, params, steps_total)
            timer = CountingTimer(rt.device)
            step = UnlearningStep(rt.model, adapter.forward_inputs, rt.space, cfg.method, device=rt.device,
                                  dtype=torch.float32, pad_token_id=adapter.tokenizer.pad_token_id, timer=timer,
                                  head_chunks=args.head_chunks)
            module = rt.engine.module
            # Ahead of DeepSpeed's own hooks: its pre-forward hook already fetches (prefetches) weights.
            hooks = [module.register_forward_pre_hook(lambda *_: setattr(counter, "region", "forward"), prepend=True),
                     module.register_forward_hook(lambda *_: setattr(counter, "region", "backward"), prepend=True)]
            probe = PerturbationProbe(module, counter)
            hooks += probe.hooks
            tokenized, _ = tokenize(mine, adapter, method, packing, args.max_length)
            steps = schedule(tokenized, per_rank, per_rank)[:steps_total]
            if len(steps) < steps_total:
                raise RuntimeError(f"{len(steps)} steps of data for {steps_total}: a caption was skipped")
            metrics = []
            per_step = []
            for i, micro in enumerate(steps):
                counter.reset()
                counter.enabled = i >= args.zero_warmup
                counter.phase, counter.region = "between", "-"
                probe.armed = i == args.zero_warmup and method == "sare"
                m = step(micro)
                probe.armed = False
                timer.read()
                if counter.enabled:
                    per_step.append(counter.snapshot())
                    metrics.append({k: float(v) for k, v in m.items()})
            counter.enabled = False
            for h in hooks:
                h.remove()
            run = {"variant": variant["name"], "about": variant["about"], "method": method, "packing": packing,
                   "model": facts, "steps": per_step, "metrics": metrics,
                   "persistent_trainable": sum(bool(getattr(p, "ds_persist", False)) for p in rt.space.params),
                   "persistent_share": sum(p.ds_numel for p in module.parameters() if getattr(p, "ds_persist", False))
                   / max(1, facts["parameters"]) if backend.stage == 3 else 1.0,
                   "perturbation_seen": probe.result(metrics[0] if metrics else {}),
                   "zero_optimization": {k: v for k, v in ds["zero_optimization"].items()}}
            out["runs"].append(run)
            if info.is_main:
                gathered = sum(v for k, v in per_step[-1]["bytes"].items() if "|gather" in k)
                print(f"[zero3] {variant['name']:<18} {method}/{'packed' if packing else 'unpacked':<9} "
                      f"gathered {gathered / 2**20:8.2f} MiB / step", flush=True)
            rt.engine.destroy()
            del rt, step, adapter, params, backend
            import gc

            gc.collect()
    if info.is_main:
        Path(args.zero3_out).write_text(json.dumps(out))


def summarise_zero3(raw: dict) -> dict:
    """Per run: mean bytes per optimizer step gathered (and reduced), by phase and region; SARE / EFUF."""
    runs = []
    for r in raw["runs"]:
        n = len(r["steps"])
        by_phase: dict[str, dict[str, float]] = {}
        totals = {"gather": 0.0, "gather_hpz": 0.0, "reduce": 0.0}
        for s in r["steps"]:
            for key, b in s["bytes"].items():
                phase, region, kind = key.split("|")
                totals[kind] += b / n
                if kind.startswith("gather"):
                    slot = by_phase.setdefault(phase, {})
                    slot[region] = slot.get(region, 0.0) + b / n
        stable = len({sum(v for k, v in s["bytes"].items() if "|gather" in k) for s in r["steps"]}) == 1
        runs.append({"variant": r["variant"], "about": r["about"], "method": r["method"], "packing": r["packing"],
                     "gather_bytes_per_step": totals["gather"] + totals["gather_hpz"],
                     "gather_hpz_bytes_per_step": totals["gather_hpz"], "reduce_bytes_per_step": totals["reduce"],
                     "perturbation_seen": r.get("perturbation_seen"), "persistent_share": r.get("persistent_share"),
                     "gather_by_phase": by_phase, "same_every_step": stable,
                     "param_bytes": r["model"]["parameters"] * 4, "metrics": r["metrics"]})
    ratios = {}
    for variant in dict.fromkeys(r["variant"] for r in runs):
        for packing in (True, False):
            pick = {r["method"]: r for r in runs if r["variant"] == variant and r["packing"] == packing}
            if "sare" in pick and "efuf" in pick and pick["efuf"]["gather_bytes_per_step"]:
                ratios[f"{variant}/{'packed' if packing else 'unpacked'}"] = (
                    pick["sare"]["gather_bytes_per_step"] / pick["efuf"]["gather_bytes_per_step"])
    checks = {}
    base = {(r["method"], r["packing"]): r for r in runs if r["variant"] == "zero3"}
    for r in runs:
        ref = base.get((r["method"], r["packing"]))
        if r["method"] == "sare" and r["variant"] != "zero3" and ref and r["metrics"] and ref["metrics"]:
            a, b = ref["metrics"][0], r["metrics"][0]
            checks[r["variant"]] = {k: {"zero3": a[k], r["variant"]: b[k]}
                                    for k in ("sam/sharpness_gap", "loss/neg", "train/grad_norm") if k in a and k in b}
    return {"world_size": raw["world_size"], "captions_per_rank_step": raw["captions_per_rank_step"], "runs": runs,
            "sare/efuf": ratios, "sare_checks_vs_zero3": checks}


def run_zero3(args, log) -> dict:
    """Start `zero3_worker` on 2 CPU ranks with the deepspeed launcher; returns the summary."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "zero3.json"
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(port),
               "--module", "sare_ds.bench", *_worker_argv(args), "--zero3-worker", "--zero3-out", str(out)]
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        log(f"ZeRO traffic on 2 CPU ranks: {' '.join(cmd[:6])} ...")
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.zero3_timeout)
        for line in proc.stdout.splitlines():
            if line.startswith("[zero3]") or "[zero3]" in line:
                log("  " + line.split("[zero3]", 1)[1].strip())
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"the 2-rank ZeRO measurement failed (exit {proc.returncode}):\n"
                               f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
        return summarise_zero3(json.loads(out.read_text()))


WORKER_OPTIONS = ("text_hidden", "text_layers", "text_intermediate", "vision_hidden", "vision_layers", "image_size",
                  "words", "objects", "neg_share", "captions_per_step", "max_length", "seed", "zero_warmup",
                  "zero_steps", "head_chunks")


def _worker_argv(args) -> list[str]:
    """The options the 2-rank workers need, from the parsed arguments (after --quick)."""
    out = [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in WORKER_OPTIONS]
    return out + (["--quick-zero"] if args.quick else [])


# ------------------------------------------------------------------------------ report

def table(result: dict) -> str:
    lines = []
    t = result.get("timing")
    if t:
        lines.append(f"{'configuration':<24} {'epoch s':>8} {'steps':>5} {'seqs':>5} {'tok/sample':>10} "
                     f"{'head/sample':>11}  phases (median s)")
        for name, r in t["configs"].items():
            ph = ", ".join(f"{k} {v:.2f}" for k, v in r["phases_s"].items())
            lines.append(f"{name:<24} {r['epoch_s']['median']:8.2f} {r['steps']:5d} {r['sequences']:5d} "
                         f"{r['tokens_per_curated_sample']:10.0f} {r['head_positions_per_curated_sample']:11.0f}  {ph}")
        lines.append("")
        for key, r in t["ratios"].items():
            lines.append(f"{key:<40} {r['median']:.3f} (per-rep {r['min']:.3f}-{r['max']:.3f})")
        lines.append("")
        for s in t["neg_share_sweep"]:
            r = s["sare_packed/efuf_packed"]
            lines.append(f"neg share {s['neg_share']:.2f} ({s['negs_per_caption']:.2f} neg/caption): SARE packed / "
                         f"EFUF packed {r['median']:.3f} (per-rep {r['min']:.3f}-{r['max']:.3f})")
        lines.append("")
        for key in ("packed_caption", "packed_sent_caption", "unpacked_sample"):
            m = t["memory"][key]
            lines.append(f"loss path, {key:<19} T={m['positions']:4d} labelled={m['labelled']:4d}: full-vocab "
                         f"{m['full_peak_bytes'] / 2**20:7.1f} MiB, labelled-only {m['kept_peak_bytes'] / 2**20:6.1f} "
                         f"MiB ({m['peak_ratio']:.3f}), in {m['chunks']} chunks (training) "
                         f"{m['chunked_peak_bytes'] / 2**20:6.1f} MiB ({m['chunked_peak_ratio']:.3f})")
        lines.append(f"loss path, packed labelled-only / unpacked full-vocab: {t['memory']['packed_kept/unpacked_full']:.3f}")
    z = result.get("zero3")
    if z:
        lines.append("")
        lines.append(f"{'ZeRO variant':<18} {'configuration':<14} {'persistent':>10} {'gathered MiB/step':>17} "
                     f"{'of it hpZ':>9} {'reduced MiB/step':>16}  SARE's perturbed forward sees")
        for r in z["runs"]:
            seen = r.get("perturbation_seen")
            restored = seen and seen["restored_distance"]
            seen = (f"{seen['eps_seen/eps_norm']:.3f} of eps*"
                    + (f", restored to {restored:.1e}" if restored is not None else "")
                    if seen else "")
            share = r.get("persistent_share")
            share = f"{share:10.3f}" if share is not None else f"{'':10}"
            lines.append(f"{r['variant']:<18} {r['method'] + ('/packed' if r['packing'] else '/unpacked'):<14} {share} "
                         f"{r['gather_bytes_per_step'] / 2**20:17.2f} {r['gather_hpz_bytes_per_step'] / 2**20:9.2f} "
                         f"{r['reduce_bytes_per_step'] / 2**20:16.2f}  {seen}")
        for key, v in z["sare/efuf"].items():
            lines.append(f"SARE / EFUF gathered bytes, {key}: {v:.3f}")
        for variant, c in z["sare_checks_vs_zero3"].items():
            lines.append(f"SARE under {variant} vs zero3, first measured step: {json.dumps(c)}")
    return "\n".join(lines)


def chart(result: dict, path: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sare_ds.plotting import save_figure

    t, z = result.get("timing"), result.get("zero3")
    panels = (3 if t else 0) + (1 if z else 0)
    fig, axes = plt.subplots(1, max(1, panels), figsize=(5.2 * max(1, panels), 4.4))
    axes = list(axes) if panels > 1 else [axes]
    i = 0
    if t:
        ax = axes[i]
        names = list(t["configs"])
        phases = list(dict.fromkeys(k for r in t["configs"].values() for k in r["phases_s"]))
        bottom = [0.0] * len(names)
        for ph in phases:
            vals = [t["configs"][n]["phases_s"].get(ph, 0.0) for n in names]
            ax.bar(range(len(names)), vals, bottom=bottom, label=ph)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_xticks(range(len(names)), [n.replace("/", "\n").replace("+", "\n+") for n in names], fontsize=7)
        ax.set_ylabel("seconds per epoch (median phases)")
        ax.set_title("one epoch of the same captions")
        ax.legend(fontsize=6)
        ax = axes[i + 1]
        xs = [s["negs_per_caption"] for s in t["neg_share_sweep"]]
        ys = [s["sare_packed/efuf_packed"]["median"] for s in t["neg_share_sweep"]]
        lo = [s["sare_packed/efuf_packed"]["min"] for s in t["neg_share_sweep"]]
        hi = [s["sare_packed/efuf_packed"]["max"] for s in t["neg_share_sweep"]]
        ax.errorbar(xs, ys, yerr=[[y - a for y, a in zip(ys, lo)], [b - y for y, b in zip(ys, hi)]], marker="o")
        ax.axhline(2.5, color="grey", ls="--", lw=1, label="target 2.5")
        ax.set_ylim(0, max([3.0, *hi]) * 1.05)
        ax.set_xlabel(f"neg spans per caption (of {t['data']['objects']})")
        ax.set_ylabel("SARE packed / EFUF packed")
        ax.set_title("time ratio across neg shares")
        ax.legend(fontsize=7)
        ax = axes[i + 2]
        ax.bar(range(len(names)), [t["configs"][n]["tokens_per_curated_sample"] for n in names], label="forwarded")
        ax.bar(range(len(names)), [t["configs"][n]["head_positions_per_curated_sample"] for n in names],
               label="through the LM head")
        ax.set_xticks(range(len(names)), [n.replace("/", "\n").replace("+", "\n+") for n in names], fontsize=7)
        ax.set_ylabel("positions per curated sample, per epoch")
        ax.set_title("token floor")
        ax.legend(fontsize=7)
        i += 3
    if z:
        ax = axes[i]
        labels = [f"{r['variant']}\n{r['method']}/{'p' if r['packing'] else 'u'}" for r in z["runs"]]
        ax.bar(range(len(labels)), [r["gather_bytes_per_step"] / 2**20 for r in z["runs"]])
        ax.set_xticks(range(len(labels)), labels, fontsize=6, rotation=90)
        ax.set_ylabel("MiB gathered per optimizer step (rank 0)")
        ax.set_title("ZeRO parameter all-gathers, 2 ranks")
    return save_figure(fig, path)


# ------------------------------------------------------------------------------ CLI

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model (LLaVA-1.5 token structure)")
    g.add_argument("--text-hidden", type=int, default=256, help="LLM width (default 256)")
    g.add_argument("--text-layers", type=int, default=4, help="LLM decoder layers (default 4)")
    g.add_argument("--text-intermediate", type=int, default=0, help="LLM MLP width (default: Llama's 2.69 x width)")
    g.add_argument("--vision-hidden", type=int, default=64, help="vision tower width (default 64)")
    g.add_argument("--vision-layers", type=int, default=2, help="vision tower layers (default 2)")
    g.add_argument("--image-size", type=int, default=336, help="image side in px; (side // 14)^2 image tokens "
                                                               "(default 336: 576)")
    g = p.add_argument_group("data")
    g.add_argument("--captions", type=int, default=8, help="captions in an epoch (default 8)")
    g.add_argument("--words", type=int, default=90, help="words a caption (default 90)")
    g.add_argument("--objects", type=int, default=5, help="object spans a caption (default 5)")
    g.add_argument("--neg-share", type=float, default=0.2, help="fraction of spans that are neg (default 0.2: one "
                                                                "a caption at 5 objects)")
    g.add_argument("--sweep", type=lambda s: [float(x) for x in s.split(",")], default=[0.1, 0.2, 0.4, 0.6],
                   help="neg shares of the SARE packed / EFUF packed sweep (default 0.1,0.2,0.4,0.6)")
    g.add_argument("--captions-per-step", type=int, default=2, help="captions an optimizer step (default 2)")
    g.add_argument("--micro-captions", type=int, default=1, help="captions a micro-batch (default 1)")
    g.add_argument("--max-length", type=int, default=1024)
    g.add_argument("--head-chunks", type=int, default=8, help="LM-head chunks per forward (model.lm_head_chunks, "
                                                              "default 8; 0: the kept logits in one piece)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("run")
    g.add_argument("--reps", type=int, default=3, help="interleaved repetitions (default 3)")
    g.add_argument("--threads", type=int, default=1, help="torch threads (default 1: on a shared machine, threads "
                                                          "waiting on descheduled siblings make times erratic)")
    g.add_argument("--quick", action="store_true", help="a smoke run of seconds: a small LLM, 2 captions, 1 repetition")
    g.add_argument("--json", help="write the results here")
    g.add_argument("--png", help="write a chart here")
    g.add_argument("--zero3", action="store_true", help="also count ZeRO parameter gathers on 2 CPU ranks")
    g.add_argument("--skip-timing", action="store_true", help="with --zero3: only the gather count")
    g.add_argument("--zero-warmup", type=int, default=2, help="steps before counting (DeepSpeed records its trace)")
    g.add_argument("--zero-steps", type=int, default=2, help="steps counted")
    g.add_argument("--zero3-timeout", type=int, default=3000)
    g.add_argument("--zero3-worker", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--quick-zero", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--zero3-out", help=argparse.SUPPRESS)
    g.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args = p.parse_args(argv)
    if args.quick:
        args.text_hidden, args.text_layers, args.vision_layers = min(args.text_hidden, 64), 1, 1
        args.captions, args.captions_per_step, args.reps = 2, 2, 1
        args.sweep = [args.neg_share]
        args.zero_warmup, args.zero_steps = 1, 1
    for name in ("captions", "objects", "words", "captions_per_step", "micro_captions", "reps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0.0 <= args.neg_share <= 1.0 or any(not 0.0 <= s <= 1.0 for s in args.sweep):
        p.error("neg shares must lie in [0, 1]")
    return args


def run(args, log=print, command: str = "") -> dict:
    torch.set_num_threads(args.threads)
    result = {"command": command,
              "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "torch": torch.__version__}}
    if not args.skip_timing:
        result["timing"] = run_timing(args, log)
    if args.zero3:
        result["zero3"] = run_zero3(args, log)
    return result


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.zero3_worker:
        from sare_ds.dist import shutdown

        zero3_worker(args)
        shutdown()  # destroys the process group and releases DeepSpeed's CPU shared memory
        return
    t0 = time.perf_counter()
    argv = sys.argv[1:] if argv is None else list(argv)
    result = run(args, command=" ".join(["python -m sare_ds.bench", *argv]))
    result["wall_s"] = time.perf_counter() - t0
    print(table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.png:
        chart(result, args.png)
    print(f"done in {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
