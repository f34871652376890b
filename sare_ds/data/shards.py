"""The curated-data shard format: writer, shard listing, manifest, format detection and plain
sequential readers.

A curation output directory holds WebDataset tar shards, `manifest.json` and `scores.png`
(docs/curation.md). Two formats, named by the manifest's `"format"`:

  captions  (today's curation) `cap-{index:06d}.tar`: one record per caption, its image
            (`<key>.png` or `<key>.jpg`) and `<key>.json` = `Caption.to_json()`:
            {"image_id", "prompt", "caption", "spans": [{"start", "end", "kind", "object",
            "score"}], "sent", "sent_score", "sent_min_score"}; a span is characters
            [start, end) of the caption.
  samples   (before caption records; a manifest without "format", or with the old
            "sare_ds curated shards v1", is this one) `{kind}-{index:06d}.tar`, kind pos / neg /
            sent: one record per sample, {"image_id", "prompt", "context", "target", "kind",
            "object", "score", "caption"}. `launch/curate.py convert OLD NEW` turns it into the
            captions format.

    for caption in iter_captions("runs/curated"):        # sare_ds.data.samples.Caption (either format)
        ...
    for sample in iter_samples("runs/curated", kind="neg"):   # sare_ds.data.samples.Sample (either format)
        ...

Shards are written under `<name>.tmp` and renamed when complete, so a shard with its final
name is always whole (an interrupted writer leaves only a .tmp, which the next run removes).

A shard source (`data.shards`) becomes names through `shard_list`: brace patterns expanded before
the list is cut at its commas, then every name checked for being a pipe: command or URL (refused
unless allow_remote), before anything is opened.
"""
from __future__ import annotations

import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Iterator, NamedTuple
from urllib.parse import urlparse

from braceexpand import braceexpand
from PIL import Image

from sare_ds.data.samples import KINDS, BadSampleError, Caption, Sample, captions_from_samples

MANIFEST = "manifest.json"
IMAGE_EXTS = ("png", "jpg")
RECORD_FIELDS = ("image_id", "prompt", "context", "target", "kind", "object", "score", "caption")
"""Fields of a per-sample record (format `samples`)."""
CAPTION_FIELDS = ("image_id", "prompt", "caption", "spans", "sent", "sent_score", "sent_min_score")
"""Fields of a caption record (format `captions`), as `Caption.to_json()` writes them."""
CAPTION_REQUIRED = ("prompt", "caption", "spans")
"""The caption-record fields a reader cannot do without (the others have defaults)."""
SPAN_FIELDS = ("start", "end", "kind")

CAPTION_KIND = "cap"
"""Shard name prefix of caption shards, and the stream kind that reads them."""
SHARD_KINDS = KINDS + (CAPTION_KIND,)
SHARD_RE = re.compile(r"^(pos|neg|sent|cap)-(\d{6})\.tar$")

FORMAT_CAPTIONS = "captions"
FORMAT_SAMPLES = "samples"
LEGACY_FORMAT = "sare_ds curated shards v1"
"""The `format` string manifests of the per-sample format carried before caption records."""


class CorruptShardError(RuntimeError):
    """A shard (or one of its members) cannot be read; the message names it and the fix."""


class RawImage(NamedTuple):
    """An image member left encoded (`iter_captions(..., decode_images=False)`: copying, converting)."""

    ext: str
    data: bytes


def shard_name(kind: str, index: int) -> str:
    """`neg-000003.tar` (per-sample format) or `cap-000003.tar` (caption format)."""
    if kind not in SHARD_KINDS:
        raise ValueError(f"shard kind {kind!r} is not one of {SHARD_KINDS}")
    return f"{kind}-{index:06d}.tar"


def shard_kind(path: str) -> str | None:
    """pos / neg / sent / cap from a shard's file name (`neg-000003.tar`), None if it does not follow the format."""
    m = SHARD_RE.match(os.path.basename(str(path)))
    return m.group(1) if m else None


