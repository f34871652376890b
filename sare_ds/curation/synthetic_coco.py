"""Write the 6-shape generated scenes of `sare_ds.data.synthetic` as a COCO-style folder, so tests
and benchmarks curate them with launch/curate.py exactly as it would curate COCO (the toy world,
sare_ds.toy, is the quickstart's input).

    python -m sare_ds.curation.synthetic_coco runs/scenes --num-images 64 --image-size 96

Layout: images/<id>.png, instances.json (images, annotations: one box per drawn object,
categories: COCO ids and names), captions.json (one caption per image, in the generator's
style: the drawn objects and, for half of the images, one object that is not drawn).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from sare_ds.data.synthetic import caption_for, write_coco_scenes


def write_synthetic_coco(out_dir: str | Path, num_images: int, image_size: int, seed: int = 0) -> Path:
    out = Path(out_dir)
    records = write_coco_scenes(out, num_images, image_size, seed, hallucination_rate=0.5)
    captions = [{"id": i + 1, "image_id": r["image"]["id"], "caption": caption_for(r["present"], r["hallucinated"])}
                for i, r in enumerate(records)]
    (out / "captions.json").write_text(json.dumps({"images": [r["image"] for r in records], "annotations": captions}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--num-images", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(write_synthetic_coco(a.out_dir, a.num_images, a.image_size, a.seed))


if __name__ == "__main__":
    main()
