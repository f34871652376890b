"""Run every attack on every method and write the comparison report.

    methods = {"base": None, "FT": "runs/ft", "EFUF": "runs/efuf", "SARE": "runs/sare"}
    results = run_attack_suite(methods, data, AttackConfig(), out_dir="runs/report", base="llava-hf/llava-1.5-7b-hf")

Each attack starts from a fresh copy of the method's model (base checkpoint + the run's
trainable weights), so attacks never see each other's updates. Every CHAIR number of a suite
is computed in one CHAIR mode (`eval_cfg.chair_mode`), recorded with the image list in
config.json and named in report.md.
"""
from __future__ import annotations

import gc
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from sare_ds.eval.evaluate import EvalConfig, EvalData, caption_metrics, generate_captions, pope_eval


@dataclass
class AttackConfig:
    data: str = "synthetic"
    """Hallucinated samples for relearning/LoRA/probe: curation's shard folder (neg shards) or `synthetic`."""
    relearn_sizes: list = field(default_factory=lambda: [60, 100, 140])
    """Relearning set sizes n (SARE: 60, 100, 140)."""
    relearn_lr: float = 1e-5
    """Learning rate of the relearning fine-tune (AdamW, no weight decay, clip 1.0)."""
    relearn_steps: int = 0
    """Optimizer steps of each relearning run (0: one epoch over the n samples)."""
    relearn_trainable: str = "mapping"
    """What relearning trains: `mapping` (the layers the methods trained), `lora` or `mapping+lora`."""
    batch_size: int = 4
    """Samples per fine-tuning step."""
    lora: bool = True
    """Run the LoRA fine-tuning attack (fresh LoRA on the LLM, trained on the largest relearning set)."""
    lora_lr: float = 1e-4
    """Learning rate of the LoRA attack."""
    lora_r: int = 8
    """LoRA rank of the attack."""
    lora_steps: int = 0
    """Optimizer steps of the LoRA attack (0: one epoch)."""
    adversarial: bool = True
    """Run the adversarial-prompt attack (shipped prompt set, or `adversarial_prompts`)."""
    adversarial_prompts: str = ""
    """A prompt file in the shape of sare_ds/resources/adversarial_prompts.json (empty: the shipped one)."""
    probe: bool = True
    """Run the sharpness probe."""
    rho: float = 0.05
    """Probe radius scale: radii 0 .. 2 rho (SARE's rho)."""
    probe_samples: int = 32
    """Neg samples in the probe's loss."""
    probe_radii: int = 9
    """Radii on the probe's grid (odd: rho is on it)."""
    probe_random: int = 4
    """Random directions of the probe."""
    dose_sizes: list = field(default_factory=list)
    """Relearning as a dose-response: set sizes n of the grid (empty: no grid). Each dose (n, lr) relearns a fresh
    copy for one epoch of n samples and scores CHAIR_S / CHAIR_I / recall and L_neg on held-out neg samples."""
    dose_lrs: list = field(default_factory=list)
    """Learning rates of the dose grid (with dose_sizes; AdamW, one epoch of batch_size)."""
    heldout_samples: int = 32
    """Neg samples no relearning dose trains on (the ones after the largest set) on which L_neg is measured after
    each dose (0: not measured). They come from the attack data (`data`): with curation's shards, the unlearning
    training data, so they are held out from relearning, not from unlearning."""
    pope_unattacked: bool = True
    """Also run POPE on each unattacked model (attacked models are scored with CHAIR only)."""
    seed: int = 0
    """Seed of the attack data order, the random directions and the planted objects."""


def _caption_summary(adapter, data: EvalData, eval_cfg: EvalConfig) -> dict:
    records, speed = generate_captions(adapter, data, eval_cfg)
    m = caption_metrics(records, data)
    return {"chair_mode": m["chair_mode"], "captions": len(records), "CHAIR_S": m["CHAIR_S"], "CHAIR_I": m["CHAIR_I"],
            "recall": m["recall"], "BLEU-1": m["BLEU-1"],
            "BLEU-4": m["BLEU-4"], "length": m["mean_length_words"], "tokens_per_s": speed["tokens_per_s"],
            "examples": [r["caption"] for r in records[:3]]}