def shard_index(path: str) -> int | None:
    """The chunk index in a shard's file name (`neg-000003.tar` -> 3), None if it does not follow the format."""
    m = SHARD_RE.match(os.path.basename(str(path)))
    return int(m.group(2)) if m else None


def is_remote(url: str) -> bool:
    """Whether a shard name is read through a URL handler rather than as a local file: any name with a
    URL scheme (`pipe:`, `http(s):`, `s3:`, `gs:`, `hf:`, `file:`, ... as urllib parses it, which is
    what webdataset's gopen dispatches on; `pipe:` runs a shell command) and `-` (stdin). A local
    path that looks like one (`data:v1/x.tar`) can be written `./data:v1/x.tar`."""
    url = str(url)
    return url.strip() == "-" or bool(urlparse(url).scheme)


class RemoteSourceError(ValueError):
    """A shard name is a pipe: command or a URL and remote sources were not allowed."""


def _split_top_level(spec: str) -> list[str]:
    """`spec` cut at the commas outside braces: `{a,b}-0.tar,c.tar` -> [`{a,b}-0.tar`, `c.tar`]."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(spec):
        ch = spec[i]
        if ch == "\\":
            i += 2  # an escaped character (braceexpand's `\{`) is never a separator
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth = max(0, depth - 1)
        elif ch == "," and depth == 0:
            parts.append(spec[start:i])
            start = i + 1
        i += 1
    parts.append(spec[start:])
    return parts


def shard_list(spec, allow_remote: bool = False) -> list[str]:
    """The shard names a `data.shards` / `input.path` value stands for, brace patterns expanded
    BEFORE the list is cut at its commas, and every expanded name checked for being remote.

        shard_list("{neg,pos,sent}-00000{0..4}.tar")   # 15 names (the commas inside braces are alternatives)
        shard_list("runs/a,runs/b/cap-{000000..000003}.tar")   # a directory and 4 shards

    Commas outside braces separate items; each item is expanded by braceexpand (webdataset's own
    expansion). A directory stays one name (`list_shards` opens its manifest). Every expanded name
    with a URL scheme (`pipe:` runs a shell command; http(s), s3, gs, hf, ...: `is_remote`) raises
    RemoteSourceError naming it unless allow_remote (data.allow_remote / input.allow_remote) is
    true: the check runs on what would be opened, so `{p..p}ipe:cmd` is refused like `pipe:cmd`.
    A list (or tuple) of specs gives the concatenation of their lists."""
    if not isinstance(spec, (str, Path)):
        return [name for item in spec for name in shard_list(item, allow_remote)]
    text = str(spec)
    names: list[str] = []
    for part in _split_top_level(text):
        part = part.strip()
        if not part:
            continue
        try:
            expanded = list(braceexpand(part))
        except Exception as e:  # braceexpand.UnbalancedBracesError and kin
            raise ValueError(f"shard source {text!r}: cannot expand {part!r} ({type(e).__name__}: {e}); fix the brace "
                             "pattern (e.g. cap-{000000..000009}.tar, {neg,pos}-000000.tar)") from None
        names.extend(n.strip() for n in expanded if n.strip())
    if not allow_remote:
        remote = [n for n in names if is_remote(n)]
        if remote:
            raise RemoteSourceError(
                f"shard source {text!r} names {remote[0]!r}{f' (and {len(remote) - 1} more)' if len(remote) > 1 else ''}"
                ", a pipe: command or a remote URL once its braces are expanded; these are off by default so a typo or "
                "a planted config cannot run a command. Fix: give local paths (write a local path containing ':' as "
                "./path), or set data.allow_remote=true (input.allow_remote=true for curation) if you mean it")
    return names


def json_cut_short(e: json.JSONDecodeError) -> bool:
    """Whether a JSON error looks like a file cut short (the parser ran out of text)."""
    return e.msg.startswith("Unterminated") or e.pos >= len(e.doc.rstrip())


def read_json_file(path: str | Path, what: str, fix: str, error: type = ValueError):
    """json.loads of a file a user gave (or a run wrote), with a truncated or malformed file raised as
    `error` naming the file, where it breaks and the fix (instead of a bare JSONDecodeError)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise error(f"{what} {path} is not UTF-8 text ({e}); fix: {fix}") from None
    except json.JSONDecodeError as e:
        cut = " (it ends early: truncated?)" if json_cut_short(e) else ""
        raise error(f"{what} {path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}{cut}; "
                    f"fix: {fix}") from None


