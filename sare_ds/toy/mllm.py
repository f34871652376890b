"""The toy world's captioner: a tiny LLaVA-1.5-layout MLLM trained from scratch on the scenes.

    record = train_toy_captioner("runs/toy/models/captioner", ToyWorld(), PRESETS["full"])

Architecture: LLaVA (CLIP vision tower, 2-layer MLP projector, Llama LLM), built by
sare_ds.models.tiny.make_tiny_llava and saved with save_pretrained, so every tool loads it
as it loads llava-hf/llava-1.5-7b-hf. The tokenizer is a byte-level BPE trained on the
world's texts.

Training data, generated in memory from a fixed seed: per scene one caption sample (EFUF's
caption prompt; the target is `world.training_caption`, which names absent co-occurring
partners with probability `caption_noise`) and `qa_per_scene` yes/no questions about a drawn
or an absent object with truthful answers (for POPE). Plain next-token NLL on the response,
AdamW with warm-up and cosine decay. As LLaVA starts from a pre-trained CLIP tower, the vision
tower is first pre-trained on the scenes (multi-label object classification from the patch
features LLaVA uses) and then frozen while the projector and the LLM learn to caption.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from sare_ds.config import EFUF_CAPTION_PROMPT
from sare_ds.data.samples import Sample
from sare_ds.data.tokenize import IGNORE_INDEX, collate, tokenize_sample
from sare_ds.toy.scenes import CAPTION_PROMPT_QA, ToyWorld, qa_answer


@dataclass
class CaptionerConfig:
    scenes: int = 4000
    """Training scenes (each gives one caption sample and qa_per_scene questions)."""
    qa_per_scene: int = 3
    """Yes/no questions per scene (a drawn or an absent object, half each)."""
    steps: int = 800
    """Optimizer steps."""
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    image_size: int = 64
    """Vision tower input (the scenes are drawn at ToyWorld.image_size and resized by the processor)."""
    patch_size: int = 16
    vision_hidden_size: int = 64
    vision_layers: int = 3
    hidden_size: int = 128
    num_layers: int = 3
    vocab_size: int = 400
    vision_steps: int = 500
    """Steps of the vision tower's pre-training (multi-label object classification) before the
    captioner is trained with the tower frozen, as LLaVA starts from a pre-trained CLIP tower."""
    vision_lr: float = 2e-3
    threads: int = 2
    """CPU threads while training (restored after). Fixed because the thread count changes float
    summation order, which 800 steps amplify: the same seed on 1 and on 2 threads gave base CHAIR_S
    43.5 vs 42.0 %."""
    seed: int = 0


PRESETS = {
    "full": CaptionerConfig(),
    # The CI variant: the same world and architecture, a shorter run.
    "ci": CaptionerConfig(scenes=2000, steps=450, vision_steps=300, qa_per_scene=1),
}


def world_corpus(world: ToyWorld, rng: random.Random, n: int = 400) -> list[str]:
    """The texts the tokenizer is trained on: the world's prompts and responses rendered as
    LLaVA-1.5 turns, so merges such as " The" / " Yes" exist where the chat template puts them."""
    def turn(prompt: str, response: str) -> str:
        return f"USER: {prompt} ASSISTANT: {response}"

    texts = []
    for c in world.categories:
        texts += [turn(CAPTION_PROMPT_QA.format(obj=c), qa_answer(c, True)),
                  turn(CAPTION_PROMPT_QA.format(obj=c), qa_answer(c, False))]
    for _ in range(n):
        texts.append(turn(EFUF_CAPTION_PROMPT, world.training_caption(world.sample_objects(rng), rng)))
    return texts


@dataclass
class TrainingScenes:
    objects: list[list[str]]
    images: list
    pixel_values: torch.Tensor
    """[N, 3, H, W] the images through the model's image processor (once per scene)."""
    samples: list[Sample]


