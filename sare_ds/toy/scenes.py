"""The toy world's scenes: coloured shapes standing for 12 COCO categories, with co-occurrence.

    world = ToyWorld()                                   # fixed categories, pairs, looks
    scene = world.sample_scene(random.Random(0))         # Scene(objects=[...], boxes=[...])
    image = world.draw(scene, random.Random(0))          # 64 x 64 PIL image
    world.caption(scene.objects)                         # "The image shows a dog, a frisbee and a cat."
    write_scene_set("runs/toy/scenes/eval", world, 200, seed=200)   # COCO-format eval set + POPE files

Each category has its own look (shape and colour) and sits in one cell of a 2 x 2 grid with
random scale and offset. Five categories are *triggers* with a *partner* (dog -> frisbee,
laptop -> mouse, ...): when a trigger is drawn its partner is drawn too with probability
`co_occurrence` if the scene has room for it. Captions list the objects in a fixed order that puts each partner right
after its trigger.

Hallucination comes from the captions the captioner is trained on, the mechanism real
MLLMs show (co-occurrence in noisy web captions; LURE, Zhou et al. 2023): `training_caption`
mentions an absent partner after its trigger with probability `caption_noise`. A captioner
that learns the captions' statistics then names the partner whenever it sees the trigger,
present or not. Evaluation uses the ground truth (annotations and clean reference captions).
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

# name -> (shape, RGB colour). Names are COCO category names (single words, so CHAIR's
# synonym list maps each back to itself); COCO_IDS gives their COCO ids.
LOOKS = {
    "dog": ("circle", (150, 85, 40)),
    "frisbee": ("ring", (230, 30, 30)),
    "laptop": ("square", (110, 110, 125)),
    "mouse": ("diamond", (25, 25, 25)),
    "fork": ("triangle", (40, 170, 60)),
    "knife": ("bar", (30, 110, 220)),
    "toilet": ("square", (190, 150, 250)),
    "sink": ("cross", (20, 200, 200)),
    "cup": ("triangle", (250, 140, 0)),
    "spoon": ("diamond", (160, 40, 180)),
    "cat": ("cross", (235, 200, 0)),
    "car": ("circle", (230, 80, 160)),
}
COCO_IDS = {"dog": 18, "frisbee": 34, "laptop": 73, "mouse": 74, "fork": 48, "knife": 49, "toilet": 70,
            "sink": 81, "cup": 47, "spoon": 50, "cat": 17, "car": 3}
# trigger -> partner (objects that usually appear together).
PAIRS = {"dog": "frisbee", "laptop": "mouse", "fork": "knife", "toilet": "sink", "cup": "spoon"}
CAPTION_PROMPT_QA = "Is there a {obj} in the image?"


@dataclass
class Scene:
    objects: list[str]
    """Drawn categories, in caption order."""
    boxes: list[list[int]] = field(default_factory=list)
    """COCO [x, y, w, h] of each object (same order)."""


@dataclass
class ToyWorld:
    image_size: int = 64
    """Side of the drawn images in pixels."""
    min_objects: int = 1
    max_objects: int = 4
    co_occurrence: float = 0.6
    """P(a drawn trigger pulls its partner in | the scene has room for one more object). Scenes draw
    their object count first, so one-object scenes never hold a pair: overall about 46 % of the
    scenes with a trigger also show its partner, and about 43 % of all scenes show a trigger
    without its partner (the scenes a co-occurrence-biased captioner hallucinates on)."""
    caption_noise: float = 0.75
    """P(an absent partner is named after its trigger) in the captioner's training captions."""
    categories: list[str] = field(default_factory=lambda: list(LOOKS))

    def __post_init__(self):
        if not 1 <= self.min_objects <= self.max_objects <= 4:
            raise ValueError(f"ToyWorld objects {self.min_objects}..{self.max_objects}: the 2 x 2 grid holds 1-4; "
                             "use min_objects >= 1 and max_objects <= 4")
        if not 32 <= self.image_size <= 512:
            raise ValueError(f"ToyWorld image_size {self.image_size}: use 32-512 px (64-96 is the toy default)")
        for p in ("co_occurrence", "caption_noise"):
            if not 0.0 <= getattr(self, p) <= 1.0:
                raise ValueError(f"ToyWorld {p} = {getattr(self, p)}: a probability, use a value in [0, 1]")
        unknown = [c for c in self.categories if c not in LOOKS]
        if unknown:
            raise ValueError(f"ToyWorld categories {unknown}: no look defined; use names from {list(LOOKS)}")
        if len(set(self.categories)) != len(self.categories) or len(self.categories) < 10:
            raise ValueError(f"ToyWorld categories {self.categories}: need at least 10 distinct names (the scenes "
                             f"hold up to 4 objects and POPE asks about as many absent ones); use names from "
                             f"{list(LOOKS)}")

    @property
    def order(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.categories)}

    # ------------------------------------------------------------------ scenes
    def sample_objects(self, rng: random.Random) -> list[str]:
        n = rng.randint(self.min_objects, self.max_objects)
        chosen: list[str] = []
        while len(chosen) < n:
            name = rng.choice([c for c in self.categories if c not in chosen])
            chosen.append(name)
            partner = PAIRS.get(name)
            if (partner in self.categories and partner not in chosen and len(chosen) < n
                    and rng.random() < self.co_occurrence):
                chosen.append(partner)
        # A partner drawn on its own is fine; only a trigger pulls its partner in.
        return sorted(chosen, key=self.order.__getitem__)

    def sample_scene(self, rng: random.Random) -> Scene:
        objects = self.sample_objects(rng)
        cell = self.image_size // 2
        boxes = []
        for slot in rng.sample(range(4), len(objects)):
            side = int(cell * rng.uniform(0.55, 0.9))
            x0 = (slot % 2) * cell + rng.randint(0, cell - side)
            y0 = (slot // 2) * cell + rng.randint(0, cell - side)
            boxes.append([x0, y0, side, side])
        return Scene(objects, boxes)

    def draw(self, scene: Scene, rng: random.Random) -> Image.Image:
        tone = rng.randint(225, 250)
        img = Image.new("RGB", (self.image_size, self.image_size), (tone, tone, tone - 5))
        d = ImageDraw.Draw(img)
        for name, (x, y, w, h) in zip(scene.objects, scene.boxes):
            shape, colour = LOOKS[name]
            x1, y1, cx, cy = x + w - 1, y + h - 1, x + w // 2, y + h // 2
            if shape == "square":
                d.rectangle([x, y, x1, y1], fill=colour)
            elif shape == "circle":
                d.ellipse([x, y, x1, y1], fill=colour)
            elif shape == "ring":
                d.ellipse([x, y, x1, y1], outline=colour, width=max(2, w // 5))
            elif shape == "triangle":
                d.polygon([(x, y1), (cx, y), (x1, y1)], fill=colour)
            elif shape == "diamond":
                d.polygon([(cx, y), (x1, cy), (cx, y1), (x, cy)], fill=colour)
            elif shape == "bar":
                d.rectangle([x, cy - h // 6, x1, cy + h // 6], fill=colour)
            elif shape == "cross":
                t = max(2, w // 6)
                d.rectangle([x, cy - t, x1, cy + t], fill=colour)
                d.rectangle([cx - t, y, cx + t, y1], fill=colour)
        return img

    # ------------------------------------------------------------------ text
    def caption(self, objects: list[str]) -> str:
        """The ground-truth caption (a reference caption) of these objects."""
        names = [f"a {o}" for o in sorted(objects, key=self.order.__getitem__)]
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        return f"The image shows {listed}."

    def noisy_objects(self, objects: list[str], rng: random.Random) -> list[str]:
        """The objects a training caption names: the drawn ones plus, with probability
        caption_noise, each absent partner of a drawn trigger."""
        named = list(objects)
        for o in objects:
            partner = PAIRS.get(o)
            if partner in self.categories and partner not in objects and rng.random() < self.caption_noise:
                named.append(partner)
        return sorted(named, key=self.order.__getitem__)

    def training_caption(self, objects: list[str], rng: random.Random) -> str:
        return self.caption(self.noisy_objects(objects, rng))

    def hallucination_prone(self, objects: list[str]) -> list[str]:
        """Absent partners of drawn triggers: what a co-occurrence-biased captioner names."""
        return [PAIRS[o] for o in objects if PAIRS.get(o) in self.categories and PAIRS[o] not in objects]

    def to_json(self) -> dict:
        return {**asdict(self), "pairs": {k: v for k, v in PAIRS.items() if k in self.categories},
                "looks": {c: LOOKS[c] for c in self.categories}, "coco_ids": {c: COCO_IDS[c] for c in self.categories}}


def qa_answer(name: str, present: bool) -> str:
    """The answer the toy captioner is trained to give to CAPTION_PROMPT_QA. POPE's parser reads
    "not" as no. The object is named before the verdict, so the verdict token sits right after
    the name it is about (a two-layer toy LLM learns that binding quickly)."""
    return f"The {name} is in the image." if present else f"The {name} is not in the image."


# ---------------------------------------------------------------------- files
def write_scene_set(out_dir: str | Path, world: ToyWorld, num_images: int, seed: int, *,
                    pope_per_image: int = 3) -> dict:
    """Draw `num_images` scenes as a COCO-format evaluation set and return its paths.

    <out_dir>/images/*.png, instances.json (one box per drawn object), captions.json (two clean
    reference captions per image), pope_random.json and pope_adversarial.json (per image up to
    `pope_per_image` present objects (yes) and as many absent ones (no); random: absent objects
    drawn uniformly; adversarial: absent co-occurring partners first, as POPE's adversarial
    split takes the objects that co-occur most), world.json and eval_set.json (what
    sare_ds.eval.EvalData.from_eval_set reads).
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    images, instances, captions = [], [], []
    pope = {"random": [], "adversarial": []}
    for idx in range(num_images):
        scene = world.sample_scene(rng)
        image = {"id": idx + 1, "file_name": f"scene_{idx + 1:05d}.png", "width": world.image_size,
                 "height": world.image_size}
        world.draw(scene, rng).save(out / "images" / image["file_name"])
        images.append(image)
        for name, box in zip(scene.objects, scene.boxes):
            instances.append({"id": len(instances) + 1, "image_id": image["id"], "category_id": COCO_IDS[name],
                              "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
        listed = " and ".join(f"a {o}" for o in reversed(scene.objects))
        for text in (world.caption(scene.objects), f"A picture of {listed}."):
            captions.append({"id": len(captions) + 1, "image_id": image["id"], "caption": text})
        present = rng.sample(scene.objects, min(pope_per_image, len(scene.objects)))
        absent = [c for c in world.categories if c not in scene.objects]
        co = [p for p in world.hallucination_prone(scene.objects)]
        choices = {"random": rng.sample(absent, len(present)),
                   "adversarial": (co + rng.sample([a for a in absent if a not in co], len(absent) - len(co)))[:len(present)]}
        for split, negatives in choices.items():
            for name, label in [(n, "yes") for n in present] + [(n, "no") for n in negatives]:
                pope[split].append({"question_id": len(pope[split]) + 1, "image": image["file_name"],
                                    "text": CAPTION_PROMPT_QA.format(obj=name), "label": label})
    categories = [{"id": COCO_IDS[c], "name": c, "supercategory": "toy"} for c in world.categories]
    paths = {"image_dir": str(out / "images"), "instances": str(out / "instances.json"),
             "captions": str(out / "captions.json"),
             "pope": {s: str(out / f"pope_{s}.json") for s in pope}}
    Path(paths["instances"]).write_text(json.dumps({"images": images, "annotations": instances,
                                                     "categories": categories}))
    Path(paths["captions"]).write_text(json.dumps({"images": images, "annotations": captions}))
    for s, qs in pope.items():
        Path(paths["pope"][s]).write_text("".join(json.dumps(q) + "\n" for q in qs))
    (out / "world.json").write_text(json.dumps({**world.to_json(), "seed": seed, "num_images": num_images}, indent=1))
    from sare_ds.eval.scenes import write_eval_set_file

    write_eval_set_file(out, paths)  # paths relative to the set's own folder
    return paths