# --------------------------------------------------------------------------- writing

def make_record(image_id: str, prompt: str, context: str, target: str, kind: str, obj: str, score: float,
                caption: str) -> dict:
    """A per-sample record (format `samples`); caption records are `Caption.to_json()`."""
    if kind not in KINDS:
        raise ValueError(f"record kind {kind!r} is not one of {KINDS}")
    return {"image_id": str(image_id), "prompt": prompt, "context": context, "target": target, "kind": kind,
            "object": obj, "score": float(score), "caption": caption}


class ShardWriter:
    """Writes one shard to `<path>.tmp`; `commit()` renames it to `path` (use as a context manager:
    the temporary file is removed if the block raises). Records of either format; one format a shard."""

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
        fields, build = (CAPTION_FIELDS, "Caption.to_json()") if "spans" in record else (RECORD_FIELDS, "make_record")
        missing = [f for f in fields if f not in record]
        if missing:
            raise ValueError(f"record of sample {key} lacks fields {missing}; build it with {build}")
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
    """A curation directory's manifest.json (None without one); a malformed one names itself and the fix."""
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        return None
    manifest = read_json_file(path, "curation manifest", "re-run launch/curate.py with the same output.dir (finished "
                              "chunks are kept and the manifest is rewritten), or restore the file", CorruptShardError)
    if not isinstance(manifest, dict):
        raise CorruptShardError(f"curation manifest {path} holds a {type(manifest).__name__}, not an object; fix: "
                                "re-run launch/curate.py with the same output.dir to rewrite it")
    return manifest


def manifest_format(manifest: dict, where: str = "manifest.json") -> str:
    """`captions` or `samples` from a manifest's "format" (absent, or the old v1 string: `samples`)."""
    fmt = manifest.get("format", FORMAT_SAMPLES)
    if fmt == LEGACY_FORMAT:
        return FORMAT_SAMPLES
    if fmt not in (FORMAT_CAPTIONS, FORMAT_SAMPLES):
        raise ValueError(f"{where}: format {fmt!r} is not one sare_ds reads ({FORMAT_CAPTIONS!r}, "
                         f"{FORMAT_SAMPLES!r}); fix: re-run launch/curate.py with this version of sare_ds")
    return fmt


def list_shards(spec, kind: str | None = None, allow_remote: bool = False) -> list[str]:
    """Shard URLs of a curation output directory (its manifest's list, else `*.tar`), a brace
    pattern, a comma-separated list, a single path or a list of those (`shard_list`: braces
    expanded first, remote names refused unless allow_remote); optionally only one kind (by name)."""
    urls: list[str] = []
    for item in shard_list(spec, allow_remote):
        if is_remote(item):
            urls.append(item)
        elif Path(item).is_dir():
            manifest = read_manifest(item)
            names = [s["name"] for s in manifest.get("shards", [])] if manifest else sorted(
                p.name for p in Path(item).glob("*.tar"))
            urls.extend(str(Path(item) / n) for n in names)
        else:
            urls.append(item)
    missing = [u for u in urls if not is_remote(u) and not Path(u).is_file()]
    if missing:
        raise FileNotFoundError(
            f"shard(s) {missing[:3]}{' ...' if len(missing) > 3 else ''} of {spec!r} do not exist; "
            "fix the path or brace pattern, or run launch/curate.py to write them")
    if kind is not None:
        urls = [u for u in urls if shard_kind(u) == kind]
    return urls


def _format_from_names(urls: list[str]) -> str | None:
    kinds = {shard_kind(u) for u in urls}
    if kinds == {CAPTION_KIND}:
        return FORMAT_CAPTIONS
    if kinds and kinds <= set(KINDS):
        return FORMAT_SAMPLES
    return None  # no shard, names that follow neither format, or a mix


