"""Build (or reuse) the toy world: captioner, CLIP with calibrated thresholds, scene sets.

    python -m sare_ds.toy.world runs/toy --preset full --seed 0

Writes, under the root:
  models/captioner/   the tiny LLaVA (save_pretrained; sare_ds.toy.mllm), toy_captioner.json
  models/clip/        toy-clip.json + toy-clip.pt (open_clip), thresholds.json (sare_ds.toy.clip)
  scenes/curation/    scenes for curation: images/ + instances.json (the captioner describes them)
  scenes/eval/        held-out evaluation scenes: COCO instances, reference captions, POPE files
  curate_overrides.txt  launch/curate.py overrides (toy CLIP, calibrated t0/t1/t2), one a line
  world.json          preset, seeds, paths, what was built or reused and how long it took

Everything is keyed by (preset, seed, world, code format): a second call with the same key
reuses what is there, a different key rebuilds. Seeds: the captioner trains with `seed`,
the CLIP with `seed`, curation scenes are drawn with seed + 100, evaluation scenes with
seed + 200 (held out: never seen in training).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

from sare_ds.toy.scenes import ToyWorld, write_scene_set

FORMAT = "sare_ds toy world v1"  # bump when a build step changes, so cached worlds are rebuilt
# preset -> scene counts (the model presets live in sare_ds.toy.mllm / sare_ds.toy.clip).
SCENES = {"full": {"curation": 480, "eval": 200}, "ci": {"curation": 200, "eval": 60}}


def _cached(path: Path, key: dict) -> bool:
    return path.is_file() and json.loads(path.read_text()).get("key") == json.loads(json.dumps(key))


def build_captioner(out: Path, world: ToyWorld, preset: str, seed: int, log=print) -> dict:
    from sare_ds.toy.mllm import preset as captioner_preset
    from sare_ds.toy.mllm import train_toy_captioner

    cfg = captioner_preset(preset, seed=seed)
    key = {"format": FORMAT, "config": asdict(cfg), "world": world.to_json()}
    record = out / "toy_captioner.json"
    if _cached(record, key) and (out / "config.json").is_file():
        log(f"toy world: reusing the captioner in {out}")
        return {"reused": True, **json.loads(record.read_text())}
    record.unlink(missing_ok=True)  # an interrupted rebuild must not leave an old record over new weights
    result = train_toy_captioner(out, world, cfg, log=log)
    record.write_text(json.dumps({"key": key, **result}, indent=1))
    return {"reused": False, **result}


def build_scenes(out: Path, world: ToyWorld, num_images: int, seed: int, log=print) -> dict:
    key = {"format": FORMAT, "world": world.to_json(), "num_images": num_images, "seed": seed}
    record = out / "scenes.json"
    if _cached(record, key):
        log(f"toy world: reusing the scenes in {out}")
        return json.loads(record.read_text())["paths"]
    import shutil

    shutil.rmtree(out, ignore_errors=True)  # fewer images must not leave those of a larger set
    paths = write_scene_set(out, world, num_images, seed)
    record.write_text(json.dumps({"key": key, "paths": paths}, indent=1))
    return paths


def build_world(root: str | Path, preset: str = "full", seed: int = 0, world: ToyWorld | None = None,
                log=print) -> dict:
    """Build or reuse everything under `root`; returns (and writes) root/world.json's content."""
    from sare_ds.toy.clip import build_toy_clip, curation_overrides

    if preset not in SCENES:
        raise ValueError(f"toy world preset {preset!r}: use one of {sorted(SCENES)}")
    world = world or ToyWorld()
    root = Path(root)
    timings = {}
    t = time.perf_counter()
    captioner = build_captioner(root / "models" / "captioner", world, preset, seed, log)
    timings["captioner_s"] = time.perf_counter() - t
    t = time.perf_counter()
    clip_dir = build_toy_clip(root / "models" / "clip", world, preset=preset, seed=seed, log=log)
    timings["clip_s"] = time.perf_counter() - t
    t = time.perf_counter()
    curation = build_scenes(root / "scenes" / "curation", world, SCENES[preset]["curation"], seed + 100, log)
    evaluation = build_scenes(root / "scenes" / "eval", world, SCENES[preset]["eval"], seed + 200, log)
    timings["scenes_s"] = time.perf_counter() - t
    overrides = curation_overrides(clip_dir)
    (root / "curate_overrides.txt").write_text("\n".join(overrides) + "\n")
    thresholds = json.loads((clip_dir / "thresholds.json").read_text())
    summary = {
        "preset": preset, "seed": seed, "world": world.to_json(),
        "seeds": {"captioner": seed, "clip": seed, "curation_scenes": seed + 100, "eval_scenes": seed + 200},
        "captioner": str(root / "models" / "captioner"), "clip": str(clip_dir),
        "captioner_reused": captioner["reused"], "captioner_final_loss": captioner["final_loss"],
        "curation_scenes": curation, "eval_scenes": str(root / "scenes" / "eval"), "eval_files": evaluation,
        "thresholds": {k: thresholds[k] for k in ("t0", "t1", "t2", "pos_precision", "neg_precision")},
        "curate_overrides": overrides, "timings": timings,
    }
    (root / "world.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m sare_ds.toy.world", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", help="folder of the toy world (e.g. runs/toy)")
    ap.add_argument("--preset", choices=sorted(SCENES), default="full")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    summary = build_world(a.root, a.preset, a.seed)
    t = summary["thresholds"]
    print(f"toy world ready in {a.root}: captioner {summary['captioner']}, CLIP {summary['clip']} "
          f"(t0 {t['t0']:.2f}, t1 {t['t1']:.2f}, t2 {t['t2']:.2f})")


if __name__ == "__main__":
    main()