def training_scenes(world: ToyWorld, cfg: CaptionerConfig, processor, rng: random.Random) -> TrainingScenes:
    objects, images, samples = [], [], []
    for idx in range(cfg.scenes):
        scene = world.sample_scene(rng)
        image = world.draw(scene, rng)
        objects.append(scene.objects)
        images.append(image)
        image_id = f"toy-train-{idx:06d}"
        samples.append(Sample(image, EFUF_CAPTION_PROMPT, "", world.training_caption(scene.objects, rng),
                              "sent", "", 0.0, image_id))
        for _ in range(cfg.qa_per_scene):
            present = rng.random() < 0.5
            pool = scene.objects if present else [c for c in world.categories if c not in scene.objects]
            name = rng.choice(pool)
            samples.append(Sample(image, CAPTION_PROMPT_QA.format(obj=name), "", qa_answer(name, present),
                                  "sent", "", 0.0, image_id))
    pixel_values = torch.cat([processor.image_processor(images=images[i:i + 256], return_tensors="pt")["pixel_values"]
                              for i in range(0, len(images), 256)])
    return TrainingScenes(objects, images, pixel_values, samples)


class _KnownImages:
    """The adapter, with image_inputs answered from the scenes' pixel tensors: tokenising the
    samples then skips one processor call per sample (the samples share each scene's image)."""

    def __init__(self, adapter, scenes: TrainingScenes):
        self._adapter = adapter
        self._pixels = {id(img): scenes.pixel_values[i:i + 1] for i, img in enumerate(scenes.images)}
        self._num_tokens = adapter.image_inputs(scenes.images[0]).num_image_tokens

    def __getattr__(self, name):
        return getattr(self._adapter, name)

    def image_inputs(self, image):
        from sare_ds.models.adapter import ImageInputs

        return ImageInputs(tensors={"pixel_values": self._pixels[id(image)]}, num_image_tokens=self._num_tokens)

    def expand_image(self, text, ids, image, prompt, where=""):
        # The toy model is a LLaVA-1.5-layout model: its placeholder becomes _num_tokens image tokens
        # (what its processor does, checked by the LLaVA tests), without a processor call per sample.
        from sare_ds.models.adapter import Expanded

        pos = ids.index(self._adapter.image_token_id)
        expanded = ids[:pos] + [self._adapter.image_token_id] * self._num_tokens + ids[pos + 1:]
        return Expanded(expanded, pos, self._num_tokens, {"pixel_values": self._pixels[id(image)]})


def _lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    # The trainer's schedule (sare_ds.train.trainer.lr_multiplier) times peak, written with the
    # product peak * (step+1) / warmup: reusing lr_multiplier rounds 5 of 800 rates differently in
    # the last bit, and the published toy models must rebuild bit-identically.
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * t))


def image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """[B, N, D] patch features exactly as LLaVA feeds them to its projector (the configured
    layer, CLS dropped by the `default` selection strategy)."""
    cfg = model.config
    hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
    return hidden[cfg.vision_feature_layer][:, 1:]