def _peek_format(url: str) -> str:
    """The format of a shard whose name does not tell it: its first .json record."""
    data = None
    if is_remote(url):
        import webdataset as wds

        first = next(iter(wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples())), None)
        data = (first or {}).get("json")
    else:
        with tarfile.open(url, "r") as tar:
            for info in tar:
                if info.isreg() and info.name.endswith(".json"):
                    data = tar.extractfile(info).read()
                    break
    if data is None:
        raise CorruptShardError(f"shard {url}: no .json record to tell its format from; fix: check it is a "
                                "curation shard (launch/curate.py writes them)")
    try:
        record = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptShardError(f"shard {url}: its first .json record does not parse ({e})") from e
    return FORMAT_CAPTIONS if isinstance(record, dict) and "spans" in record else FORMAT_SAMPLES


def shard_format(spec, allow_remote: bool = False) -> str:
    """`captions` or `samples`: what a shard source holds. A directory's manifest says it; without one
    (or for patterns and lists) the shard names do (`cap-*` or `pos|neg|sent-*`), else the first
    record. A source mixing both formats is refused."""
    parts = _split_top_level(str(spec)) if isinstance(spec, (str, Path)) else list(spec)
    groups = []  # (name, shard names): each directory alone, the rest of each list item together
    for part in parts:
        names = shard_list(str(part), allow_remote)
        dirs = [n for n in names if not is_remote(n) and Path(n).is_dir()]
        files = [n for n in names if n not in dirs]
        groups += [(d, [d]) for d in dirs] + ([(str(part).strip(), files)] if files else [])
    if not groups:
        raise FileNotFoundError(f"shard source {spec!r} names no shard; fix data.shards (a curation output.dir, "
                                "a brace pattern or a comma-separated list)")
    dirs = {name for name, members in groups if members == [name] and not is_remote(name) and Path(name).is_dir()}
    found: dict[str, str] = {}
    for item, members in groups:
        manifest = read_manifest(item) if item in dirs else None
        if manifest is not None:
            found[item] = manifest_format(manifest, f"{item}/{MANIFEST}")
            continue
        urls = list_shards(members, allow_remote=allow_remote)
        if not urls:
            raise FileNotFoundError(f"shard source {item!r} holds no .tar shards; fix the path, or run "
                                    "launch/curate.py to write them")
        fmt = _format_from_names(urls)
        if fmt is None:
            kinds = {shard_kind(u) for u in urls}
            if CAPTION_KIND in kinds and kinds & set(KINDS):
                raise ValueError(f"shard source {item!r} mixes caption shards (cap-*) and per-kind shards "
                                 "(pos/neg/sent-*); fix: keep one format per directory (convert the old one with "
                                 "`python launch/curate.py convert OLD_DIR NEW_DIR`)")
            fmt = _peek_format(urls[0])
        found[item] = fmt
    if len(set(found.values())) > 1:
        raise ValueError(f"shard sources {found} are in different formats; fix: convert the per-sample ones with "
                         "`python launch/curate.py convert OLD_DIR NEW_DIR`")
    return next(iter(found.values()))


