"""Attacks on an unlearned model: relearning, LoRA fine-tuning, adversarial prompting.

    samples = load_neg_samples("runs/curated/shards", limit=140)      # or "synthetic"
    fine_tune_attack(adapter, samples[:60], trainable="mapping", lr=1e-5, steps=0)
    adversarial_prompt_eval(adapter, data, cfg)

Relearning (SARE's main robustness test) fine-tunes the unlearned model with plain NLL on
n hallucinated samples: the neg targets are treated as capability ("pos") samples and the
library's own FT step (UnlearningStep, method ft) on a PlainParameterSpace does the update,
so there is no second training loop. The LoRA attack is the same on fresh LoRA adapters of
the LLM (mapping frozen). Adversarial prompting re-measures CHAIR with the shipped prompts
(leading questions about an absent object, "also describe the ...", long descriptions).
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
from importlib import resources
from pathlib import Path

import torch

from sare_ds.config import MethodConfig, ModelConfig
from sare_ds.data.samples import BadSampleError, Sample
from sare_ds.data.shards import iter_samples
from sare_ds.eval.chair import chair

# COCO's most frequent categories: the absent object of a leading prompt is drawn from these,
# so the question is plausible (hallucinations are mostly frequent, co-occurring objects).
FREQUENT_CATEGORIES = ("person", "car", "chair", "cup", "bottle", "dining table", "dog", "cat", "bowl",
                       "truck", "handbag", "bench", "umbrella", "book", "clock", "potted plant", "bird",
                       "couch", "backpack", "knife")


# ----------------------------------------------------------------------------- attack data

def load_neg_samples(source: str | Path, limit: int, *, seed: int = 0, image_size: int = 32,
                     prompt: str | None = None) -> list[Sample]:
    """`limit` hallucinated (neg) samples: from curation shards, or generated ("synthetic")."""
    if str(source) == "synthetic":
        from sare_ds.config import EFUF_CAPTION_PROMPT
        from sare_ds.data.synthetic import generate_samples

        # About one image in two carries a hallucination: generate until there are enough.
        n_images, negs = max(8, 2 * limit), []
        while len(negs) < limit:
            negs = [s for s in generate_samples(n_images, image_size, prompt or EFUF_CAPTION_PROMPT, seed)
                    if s.kind == "neg"]
            n_images *= 2
        return negs[:limit]
    shard_dir = Path(source)
    if not shard_dir.is_dir():
        raise FileNotFoundError(f"attack data {shard_dir} is not a folder; pass curation's shard folder or 'synthetic'")
    out = []
    for s in iter_samples(shard_dir, kind="neg"):
        out.append(s)
        if len(out) >= limit:
            break
    if not out:
        raise FileNotFoundError(f"attack data {shard_dir}: no neg sample (no neg shard or only empty ones); "
                                "pass the output folder of curation, whose neg-*.tar shards hold them")
    if len(out) < limit:
        raise ValueError(f"{shard_dir}: only {len(out)} neg samples, the attack needs {limit}; "
                         "fix: curate more images or lower the relearning sizes")
    return out


# ----------------------------------------------------------------------------- fine-tuning attacks

def set_attack_trainable(adapter, trainable: str, *, lora_r: int = 8, lora_alpha: int = 16) -> list[str]:
    """Freeze all but the attacked set: `mapping`, `lora` (fresh LoRA on the LLM only) or `mapping+lora`."""
    from sare_ds.models import select_trainable

    if trainable not in ("mapping", "lora", "mapping+lora"):
        raise ValueError(f"attack trainable = {trainable!r}: use mapping, lora or mapping+lora")
    mode = "mapping" if trainable == "mapping" else "mapping+lora"
    names = select_trainable(adapter, ModelConfig(trainable=mode, lora_r=lora_r, lora_alpha=lora_alpha))
    if trainable == "lora":
        # select_trainable trains mapping + LoRA; the LoRA attack leaves the mapping as unlearned.
        for name, p in adapter.model.named_parameters():
            if "lora_" not in name:
                p.requires_grad_(False)
        names = [n for n in names if "lora_" in n]
    return names


def fine_tune_attack(adapter, samples: list[Sample], *, trainable: str = "mapping", lr: float = 1e-5,
                     steps: int = 0, batch_size: int = 4, seed: int = 0, lora_r: int = 8, lora_alpha: int = 16,
                     max_length: int = 2048) -> dict:
    """Plain NLL fine-tuning on the samples' targets (steps = 0: one epoch); returns the loss curve."""
    from sare_ds.data.samples import Caption
    from sare_ds.data.steps import StepComposer
    from sare_ds.data.tokenize import tokenize_caption
    from sare_ds.train.params import PlainParameterSpace
    from sare_ds.train.step import UnlearningStep

    names = set_attack_trainable(adapter, trainable, lora_r=lora_r, lora_alpha=lora_alpha)
    model = adapter.model
    param = next(p for p in model.parameters() if p.requires_grad)
    tokenized, skipped = [], 0
    for s in samples:
        try:
            # The hallucinated span becomes a capability target: plain NLL makes it likely again.
            tokenized += tokenize_caption(Caption.from_sample(dataclasses.replace(s, kind="pos")), adapter, max_length)
        except BadSampleError:
            skipped += 1
    batch_size = max(1, min(batch_size, len(tokenized)))
    if not tokenized:
        raise ValueError("fine_tune_attack: no usable sample (all failed tokenisation); check the attack data")
    steps_per_epoch = len(tokenized) // batch_size
    steps = steps or steps_per_epoch
    composer = StepComposer({"pos": tokenized}, {"pos": batch_size}, 1, math.ceil(steps / steps_per_epoch), seed, steps)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    space = PlainParameterSpace(params, optimizer, None, clip_grad_norm=1.0)
    pad_id = adapter.tokenizer.pad_token_id
    pad_id = adapter.tokenizer.eos_token_id if pad_id is None else pad_id
    step = UnlearningStep(model, adapter.forward_inputs, space, MethodConfig(name="ft", lambda2=0.0),
                          device=param.device, dtype=param.dtype, pad_token_id=pad_id)
    torch.manual_seed(seed)
    model.train()
    losses = []
    for micro in composer:
        metrics = step(micro)  # each micro-batch: {"pos": [sequences]}
        # Kept on the device: reading a value every step would wait for the device each time.
        losses.append(metrics["loss/pos"].detach())
    losses = torch.stack(losses).float().tolist() if losses else []
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return {"trainable": trainable, "num_trainable_tensors": len(names), "samples": len(tokenized),
            "skipped": skipped, "steps": len(losses), "lr": lr, "losses": losses}


