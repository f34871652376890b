"""The curated-sample shard format: writer, shard listing, manifest and a plain sequential reader.

A curation output directory holds WebDataset tar shards `{kind}-{index:06d}.tar` (kind: pos,
neg, sent), `manifest.json` and `scores.png` (docs/curation.md). Each sample is two tar members
sharing a key: the image (`<key>.png` or `<key>.jpg`) and `<key>.json`, the record
{"image_id", "prompt", "context", "target", "kind", "object", "score", "caption"}.

    for sample in iter_samples("runs/curated", kind="neg"):   # sare_ds.data.samples.Sample
        ...

Shards are written under `<name>.tmp` and renamed when complete, so a shard with its final
name is always whole (an interrupted writer leaves only a .tmp, which the next run removes).
"""
from __future__ import annotations

import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Iterator

from braceexpand import braceexpand
from PIL import Image

from sare_ds.data.samples import KINDS, Sample

MANIFEST = "manifest.json"
IMAGE_EXTS = ("png", "jpg")
RECORD_FIELDS = ("image_id", "prompt", "context", "target", "kind", "object", "score", "caption")
SHARD_RE = re.compile(r"^(pos|neg|sent)-(\d{6})\.tar$")


class CorruptShardError(RuntimeError):
    """A shard (or one of its members) cannot be read; the message names it and the fix."""


def shard_name(kind: str, index: int) -> str:
    if kind not in KINDS:
        raise ValueError(f"shard kind {kind!r} is not one of {KINDS}")
    return f"{kind}-{index:06d}.tar"


def shard_kind(path: str) -> str | None:
    """pos / neg / sent from a shard's file name (`neg-000003.tar`), None if it does not follow the format."""
    m = SHARD_RE.match(os.path.basename(path))
    return m.group(1) if m else None


def is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


# --------------------------------------------------------------------------- writing

def make_record(image_id: str, prompt: str, context: str, target: str, kind: str, obj: str, score: float,
                caption: str) -> dict:
    if kind not in KINDS:
        raise ValueError(f"record kind {kind!r} is not one of {KINDS}")
    return {"image_id": str(image_id), "prompt": prompt, "context": context, "target": target, "kind": kind,
            "object": obj, "score": float(score), "caption": caption}


