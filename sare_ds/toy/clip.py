"""A tiny open_clip CLIP trained on the toy world's scenes, and curation thresholds calibrated for it.

    out = build_toy_clip("runs/toy/clip", ToyWorld())     # trains (~25 s), calibrates (~8 s); cached
    curation_overrides(out)   # ["clip.model=.../toy-clip.json", "clip.pretrained=.../toy-clip.pt", ...,
                              #  "split.t0=...", ...]: pass them to launch/curate.py
    python -m sare_ds.toy.clip runs/toy/clip [--preset ci] [--seed 0]

The architecture is an ordinary open_clip CLIP (ViT 32 px / patch 8 / 2 layers / width 64, a 2-layer
text transformer on CLIP's BPE tokenizer, embed_dim 64) written as `<out>/toy-clip.json`; the weights
are a state dict `<out>/toy-clip.pt`. Curation loads them through the path a real CLIP takes
(`ClipScorer.from_config` with clip.model=<json>, clip.pretrained=<pt>).

Training sees what curation will score: every scene is cut into the windows of curation's local
score (clip.patch_size = a quarter of the image, clip.window_patches=2: 3 x 3 windows of one grid
cell, stride half a cell, cut by ClipScorer.windows itself) plus the whole scene (ClipScorer.whole,
for clip.mode=global). Each crop is paired with the 12 category prompts in curation's format
("A photo containing dog."); the loss is SigLIP's pairwise sigmoid with several positives per crop:
an object's target is the fraction of its box inside the crop (1 for the whole scene), 0 for the
objects not drawn. A sigmoid rather than a softmax over categories because curation compares
scores with fixed thresholds across images: absent objects must score low in absolute terms, not
only lower than the present ones.

Calibration curates a held-out scene set whose captions are the world's *training* captions (they
name absent co-occurring partners, i.e. hallucinations) with this CLIP, through
sare_ds.curation.pipeline.curate (launch/curate.py's entry point), and proposes t0 / t1 / t2 with
sare_ds.curation.calibrate.calibrate_dir from the annotated present / absent labels.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shlex
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import sare_ds  # noqa: F401  (torchvision guard before open_clip)
from sare_ds.toy.scenes import ToyWorld

CONFIG_FILE, WEIGHTS_FILE = "toy-clip.json", "toy-clip.pt"
THRESHOLDS_FILE, RECORD_FILE = "thresholds.json", "toy_clip.json"
FORMAT = "sare_ds toy clip v1"  # bump when training changes, so cached builds are redone

# The architecture (open_clip model-config JSON). init_logit_scale / init_logit_bias: the sigmoid loss's
# logit is scale * cos + bias, so it starts with the present / absent boundary at cos = 0.5 (SigLIP's
# -10 with scale 10 put it at 0.9 and squeezed all scores into 60-100); both are learned and saved.
TOY_CLIP_CONFIG = {
    "embed_dim": 64,
    "init_logit_scale": math.log(10.0),
    "init_logit_bias": -5.0,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2, "mlp_ratio": 2.0},
}
PROMPT = "A photo containing {obj}."  # curation's clip.prompt default
WINDOW_PATCHES = 2
# An object's score is its best patch (clip.top_k=1): a corner patch of the object's cell is covered by the
# cell's window alone, which holds the whole object; more patches mix in windows that cut it.
TOP_K = 1
# Training and calibration sizes (many small batches learn faster here than few large ones).
PRESETS = {
    "full": {"num_scenes": 3000, "steps": 800, "batch_size": 64, "lr": 3e-3, "calibration_images": 400},
    "ci": {"num_scenes": 600, "steps": 400, "batch_size": 32, "lr": 4e-3, "calibration_images": 150},
}


def patch_size_for(world: ToyWorld) -> int:
    """clip.patch_size whose 2 x 2-patch windows are one grid cell (16 px for 64 px scenes)."""
    if world.image_size % 4:
        raise ValueError(f"toy clip: ToyWorld image_size {world.image_size} is not a multiple of 4, so windows of "
                         "2 x 2 patches cannot be grid cells; use 64 or 96")
    return world.image_size // 4


def _scorer(model, tokenizer, world: ToyWorld, top_k: int = TOP_K):
    """A ClipScorer around the in-memory model with the toy geometry (crops for training, scores for checks)."""
    from sare_ds.curation.config import ClipConfig
    from sare_ds.curation.scoring import ClipScorer

    cfg = ClipConfig(model="", pretrained="", patch_size=patch_size_for(world), window_patches=WINDOW_PATCHES,
                     top_k=top_k, prompt=PROMPT, object_text="category", max_side=0)
    return ClipScorer.from_model(model, tokenizer, cfg, "cpu")


def make_training_data(world: ToyWorld, scorer, num_scenes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 crops [N, 3, S, S] (each scene's windows, then the whole scene) and float targets [N, categories]:
    the fraction of each object's box inside the crop."""
    rng = random.Random(seed)
    cats = {c: i for i, c in enumerate(world.categories)}
    p, side = scorer.patch, scorer.patch * scorer.window
    crops, targets = [], []
    for _ in range(num_scenes):
        scene = world.sample_scene(rng)
        image = world.draw(scene, rng)
        windows, (nr, nc) = scorer.windows(image)  # exactly the crops curation scores
        crops += [windows, scorer.whole(image)]
        t = torch.zeros(nr * nc + 1, len(cats))
        for name, (x, y, w, h) in zip(scene.objects, scene.boxes):
            for r in range(nr):
                for c in range(nc):  # window (r, c) covers [c*p, c*p + side) x [r*p, r*p + side)
                    ix = max(0, min(x + w, c * p + side) - max(x, c * p))
                    iy = max(0, min(y + h, r * p + side) - max(y, r * p))
                    t[r * nc + c, cats[name]] = ix * iy / (w * h)
            t[-1, cats[name]] = 1.0
        targets.append(t)
    # uint8 halves memory use of float16: exact at 64 px (windows are not resampled), within 1/510 otherwise.
    crops = (torch.cat(crops) * 255).round().to(torch.uint8)
    return crops, torch.cat(targets)