def pretrain_vision_tower(model, world: ToyWorld, cfg: CaptionerConfig, scenes: TrainingScenes,
                          log=print) -> float:
    """Multi-label classification of the drawn objects from the mean patch feature; returns the
    last loss. The linear head is thrown away; the tower keeps what it learned."""
    tower = model.model.vision_tower
    head = torch.nn.Linear(tower.config.hidden_size, len(world.categories))
    params = list(tower.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.vision_lr, weight_decay=0.0)
    index = {c: i for i, c in enumerate(world.categories)}
    target = torch.zeros(len(scenes.objects), len(index))
    for i, objs in enumerate(scenes.objects):
        target[i, [index[o] for o in objs]] = 1.0
    order = torch.Generator().manual_seed(cfg.seed + 2)
    losses = []
    for step in range(cfg.vision_steps):
        batch = torch.randint(0, len(target), (cfg.batch_size,), generator=order)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, cfg.vision_steps, cfg.vision_lr, 20)
        logits = head(image_features(model, scenes.pixel_values[batch]).mean(1))
        loss = F.binary_cross_entropy_with_logits(logits, target[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == cfg.vision_steps:
            log(f"vision tower: step {step + 1}/{cfg.vision_steps} object BCE {sum(losses[-20:]) / len(losses[-20:]):.4f}")
    tower.requires_grad_(False)
    return sum(losses[-20:]) / max(1, len(losses[-20:]))


def train_toy_captioner(out_dir: str | Path, world: ToyWorld, cfg: CaptionerConfig, *, log=print) -> dict:
    """Train the captioner, save it to `out_dir` (save_pretrained) and return the training record."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _train(out_dir, world, cfg, log)
    finally:
        torch.set_num_threads(previous_threads)


def _train(out_dir, world: ToyWorld, cfg: CaptionerConfig, log) -> dict:
    from sare_ds.models.llava import LlavaAdapter
    from sare_ds.models.tiny import make_tiny_llava, train_tokenizer

    t0 = time.perf_counter()
    rng = random.Random(cfg.seed)
    tokenizer = train_tokenizer(world_corpus(world, random.Random(cfg.seed + 1)), vocab_size=cfg.vocab_size)
    model, processor = make_tiny_llava(
        tokenizer, image_size=cfg.image_size, patch_size=cfg.patch_size, vision_hidden_size=cfg.vision_hidden_size,
        vision_layers=cfg.vision_layers, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, seed=cfg.seed)
    adapter = LlavaAdapter(model, processor, str(out_dir))
    scenes = training_scenes(world, cfg, processor, rng)
    vision_loss = pretrain_vision_tower(model, world, cfg, scenes, log=log)
    known = _KnownImages(adapter, scenes)
    tokenized = [tokenize_sample(s, known, max_length=256) for s in scenes.samples]
    t_data = time.perf_counter() - t0
    log(f"captioner: {len(tokenized)} samples from {cfg.scenes} scenes ready in {t_data:.1f} s; "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")

    trainable = [p for p in model.parameters() if p.requires_grad]  # the tower stays frozen (LLaVA)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    order = torch.Generator().manual_seed(cfg.seed)
    perm, pos = torch.randperm(len(tokenized), generator=order), 0
    pad_id = tokenizer.pad_token_id
    model.train()
    losses = []
    for step in range(cfg.steps):
        if pos + cfg.batch_size > len(perm):
            perm, pos = torch.randperm(len(tokenized), generator=order), 0
        batch = collate([tokenized[int(i)] for i in perm[pos:pos + cfg.batch_size]], pad_id)
        pos += cfg.batch_size
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, cfg.steps, cfg.lr, cfg.warmup_steps)
        logits = model(**adapter.forward_inputs(batch)).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                               ignore_index=IGNORE_INDEX)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        losses.append(loss.detach())
        if (step + 1) % 50 == 0 or step + 1 == cfg.steps:
            recent = torch.stack(losses[-50:]).mean().item()
            if not math.isfinite(recent):
                raise FloatingPointError(f"captioner training diverged at step {step + 1} (loss {recent}); "
                                         "lower the preset's lr")
            log(f"captioner: step {step + 1}/{cfg.steps} loss {recent:.4f} ({time.perf_counter() - t0:.0f} s)")
    model.eval()
    model.requires_grad_(True)  # saved as an ordinary checkpoint; trainers pick their own sets
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    record = {"config": asdict(cfg), "world": world.to_json(), "final_loss": torch.stack(losses[-50:]).mean().item(),
              "vision_bce": vision_loss,
              "seconds": time.perf_counter() - t0, "data_seconds": t_data, "samples": len(tokenized)}
    (out_dir / "toy_captioner.json").write_text(json.dumps(record, indent=1))
    return record


def preset(name: str, **overrides) -> CaptionerConfig:
    if name not in PRESETS:
        raise ValueError(f"captioner preset {name!r}: use one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)