def attack_method(load, data: EvalData, eval_cfg: EvalConfig, cfg: AttackConfig, samples: list) -> dict:
    """All attacks on one method; `load()` returns a fresh adapter of it."""
    from sare_ds.eval.attacks import adversarial_prompt_eval, fine_tune_attack, load_adversarial_prompts
    from sare_ds.eval.probe import sharpness_probe

    out: dict = {}
    adapter = load()  # run_attack_suite freed the previous method's last copy
    out["none"] = _caption_summary(adapter, data, eval_cfg)
    if cfg.pope_unattacked and data.pope_files:
        pope = pope_eval(adapter, data, eval_cfg)
        out["none"]["POPE_F1"] = pope["mean"]["f1"]
        out["none"]["POPE_accuracy"] = pope["mean"]["accuracy"]
        out["pope_splits"] = pope["splits"]
    if cfg.adversarial:
        prompts = load_adversarial_prompts(cfg.adversarial_prompts or None)
        out["adversarial"] = adversarial_prompt_eval(adapter, data, eval_cfg, prompts, seed=cfg.seed)
    if cfg.probe:
        out["probe"] = sharpness_probe(adapter, samples[:cfg.probe_samples], rho=cfg.rho, num_radii=cfg.probe_radii,
                                       num_random=cfg.probe_random, seed=cfg.seed)
    out["relearn"] = {}
    for n in cfg.relearn_sizes:
        adapter = None  # the previous copy goes before the next one loads: two at once double the memory
        _free_memory()
        adapter = load()
        train = fine_tune_attack(adapter, samples[:n], trainable=cfg.relearn_trainable, lr=cfg.relearn_lr,
                                 steps=cfg.relearn_steps, batch_size=cfg.batch_size, seed=cfg.seed)
        out["relearn"][str(n)] = {**_caption_summary(adapter, data, eval_cfg), "train": train}
    heldout = samples[max([*cfg.relearn_sizes, *cfg.dose_sizes, 0]):][:cfg.heldout_samples]
    if heldout and cfg.dose_sizes:
        out["none"]["L_neg_heldout"] = heldout_neg_loss(adapter, heldout)
    if cfg.dose_sizes:
        out["dose"] = {}
        for lr in cfg.dose_lrs:
            for n in cfg.dose_sizes:
                adapter = None
                _free_memory()
                adapter = load()
                train = fine_tune_attack(adapter, samples[:n], trainable=cfg.relearn_trainable, lr=lr,
                                         steps=0, batch_size=cfg.batch_size, seed=cfg.seed)
                row = {**_caption_summary(adapter, data, eval_cfg), "n": n, "lr": lr, "steps": train["steps"]}
                if heldout:
                    row["L_neg_heldout"] = heldout_neg_loss(adapter, heldout)
                out["dose"][f"{n}@{lr:g}"] = row
    if cfg.lora:
        adapter = None
        _free_memory()
        adapter = load()
        n = max(cfg.relearn_sizes) if cfg.relearn_sizes else len(samples)
        train = fine_tune_attack(adapter, samples[:n], trainable="lora", lr=cfg.lora_lr, steps=cfg.lora_steps,
                                 batch_size=cfg.batch_size, seed=cfg.seed, lora_r=cfg.lora_r, lora_alpha=2 * cfg.lora_r)
        out["lora"] = {**_caption_summary(adapter, data, eval_cfg), "train": train}
    return out