def train_toy_clip(out_dir: str | Path, world: ToyWorld, *, num_scenes: int, steps: int, batch_size: int,
                   seed: int = 0, lr: float = 2e-3, log: Callable[[str], None] = print) -> dict:
    """Train the toy CLIP; write <out>/toy-clip.json (architecture) and <out>/toy-clip.pt (weights).

    Returns {"model" (in memory, eval mode), "tokenizer", "config", "weights", "final_loss" (mean of the
    last 20 steps), "seconds" (training), "data_seconds", "crops", "steps"}. Deterministic given seed."""
    from sare_ds.curation.scoring import resolve_clip_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / CONFIG_FILE
    config_path.write_text(json.dumps(TOY_CLIP_CONFIG, indent=1))
    name = resolve_clip_model(str(config_path))
    threads = torch.get_num_threads()
    # One thread: the same float results on any machine (deterministic given seed), and ops this small gain
    # little from a second one but lose 8x when another process holds a core (measured on 2 cores).
    torch.set_num_threads(1)
    try:
        trained = _train(name, world, num_scenes, steps, batch_size, seed, lr, log)
    finally:
        torch.set_num_threads(threads)
    weights = out / WEIGHTS_FILE
    torch.save(trained["model"].state_dict(), weights)
    return {**trained, "config": str(config_path), "weights": str(weights)}