class ShardWriter:
    """Writes one shard to `<path>.tmp`; `commit()` renames it to `path` (use as a context manager:
    the temporary file is removed if the block raises)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.tmp.parent.mkdir(parents=True, exist_ok=True)
        self._tar = tarfile.open(self.tmp, "w")
        self.count = 0

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o444
        info.mtime = 0  # identical inputs give byte-identical shards (easy to compare runs)
        self._tar.addfile(info, io.BytesIO(data))

    def write(self, key: str, image_bytes: bytes, image_ext: str, record: dict) -> None:
        # WebDataset splits a member name at its first dot into key and extension.
        if not key or "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must be non-empty without '.' or '/' (WebDataset key rule)")
        if image_ext not in IMAGE_EXTS:
            raise ValueError(f"image extension {image_ext!r} must be one of {IMAGE_EXTS}")
        missing = [f for f in RECORD_FIELDS if f not in record]
        if missing:
            raise ValueError(f"record of sample {key} lacks fields {missing}; build it with make_record")
        self._add(f"{key}.{image_ext}", image_bytes)
        self._add(f"{key}.json", json.dumps(record, ensure_ascii=False).encode("utf-8"))
        self.count += 1

    def commit(self) -> int:
        self._tar.close()
        os.replace(self.tmp, self.path)  # atomic on one file system: readers never see half a shard
        return self.count

    def abort(self) -> None:
        self._tar.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


# --------------------------------------------------------------------------- listing

def read_manifest(shard_dir: str | Path) -> dict | None:
    path = Path(shard_dir) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def list_shards(spec, kind: str | None = None, allow_remote: bool = False) -> list[str]:
    """Shard URLs of a curation output directory (its manifest's list, else `*.tar`), a brace
    pattern, a single path or a list of those; optionally only one kind (by file name)."""
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    urls: list[str] = []
    for item in specs:
        item = str(item)
        if is_remote(item):
            if not allow_remote:
                raise ValueError(
                    f"shard source {item!r} is a pipe: command or a remote URL; these are off by default "
                    "so a typo cannot run a command. Fix: pass allow_remote=True (data.allow_remote=true) "
                    "if you mean it, or give a local path")
            urls.extend(braceexpand(item))
        elif Path(item).is_dir():
            manifest = read_manifest(item)
            names = [s["name"] for s in manifest["shards"]] if manifest else sorted(
                p.name for p in Path(item).glob("*.tar"))
            urls.extend(str(Path(item) / n) for n in names)
        else:
            expanded = list(braceexpand(item))
            missing = [u for u in expanded if not Path(u).is_file()]
            if missing:
                raise FileNotFoundError(
                    f"shard(s) {missing[:3]}{' ...' if len(missing) > 3 else ''} of {item!r} do not exist; "
                    "fix the path or brace pattern, or run launch/curate.py to write them")
            urls.extend(expanded)
    if kind is not None:
        urls = [u for u in urls if shard_kind(u) == kind]
    return urls


def shard_counts(urls: list[str], shard_dirs_manifest: dict | None = None) -> dict[str, int]:
    """Samples per shard: from the manifest where it lists the shard, else by reading tar headers."""
    known = {}
    if shard_dirs_manifest:
        known = {s["name"]: s["count"] for s in shard_dirs_manifest.get("shards", [])}
    counts = {}
    for url in urls:
        name = os.path.basename(url)
        if name in known:
            counts[url] = int(known[name])
        else:
            counts[url] = len({m.split(".", 1)[0] for m in _member_names(url)})
    return counts


def _member_names(url: str) -> list[str]:
    try:
        with tarfile.open(url, "r") as tar:
            return [m.name for m in tar if m.isreg()]
    except (tarfile.TarError, OSError, EOFError) as e:
        raise CorruptShardError(f"shard {url}: cannot read its tar headers ({e}); fix: re-run curation for it "
                                "(delete it and its chunk record in .chunks/) or leave it out") from e


# --------------------------------------------------------------------------- reading

def record_to_sample(record: dict, image, where: str) -> Sample:
    missing = [f for f in RECORD_FIELDS if f not in record]
    if missing:
        raise CorruptShardError(f"{where}: record lacks fields {missing}; the shard is not in sare_ds's format "
                                "(docs/curation.md); re-run launch/curate.py")
    return Sample(image=image, prompt=record["prompt"], context=record["context"], target=record["target"],
                  kind=record["kind"], object=record["object"], score=float(record["score"]),
                  image_id=str(record["image_id"]), meta={"caption": record["caption"]})


def decode_members(key: str, members: dict[str, bytes], where: str) -> Sample:
    """A Sample from one key's members (`json` + `png`/`jpg`)."""
    if "json" not in members:
        raise CorruptShardError(f"{where}: sample {key} has no .json record")
    ext = next((e for e in IMAGE_EXTS if e in members), None)
    if ext is None:
        raise CorruptShardError(f"{where}: sample {key} has no .png/.jpg image")
    try:
        record = json.loads(members["json"].decode("utf-8"))
        image = Image.open(io.BytesIO(members[ext]))
        image.load()
    except Exception as e:  # any decoder failure is a corrupt member
        raise CorruptShardError(f"{where}: sample {key} does not decode ({type(e).__name__}: {e})") from e
    return record_to_sample(record, image.convert("RGB"), f"{where}: sample {key}")


def iter_samples(shard_dir_or_pattern, kind: str | None = None) -> Iterator[Sample]:
    """Every sample of the shards in order (shard by shard, members in file order). A simple
    sequential reader, the reference the training stream is tested against."""
    for url in list_shards(shard_dir_or_pattern, kind):
        try:
            with tarfile.open(url, "r") as tar:
                key, members = None, {}
                for info in tar:
                    if not info.isreg():
                        continue
                    k, _, ext = info.name.partition(".")
                    if k != key and key is not None:
                        sample = decode_members(key, members, f"shard {url}")
                        if kind is None or sample.kind == kind:
                            yield sample
                        members = {}
                    key = k
                    members[ext] = tar.extractfile(info).read()
                if key is not None:
                    sample = decode_members(key, members, f"shard {url}")
                    if kind is None or sample.kind == kind:
                        yield sample
        except (tarfile.TarError, EOFError, OSError) as e:
            raise CorruptShardError(f"shard {url} is corrupt or truncated ({e}); fix: re-run curation for it "
                                    "(delete it and its chunk record in .chunks/)") from e
