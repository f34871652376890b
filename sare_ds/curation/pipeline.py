"""EFUF curation (docs/method.md section 2): caption, find objects, score them with CLIP, split
each caption into its pos / neg spans and sent flag, and write caption records to WebDataset
shards, a manifest and a score histogram.

    manifest = curate(load_curation_config("curate.yaml", overrides))

One record per caption (`sare_ds.data.samples.Caption.to_json()`: image, prompt, caption text,
spans as character offsets, sent flag with mean and minimum score), so training forwards each
image and caption once; a caption with no span that is not a sent response is not written
(counted as `nothing_to_train`). Format: sare_ds/data/shards.py, docs/curation.md.

Work is cut into chunks of `output.images_per_chunk` input images (one input shard for
shard inputs). Chunk c is done by rank c % world_size and writes `cap-c.tar` (not written when
no caption of the chunk has anything to train), under a temporary name renamed when complete,
then its record `.chunks/chunk-c.json` (counts, skipped inputs by reason, scores) last: that
record is the chunk's "done" mark, so an interrupted run redoes only the chunks without one.
Rank 0 writes manifest.json and scores.png when all chunks are done.

Ranks share no long-lived collective: ranks own unequal numbers of chunks (c % world), and a
barrier at the end would time out on the idle ranks while a 7B model still captions. Every rank
checks that the output directory can be resumed with its config (so a mismatch is raised on
every rank, not on rank 0 alone while the others wait), does its chunks and exits; rank 0 then
polls `.chunks/` until every chunk's record is there and writes the manifest. Only starting
over (output.resume=false) on several ranks needs one short barrier, so no rank writes before
rank 0 has deleted the old run.

The captioner and the scorer are injectable (tests use fake captions and stub encoders):
captioner(images, prompt, image_ids) -> captions; scorer.score(images, objects per image) -> scores.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import platform
import shutil
import time
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from sare_ds.eval.distributed import rank_and_world as process_group_rank_and_world

from sare_ds.curation.calibrate import plot_scores
from sare_ds.curation.config import CurationConfig, save_curation_config
from sare_ds.curation.inputs import LoadedImage, load_item, open_source
from sare_ds.curation.split import ObjectScore, first_mentions, split_caption_spans
from sare_ds.data.samples import KINDS, Caption
from sare_ds.data.shards import (
    CAPTION_KIND,
    FORMAT_CAPTIONS,
    MANIFEST,
    SHARD_RE,
    ShardWriter,
    read_json_file,
    shard_kind,
    shard_name,
)

log = logging.getLogger("sare_ds.curation")

CHUNKS = ".chunks"
FORMAT = FORMAT_CAPTIONS
"""The manifest's (and each chunk record's) "format": caption records (docs/curation.md)."""
COUNT_KEYS = ("captions",) + KINDS
"""What a chunk record and the manifest count: captions written, pos / neg spans, sent captions."""
# Fields that do not change what a chunk contains: a resumed run may change them.
NON_SEMANTIC = {("output", "resume"), ("clip", "device"), ("clip", "batch_size"), ("caption", "batch_size"),
                ("output", "histogram_bins")}

FILE_FAULTS = ("missing_image", "unreadable_image")
"""Skip reasons that are faults of an input file (each logged as a warning naming the file)."""
SKIPPED_LISTED = 1000
"""Skipped inputs the manifest names one by one (`skipped_inputs`); more are counted in `skipped` and
`skipped_inputs_not_listed`, and every one stays named in its chunk record (.chunks/chunk-*.json)."""

# captioner(images, prompt, image ids) -> one caption per image; None: no caption exists for it.
Captioner = Callable[[list, str, list[str]], list]


class ResumeMismatchError(ValueError):
    """The output directory holds a run made with a different configuration."""


# --------------------------------------------------------------------------- helpers

# Seconds the start-over barrier (output.resume=false on several ranks) waits for rank 0 to delete
# the old run: deleting files takes seconds; a longer wait means rank 0 failed (see its log).
START_BARRIER_S = 600
# Seconds between two progress lines of rank 0 while it waits for other ranks' chunks.
WAIT_LOG_S = 60.0


def rank_and_world() -> tuple[int, int]:
    """This process's (rank, world size): the process group's when one is initialised (eval's helper),
    else the launcher's RANK / WORLD_SIZE. Curation starts no process group of its own, so under
    torchrun or deepspeed the environment is where the ranks are found (eval's helper alone would
    answer (0, 1) on every rank, and every rank would redo every chunk)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return process_group_rank_and_world()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _start_over_barrier(world: int) -> None:
    """One short gloo barrier (then the group is destroyed): other ranks must not write chunks before
    rank 0 has deleted the previous run (output.resume=false). gloo: only the barrier, on CPU."""
    import datetime

    started_here = not torch.distributed.is_initialized()
    if started_here:
        torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=START_BARRIER_S))
    try:
        torch.distributed.barrier()
    except RuntimeError as e:
        raise RuntimeError(
            f"output.resume=false: rank 0 did not finish deleting the previous run within {START_BARRIER_S} s "
            f"({e}); it most likely failed: its log names the error. Fix that and run the same command again") from e
    finally:
        if started_here:
            torch.distributed.destroy_process_group()


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("sare_ds", "torch", "open_clip_torch", "webdataset", "transformers", "pillow", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def semantic_config(cfg: CurationConfig) -> dict:
    d = dataclasses.asdict(cfg)
    for section, name in NON_SEMANTIC:
        d[section].pop(name, None)
    return d


def load_chunk_records(out_dir: str | Path) -> list[dict]:
    """The chunk records of a curation directory; a damaged one names itself and the fix (delete it:
    its chunk is redone by the next run of the same command)."""
    return [read_json_file(p, "chunk record", f"delete it (and {p.stem.replace('chunk', 'cap')}.tar if there is "
                           "one), then run the same launch/curate.py command again: that chunk is redone")
            for p in sorted((Path(out_dir) / CHUNKS).glob("chunk-*.json"))]


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def encode_image(img: LoadedImage, fmt: str, jpeg_quality: int) -> bytes:
    if img.format == fmt:
        return img.data  # already in the output format: copy, no second lossy encoding
    buf = io.BytesIO()
    if fmt == "png":
        img.image.save(buf, format="PNG")
    else:
        img.image.save(buf, format="JPEG", quality=jpeg_quality)
    return buf.getvalue()


def model_captioner(cfg: CurationConfig, device=None) -> Captioner:
    """The MLLM of cfg.model, decoding as cfg.caption says (sare_ds.models.generate)."""
    from sare_ds.models import load_mllm
    from sare_ds.models.generate import generate_responses

    adapter = load_mllm(cfg.model)
    if device is None:
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    adapter.model.to(device)
    c = cfg.caption

    def caption(images: list, prompt: str, image_ids: list[str]) -> list[str]:  # noqa: ARG001
        return generate_responses(adapter, images, prompt, max_new_tokens=c.max_new_tokens, do_sample=c.do_sample,
                                  temperature=c.temperature, top_p=c.top_p, num_beams=c.num_beams,
                                  batch_size=c.batch_size, device=device)

    return caption


def annotations_captioner(path: str | Path) -> Captioner:
    """Captions looked up by image id in a COCO captions JSON (an id it lacks gives None, counted as
    skipped `no_caption_for_image`; an empty caption in the file stays `empty_caption`)."""
    table = annotation_captions(path)

    def caption(images: list, prompt: str, image_ids: list[str]) -> list[str | None]:  # noqa: ARG001
        return [table.get(i) for i in image_ids]

    return caption


def annotation_captions(path: str | Path) -> dict[str, str]:
    """image id -> first caption of a COCO captions JSON."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"caption.captions_file = {str(path)!r} does not exist; pass a COCO captions JSON")
    data = read_json_file(path, "caption.captions_file =", "pass a whole COCO captions JSON "
                          "(annotations/captions_*.json; download or copy it again if it was cut short)")
    if not isinstance(data, dict) or "annotations" not in data:
        raise ValueError(f"caption.captions_file = {str(path)!r} has no `annotations` list of "
                         "{{image_id, caption}}; pass a COCO captions JSON")
    out: dict[str, str] = {}
    for ann in data["annotations"]:
        out.setdefault(str(ann["image_id"]), str(ann.get("caption", "")))
    return out


# --------------------------------------------------------------------------- one chunk

class ChunkCurator:
    """Turns one chunk of input items into shards + a chunk record."""

    def __init__(self, cfg: CurationConfig, out_dir: Path, captioner: Captioner, scorer, vocabulary):
        self.cfg, self.out_dir = cfg, out_dir
        self.captioner, self.scorer, self.vocabulary = captioner, scorer, vocabulary

    def run(self, index: int, items) -> dict:
        cfg = self.cfg
        rec = {"chunk": index, "format": FORMAT, "images": 0, "curated_images": 0, "nothing_to_train": 0,
               "skipped": {}, "skipped_inputs": [], "dropped": {}, "counts": {k: 0 for k in COUNT_KEYS},
               "shards": [], "scores": []}
        writers: dict[str, ShardWriter] = {}  # at most the chunk's one caption shard, opened on its first record
        torch.manual_seed(cfg.caption.seed + index)  # sampled captions do not depend on which rank ran the chunk
        try:
            batch = []
            for item in items:
                rec["images"] += 1
                img, reason = load_item(item)
                if img is None:
                    self._skip(rec, reason, item)
                    continue
                batch.append((item, img))
                if len(batch) == cfg.caption.batch_size:
                    self._process(batch, rec, writers, index)
                    batch = []
            if batch:
                self._process(batch, rec, writers, index)
            for kind, w in writers.items():
                rec["shards"].append({"name": w.path.name, "kind": kind, "count": w.commit(), "chunk": index})
        except BaseException:
            for w in writers.values():
                w.abort()
            raise
        write_json_atomic(chunk_record_path(self.out_dir, index), rec)
        return rec

    @staticmethod
    def _skip(rec: dict, reason: str, item) -> None:
        """Count one skipped input and name it (id, file, reason) in the chunk record and the manifest."""
        rec["skipped"][reason] = rec["skipped"].get(reason, 0) + 1
        rec["skipped_inputs"].append({"image_id": str(item.image_id), "file": item.source, "reason": reason})
        if reason in FILE_FAULTS:
            log.warning("curation chunk %d: skipping image %s (%s): %s", rec["chunk"], item.image_id,
                        item.source or "no file", reason)

    def _process(self, batch, rec: dict, writers: dict, index: int) -> None:
        cfg = self.cfg
        captions = self.captioner([img.image for _, img in batch], cfg.caption.prompt,
                                  [item.image_id for item, _ in batch])
        if len(captions) != len(batch):
            raise RuntimeError(f"captioner returned {len(captions)} captions for {len(batch)} images")
        keep = []
        for (item, img), caption in zip(batch, captions):
            if caption is None:  # the captions file has no entry for this image (not an empty answer)
                self._skip(rec, "no_caption_for_image", item)
                continue
            caption = caption.strip()
            if not caption:
                self._skip(rec, "empty_caption", item)
                continue
            mentions = first_mentions(self.vocabulary.mentions(caption))
            if not mentions:
                self._skip(rec, "no_objects", item)
                continue
            keep.append((item, img, caption, mentions))
        if not keep:
            return
        text = (lambda m: m.word.lower()) if cfg.clip.object_text == "word" else (lambda m: m.category)
        scores = self.scorer.score([img.image for _, img, _, _ in keep], [[text(m) for m in ms] for *_, ms in keep])
        # zip would silently drop images (or objects) a faulty scorer left out: check, as for captions.
        if len(scores) != len(keep):
            raise RuntimeError(f"scorer returned scores for {len(scores)} images but was given {len(keep)}; "
                               "it must return one list per image (ClipScorer.score does)")
        s = cfg.split
        for (item, img, caption, mentions), obj_scores in zip(keep, scores):
            if len(obj_scores) != len(mentions):
                raise RuntimeError(f"scorer returned {len(obj_scores)} scores for the {len(mentions)} objects of "
                                   f"image {item.image_id!r}; it must return one score per object, in order")
            objects = [ObjectScore(m.category, text(m), m.start, m.end, float(v)) for m, v in zip(mentions, obj_scores)]
            for o in objects:
                label = None if item.present is None else (o.category in item.present)
                rec["scores"].append([o.category, round(o.score, 4), label])
            split = split_caption_spans(caption, objects, s.t0, s.t1, s.t2, s.exclusive_fragments)
            for reason, n in split.dropped.items():
                rec["dropped"][reason] = rec["dropped"].get(reason, 0) + n
            rec["curated_images"] += 1
            if split.empty:  # no span and not a sent response: nothing of it is trained on
                rec["nothing_to_train"] += 1
                continue
            record = Caption(None, cfg.caption.prompt, caption, split.spans, split.sent, split.sent_score,
                             split.sent_min_score, str(item.image_id))
            if CAPTION_KIND not in writers:
                writers[CAPTION_KIND] = ShardWriter(self.out_dir / shard_name(CAPTION_KIND, index))
            w = writers[CAPTION_KIND]
            w.write(f"{index:06d}_{w.count:07d}", encode_image(img, cfg.output.image_format, cfg.output.jpeg_quality),
                    cfg.output.image_format, record.to_json())
            for kind, n in record.kind_counts().items():
                rec["counts"][kind] += n
            rec["counts"]["captions"] += 1


# --------------------------------------------------------------------------- the run

def chunk_record_path(out_dir: Path, chunk: int) -> Path:
    return out_dir / CHUNKS / f"chunk-{chunk:06d}.json"


def check_resume(cfg: CurationConfig, out_dir: Path) -> None:
    """Every rank, before it writes anything: refuse to resume a run made with another config.
    Read-only, so each rank raises the same error itself instead of waiting for rank 0."""
    saved = out_dir / CHUNKS / "config.json"
    if not cfg.output.resume:
        return
    # A directory of the per-sample format (before caption records): resuming would mix two formats.
    old_shards = sorted(p.name for p in out_dir.glob("*.tar") if shard_kind(p.name) in KINDS)
    old_records = [r["chunk"] for r in load_chunk_records(out_dir) if r.get("format") != FORMAT]
    if old_shards or old_records:
        raise ResumeMismatchError(
            f"output.dir = {str(out_dir)!r} holds a curation run in the per-sample format (shards "
            f"{old_shards[:3] or 'none'}, chunk records of chunks {old_records[:3] or 'none'}); resuming would mix it "
            "with caption records. Fix: convert it (`python launch/curate.py convert OLD_DIR NEW_DIR`), choose a new "
            "output.dir, or set output.resume=false to start over there")
    if not saved.is_file():
        return
    previous = read_json_file(saved, "saved curation config", "set output.resume=false to start over in "
                              f"{out_dir}, or choose a new output.dir", ResumeMismatchError)
    current = semantic_config(cfg)
    if previous != current:
        diff = sorted(f"{s}.{k}" for s in current for k in current[s]
                      if previous.get(s, {}).get(k) != current[s][k])
        raise ResumeMismatchError(
            f"output.dir = {str(out_dir)!r} holds a curation run with a different config (differs in "
            f"{', '.join(diff) or 'layout'}); resuming would mix samples of two configs. Fix: choose a new "
            "output.dir, or set output.resume=false to start over there")


def _tmp_chunk(path: Path) -> int | None:
    """The chunk a half-written file belongs to (`cap-000003.tar.tmp`, `chunk-000003.json.tmp`)."""
    name = path.name[:-len(".tmp")]
    m = SHARD_RE.match(name)
    if m:
        return int(m.group(2))
    if name.startswith("chunk-") and name.endswith(".json") and name[6:-5].isdigit():
        return int(name[6:-5])
    return None


def prepare_output(cfg: CurationConfig, out_dir: Path, rank: int = 0, world: int = 1) -> None:
    """Start over (rank 0, output.resume=false) and remove the half-written files an interrupted run
    left: each rank those of its own chunks (another rank may be writing its own right now), rank 0
    also the rest. Rank 0 saves the config that later resumes are checked against."""
    chunks = out_dir / CHUNKS
    if rank == 0 and not cfg.output.resume and out_dir.exists():
        for p in list(out_dir.glob("*.tar")) + list(out_dir.glob("*.tmp")) + [out_dir / MANIFEST]:
            p.unlink(missing_ok=True)
        shutil.rmtree(chunks, ignore_errors=True)
    chunks.mkdir(parents=True, exist_ok=True)
    for p in list(out_dir.glob("*.tmp")) + list(chunks.glob("*.tmp")):
        c = _tmp_chunk(p)
        if (c is not None and c % world == rank) or (c is None and rank == 0):
            # Left by an interrupted writer; its chunk has no record and is redone.
            p.unlink(missing_ok=True)
    if rank == 0:
        write_json_atomic(chunks / "config.json", semantic_config(cfg))
        save_curation_config(cfg, out_dir / "curation_config.yaml")


def wait_for_chunks(out_dir: Path, num_chunks: int, world: int, poll_s: float) -> None:
    """Rank 0, its own chunks done: wait until every chunk record is there (other ranks may have more
    chunks, or slower ones). A rank that fails ends the job through the launcher (torchrun and the
    deepspeed launcher stop every rank), so this wait does not outlive a failed run."""
    last_log = 0.0
    while True:
        missing = [c for c in range(num_chunks) if not chunk_record_path(out_dir, c).is_file()]
        if not missing:
            return
        if any(c % world == 0 for c in missing):
            raise RuntimeError(f"{out_dir}: rank 0 finished but its chunks {[c for c in missing if c % world == 0][:10]} "
                               "have no record; fix: run the same command again (finished chunks are kept)")
        if time.monotonic() - last_log >= WAIT_LOG_S:
            ranks = sorted({c % world for c in missing})
            log.info("rank 0: own chunks done; waiting for %d chunk record(s) of rank(s) %s (chunks %s%s) "
                     "before writing manifest.json (polling every %.0f s)", len(missing), ranks, missing[:10],
                     " ..." if len(missing) > 10 else "", poll_s)
            last_log = time.monotonic()
        time.sleep(poll_s)


def write_manifest(cfg: CurationConfig, out_dir: Path, num_chunks: int, source_desc: str) -> dict:
    records = load_chunk_records(out_dir)
    done = {r["chunk"] for r in records}
    missing = sorted(set(range(num_chunks)) - done)
    if missing:
        raise RuntimeError(f"{out_dir}: chunks {missing[:10]} have no record; a rank failed. Fix: run the same "
                           "command again (finished chunks are kept)")
    counts = {k: sum(r["counts"][k] for r in records) for k in COUNT_KEYS}
    skipped: dict[str, int] = {}
    dropped: dict[str, int] = {}
    for r in records:
        for reason, n in r["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
        for reason, n in r["dropped"].items():
            dropped[reason] = dropped.get(reason, 0) + n
    shards = sorted((s for r in records for s in r["shards"]), key=lambda s: s["chunk"])
    named = [x for r in sorted(records, key=lambda r: r["chunk"]) for x in r.get("skipped_inputs", [])]
    scores = [s for r in records for s in r["scores"]]
    s = cfg.split
    manifest = {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": source_desc,
        "counts": counts,
        "nothing_to_train": sum(r["nothing_to_train"] for r in records),
        "images": {"input": sum(r["images"] for r in records), "curated": sum(r["curated_images"] for r in records)},
        "skipped": dict(sorted(skipped.items())),
        "skipped_inputs": named[:SKIPPED_LISTED],
        "skipped_inputs_not_listed": max(0, len(named) - SKIPPED_LISTED),
        "dropped_candidates": dict(sorted(dropped.items())),
        "objects_scored": len(scores),
        "thresholds": {"t0": s.t0, "t1": s.t1, "t2": s.t2},
        "shards": shards,
        "histogram": "scores.png",
        "config": dataclasses.asdict(cfg),
        "versions": package_versions(),
    }
    labelled = [x for x in scores if x[2] is not None]
    groups = ({"present (annotated)": [x[1] for x in labelled if x[2]],
               "absent (not annotated)": [x[1] for x in labelled if not x[2]]}
              if labelled else {"all objects": [x[1] for x in scores]})
    plot_scores(out_dir / "scores.png", groups, manifest["thresholds"], cfg.output.histogram_bins,
                f"Object scores ({cfg.clip.model}, {cfg.clip.mode})")
    if counts["captions"] == 0:
        manifest["warning"] = nothing_written_warning(manifest)
        log.warning("%s", manifest["warning"])
    write_json_atomic(out_dir / MANIFEST, manifest)
    return manifest


def nothing_written_warning(manifest: dict) -> str:
    """Why a curation run wrote no caption record, and what to change."""
    images, skipped = manifest["images"], manifest["skipped"]
    report = ", ".join(f"{n} {r}" for r, n in sorted(skipped.items(), key=lambda kv: -kv[1])) or "none"
    t = manifest["thresholds"]
    return (f"curation wrote NO caption record (no shard; training on this directory will fail): "
            f"{images['input']} input image(s), {images['curated']} captioned and scored, "
            f"{manifest['nothing_to_train']} of them with nothing to train (no object above t0 = {t['t0']} or below "
            f"t1 = {t['t1']}, not sent); skipped inputs by reason: {report} (named under skipped_inputs in "
            f"manifest.json). Fix: check input.path / input.annotations (missing or unreadable images), the "
            f"captioner (empty captions, or captions naming no COCO object), or the thresholds for this CLIP "
            f"(`python launch/curate.py calibrate`, then split.t0 / t1 / t2)")


def curate(cfg: CurationConfig, *, captioner: Captioner | None = None, scorer=None, vocabulary=None,
           rank: int | None = None, world_size: int | None = None, max_chunks: int | None = None,
           poll_s: float = 10.0) -> dict | None:
    """Run (or resume) curation; returns the manifest on rank 0 (None on other ranks, which return as
    soon as their own chunks are done). `max_chunks` stops after that many chunks of this rank without
    finalising (tests of resume); `poll_s`: how often rank 0 looks for other ranks' chunk records."""
    from sare_ds.objects import CocoVocabulary

    r_env, w_env = rank_and_world()
    rank = r_env if rank is None else rank
    world = w_env if world_size is None else world_size
    out_dir = Path(cfg.output.dir)
    vocabulary = vocabulary or CocoVocabulary.default()
    source = open_source(cfg.input, cfg.output.images_per_chunk, vocabulary)
    chunks = source.chunks()
    check_resume(cfg, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if world > 1 and not cfg.output.resume:
        if rank == 0:
            prepare_output(cfg, out_dir, rank, world)
        _start_over_barrier(world)
        if rank != 0:
            prepare_output(cfg, out_dir, rank, world)
    else:
        prepare_output(cfg, out_dir, rank, world)

    mine = [c for c in range(len(chunks)) if c % world == rank]
    todo = [c for c in mine if not chunk_record_path(out_dir, c).is_file()]
    log.info("rank %d: %s; %d of its %d chunks to do (%d already done)", rank, source.description, len(todo),
             len(mine), len(mine) - len(todo))
    if todo:
        if captioner is None:
            captioner = (annotations_captioner(cfg.caption.captions_file) if cfg.caption.source == "annotations"
                         else model_captioner(cfg))
        if scorer is None:
            from sare_ds.curation.scoring import ClipScorer

            device = cfg.clip.device
            if device == "auto":
                device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
            scorer = ClipScorer.from_config(cfg.clip, device)
        curator = ChunkCurator(cfg, out_dir, captioner, scorer, vocabulary)
        for n, c in enumerate(tqdm(todo, desc=f"curate rank {rank}", disable=rank != 0, unit="chunk")):
            if max_chunks is not None and n >= max_chunks:
                return None
            curator.run(c, source.items(chunks[c]))
    if rank != 0:
        log.info("rank %d: its %d chunks are done; rank 0 writes the manifest when every rank's are", rank, len(mine))
        return None
    if world > 1:
        wait_for_chunks(out_dir, len(chunks), world, poll_s)
    return write_manifest(cfg, out_dir, len(chunks), source.description)