# ----------------------------------------------------------------------------- adversarial prompts

def load_adversarial_prompts(path: str | Path | None = None) -> list[dict]:
    """The shipped prompt set (sare_ds/resources/adversarial_prompts.json) or a file of the same shape."""
    if path is None:
        data = json.loads((resources.files("sare_ds") / "resources" / "adversarial_prompts.json").read_text())
    else:
        from sare_ds.data.shards import read_json_file

        data = read_json_file(path, "adversarial prompt file", "fix the file (sare_ds/resources/"
                              "adversarial_prompts.json shows the shape: {\"prompts\": [{\"id\": ..., \"template\": ...}]})")
    prompts = data["prompts"]
    for p in prompts:
        if not {"id", "template"} <= set(p):
            raise ValueError(f"adversarial prompt {p}: needs `id` and `template`; fix the prompt file")
    return prompts


def absent_object(ground_truth: set[str], key: str, seed: int) -> str:
    """A frequent COCO category not in the image, the same for the same (image, prompt, seed)."""
    candidates = [c for c in FREQUENT_CATEGORIES if c not in ground_truth] or ["giraffe"]
    return random.Random(f"{seed}-{key}").choice(candidates)


def adversarial_prompt_eval(adapter, data, cfg, prompts: list[dict] | None = None, seed: int = 0) -> dict:
    """CHAIR of the responses to each adversarial prompt, and the mean over prompts."""
    from sare_ds.eval.evaluate import generate_for_items

    prompts = prompts or load_adversarial_prompts()
    images = data.truth.image_paths(data.image_dir, cfg.num_images)
    items = []
    for p in prompts:
        for image_id, path in images:
            planted = absent_object(data.truth.objects[image_id], f"{image_id}-{p['id']}", seed)
            items.append((image_id, str(path), p["template"].format(object=planted)))
    records, speed = generate_for_items(adapter, items, cfg)
    per_prompt, n = {}, len(images)
    for k, p in enumerate(prompts):
        scores = chair(records[k * n:(k + 1) * n], data.truth)
        per_prompt[p["id"]] = {"CHAIR_S": scores["CHAIR_S"], "CHAIR_I": scores["CHAIR_I"],
                               "examples": [{"prompt": r["prompt"], "caption": r["caption"]} for r in records[k * n:k * n + 2]]}
    mean = {m: sum(v[m] for v in per_prompt.values()) / len(per_prompt) for m in ("CHAIR_S", "CHAIR_I")}
    return {**mean, "per_prompt": per_prompt, "seconds": speed["seconds"]}
