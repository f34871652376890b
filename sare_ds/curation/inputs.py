"""Image inputs of curation: a folder of images, a COCO layout, or WebDataset shards of images.

Every source gives a deterministic list of work units (chunks), the same on every rank, so
rank r can take chunks r, r + world, ... and an interrupted run finds the same chunks again.
An item is an image id plus a loader; loading may fail (a missing or corrupt file) and is
reported as a reason, not an exception, so curation can skip and count it.

    source = open_source(cfg.input, images_per_chunk=1000)
    for chunk in source.chunks(): for item in source.items(chunk): ...
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from PIL import Image, UnidentifiedImageError

from sare_ds.data.shards import is_remote, read_json_file, shard_list

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
SHARD_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass
class LoadedImage:
    image: Image.Image
    """Decoded RGB image."""
    data: bytes
    """The encoded source bytes (copied into the shard when already in the output format)."""
    format: str
    """Source encoding as a shard extension: png, jpg or other."""


@dataclass
class Item:
    image_id: str
    load: Callable[[], bytes]
    """Returns the encoded image bytes (may raise OSError for a missing file)."""
    present: set[str] | None = None
    """COCO categories annotated in the image (None when the input has no annotations)."""
    source: str = ""
    """Where the image comes from (its file, or `<shard>#<key>`): named in the manifest when it is skipped."""


def decode_image(data: bytes) -> LoadedImage:
    """Decode and fully load (a truncated file fails here, not later in a worker)."""
    img = Image.open(io.BytesIO(data))
    fmt = {"PNG": "png", "JPEG": "jpg"}.get(img.format or "", "other")
    img.load()
    return LoadedImage(img.convert("RGB"), data, fmt)


def load_item(item: Item) -> tuple[LoadedImage | None, str | None]:
    """(image, None) or (None, skip reason)."""
    try:
        data = item.load()
    except OSError:
        return None, "missing_image"
    try:
        return decode_image(data), None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None, "unreadable_image"


@dataclass
class Source:
    description: str
    units: list = field(default_factory=list)
    """Chunks: lists of Items (folder, COCO) or shard URLs (one chunk per input shard)."""
    expand: Callable[[object], Iterator[Item]] | None = None

    def chunks(self) -> list:
        return self.units

    def items(self, chunk) -> Iterator[Item]:
        return iter(chunk) if self.expand is None else self.expand(chunk)


def _read_file(path: Path) -> Callable[[], bytes]:
    return lambda: path.read_bytes()


def _chunked(items: list[Item], size: int) -> list[list[Item]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def folder_source(path: Path, per_chunk: int, limit: int) -> Source:
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"input.path = {str(path)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}); "
                                "fix: point it at an image folder")
    if limit:
        files = files[:limit]
    # The relative path without suffix is the id: unique and stable across runs.
    items = [Item(str(p.relative_to(path).with_suffix("")).replace(os.sep, "/"), _read_file(p), source=str(p))
             for p in files]
    return Source(f"folder {path} ({len(items)} images)", _chunked(items, per_chunk))


def coco_source(path: Path, annotations: Path, per_chunk: int, limit: int, vocabulary=None) -> Source:
    if not annotations.is_file():
        raise FileNotFoundError(f"input.annotations = {str(annotations)!r} does not exist; "
                                "fix: pass the COCO instances JSON (annotations/instances_*.json)")
    data = read_json_file(annotations, "input.annotations =", "pass a whole COCO instances JSON "
                          "(annotations/instances_*.json; download or copy it again if it was cut short)")
    if not isinstance(data, dict) or "images" not in data:
        raise ValueError(f"input.annotations = {str(annotations)!r} has no `images` list; it must be a COCO "
                         "instances file (images, annotations, categories)")
    names = {c["id"]: c["name"] for c in data.get("categories", [])}
    if vocabulary is not None:
        # COCO's names are CHAIR's categories; mapping through the vocabulary also accepts synonyms.
        names = {k: vocabulary.category_of(v) or v for k, v in names.items()}
    present: dict = {}
    for ann in data.get("annotations", []):
        if ann.get("category_id") in names:
            present.setdefault(ann["image_id"], set()).add(names[ann["category_id"]])
    images = sorted(data["images"], key=lambda im: str(im["id"]))
    if limit:
        images = images[:limit]
    has_labels = bool(data.get("annotations"))
    items = [Item(str(im["id"]), _read_file(path / im["file_name"]),
                  present.get(im["id"], set()) if has_labels else None, str(path / im["file_name"])) for im in images]
    return Source(f"COCO layout {path} + {annotations.name} ({len(items)} images)", _chunked(items, per_chunk))


def _count_samples(url: str) -> int:
    import webdataset as wds

    return sum(1 for _ in wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples()))


def shards_source(spec: str, per_chunk: int, limit: int, allow_remote: bool) -> Source:  # noqa: ARG001
    """One chunk per input shard (its members are only known by reading it). With a limit, the shards
    are counted first, in order, until the limit is reached, so every rank knows how many images each
    of its chunks takes; the chunk of the shard where the limit falls takes only the rest."""
    urls = []
    # Braces are expanded (and commas split) first, then every name is checked for being a pipe:
    # command or URL: `{p..p}ipe:cmd` is refused like `pipe:cmd` (shard_list).
    for name in shard_list(spec, allow_remote):
        if not is_remote(name) and Path(name).is_dir():
            urls.extend(sorted(str(p) for p in Path(name).glob("*.tar")))
        else:
            urls.append(name)
    if not urls:
        raise FileNotFoundError(f"input.path = {spec!r} names no .tar shards; fix the path or pattern")

    take: dict[str, int] = {}  # url -> images its chunk takes (limit only)
    if limit:
        left, kept = limit, []
        for url in urls:
            if left == 0:
                break
            take[url] = min(left, _count_samples(url))
            left -= take[url]
            kept.append(url)
        urls = kept

    def expand(url: str) -> Iterator[Item]:
        import itertools

        import webdataset as wds

        # Stages: open the shard, group members by key; errors propagate (a corrupt input shard
        # is the user's data: the run stops and names it rather than silently dropping a shard).
        samples = wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples())
        for sample in itertools.islice(iter(samples), take.get(url)):
            ext = next((e for e in SHARD_IMAGE_EXTS if e in sample), None)
            key = sample["__key__"]
            if ext is None:
                yield Item(key, _raise_missing(url, key), source=f"{url}#{key}")
            else:
                yield Item(key, (lambda b=sample[ext]: b), source=f"{url}#{key}")

    images = f", first {sum(take.values())} images" if limit else ""
    return Source(f"shards {spec} ({len(urls)} shards{images})", urls, expand)


def _raise_missing(url: str, key: str) -> Callable[[], bytes]:
    def load() -> bytes:
        raise OSError(f"{url}: sample {key} has no image member")
    return load


def open_source(input_cfg, images_per_chunk: int, vocabulary=None) -> Source:
    fmt, path = input_cfg.format, input_cfg.path
    if fmt == "auto":
        if input_cfg.annotations:
            fmt = "coco"
        elif path.endswith(".tar") or "{" in path or is_remote(path) or (
                Path(path).is_dir() and any(Path(path).glob("*.tar"))):
            fmt = "shards"
        else:
            fmt = "folder"
    if fmt == "shards":
        return shards_source(path, images_per_chunk, input_cfg.limit, input_cfg.allow_remote)
    if not Path(path).is_dir():
        raise FileNotFoundError(f"input.path = {path!r} is not a directory; fix: point it at the image folder")
    if fmt == "coco":
        return coco_source(Path(path), Path(input_cfg.annotations), images_per_chunk, input_cfg.limit, vocabulary)
    return folder_source(Path(path), images_per_chunk, input_cfg.limit)
