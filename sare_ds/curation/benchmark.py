"""Throughput figures (printed, not a timed test) for curation and the shard stream, tiny models on CPU.

    DS_ACCELERATOR=cpu .venv/bin/python -m sare_ds.curation.benchmark [--images 32] [--out /tmp/sare-bench]

1. curation images/s: tiny random LLaVA captions (greedy, caption.max_new_tokens tokens), tiny
   open_clip local scores, shards written; with the time spent captioning and scoring;
2. window reuse: local scores of images with several objects, windows encoded once for all
   objects vs once per object (what a per-object loop would cost);
3. stream captions/s per worker (read, shuffle, decode, chat-template tokenisation, batch) next
   to the rate at which a SARE training step of the tiny model consumes captions (packed).
"""
from __future__ import annotations

import argparse
import functools
import io
import time
from pathlib import Path

import sare_ds  # noqa: F401  (torchvision guard first)
import torch


def bench_curation(out: Path, images: int, max_new_tokens: int, model_dir: Path) -> Path:
    from sare_ds.curation.config import load_curation_config
    from sare_ds.curation.pipeline import curate, model_captioner
    from sare_ds.curation.scoring import TINY_CLIP_NAME, ClipScorer
    from sare_ds.curation.synthetic_coco import write_synthetic_coco

    scenes = write_synthetic_coco(out / "scenes", images, 96, seed=0)
    cfg = load_curation_config(None, [
        f"input.path={scenes / 'images'}", f"input.annotations={scenes / 'instances.json'}",
        f"model.name_or_path={model_dir}", f"caption.max_new_tokens={max_new_tokens}",
        f"clip.model={TINY_CLIP_NAME}", "clip.pretrained=", "clip.patch_size=24", "clip.window_patches=2",
        f"output.dir={out / 'curated'}", "output.images_per_chunk=8", "output.resume=false",
        "split.t0=0", "split.t1=-100", "split.t2=-100"])
    gen = model_captioner(cfg, device="cpu")
    scorer = ClipScorer.from_config(cfg.clip, "cpu")
    timing = {"caption": 0.0, "score": 0.0}

    def captioner(imgs, prompt, ids):
        t = time.perf_counter()
        out_ = gen(imgs, prompt, ids)
        timing["caption"] += time.perf_counter() - t
        # The random tiny model names no COCO object; keep its cost, give the split something to do.
        return [f"{c} The image shows a dog, a cat. There is a cup." for c in out_]

    class TimedScorer:
        def score(self, imgs, objs):
            t = time.perf_counter()
            r = scorer.score(imgs, objs)
            timing["score"] += time.perf_counter() - t
            return r

    t0 = time.perf_counter()
    manifest = curate(cfg, captioner=captioner, scorer=TimedScorer())
    total = time.perf_counter() - t0
    print(f"[curation] {images} images of 96 px in {total:.2f} s = {images / total:.1f} images/s "
          f"(captioning {timing['caption']:.2f} s at {max_new_tokens} new tokens, CLIP scoring {timing['score']:.2f} s, "
          f"rest: reading, splitting, writing shards); samples {manifest['counts']}")
    return out / "curated"


def bench_window_reuse(n_images: int = 8, n_objects: int = 6) -> None:
    from PIL import Image

    from sare_ds.curation.config import ClipConfig
    from sare_ds.curation.scoring import TINY_CLIP_NAME, ClipScorer

    scorer = ClipScorer.from_config(ClipConfig(model=TINY_CLIP_NAME, pretrained="", patch_size=48,
                                               window_patches=4), "cpu")
    g = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(480, 640, 3, generator=g) * 255).byte().numpy()) for _ in range(n_images)]
    objects = ["dog", "cat", "person", "car", "cup", "chair", "bird", "tv"][:n_objects]
    scorer.score(images[:1], [objects])  # warm-up (text cache filled for both variants)
    t = time.perf_counter()
    shared = scorer.score(images, [objects] * n_images)
    t_shared = time.perf_counter() - t
    t = time.perf_counter()
    per_object = [[scorer.score([img], [[o]])[0][0] for o in objects] for img in images]
    t_each = time.perf_counter() - t
    assert all(abs(a - b) < 1e-3 for ra, rb in zip(shared, per_object) for a, b in zip(ra, rb))
    print(f"[window reuse] {n_images} images 640x480 (70 windows each), {n_objects} objects: encoded once "
          f"{t_shared:.2f} s ({n_images / t_shared:.1f} images/s) vs once per object {t_each:.2f} s: "
          f"speed-up {t_each / t_shared:.1f}x")


