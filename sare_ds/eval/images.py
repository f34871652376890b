"""The fixed list of images a CHAIR evaluation captions; always explicit, recorded in every report.

    images = pope_image_list()                 # the 500 val2014 images of the shipped POPE files
    images = read_image_list("my_500.txt")     # COCO ids, one a line
    truth = truth.restricted_to(images)

Papers differ on which 500 val2014 images they caption, so sare_ds never picks "the first N
annotated images": the list is a file or a named packaged list, and `to_json()` goes into
eval.json / report config so a number can always be traced to its images.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

POPE_IMAGE_LIST = "pope-coco-val2014-500"
"""Name of the default list: the images of sare_ds/resources/pope/coco_pope_*.json."""

_COCO_FILE = re.compile(r"COCO_(?:val|train)2014_0*(\d+)\.jpg$")


@dataclass(frozen=True)
class ImageList:
    name: str
    """What the list is, e.g. "pope-coco-val2014-500" or the file name."""
    ids: tuple
    """Image ids in evaluation order."""
    source: str = ""
    """Where the list came from (a file path, or the files it was derived from)."""

    def to_json(self) -> dict:
        return {"name": self.name, "source": self.source, "count": len(self.ids), "ids": list(self.ids)}


class ImageListError(ValueError):
    """An image list file breaks the one-COCO-id-a-line format."""


def read_image_list(path: str | Path) -> ImageList:
    """COCO image ids, one a line; blank lines and lines starting with # are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image list {path} does not exist; pass a file of COCO image ids, one a line "
                                "(or leave --images out for the 500 POPE images)")
    ids, seen = [], set()
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if not text.isdigit():
            raise ImageListError(f"{path}, line {lineno}: {text!r} is not a COCO image id; write one integer id a "
                                 "line (e.g. 391895 for COCO_val2014_000000391895.jpg)")
        image_id = int(text)
        if image_id in seen:
            raise ImageListError(f"{path}, line {lineno}: image {image_id} is listed twice; list each image once")
        seen.add(image_id)
        ids.append(image_id)
    if not ids:
        raise ImageListError(f"{path}: no image id; write one COCO image id a line")
    return ImageList(path.name, tuple(ids), str(path))


def image_list_of_pope(pope_files: dict) -> tuple[tuple[int, ...], dict[str, tuple[int, ...]]]:
    """(the image ids of POPE question files in order of first appearance, the ids per split); every split
    must ask about the same images."""
    from sare_ds.eval.pope import load_questions

    per_split = {}
    for split, path in pope_files.items():
        ids = []
        for q in load_questions(path):
            m = _COCO_FILE.search(q["image"])
            if m is None:
                raise ImageListError(f"{path}: image {q['image']!r} is not a COCO file name "
                                     "(COCO_val2014_ or COCO_train2014_ + 12 digits + .jpg); pass --images FILE for other images")
            ids.append(int(m.group(1)))
        per_split[split] = tuple(dict.fromkeys(ids))
    first, *rest = per_split.values()
    for split, ids in per_split.items():
        if set(ids) != set(first):
            raise ImageListError(f"POPE split {split!r} asks about other images than {next(iter(per_split))!r}; "
                                 "their image lists differ, so pass the caption images with --images FILE")
    return first, per_split


def pope_image_list() -> ImageList:
    """The 500 val2014 images of the shipped POPE question files (random / popular / adversarial)."""
    from sare_ds.eval.pope import packaged_pope_files

    files = packaged_pope_files()
    ids, _ = image_list_of_pope(files)
    return ImageList(POPE_IMAGE_LIST, ids, "sare_ds/resources/pope/coco_pope_{random,popular,adversarial}.json")


def all_images(truth, name: str, source: str = "") -> ImageList:
    """Every image of a ground truth that has a file name (e.g. a generated scene evaluation set)."""
    return ImageList(name, tuple(i for i, f in truth.file_names.items() if f), source)


def dump_image_list(images: ImageList) -> str:
    """The list as a file `read_image_list` reads back (a header comment, then one id a line)."""
    return f"# {images.name} ({images.source}), {len(images.ids)} images\n" + "".join(f"{i}\n" for i in images.ids)


__all__ = ["ImageList", "ImageListError", "POPE_IMAGE_LIST", "all_images", "dump_image_list", "image_list_of_pope",
           "pope_image_list", "read_image_list"]