def shard_counts(urls: list[str], shard_dirs_manifest: dict | None = None) -> dict[str, int]:
    """Records per shard: from the manifest where it lists the shard, else by reading tar headers."""
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


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def record_to_caption(record: dict, image, where: str) -> Caption:
    """A Caption from a caption record; a record of the wrong shape raises CorruptShardError naming the
    field. Whether the spans lie inside the caption is `Caption.check()`'s (a skip, not corruption)."""
    def bad(what: str) -> CorruptShardError:
        return CorruptShardError(f"{where}: caption record {what}; the shard is not in sare_ds's caption format "
                                 "(docs/curation.md); fix: re-run launch/curate.py (or `launch/curate.py convert` "
                                 "for per-kind shards)")

    missing = [f for f in CAPTION_REQUIRED if f not in record]
    if missing:
        raise bad(f"lacks fields {missing}")
    for name in ("prompt", "caption"):
        if not isinstance(record[name], str):
            raise bad(f"field {name!r} is {type(record[name]).__name__}, not a string")
    if not isinstance(record["spans"], list):
        raise bad(f"field 'spans' is {type(record['spans']).__name__}, not a list")
    for i, span in enumerate(record["spans"]):
        if not isinstance(span, dict):
            raise bad(f"span {i} is {type(span).__name__}, not an object")
        lacking = [f for f in SPAN_FIELDS if f not in span]
        if lacking:
            raise bad(f"span {i} lacks fields {lacking}")
        if not (_is_int(span["start"]) and _is_int(span["end"])):
            raise bad(f"span {i} has start/end {span['start']!r}/{span['end']!r}, not integers")
        if not isinstance(span["kind"], str):
            raise bad(f"span {i} has kind {span['kind']!r}, not a string")
    try:
        return Caption.from_json(record, image)
    except (TypeError, ValueError) as e:
        raise bad(f"has a field of the wrong type ({type(e).__name__}: {e})") from e


def decode_members(key: str, members: dict[str, bytes], where: str, decode_image: bool = True) -> Sample | Caption:
    """A Caption (a record with "spans") or a Sample (a per-sample record) from one key's members
    (`json` + `png`/`jpg`). decode_image=False leaves the image as a RawImage (ext, bytes)."""
    if "json" not in members:
        raise CorruptShardError(f"{where}: sample {key} has no .json record")
    ext = next((e for e in IMAGE_EXTS if e in members), None)
    if ext is None:
        raise CorruptShardError(f"{where}: sample {key} has no .png/.jpg image")
    try:
        record = json.loads(members["json"].decode("utf-8"))
        if decode_image:
            image = Image.open(io.BytesIO(members[ext]))
            image.load()
            image = image.convert("RGB")
        else:
            image = RawImage(ext, members[ext])
    except Exception as e:  # any decoder failure is a corrupt member
        raise CorruptShardError(f"{where}: sample {key} does not decode ({type(e).__name__}: {e})") from e
    if not isinstance(record, dict):
        raise CorruptShardError(f"{where}: sample {key}: its .json is a {type(record).__name__}, not a record; "
                                "re-run launch/curate.py")
    if "spans" in record:
        return record_to_caption(record, image, f"{where}: sample {key}")
    return record_to_sample(record, image, f"{where}: sample {key}")


class ShardReadError(CorruptShardError):
    """A shard's tar data breaks (cut inside a member, a bad header, an unreadable file): `samples_read`
    whole samples came before the break."""

    def __init__(self, url: str, samples_read: int, cause: BaseException):
        super().__init__(f"shard {url} is corrupt or truncated after {samples_read} whole sample(s) "
                         f"({type(cause).__name__}: {cause}); fix: re-run curation for it (delete it and its chunk "
                         "record in .chunks/, run launch/curate.py again)")
        self.url, self.samples_read = url, samples_read


def _open_stream(url: str):
    if is_remote(url):  # callers check allow_remote (shard_list) before anything is opened
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    return open(url, "rb")


def iter_raw(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) of one shard in file order, members grouped as webdataset groups them
    (key: the name up to its first dot; extension lower-cased; `__*__` members left out). Local paths
    are read with tarfile; remote names (`is_remote`, allowed by the caller) through webdataset's
    gopen. A read error raises ShardReadError with the number of whole samples yielded before it
    (the sample being read when it broke is not yielded)."""
    yielded = 0
    try:
        stream = _open_stream(url)
    except Exception as e:  # noqa: BLE001  (missing file, a pipe that cannot start, ...)
        raise ShardReadError(url, 0, e) from e
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            key, members = None, {}
            for info in tar:
                if not info.isreg():
                    continue
                name = os.path.basename(info.name)
                if name.startswith("__"):
                    continue
                k, _, ext = info.name.partition(".")
                if k != key and key is not None:
                    yield key, members
                    yielded += 1
                    members = {}
                key = k
                members[ext.lower()] = tar.extractfile(info).read()
            if key is not None:
                yield key, members
                yielded += 1
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise ShardReadError(url, yielded, e) from e
    finally:
        stream.close()


def iter_members(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) of one shard, in file order (`iter_raw`; a broken shard raises
    ShardReadError, a CorruptShardError naming it and the fix)."""
    yield from iter_raw(url)