def _train(name: str, world: ToyWorld, num_scenes: int, steps: int, batch_size: int, seed: int, lr: float,
           log: Callable[[str], None]) -> dict:
    """train_toy_clip's loop: the sigmoid loss of every crop against the 12 category prompts."""
    import open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(name)
        tokenizer = open_clip.get_tokenizer(name)
        scorer = _scorer(model, tokenizer, world)

        t0 = time.perf_counter()
        crops, targets = make_training_data(world, scorer, num_scenes, seed)
        data_seconds = time.perf_counter() - t0
        log(f"toy clip: {len(crops)} crops from {num_scenes} scenes in {data_seconds:.1f} s")

        texts = tokenizer([PROMPT.format(obj=c) for c in world.categories])
        # The 49408 x 64 token table (95 % of the parameters) stays at its seeded initialisation: the text
        # transformer separates the 12 prompts from random token vectors, and Adam over the table would
        # cost a third of every step. It is saved with the rest, so loading reproduces it.
        model.token_embedding.weight.requires_grad_(False)
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=lr, weight_decay=0.0)
        warmup = max(1, steps // 10)  # linear warm-up, then cosine decay to 0
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
        gen = torch.Generator().manual_seed(seed)
        model.train()
        losses, t0 = [], time.perf_counter()
        for step in range(steps):
            idx = torch.randint(len(crops), (batch_size,), generator=gen)
            images = (crops[idx].float() / 255.0 - scorer.mean) / scorer.std
            img = F.normalize(model.encode_image(images), dim=-1)
            txt = F.normalize(model.encode_text(texts), dim=-1)
            logits = model.logit_scale.exp() * img @ txt.T + model.logit_bias
            loss = F.binary_cross_entropy_with_logits(logits, targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
                log(f"toy clip: step {step + 1}/{steps} loss {sum(losses[-20:]) / len(losses[-20:]):.4f} "
                    f"scale {model.logit_scale.exp().item():.1f} bias {model.logit_bias.item():.2f} "
                    f"({time.perf_counter() - t0:.1f} s)")
        seconds = time.perf_counter() - t0
    model.eval()
    return {"model": model, "tokenizer": tokenizer, "final_loss": sum(losses[-20:]) / len(losses[-20:]),
            "seconds": round(seconds, 2),
            "data_seconds": round(data_seconds, 2), "crops": len(crops), "steps": steps}


def _clip_overrides(out: Path, patch_size: int, top_k: int) -> list[str]:
    """The clip.* overrides that score with the toy CLIP in `out` (absolute paths: any working directory)."""
    return [f"clip.model={(out / CONFIG_FILE).resolve()}", f"clip.pretrained={(out / WEIGHTS_FILE).resolve()}",
            "clip.mode=local", f"clip.patch_size={patch_size}", f"clip.window_patches={WINDOW_PATCHES}",
            f"clip.top_k={top_k}", "clip.object_text=category"]


def calibrate_toy_clip(out_dir: str | Path, world: ToyWorld, *, num_images: int, seed: int,
                       top_k: int = TOP_K) -> dict:
    """Curate a held-out scene set with the trained toy CLIP and write <out>/thresholds.json (t0, t1, t2,
    present / absent score statistics, pos / neg precision, and the clip.* settings they belong to)."""
    from sare_ds.curation.calibrate import calibrate_dir
    from sare_ds.curation.config import load_curation_config
    from sare_ds.curation.pipeline import curate
    from sare_ds.toy.scenes import COCO_IDS, write_scene_set

    out = Path(out_dir)
    cal = out / "calibration"
    shutil.rmtree(cal, ignore_errors=True)  # a smaller set must not leave the images of a larger one
    paths = write_scene_set(cal / "scenes", world, num_images, seed)
    # Captions that name absent partners (the world's training captions), so there are absent objects to score.
    instances = json.loads(Path(paths["instances"]).read_text())
    names = {v: k for k, v in COCO_IDS.items()}
    objects: dict[int, list[str]] = {im["id"]: [] for im in instances["images"]}
    for ann in instances["annotations"]:
        objects[ann["image_id"]].append(names[ann["category_id"]])
    rng = random.Random(seed)
    captions = [{"id": i + 1, "image_id": image_id, "caption": world.training_caption(objs, rng)}
                for i, (image_id, objs) in enumerate(objects.items())]
    captions_file = cal / "training_captions.json"
    captions_file.write_text(json.dumps({"images": instances["images"], "annotations": captions}))
    # Thresholds of this run do not matter (only the recorded scores do): t0 = t1 = t2 = 0 is valid.
    cfg = load_curation_config(None, [
        f"input.path={paths['image_dir']}", f"input.annotations={paths['instances']}", "caption.source=annotations",
        f"caption.captions_file={captions_file}", *_clip_overrides(out, patch_size_for(world), top_k),
        "split.t0=0", "split.t1=0", "split.t2=0", f"output.dir={cal / 'curated'}", "output.resume=false",
        f"output.images_per_chunk={num_images}"])
    curate(cfg, rank=0, world_size=1)
    result = calibrate_dir(cal / "curated")
    thresholds = {**result, "clip": {"patch_size": patch_size_for(world), "window_patches": WINDOW_PATCHES,
                                     "top_k": top_k, "prompt": PROMPT, "object_text": "category"},
                  "calibration": {"num_images": num_images, "seed": seed, "curated": str(cal / "curated")}}
    (out / THRESHOLDS_FILE).write_text(json.dumps(thresholds, indent=1))
    return thresholds


def curation_overrides(out_dir: str | Path) -> list[str]:
    """launch/curate.py overrides that score with the toy CLIP in `out_dir` at its calibrated thresholds."""
    out = Path(out_dir)
    missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE, THRESHOLDS_FILE) if not (out / f).is_file()]
    if missing:
        raise FileNotFoundError(f"toy CLIP folder {out} lacks {', '.join(missing)}; build it with "
                                f"`python -m sare_ds.toy.clip {out}` (or sare_ds.toy.clip.build_toy_clip)")
    t = json.loads((out / THRESHOLDS_FILE).read_text())
    k = t["clip"]
    return [*_clip_overrides(out, k["patch_size"], k["top_k"]),
            f"split.t0={t['t0']!r}", f"split.t1={t['t1']!r}", f"split.t2={t['t2']!r}"]


