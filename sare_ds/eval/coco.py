"""COCO-format ground truth for CHAIR: objects per image and reference captions.

    truth = CocoTruth.from_files(["instances_val2014.json"], ["captions_val2014.json"])
    truth.objects[391895]   # {'person', 'bicycle', ...}
    images = truth.image_paths("/data/coco/val2014")

As in the CHAIR reference, the ground-truth objects of an image are the categories of its
instance annotations plus the objects the vocabulary finds in its reference captions
(several files, e.g. train + val, are merged). The standard COCO JSON layout is read:
`images` [{id, file_name}], `annotations` [{image_id, category_id} or {image_id, caption}],
`categories` [{id, name}].
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from sare_ds.objects import CocoVocabulary


class CocoFormatError(ValueError):
    """A COCO JSON file lacks a field the evaluation needs; the message names file and fix."""


def _read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file {path} does not exist; pass the instances_*.json / "
                                "captions_*.json of the images being evaluated")
    data = json.loads(path.read_text())
    for key in ("images", "annotations"):
        if key not in data:
            raise CocoFormatError(f"{path}: no `{key}` list; a COCO annotation file has `images` and `annotations`")
    return data


@dataclass
class CocoTruth:
    objects: dict[int | str, set[str]] = field(default_factory=dict)
    """Ground-truth categories per image id."""
    captions: dict[int | str, list[str]] = field(default_factory=dict)
    """Reference captions per image id."""
    file_names: dict[int | str, str] = field(default_factory=dict)
    """Image file name per image id (relative to the image folder)."""

    @classmethod
    def from_files(cls, instances: list[str | Path], captions: list[str | Path],
                   vocab: CocoVocabulary | None = None) -> "CocoTruth":
        vocab = vocab or CocoVocabulary.default()
        truth = cls()
        for path in instances:
            data = _read_json(path)
            truth._add_images(data)
            names = {c["id"]: c["name"] for c in data.get("categories", [])}
            for ann in data["annotations"]:
                name = names.get(ann.get("category_id"))
                category = vocab.category_of(name) if name is not None else None
                if category is None:
                    raise CocoFormatError(
                        f"{path}: annotation {ann.get('id', '?')} has category_id {ann.get('category_id')!r} "
                        f"({name!r}), which is not a category of the synonyms vocabulary; fix: use COCO's "
                        "80 category names or extend the synonyms file")
                truth.objects.setdefault(ann["image_id"], set()).add(category)
        for path in captions:
            data = _read_json(path)
            truth._add_images(data)
            for ann in data["annotations"]:
                if "caption" not in ann:
                    raise CocoFormatError(f"{path}: annotation {ann.get('id', '?')} has no `caption`; "
                                          "pass a captions_*.json file here")
                truth.captions.setdefault(ann["image_id"], []).append(ann["caption"])
                truth.objects.setdefault(ann["image_id"], set()).update(vocab.objects(ann["caption"]))
        return truth

    def _add_images(self, data: dict) -> None:
        for img in data["images"]:
            self.file_names.setdefault(img["id"], img.get("file_name", ""))
            self.objects.setdefault(img["id"], set())

    @property
    def image_ids(self) -> list:
        """Images that have a file name, in file order."""
        return [i for i, name in self.file_names.items() if name]

    def image_paths(self, image_dir: str | Path, limit: int = 0) -> list[tuple]:
        """(image_id, path) of the images with annotations; `limit` > 0 keeps the first ones."""
        ids = self.image_ids[:limit] if limit > 0 else self.image_ids
        return [(i, Path(image_dir) / self.file_names[i]) for i in ids]


def load_image(path: str | Path):
    """RGB PIL image; a missing file names itself and the fix."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist; check the image folder matches the annotation file")
    with Image.open(path) as im:
        return im.convert("RGB")
