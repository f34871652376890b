"""Per-kind curation output (`pos|neg|sent-*.tar`, one record per sample: the format before caption
records) -> caption shards (`cap-*.tar`, one record per caption), so packed training can read it.

    python launch/curate.py convert runs/curated-old runs/curated
    manifest = convert_to_captions("runs/curated-old", "runs/curated")

The samples of one caption are grouped (`sare_ds.data.samples.captions_from_samples`: same image
id, prompt and caption text; a pos/neg sample's span is [len(context), len(context + target)) of
its caption) one chunk at a time: a curation chunk wrote all the samples of its captions under
one shard index, and chunk c of the old directory becomes `cap-c.tar` of the new one. Images are
copied as they are (no re-encoding). Old records carry no minimum object score, so a converted
sent caption's `sent_min_score` is its mean score. Shards are written under `.tmp` names and
renamed when whole; the manifest (with `"converted_from"`) comes last.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from sare_ds.curation.pipeline import COUNT_KEYS, FORMAT, write_json_atomic, package_versions
from sare_ds.data.shards import (
    CAPTION_KIND,
    FORMAT_CAPTIONS,
    MANIFEST,
    ShardWriter,
    chunk_groups,
    grouped_captions,
    list_shards,
    read_manifest,
    shard_format,
    shard_name,
)

# What an old manifest says about the run that stays true of the converted one.
KEPT_FIELDS = ("source", "images", "skipped", "skipped_inputs", "skipped_inputs_not_listed", "dropped_candidates",
               "objects_scored", "thresholds", "config")
KEPT_FILES = ("scores.png", "curation_config.yaml")


def convert_to_captions(old_dir: str | Path, new_dir: str | Path) -> dict:
    """Write the caption-format shards and manifest of an old per-kind curation directory; returns the
    new manifest. NEW_DIR must not hold shards or a manifest already."""
    old_dir, new_dir = Path(old_dir), Path(new_dir)
    if not old_dir.is_dir():
        raise FileNotFoundError(f"{old_dir} is not a directory; pass the output.dir of a curation run")
    fmt = shard_format(old_dir)
    if fmt == FORMAT_CAPTIONS:
        raise ValueError(f"{old_dir} already holds caption shards (format {FORMAT_CAPTIONS!r}); train from it as it is")
    if new_dir.resolve() == old_dir.resolve():
        raise ValueError(f"NEW_DIR {new_dir} is OLD_DIR; write the caption shards to another directory")
    if new_dir.exists() and (any(new_dir.glob("*.tar")) or (new_dir / MANIFEST).exists()):
        raise FileExistsError(f"{new_dir} already holds shards or a manifest; pass a new or empty directory "
                              "(or delete it first)")
    new_dir.mkdir(parents=True, exist_ok=True)
    for leftover in new_dir.glob("*.tar.tmp"):  # an interrupted conversion's half-written shards
        leftover.unlink()

    old_manifest = read_manifest(old_dir) or {}
    urls = list_shards(old_dir)
    counts = {k: 0 for k in COUNT_KEYS}
    samples_in = 0
    shards = []
    for index, group in chunk_groups(urls):
        index = 0 if index is None else index  # shards without the naming: one chunk
        captions = grouped_captions(group, decode_images=False)
        if not captions:
            continue
        with ShardWriter(new_dir / shard_name(CAPTION_KIND, index)) as w:
            for cap in captions:
                w.write(f"{index:06d}_{w.count:07d}", cap.image.data, cap.image.ext, cap.to_json())
                for kind, n in cap.kind_counts().items():
                    counts[kind] += n
                    samples_in += n
                counts["captions"] += 1
        shards.append({"name": w.path.name, "kind": CAPTION_KIND, "count": w.count, "chunk": index})
    old_counts = old_manifest.get("counts")
    if old_counts and sum(old_counts.values()) != samples_in:
        raise RuntimeError(f"{old_dir}: its manifest counts {old_counts} samples, but {samples_in} were converted; "
                           "the directory changed or is incomplete. Fix: re-run the old curation, or delete its "
                           f"manifest to convert the shards that are there (then delete {new_dir})")
    for name in KEPT_FILES:
        if (old_dir / name).is_file():
            shutil.copy2(old_dir / name, new_dir / name)
    manifest = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "converted_from": {"dir": str(old_dir.resolve()), "format": fmt,
                                   "counts": old_counts or {"samples": samples_in}},
                "counts": counts}
    manifest.update({k: old_manifest[k] for k in KEPT_FIELDS if k in old_manifest})
    manifest["shards"] = shards
    if (new_dir / "scores.png").is_file():
        manifest["histogram"] = "scores.png"
    manifest["versions"] = package_versions()
    write_json_atomic(new_dir / MANIFEST, manifest)
    return manifest