def _decoded(urls: list[str], decode_image: bool = True) -> Iterator[Sample | Caption]:
    for url in urls:
        for key, members in iter_members(url):
            yield decode_members(key, members, f"shard {url}", decode_image)


def _captions_of(urls: list[str], decode_image: bool = True) -> Iterator[Caption]:
    for item in _decoded(urls, decode_image):
        if not isinstance(item, Caption):
            raise CorruptShardError(f"caption shards: image {item.image_id} is a per-sample ({item.kind}) record; "
                                    "fix: keep one format per source (re-run launch/curate.py)")
        yield item


def chunk_groups(urls: list[str]) -> list[tuple[int | None, list[str]]]:
    """Per-sample shards by chunk, in chunk order: the samples of one caption share a chunk (and so a shard
    index across kinds), so a chunk at a time is enough to group them into captions. Shards whose names
    do not follow the format are one group (index None)."""
    if not all(shard_index(u) is not None for u in urls):
        return [(None, list(urls))] if urls else []
    groups: dict[int, list[str]] = {}
    for u in urls:
        groups.setdefault(shard_index(u), []).append(u)
    return sorted(groups.items())


def grouped_captions(urls: list[str], decode_images: bool = True) -> list[Caption]:
    """The captions of some per-sample shards (`captions_from_samples`; spans in caption order)."""
    samples = list(_decoded(urls, decode_images))
    if any(isinstance(s, Caption) for s in samples):
        raise CorruptShardError(f"per-sample shards {urls} hold caption records; fix: keep one format per "
                                "source (re-run launch/curate.py)")
    try:
        captions = captions_from_samples(samples)
    except BadSampleError as e:
        raise CorruptShardError(f"shards {urls}: {e}") from e
    for cap in captions:
        cap.spans.sort(key=lambda s: s.start)  # caption order, as curation writes them
    return captions


def iter_captions(shard_dir_or_pattern, decode_images: bool = True, allow_remote: bool = False) -> Iterator[Caption]:
    """Every caption of a shard source in order: the records of a caption-format source, or the
    per-kind samples of an old-format one grouped into captions (`captions_from_samples`, one chunk
    at a time). decode_images=False leaves images as RawImage (ext, bytes)."""
    urls = list_shards(shard_dir_or_pattern, allow_remote=allow_remote)
    if shard_format(shard_dir_or_pattern, allow_remote) == FORMAT_CAPTIONS:
        yield from _captions_of(urls, decode_images)
    else:
        for _, group in chunk_groups(urls):
            yield from grouped_captions(group, decode_images)


def iter_samples(shard_dir_or_pattern, kind: str | None = None) -> Iterator[Sample]:
    """Every sample of the shards in order: per-sample shards shard by shard, members in file order;
    caption shards unpacked (`Caption.unpack()`: a sample per span, then the sent one; the caption in
    `meta["caption"]`). A simple sequential reader, the reference the training stream is tested against."""
    if shard_format(shard_dir_or_pattern) == FORMAT_CAPTIONS:
        for cap in _captions_of(list_shards(shard_dir_or_pattern)):
            for sample in cap.unpack():
                if kind is None or sample.kind == kind:
                    sample.meta["caption"] = cap.caption
                    yield sample
        return
    for item in _decoded(list_shards(shard_dir_or_pattern, kind)):
        if not isinstance(item, Sample):
            raise CorruptShardError(f"per-sample shards: image {item.image_id} is a caption record; fix: keep one "
                                    "format per source (re-run launch/curate.py)")
        if kind is None or item.kind == kind:
            yield item