def bench_stream(shards: Path, model_dir: Path, steps: int = 10) -> None:
    import dataclasses

    from sare_ds.config import MethodConfig, ModelConfig
    from sare_ds.data.samples import Span
    from sare_ds.data.shards import ShardWriter, iter_captions, shard_name
    from sare_ds.data.stream import ShardStream
    from sare_ds.data.tokenize import tokenize_caption
    from sare_ds.models import load_mllm, select_trainable
    from sare_ds.train.params import PlainParameterSpace
    from sare_ds.train.step import UnlearningStep

    # Random tiny CLIP scores do not split into all kinds; re-label the curated captions' spans
    # round-robin pos/neg and every other caption sent (kinds only: images and texts are the curated
    # ones), into 4 caption shards.
    stream_dir = shards.parent / "stream"
    writers = [ShardWriter(stream_dir / shard_name("cap", i)) for i in range(4)]
    n = 0
    for cap in iter_captions(shards):
        spans = [dataclasses.replace(sp, kind=("pos", "neg")[(n + j) % 2]) for j, sp in enumerate(cap.spans)]
        if not spans:
            spans = [Span(0, len(cap.caption), "neg", "", 15.0)]
        cap = dataclasses.replace(cap, spans=spans, sent=n % 2 == 0)
        buf = io.BytesIO()
        cap.image.save(buf, format="PNG")
        w = writers[n % 4]
        w.write(f"{n % 4:06d}_{w.count:07d}", buf.getvalue(), "png", cap.to_json())
        n += 1
    for w in writers:
        w.commit()
    shards = stream_dir
    adapter = load_mllm(ModelConfig(name_or_path=str(model_dir)))
    per_step = {"cap": 2}
    tokenize = functools.partial(tokenize_caption, adapter=adapter, max_length=512)
    for workers in (0, 2):
        stream = ShardStream(shards, adapter, per_step=per_step, epochs=50, num_workers=workers, max_steps=200)
        t = time.perf_counter()
        count = sum(len(v) for step in stream for mb in step for v in mb.values())
        dt = time.perf_counter() - t
        print(f"[stream] num_workers={workers}: {count} captions in {dt:.2f} s = {count / dt:.0f} captions/s "
              f"({count / dt / max(1, workers):.0f} per worker; includes worker start-up)")
    model_cfg = ModelConfig(name_or_path=str(model_dir))
    select_trainable(adapter, model_cfg)
    params = [p for p in adapter.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    space = PlainParameterSpace(params, opt, None, 1.0)
    pad = adapter.tokenizer.pad_token_id or 0
    step_fn = UnlearningStep(adapter.model, adapter.forward_inputs, space, MethodConfig(), device=torch.device("cpu"),
                             dtype=torch.float32, pad_token_id=pad, check_finite=False)
    batches = list(ShardStream(shards, adapter, per_step=per_step, epochs=50, max_steps=steps + 2,
                               tokenize=lambda c: tokenize(c)))
    micro = [[[s for item in mb["cap"] for s in item] for mb in step] for step in batches]
    for mb in micro[:2]:  # warm-up
        step_fn(mb)
    t = time.perf_counter()
    for mb in micro[2:]:
        step_fn(mb)
    dt = time.perf_counter() - t
    print(f"[train] tiny LLaVA SARE step on CPU (packed captions): {dt / steps * 1e3:.0f} ms/step = "
          f"{per_step['cap'] * steps / dt:.0f} captions/s consumed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--out", default="/tmp/sare-bench")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from sare_ds.data.synthetic import caption_corpus
    from sare_ds.models.tiny import DEFAULT_CORPUS, build_tiny_llava

    model_dir = out / "tiny-llava"
    if not (model_dir / "config.json").is_file():
        build_tiny_llava(model_dir, corpus=DEFAULT_CORPUS + caption_corpus(), seed=0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    shards = bench_curation(out, a.images, a.max_new_tokens, model_dir)
    bench_window_reuse()
    bench_stream(shards, model_dir)


if __name__ == "__main__":
    main()
