"""COCO-format ground truth for CHAIR: objects per image, reference captions, the evaluated images.

    truth = CocoTruth.from_files(["instances_val2014.json"], ["captions_val2014.json"])   # mode reference
    truth.objects[391895]                       # {'person', 'bicycle', ...}
    truth = truth.restricted_to(pope_image_list())   # caption exactly these images, in this order
    images = truth.image_paths("/data/coco/val2014")
    corrected = truth.for_mode("corrected")     # same files, objects found by the corrected extractor

As in the CHAIR script, the ground-truth objects of an image are the categories of its instance
annotations plus the objects found in its reference captions by the *same extractor* as the
generated captions (`chair_mode`: reference or corrected), so both sides of the metric move
together. Several files (e.g. train + val, as the script merges them) are merged. The objects
of an image are computed when first asked for, so a 500-image evaluation does not run the
extractor over all 600k COCO captions. The standard COCO JSON layout is read: `images`
[{id, file_name}], `annotations` [{image_id, category_id} or {image_id, caption}],
`categories` [{id, name}].
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from sare_ds.objects import chair_vocabulary, check_chair_mode


class CocoFormatError(ValueError):
    """A COCO JSON file lacks a field the evaluation needs; the message names file and fix."""


def _read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file {path} does not exist; pass the instances_*.json / "
                                "captions_*.json of the images being evaluated")
    from sare_ds.data.shards import read_json_file

    data = read_json_file(path, "COCO annotation file", "download or copy it again (annotations/instances_*.json, "
                          "captions_*.json), or pass the right file", CocoFormatError)
    if not isinstance(data, dict):
        raise CocoFormatError(f"{path}: holds a {type(data).__name__}, not a COCO annotation object with `images` "
                              "and `annotations`; pass the instances_*.json / captions_*.json of the images")
    for key in ("images", "annotations"):
        if key not in data:
            raise CocoFormatError(f"{path}: no `{key}` list; a COCO annotation file has `images` and `annotations`")
    return data


class _ObjectsByImage(Mapping):
    """image id -> ground-truth categories, computed on first access with one extractor."""

    def __init__(self, truth: "CocoTruth"):
        self._truth, self._cache = truth, {}
        self._vocab = chair_vocabulary(truth.chair_mode)

    def __getitem__(self, image_id):
        if image_id not in self._cache:
            if image_id not in self._truth.file_names:
                raise KeyError(image_id)
            found = {self._vocab.category_of(name) for name in self._truth.instance_names.get(image_id, ())}
            for caption in self._truth.captions.get(image_id, ()):
                found.update(self._vocab.objects(caption))
            self._cache[image_id] = found
        return self._cache[image_id]

    def __iter__(self):
        return iter(self._truth.file_names)

    def __len__(self):
        return len(self._truth.file_names)

    def __contains__(self, image_id):
        return image_id in self._truth.file_names


@dataclass
class CocoTruth:
    instance_names: dict = field(default_factory=dict)
    """COCO category names of the instance annotations per image id."""
    captions: dict = field(default_factory=dict)
    """Reference captions per image id."""
    file_names: dict = field(default_factory=dict)
    """Image file name per image id (relative to the image folder); every image of the files."""
    chair_mode: str = "reference"
    """Extractor that finds objects in the reference captions (sare_ds.objects.CHAIR_MODES)."""
    image_list: object = None
    """The evaluated images (sare_ds.eval.images.ImageList); None: every image with a file name."""

    @classmethod
    def from_files(cls, instances: list[str | Path], captions: list[str | Path],
                   mode: str = "reference") -> "CocoTruth":
        check_chair_mode(mode)
        vocab = chair_vocabulary(mode)
        truth = cls(chair_mode=mode)
        for path in instances:
            data = _read_json(path)
            truth._add_images(data)
            names = {c["id"]: c["name"] for c in data.get("categories", [])}
            for ann in data["annotations"]:
                name = names.get(ann.get("category_id"))
                if name is None or vocab.category_of(name) is None:
                    raise CocoFormatError(
                        f"{path}: annotation {ann.get('id', '?')} has category_id {ann.get('category_id')!r} "
                        f"({name!r}), which is not a category of the synonyms vocabulary; fix: use COCO's "
                        "80 category names or extend the synonyms file")
                truth.instance_names.setdefault(ann["image_id"], []).append(name)
        for path in captions:
            data = _read_json(path)
            truth._add_images(data)
            for ann in data["annotations"]:
                if "caption" not in ann:
                    raise CocoFormatError(f"{path}: annotation {ann.get('id', '?')} has no `caption`; "
                                          "pass a captions_*.json file here")
                truth.captions.setdefault(ann["image_id"], []).append(ann["caption"])
        return truth

    def _add_images(self, data: dict) -> None:
        for img in data["images"]:
            self.file_names.setdefault(img["id"], img.get("file_name", ""))

    @property
    def objects(self) -> Mapping:
        """Ground-truth categories per image id (instances + reference-caption objects, this truth's mode)."""
        if getattr(self, "_objects", None) is None:
            self._objects = _ObjectsByImage(self)
        return self._objects

    def for_mode(self, mode: str) -> "CocoTruth":
        """The same annotations with objects found by another CHAIR mode's extractor (self if the same)."""
        check_chair_mode(mode)
        return self if mode == self.chair_mode else replace(self, chair_mode=mode)

    def restricted_to(self, image_list) -> "CocoTruth":
        """The same annotations; image_ids / image_paths give the list's images, in the list's order."""
        known = {i for i, name in self.file_names.items() if name}
        missing = [i for i in image_list.ids if i not in known]
        if missing:
            raise ValueError(
                f"image list {image_list.name!r} ({image_list.source}): {len(missing)} of its {len(image_list.ids)} "
                f"images (e.g. {missing[:3]}) are not in the annotation files ({len(known)} images with a file "
                "name); pass the annotation files that hold them (COCO val2014 instances and captions for the "
                "POPE images) or another list with --images FILE")
        out = replace(self, image_list=image_list)
        out._objects = self._objects if getattr(self, "_objects", None) is not None else None
        return out

    @property
    def image_ids(self) -> list:
        """The evaluated images: the image list's, else every image with a file name (file order)."""
        if self.image_list is not None:
            return list(self.image_list.ids)
        return [i for i, name in self.file_names.items() if name]

    def image_paths(self, image_dir: str | Path, limit: int = 0) -> list[tuple]:
        """(image_id, path) of the evaluated images; `limit` > 0 keeps the first ones (quick looks only)."""
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
