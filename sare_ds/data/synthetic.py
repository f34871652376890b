"""Generated scenes for the embedded default: coloured shapes stand for objects.

Each image shows 1-3 objects (each object a fixed shape and colour); its caption names them
and, half of the time, one object that is NOT drawn (a hallucination). Samples come out as
EFUF's curation would make them, with the generator's ground truth standing in for CLIP
scores (present: 35, absent: 15 on the 100 x cosine scale). This is a stand-in until the
curated shards feed training; it is not a measurement of anything.
"""
from __future__ import annotations

import random

from PIL import Image, ImageDraw

from sare_ds.data.samples import Caption, Sample, Span
from sare_ds.data.subsentence import object_span

# name -> (RGB colour, shape)
OBJECTS = {
    "dog": ((220, 40, 40), "square"),
    "cat": ((40, 60, 220), "circle"),
    "car": ((40, 180, 60), "triangle"),
    "bird": ((240, 200, 30), "circle"),
    "cup": ((150, 60, 200), "square"),
    "chair": ((30, 200, 200), "triangle"),
}
PRESENT_SCORE, ABSENT_SCORE = 35.0, 15.0


def draw_scene(objects: list[str], size: int, rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (size, size), (245, 245, 245))
    draw = ImageDraw.Draw(img)
    cell = size // 2
    slots = rng.sample(range(4), len(objects))
    for name, slot in zip(objects, slots):
        colour, shape = OBJECTS[name]
        x0, y0 = (slot % 2) * cell + 2, (slot // 2) * cell + 2
        x1, y1 = x0 + cell - 4, y0 + cell - 4
        if shape == "square":
            draw.rectangle([x0, y0, x1, y1], fill=colour)
        elif shape == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=colour)
        else:
            draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=colour)
    return img


def caption_for(present: list[str], hallucinated: str | None) -> str:
    text = "The image shows a " + ", a ".join(present) + "."
    if hallucinated:
        text += f" There is also a {hallucinated} nearby."
    return text


def caption_corpus() -> list[str]:
    names = list(OBJECTS)
    return [caption_for(names[i:i + 3], names[i - 1]) for i in range(len(names))]


def generate_captions(num_images: int, image_size: int, prompt: str, seed: int) -> list[Caption]:
    """One caption record per generated image: a span per named object, sent when nothing is hallucinated."""
    rng = random.Random(seed)
    names = list(OBJECTS)
    captions: list[Caption] = []
    for idx in range(num_images):
        present = rng.sample(names, rng.randint(1, 3))
        absent = [n for n in names if n not in present]
        hallucinated = rng.choice(absent) if rng.random() < 0.5 else None
        image = draw_scene(present, image_size, rng)
        text = caption_for(present, hallucinated)
        spans = []
        for name in present + ([hallucinated] if hallucinated else []):
            context, target = object_span(text, name)
            kind = "neg" if name == hallucinated else "pos"
            spans.append(Span(len(context), len(context) + len(target), kind, name,
                              ABSENT_SCORE if kind == "neg" else PRESENT_SCORE))
        captions.append(Caption(image, prompt, text, spans, sent=hallucinated is None, sent_score=PRESENT_SCORE,
                                sent_min_score=PRESENT_SCORE, image_id=f"synthetic-{idx:05d}"))
    return captions


def generate_samples(num_images: int, image_size: int, prompt: str, seed: int) -> list[Sample]:
    """The same data as per-kind samples (EFUF's unit): each caption's spans, then its sent sample."""
    return [s for c in generate_captions(num_images, image_size, prompt, seed) for s in c.unpack()]


# COCO's own category ids for the generator's objects.
COCO_IDS = {"bird": 16, "cat": 17, "dog": 18, "cup": 47, "chair": 62, "car": 3}


def write_coco_scenes(out_dir, num_images: int, image_size: int, seed: int,
                      hallucination_rate: float = 0.0, name_format: str = "{:06d}.png") -> list[dict]:
    """Draw scenes into <out_dir>/images and write <out_dir>/instances.json (COCO format).

    Returns one record per image: {"image": COCO image entry, "present": [...], "absent": [...],
    "hallucinated": name or None}; with probability `hallucination_rate` an image gets one absent
    object named as hallucinated (for captions that mimic an MLLM's). Callers write their own
    captions/questions from these records.
    """
    import json
    from pathlib import Path

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    names = list(OBJECTS)
    records, annotations = [], []
    for idx in range(num_images):
        present = rng.sample(names, rng.randint(1, 3))
        absent = [n for n in names if n not in present]
        hallucinated = rng.choice(absent) if rng.random() < hallucination_rate else None
        image = {"id": idx + 1, "file_name": name_format.format(idx + 1), "width": image_size, "height": image_size}
        draw_scene(present, image_size, rng).save(out / "images" / image["file_name"])
        for name in present:
            annotations.append({"id": len(annotations) + 1, "image_id": image["id"], "category_id": COCO_IDS[name],
                                "bbox": [0, 0, image_size, image_size], "area": image_size * image_size,
                                "iscrowd": 0})
        records.append({"image": image, "present": present, "absent": absent, "hallucinated": hallucinated,
                        "rng": rng})
    categories = [{"id": COCO_IDS[n], "name": n, "supercategory": "object"} for n in names]
    (out / "instances.json").write_text(json.dumps({"images": [r["image"] for r in records],
                                                    "annotations": annotations, "categories": categories}))
    return records
