"""A COCO-format evaluation set of the generated scenes (the toy world / quickstart).

    paths = write_scene_eval_set("runs/eval-scenes", num_images=16, image_size=32, seed=1)
    # {'image_dir', 'instances', 'captions', 'pope': {'random': ...}}

Images are drawn by sare_ds.data.synthetic (coloured shapes standing for COCO objects); the
instance file lists the drawn objects, the caption file two grounded reference captions per
image, and a POPE-style question file asks about every drawn object (yes) and as many
absent ones (no). The seed should differ from the training data's seed.
"""
from __future__ import annotations

import json
from pathlib import Path

from sare_ds.data.synthetic import caption_for, write_coco_scenes


def write_scene_eval_set(out_dir: str | Path, num_images: int = 16, image_size: int = 32, seed: int = 1) -> dict:
    out_dir = Path(out_dir)
    records = write_coco_scenes(out_dir, num_images, image_size, seed, name_format="scene_{:05d}.png")
    captions, questions = [], []
    for r in records:
        present, image_id, file_name = r["present"], r["image"]["id"], r["image"]["file_name"]
        captions.append({"id": len(captions) + 1, "image_id": image_id, "caption": caption_for(present, None)})
        captions.append({"id": len(captions) + 1, "image_id": image_id,
                         "caption": "A picture of a " + " and a ".join(reversed(present)) + "."})
        absent = r["rng"].sample(r["absent"], len(present))
        for name, label in [(n, "yes") for n in present] + [(n, "no") for n in absent]:
            questions.append({"question_id": len(questions) + 1, "image": file_name,
                              "text": f"Is there a {name} in the image?", "label": label})
    images = [r["image"] for r in records]
    paths = {"image_dir": str(out_dir / "images"), "instances": str(out_dir / "instances.json"),
             "captions": str(out_dir / "captions.json"), "pope": {"random": str(out_dir / "pope_random.json")}}
    Path(paths["captions"]).write_text(json.dumps({"images": images, "annotations": captions}))
    Path(paths["pope"]["random"]).write_text("".join(json.dumps(q) + "\n" for q in questions))
    (out_dir / "eval_set.json").write_text(json.dumps(paths, indent=1))
    return paths