def build_toy_clip(out_dir: str | Path, world: ToyWorld | None = None, *, preset: str = "full", seed: int = 0,
                   log: Callable[[str], None] = print) -> Path:
    """Train and calibrate the toy CLIP into `out_dir`, or reuse what is there if it was built with the same
    preset, seed and world (recorded in <out>/toy_clip.json with the training figures). Returns out_dir."""
    if preset not in PRESETS:
        raise ValueError(f"toy clip preset {preset!r}: use one of {list(PRESETS)}")
    world = world or ToyWorld()
    out = Path(out_dir)
    key = {"format": FORMAT, "preset": preset, "seed": seed, "params": PRESETS[preset],
           "scoring": {"top_k": TOP_K, "window_patches": WINDOW_PATCHES, "prompt": PROMPT},
           "architecture": TOY_CLIP_CONFIG, "world": world.to_json()}
    record_path = out / RECORD_FILE
    complete = record_path.is_file() and all((out / f).is_file() for f in (CONFIG_FILE, WEIGHTS_FILE, THRESHOLDS_FILE))
    # The key goes through a JSON round trip, so tuples (the looks' colours) compare as the lists recorded.
    if complete and json.loads(record_path.read_text()).get("key") == json.loads(json.dumps(key)):
        log(f"toy clip: reusing {out} (preset {preset}, seed {seed})")
        return out
    record_path.unlink(missing_ok=True)  # an interrupted rebuild must not leave the old record over new weights
    p = PRESETS[preset]
    trained = train_toy_clip(out, world, num_scenes=p["num_scenes"], steps=p["steps"], batch_size=p["batch_size"],
                             seed=seed, lr=p["lr"], log=log)
    t = calibrate_toy_clip(out, world, num_images=p["calibration_images"], seed=seed + 1)
    log(f"toy clip: t0 {t['t0']:.2f} t1 {t['t1']:.2f} t2 {t['t2']:.2f}; pos precision {t['pos_precision']:.3f}, "
        f"neg precision {t['neg_precision']:.3f} (present mean {t['present']['mean']:.1f}, "
        f"absent mean {t['absent']['mean']:.1f})")
    training = {k: v for k, v in trained.items() if k not in ("model", "tokenizer")}
    record_path.write_text(json.dumps({"key": key, "training": training,
                                       "calibration": {k: t[k] for k in ("t0", "t1", "t2", "pos_precision",
                                                                         "neg_precision")}}, indent=1))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m sare_ds.toy.clip", description=__doc__.split("\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--preset", choices=list(PRESETS), default="full")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    out = build_toy_clip(a.out_dir, ToyWorld(), preset=a.preset, seed=a.seed)
    t = json.loads((out / THRESHOLDS_FILE).read_text())
    print(json.dumps({k: t[k] for k in ("t0", "t1", "t2", "pos_precision", "neg_precision")}, indent=1))
    print("launch/curate.py overrides:", shlex.join(curation_overrides(out)))


if __name__ == "__main__":
    main()