@torch.no_grad()
def heldout_neg_loss(adapter, samples: list, batch_size: int = 16) -> float:
    """L_neg = - the mean span NLL of held-out hallucinated samples, the loss SARE and EFUF minimise (lower: the
    hallucinations are less likely; relearning raises it)."""
    from sare_ds.data.tokenize import collate, tokenize_sample
    from sare_ds.eval.probe import _neg_loss

    params = next(adapter.model.parameters())
    pad = adapter.tokenizer.pad_token_id if adapter.tokenizer.pad_token_id is not None else adapter.tokenizer.eos_token_id
    items = [tokenize_sample(s, adapter, 4096) for s in samples]
    batches = [collate(items[i:i + batch_size], pad) for i in range(0, len(items), batch_size)]
    was = adapter.model.training
    adapter.model.eval()
    try:
        return float(_neg_loss(adapter, batches, params.device, params.dtype))
    finally:
        adapter.model.train(was)


def _free_memory() -> None:
    """Collect dropped models (their modules hold reference cycles) and return cached GPU memory."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_attack_suite(methods: dict[str, str | None], data: EvalData, cfg: AttackConfig | None = None, *,
                     eval_cfg: EvalConfig | None = None, out_dir: str | Path = "runs/report",
                     base: str | None = None, toy_world: bool = False) -> dict:
    """results[method] for every method (name -> run folder, None for the base model); writes the report."""
    from sare_ds.eval.attacks import load_neg_samples
    from sare_ds.eval.distributed import rank_and_world
    from sare_ds.eval.report import write_report
    from sare_ds.eval.weights import load_method_model

    cfg = cfg or AttackConfig()
    eval_cfg = eval_cfg or EvalConfig()
    if data.truth is None:
        raise ValueError("run_attack_suite: the attacks are scored with CHAIR; pass annotation files (EvalData.truth)")
    # one mode for every CHAIR number of the report, attacks.py's included (they score with data.truth)
    data = data.with_chair_mode(eval_cfg.chair_mode)
    if any(run is None for run in methods.values()) and base is None:
        raise ValueError("run_attack_suite: a method without a run folder is the base model; pass base=<checkpoint>")
    needed = max([*cfg.relearn_sizes, *cfg.dose_sizes, cfg.probe_samples if cfg.probe else 0, 1])
    if cfg.dose_sizes:
        needed = max(needed, max([*cfg.relearn_sizes, *cfg.dose_sizes]) + cfg.heldout_samples)
    if any(not (isinstance(n, int) and n > 0) for n in cfg.dose_sizes) or any(not lr > 0 for lr in cfg.dose_lrs):
        raise ValueError(f"AttackConfig: dose_sizes {cfg.dose_sizes} must be whole numbers > 0 and dose_lrs "
                         f"{cfg.dose_lrs} > 0 (n = 0 is the unattacked row, always reported); fix the grid")
    if bool(cfg.dose_sizes) != bool(cfg.dose_lrs):
        raise ValueError(f"AttackConfig: dose_sizes {cfg.dose_sizes} and dose_lrs {cfg.dose_lrs} make a grid together; "
                         "give both (e.g. --dose-sizes 20,60,140 --dose-lrs 1e-4,1e-3) or neither")
    samples = load_neg_samples(cfg.data, needed, seed=cfg.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {}
    for name, run_dir in methods.items():
        results[name] = attack_method(lambda: load_method_model(run_dir, base=base, device=device),  # noqa: B023
                                      data, eval_cfg, cfg, samples)
        _free_memory()  # attack_method's last copy is unreferenced now
    results_meta = {"attack_config": asdict(cfg), "eval_config": asdict(eval_cfg), "chair_mode": eval_cfg.chair_mode,
                    "images": dict(data.images.to_json(), limit=eval_cfg.num_images) if data.images else None,
                    "methods": {k: (str(v) if v else None) for k, v in methods.items()}}
    if rank_and_world()[0] == 0:
        write_report(results, out_dir, toy_world=toy_world)
        (Path(out_dir) / "config.json").write_text(__import__("json").dumps(results_meta, indent=1))
    return results
