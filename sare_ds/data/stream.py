"""Training steps streamed from curated WebDataset shards (the shard twin of `steps.StepComposer`).

    stream = ShardStream("runs/curated", adapter, per_step={"cap": 4}, grad_accum_steps=1, epochs=1,
                         seed=0, rank=rank, world_size=world, num_workers=2, start_step=resume_step)
    for micro_batches in stream:          # list of grad_accum_steps dicts kind -> [what tokenize returned]
        ...

A source holds one of two formats (`stream.format`, from its manifest: data/shards.py):
  captions  one record per caption (today's curation): ONE stream kind, "cap";
            `per_step={"cap": n}` gives n captions per micro-batch, and `tokenize` gets each decoded
            `Caption` (it may return anything, a list of sequences too: it is yielded as returned).
  samples   per-kind shards (before caption records): stream kinds pos / neg / sent,
            `per_step={"pos": 1, "neg": 1, "sent": 1}`, `tokenize` gets each `Sample`.
Asking a source for the kinds of the other format is refused at construction, naming the fix.

Each optimizer step gets exactly `per_step[kind]` records of each kind in each of its
`grad_accum_steps` micro-batches. An epoch is one pass over the driver kind: the captions, or
(per-kind format) the neg samples (the set being unlearned; pos, then sent, when no neg is drawn);
the other kinds cycle, reshuffled each cycle.

The pipeline, per kind and per data-loader worker, as visible stages:

  1. shard list        the kind's shards (directory manifest, brace pattern or list)
  2. split by node     the kind's records, in shard order, cut into ranks x workers contiguous runs
  3. split by worker   of sizes differing by at most one (slot = rank x workers + worker); a run is
                       a list of pieces (shard, first record, end record)
  4. shuffle           piece order per pass, then a seeded shuffle buffer over records
  5. skip              resume: records of steps before start_step are passed over undecoded
  6. decode            image + JSON record -> Caption or Sample (corrupt members raise, or are counted)
                       (stage 1's counts are checked here against what each shard yields: a shard
                       that ends or breaks early, or holds more than its manifest count, raises
                       naming the shard, the counts and the fix, or is counted with skip_corrupt)
  7. tokenise          the `tokenize` callable (default: data.tokenize's tokenize_caption / tokenize_sample)
  8. batch             per_step[kind] records per micro-batch, grad_accum_steps per step

Sharing: every record (a caption, or a per-kind sample; "sample" below) belongs to one (rank,
worker) slot, so the ranks' samples are disjoint and together cover the data. Samples, not whole
shards, are dealt: shards are as large as a curation chunk made them (the last chunk is often
small), and dealing whole shards left some slots with a fraction of the others' data. At most
slots - 1 shards are cut between two slots; the slot holding the tail of a cut shard reads
(without decoding) past its head each pass.
Ranks must stay in lockstep, so every slot yields the same number of steps per epoch:
m = floor(driver samples / (slots x driver samples per step)), and a rank has S = m x workers
steps an epoch. Each slot then has at least m steps' worth of samples; what the rounding leaves
over (< slots x samples per step, listed in `dropped_per_epoch`) is not seen that epoch, and
a different few each epoch since every pass is reshuffled. A slot whose share falls short (only
possible when corrupt members are skipped) tops up from a reshuffled repeat of its own samples,
so a few samples repeat instead of steps being lost (`repeated_per_epoch` counts the planned
repeats, `skipped["topped_up"]` the ones made). More than 5 % dropped or repeated logs a warning.

Skips: `stream.skipped` (reason -> count) counts each skipped sample ONCE, a sample being (shard, its
index in the shard), however many passes re-read it; each is logged once with its shard and key, and
the rank logs a summary when its iteration ends. DataLoader workers count their own (disjoint)
samples and send their totals with every step, so the main process's `skipped` is exact; it is
updated in place, so a reference taken before the loop (the trainer's data report) holds the final
counts. Reasons: corrupt_member, truncated_shard, beyond_manifest_count, `tokenize`'s BadSampleError
reasons, and topped_up (repeats made, not skips).
Workers' steps interleave round-robin, which is the order torch's DataLoader returns them in,
so step p of a rank is step p // W of the worker role p % W (on resume, DataLoader worker i
plays role (i + start_step) % W): that is how `start_step` resumes exactly (without corrupt
members being skipped).
Deterministic for (seed, world_size, num_workers).
"""
from __future__ import annotations

import functools
import itertools
import logging
import os
import random
from typing import Any, Callable, Iterator

import torch
import webdataset as wds

from sare_ds.data.samples import KINDS, BadSampleError, Caption, Sample, skip_report
from sare_ds.data.shards import (
    CAPTION_KIND,
    FORMAT_CAPTIONS,
    SHARD_KINDS,
    CorruptShardError,
    ShardReadError,
    decode_members,
    is_remote,
    iter_raw,
    list_shards,
    read_manifest,
    shard_counts,
    shard_format,
    shard_index,
)

log = logging.getLogger("sare_ds.data.stream")


class NoUsableSampleError(CorruptShardError):
    """Every sample of one kind in a rank's shards was skipped; the message counts the reasons."""


class NotEnoughShardsError(ValueError):
    """Too few samples of a kind for ranks x workers slots: some slot would have no data."""


class ShardFormatError(ValueError):
    """per_step asks for the stream kinds of the other shard format (caption vs per-kind shards)."""


# One slot's part of one shard: (url, first sample, end sample), in the shard's member order.
Piece = tuple[str, int, int]

# Share of the driver kind's samples dropped (rounding) or repeated (top-ups) per epoch above
# which the stream warns: a few samples are the price of lockstep, a large share is a setup issue.
WARN_SHARE = 0.05

# What the stream itself counts in `skipped` (the reasons of `tokenize`'s BadSampleErrors come on top).
CORRUPT_MEMBER = "corrupt_member"
"""A sample whose members do not decode (image, JSON record, or one of them missing)."""
TRUNCATED_SHARD = "truncated_shard"
"""A sample its shard's count (manifest.json, else tar headers) promises that the tar does not yield:
it ends, or breaks, before it."""
BEYOND_COUNT = "beyond_manifest_count"
"""A sample a shard holds after as many as its manifest count (it would never be read)."""
TOPPED_UP = "topped_up"
"""Not a skip: one per repeat a slot made to keep its step count after skips (each repeat counted)."""


def _keep(x):  # DataLoader collate: steps are already composed (module level so it pickles)
    return x


def split_samples(shards: list[str], counts: dict[str, int], n: int) -> list[list[Piece]]:
    """Cut the samples of `shards` (in the given order, each shard's members in file order) into n
    contiguous runs whose sizes differ by at most one. Run g holds samples [N g / n, N (g + 1) / n)
    of the concatenation, as pieces of shards; empty shards give no piece. Deterministic."""
    total = sum(counts[u] for u in shards)
    bounds = [total * g // n for g in range(n + 1)]
    runs: list[list[Piece]] = [[] for _ in range(n)]
    offset = 0
    for url in shards:
        size = counts[url]
        for g in range(n):
            lo, hi = max(bounds[g], offset), min(bounds[g + 1], offset + size)
            if lo < hi:
                runs[g].append((url, lo - offset, hi - offset))
        offset += size
    return runs


def _piece_size(pieces: list[Piece]) -> int:
    return sum(hi - lo for _, lo, hi in pieces)


def _noun(kind: str) -> str:
    """How messages name a kind's records."""
    return "caption" if kind == CAPTION_KIND else f"{kind} sample"


def _per_step_name(kind: str) -> str:
    """The setting that asks for a kind, as messages name it."""
    return "data.captions_per_step" if kind == CAPTION_KIND else f"data.{kind}_per_step"


class SkipCounter:
    """One worker's skips by reason, each sample counted ONCE: a sample is (shard, its index in the shard),
    so the passes that re-read it (epochs, top-ups, cycles of the other kinds) and the slot reading past
    it to its own part of a cut shard do not count it again. Each new skip is logged once, naming the
    shard and the sample key. Slots own disjoint samples, so the counts of all workers add up exactly."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        self._seen: set[tuple[str, int]] = set()

    def add(self, reason: str, url: str, indices, what: str) -> int:
        new = [i for i in indices if (url, i) not in self._seen]
        if new:
            self._seen.update((url, i) for i in new)
            self.counts[reason] = self.counts.get(reason, 0) + len(new)
            log.warning("skipping %s [counted once under skipped[%r]: %d sample(s)]", what, reason, len(new))
        return len(new)

    def repeat(self) -> None:
        self.counts[TOPPED_UP] = self.counts.get(TOPPED_UP, 0) + 1


def _fix_for(url: str) -> str:
    """How to redo one curation shard."""
    index = shard_index(url)
    record = f".chunks/chunk-{index:06d}.json" if index is not None else "its chunk record in .chunks/"
    return (f"re-run curation for it (delete it and {record} in its output.dir, then run the same launch/curate.py "
            "command again: only that chunk is redone and the manifest rewritten)")


class _Faults:
    """What reading a slot's pieces does when a shard does not yield what its count says: raise, naming
    the shard, the counts and the fixes, or (skip_corrupt) count the samples concerned once each."""

    def __init__(self, stream: "ShardStream", skips: SkipCounter):
        self.skip_corrupt, self.skips = stream.skip_corrupt, skips
        self.count_source = stream.count_source

    def _counted(self, url: str, total: int) -> str:
        if self.count_source.get(url) == "manifest":
            return f"shard {url}: manifest.json counts {total} samples for it"
        return f"shard {url}: its tar headers listed {total} samples when the stream started"

    def short(self, url: str, lo: int, hi: int, total: int, got: int, error: Exception | None = None) -> None:
        """The tar ended (error None) or broke after `got` samples; this piece wanted [lo, hi)."""
        first = max(lo, got)
        how = (f"its tar ends after {got} sample(s)" if error is None
               else f"its tar breaks after {got} whole sample(s) ({type(error.__cause__ or error).__name__}: "
                    f"{error.__cause__ or error})")
        what = (f"{self._counted(url, total)}, but {how}; samples {first}..{hi - 1} of it ({hi - first}) cannot "
                "be read")
        if not self.skip_corrupt:
            raise CorruptShardError(
                f"{what}, and training would repeat others in their place. Fix: {_fix_for(url)}; if the shard is "
                f"whole and the count wrong, correct its \"count\" in manifest.json; or pass data.skip_corrupt=true "
                f"to train without them (counted in data.json under skipped[{TRUNCATED_SHARD!r}])") from error
        self.skips.add(TRUNCATED_SHARD, url, range(first, hi), what)

    def beyond(self, url: str, total: int, holds: int | None) -> None:
        """The shard holds samples past its count (`holds` of them in all, None: not counted)."""
        held = f"{holds}" if holds is not None else f"more than {total}"
        what = (f"{self._counted(url, total)}, but it holds {held}; the samples after the first {total} would "
                "never be read")
        if not self.skip_corrupt:
            raise CorruptShardError(
                f"{what}. Fix: {_fix_for(url)}, or correct its \"count\" in manifest.json to what the shard holds; "
                f"or pass data.skip_corrupt=true to leave them out (counted in data.json under "
                f"skipped[{BEYOND_COUNT!r}])")
        self.skips.add(BEYOND_COUNT, url, range(total, holds if holds is not None else total + 1), what)


class ShardStream:
    """Optimizer steps of one rank, read from shards; `len()` is this rank's number of steps."""

    def __init__(self, shards, adapter=None, *, per_step: dict[str, int], grad_accum_steps: int = 1,
                 epochs: int = 1, seed: int = 0, max_steps: int = 0, max_length: int = 512, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, shuffle_buffer: int = 1000, start_step: int = 0,
                 skip_corrupt: bool = False, allow_remote: bool = False,
                 tokenize: Callable[[Caption | Sample], Any] | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank = {rank} must be in [0, world_size = {world_size})")
        if grad_accum_steps < 1 or epochs < 1 or num_workers < 0 or shuffle_buffer < 1:
            raise ValueError("grad_accum_steps and epochs must be >= 1, num_workers >= 0, shuffle_buffer >= 1")
        unknown = sorted(set(per_step) - set(SHARD_KINDS))
        if unknown:
            raise ValueError(f"per_step has kinds {unknown}; stream kinds are {SHARD_KINDS} ('cap': caption shards)")
        self.format = shard_format(shards, allow_remote)
        """`captions` (one record per caption, stream kind "cap") or `samples` (per-kind pos/neg/sent shards)."""
        captions = self.format == FORMAT_CAPTIONS
        self._record_type = Caption if captions else Sample
        stream_kinds = (CAPTION_KIND,) if captions else KINDS
        wrong = sorted(k for k, n in per_step.items() if int(n) > 0 and k not in stream_kinds)
        if wrong:
            raise ShardFormatError(self._format_mismatch(shards, wrong))
        if tokenize is None:
            if adapter is None:
                raise ValueError("ShardStream needs the model adapter (to tokenise) or a tokenize callable")
            from sare_ds.data import tokenize as tok

            tokenize = _Tokenizer(adapter, max_length, tok.tokenize_caption if captions else tok.tokenize_sample)
        self.tokenize = tokenize
        self.per_step = {k: int(per_step.get(k, 0)) for k in stream_kinds}
        self.grad_accum_steps, self.epochs, self.seed = grad_accum_steps, epochs, seed
        self.rank, self.world_size = rank, world_size
        self.num_workers = num_workers
        self.workers = max(1, num_workers)  # in-process reading is one worker
        self.shuffle_buffer, self.skip_corrupt, self.start_step = shuffle_buffer, skip_corrupt, start_step
        self.kinds = [k for k in stream_kinds if self.per_step[k] > 0]
        """The stream kinds each micro-batch holds, in order."""
        kinds = self.kinds
        if not kinds:
            raise ValueError("per_step asks for no captions; set data.captions_per_step >= 1" if captions else
                             "per_step asks for no samples of any kind; set data.neg_per_step=1 (or pos/sent)")
        # The driver kind sets the epoch: captions, or the neg samples being unlearned (pos, then sent).
        self.driver = CAPTION_KIND if captions else next(k for k in ("neg", "pos", "sent") if self.per_step[k] > 0)

        # Stage 1: the shard list of each kind, with sample counts (manifest, else tar headers).
        self.slots: dict[str, list[list[list[Piece]]]] = {}  # kind -> rank -> worker -> pieces
        self.counts: dict[str, int] = {}
        self.count_source: dict[str, str] = {}  # url -> "manifest" or "headers": where its count came from
        n_slots = world_size * self.workers
        totals: dict[str, int] = {}
        for kind in kinds:
            # A caption source is one kind: every shard of it (names need not follow cap-*).
            urls = list_shards(shards, None if captions else kind, allow_remote=allow_remote)
            counts = self._counts(urls)
            totals[kind] = sum(counts.values())
            # Every slot draws every kind it is asked for: a slot with no sample of a kind would fail
            # inside one DataLoader worker of one rank, mid-run, while the other ranks wait for it in
            # the next collective. Checked here, on every rank, before anything is read.
            if totals[kind] < n_slots:
                raise NotEnoughShardsError(
                    f"{totals[kind]} {_noun(kind)}(s) in {len(urls)} shard(s) of {shards!r}, but world_size x "
                    f"workers = {world_size} x {self.workers} = {n_slots} slots each need at least one; fix: "
                    f"lower data.num_workers (or the world size), or curate more images (more "
                    f"and smaller chunks: output.images_per_chunk)"
                    + (f"; with none at all, check the curation manifest's counts and thresholds{_none_hint(kind)}"
                       if not totals[kind] else ""))
            self.counts.update(counts)
            # Stages 2 and 3: split by node, then by worker (slot = rank x workers + worker).
            runs = split_samples(urls, counts, n_slots)
            self.slots[kind] = [runs[r * self.workers:(r + 1) * self.workers] for r in range(world_size)]

        per_opt_step = self.per_step[self.driver] * grad_accum_steps
        total_driver = totals[self.driver]
        # Steps per epoch from the total, not from the smallest slot: slot shares differ by at most
        # one sample, so each slot holds at least m steps' worth and lockstep costs < one step per slot.
        self.steps_per_worker_epoch = total_driver // (n_slots * per_opt_step)
        if self.steps_per_worker_epoch == 0:
            raise ValueError(
                f"{total_driver} {_noun(self.driver)}s cannot give every slot one step, which takes "
                f"(world_size x workers x {self.driver} per step x grad_accum_steps = {world_size} x "
                f"{self.workers} x {self.per_step[self.driver]} x {grad_accum_steps} = "
                f"{n_slots * per_opt_step}); fix: lower data.num_workers or the world size, lower "
                f"{_per_step_name(self.driver)} or optim.grad_accum_steps, or curate more data")
        self.steps_per_epoch = self.steps_per_worker_epoch * self.workers
        need = self.steps_per_worker_epoch * per_opt_step  # driver samples one slot uses per epoch
        shares = [_piece_size(p) for node in self.slots[self.driver] for p in node]
        self.dropped_per_epoch = sum(max(0, n - need) for n in shares)
        """Driver samples not seen in an epoch (rounding of the total to whole steps of every slot)."""
        self.repeated_per_epoch = sum(max(0, need - n) for n in shares)
        """Driver samples a slot repeats per epoch to keep the ranks in lockstep (0 unless its share is
        short; corrupt members skipped at run time are topped up too, counted in skipped["topped_up"])."""
        for what, n in (("dropped", self.dropped_per_epoch), ("repeated", self.repeated_per_epoch)):
            if n > WARN_SHARE * total_driver:
                log.warning(
                    "%d of %d %ss (%.0f %%) are %s each epoch so that %d slots (world_size x workers) "
                    "make the same %d steps of %d %ss; fix: fewer slots (lower data.num_workers), fewer "
                    "samples per step (%s, optim.grad_accum_steps), or more data (curate more "
                    "images; output.images_per_chunk sets how they are cut into shards)",
                    n, total_driver, _noun(self.driver), 100.0 * n / total_driver, what, n_slots,
                    self.steps_per_worker_epoch, per_opt_step, _noun(self.driver), _per_step_name(self.driver))
        total = self.steps_per_epoch * epochs
        self.num_steps = min(total, max_steps) if max_steps > 0 else total
        if not 0 <= start_step <= self.num_steps:
            raise ValueError(f"start_step = {start_step} is outside [0, {self.num_steps}] steps of this run")
        self._last_skip: dict[str, str] = {}  # kind -> message of the last sample skipped (for errors)
        self.skipped: dict[str, int] = {}
        """Samples skipped while streaming, by reason, each sample counted once (CORRUPT_MEMBER,
        TRUNCATED_SHARD, BEYOND_COUNT, the reasons of `tokenize`'s BadSampleErrors), and TOPPED_UP
        (repeats made in their place). Summed over this rank's DataLoader workers (each step carries its
        worker's counts to this process) and updated in place while iterating, so a reference taken
        before the loop holds the final counts after it."""

    def _format_mismatch(self, shards, wrong: list[str]) -> str:
        if self.format == FORMAT_CAPTIONS:
            return (f"per_step asks for {wrong} samples, but the shard source {shards!r} is in the 'captions' "
                    "format (one record per caption, written by launch/curate.py since caption records), which "
                    "streams as the one kind 'cap'. Fix: ask per_step={'cap': n} (data.captions_per_step = n); "
                    "the per-sample view (data.packing=false) comes from tokenising each caption unpacked, not "
                    "from per-kind shards")
        return (f"per_step asks for {wrong}, but the shard source {shards!r} is in the old per-kind 'samples' "
                "format (pos/neg/sent-*.tar, one record per sample), which has no caption records. Fix: convert "
                "it with `python launch/curate.py convert OLD_DIR NEW_DIR` and train from NEW_DIR, or ask per_step "
                "for pos/neg/sent (the trainer does so by itself for per-kind shards, whatever data.packing is)")

    def _counts(self, urls: list[str]) -> dict[str, int]:
        """Samples per shard: the manifest's count where its directory's manifest lists the shard (checked
        against what the shard yields while streaming), else its tar headers (remote: one read of it)."""
        local = [u for u in urls if not is_remote(u)]
        manifests = {}
        for d in {os.path.dirname(u) for u in local}:
            manifests[d] = read_manifest(d) or {}
        counts = {}
        for u in local:
            manifest = manifests[os.path.dirname(u)]
            listed = {s.get("name") for s in manifest.get("shards", [])}
            counts.update(shard_counts([u], manifest))
            self.count_source[u] = "manifest" if os.path.basename(u) in listed else "headers"
        for u in urls:
            if is_remote(u):  # no manifest to hand: stream the shard once to count its samples
                counts[u] = sum(1 for _ in iter_raw(u))
                self.count_source[u] = "headers"
        return counts

    def __len__(self) -> int:
        return self.num_steps

    # ----------------------------------------------------------------------- one worker
    def _pass(self, kind: str, node: int, worker: int, label: str, skip: int, skips: SkipCounter) -> Iterator[Any]:
        """One pass over a slot's shards of one kind: stages 4-7."""
        pieces = list(self.slots[kind][node][worker])
        rng = random.Random(f"{self.seed}/{kind}/{label}/{node}/{worker}")
        rng.shuffle(pieces)  # stage 4a: piece order of this pass
        raw = wds.DataPipeline(
            functools.partial(_piece_samples, pieces, self.counts, _Faults(self, skips)),
            wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100), rng=rng),  # stage 4b
        )
        for sample in itertools.islice(iter(raw), skip, None):  # stage 5: resume skip, undecoded
            members = {k: v for k, v in sample.items() if not k.startswith("__")}
            url, key, index = sample["__url__"], sample["__key__"], sample["__index__"]
            where = f"shard {url}"
            try:
                decoded = decode_members(key, members, where)  # stage 6
                if not isinstance(decoded, self._record_type):
                    raise CorruptShardError(
                        f"{where}: sample {key} is a {type(decoded).__name__} record in a "
                        f"{self.format!r}-format source; one format per source")
            except CorruptShardError as e:
                if not self.skip_corrupt:
                    raise CorruptShardError(
                        f"{e}; fix: {_fix_for(url)}, or pass data.skip_corrupt=true to skip and count such members"
                    ) from e
                skips.add(CORRUPT_MEMBER, url, [index], f"corrupt member: {e}")
                continue
            try:
                yield self.tokenize(decoded)  # stage 7
            except BadSampleError as e:
                self._last_skip[kind] = str(e)
                skips.add(e.reason, url, [index], f"shard {url} sample {key}: {e}")

    def _no_usable(self, kind: str, node: int, worker: int, skips: SkipCounter) -> "NoUsableSampleError":
        shards = sorted({p[0] if isinstance(p, (tuple, list)) else str(p) for p in self.slots[kind][node][worker]})
        last = self._last_skip.get(kind)
        return NoUsableSampleError(
            f"no usable {kind} sample in the shards of rank {node} worker {worker} ({', '.join(map(str, shards))}): "
            f"every one was skipped. Skipped so far by this worker (all kinds), by reason: "
            f"{skip_report({k: v for k, v in skips.counts.items() if k != TOPPED_UP})}."
            + (f" The last one: {last}" if last else " Fix: check the shards with launch/curate.py's manifest."))

    def _cycled(self, kind: str, node: int, worker: int, skip: int, skips: SkipCounter) -> Iterator[Any]:
        """Endless passes, each reshuffled; `skip` samples passed over (whole passes not even read)."""
        n = _piece_size(self.slots[kind][node][worker])  # >= 1: checked at construction
        for cycle in itertools.count(skip // n):
            got = 0
            for item in self._pass(kind, node, worker, f"cycle{cycle}", skip % n if cycle == skip // n else 0, skips):
                got += 1
                yield item
            if got == 0 and cycle > skip // n:
                raise self._no_usable(kind, node, worker, skips)

    def _driver(self, node: int, worker: int, epoch: int, skip: int, need: int, skips: SkipCounter) -> Iterator[Any]:
        """`need` samples of this epoch's pass; a pass left short by skipped samples is topped up from a
        reshuffled extra pass, so every rank still makes the same number of steps. Nothing is read past
        the `need`-th sample."""
        got = 0
        if need <= 0:
            return
        for item in self._pass(self.driver, node, worker, f"epoch{epoch}", skip, skips):
            got += 1
            yield item
            if got == need:
                return
        for topup in itertools.count():
            before = got
            for item in self._pass(self.driver, node, worker, f"epoch{epoch}-topup{topup}", 0, skips):
                got += 1
                skips.repeat()
                yield item
                if got == need:
                    return
            if got == before:
                raise self._no_usable(self.driver, node, worker, skips)

    def worker_steps(self, node: int, worker: int, start_step: int = 0) -> Iterator[tuple[list, dict]]:
        """(step, this worker's skip counts so far) for the steps p of this rank with p % W == worker,
        p >= start_step."""
        W, m, A = self.workers, self.steps_per_worker_epoch, self.grad_accum_steps
        mine = range(worker, self.num_steps, W)
        first = sum(1 for p in mine if p < start_step)  # this worker's steps already done
        skips = SkipCounter()
        others = [k for k in self.kinds if k != self.driver]
        streams = {k: self._cycled(k, node, worker, first * self.per_step[k] * A, skips) for k in others}
        per_driver = self.per_step[self.driver] * A
        local = first
        total_local = len(mine)
        while local < total_local:
            epoch, in_epoch = divmod(local, m)
            driver = self._driver(node, worker, epoch, in_epoch * per_driver, (m - in_epoch) * per_driver, skips)
            streams[self.driver] = driver
            for _ in range(m - in_epoch):
                if local >= total_local:
                    break
                # Stage 8: batch.
                step = [{k: [next(streams[k]) for _ in range(self.per_step[k])] for k in self.kinds}
                        for _ in range(A)]
                yield step, dict(skips.counts)
                local += 1

    # ----------------------------------------------------------------------- the rank
    def _merge(self, latest: dict[int, dict]) -> None:
        """stream.skipped = the sum of every worker's latest counts (in place: references stay valid)."""
        total: dict[str, int] = {}
        for counts in latest.values():
            for k, v in counts.items():
                total[k] = total.get(k, 0) + v
        self.skipped.clear()
        self.skipped.update(sorted(total.items()))

    def __iter__(self) -> Iterator[list[dict[str, list]]]:
        latest: dict[int, dict] = {}
        try:
            if self.num_workers == 0:
                for step, counts in self.worker_steps(self.rank, 0, self.start_step):
                    latest[0] = counts
                    self._merge(latest)
                    yield step
                return
            loader = torch.utils.data.DataLoader(
                _RankSteps(self), batch_size=None, num_workers=self.num_workers, collate_fn=_keep,
                persistent_workers=False)
            for p, (step, counts, worker) in enumerate(loader, start=self.start_step):
                if worker != p % self.workers:  # the round-robin order resume depends on
                    raise RuntimeError(f"step {p} came from worker {worker}, expected {p % self.workers}; "
                                       "the DataLoader no longer returns workers round-robin")
                latest[worker] = counts  # cumulative per worker: the latest is that worker's total
                self._merge(latest)
                yield step
        finally:
            if any(k != TOPPED_UP for k in self.skipped):
                log.warning("rank %d: skipped while streaming, each sample once, by reason: %s (the lines above "
                            "name each one's shard and key)", self.rank, skip_report(self.skipped))


def _none_hint(kind: str) -> str:
    """The extra fix for a per-kind source with no sample of `kind`: never a value validation rejects
    (EFUF and SARE need data.neg_per_step >= 1; FT draws no neg samples at all)."""
    if kind == CAPTION_KIND:
        return ""
    if kind == "neg":
        return (" (neg spans come from objects scoring below split.t1: the captions may name no hallucinated "
                "object, or t1 is low for this CLIP; `python launch/curate.py calibrate` proposes one); only "
                "method.name=ft trains without neg samples")
    return f", or set data.{kind}_per_step=0"


def _piece_samples(pieces: list[Piece], counts: dict[str, int], faults: _Faults) -> Iterator[dict]:
    """Source stage: the raw samples (key + members, `__url__`, `__index__` in the shard) of some pieces
    of shards, in the given piece order. A piece is read from the start of its shard (tar has no index),
    the samples before its first one passed over undecoded. What a shard yields is checked against its
    count: a shard that ends or breaks before its piece's end, or (the piece ending the shard) goes on
    after its count, goes to `faults` (an error, or counted skips with skip_corrupt)."""
    for url, lo, hi in pieces:
        total = counts[url]
        reader = iter_raw(url)
        i = 0
        try:
            for key, members in reader:
                if i >= hi:  # only the piece that ends the shard reads on: is there more than its count?
                    faults.beyond(url, total, i + 1 + sum(1 for _ in reader) if faults.skip_corrupt else None)
                    break
                if i >= lo:
                    yield {**members, "__key__": key, "__url__": url, "__index__": i}
                i += 1
                if i == hi and hi < total:
                    break
        except ShardReadError as e:
            if e.samples_read < hi:  # a break after the counted samples costs this piece nothing
                faults.short(url, lo, hi, total, e.samples_read, e)
            continue
        finally:
            reader.close()
        if i < hi:
            faults.short(url, lo, hi, total, i)


class _RankSteps(torch.utils.data.IterableDataset):
    """The DataLoader face of a ShardStream: each worker yields its own share of the rank's steps."""

    def __init__(self, stream: ShardStream):
        self.stream = stream

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        loader_worker = 0 if info is None else info.id
        # The DataLoader always starts its round-robin at its worker 0, which must therefore play the
        # role of the worker owning step start_step (role = p % W).
        role = (loader_worker + self.stream.start_step) % self.stream.workers
        for step, counts in self.stream.worker_steps(self.stream.rank, role, self.stream.start_step):
            yield step, counts, role


class _Tokenizer:
    """tokenize_caption / tokenize_sample bound to an adapter and max_length (a class, not a lambda, so it
    pickles)."""

    def __init__(self, adapter, max_length: int, fn):
        self.adapter, self.max_length, self.fn = adapter, max_length, fn

    def __call__(self, sample: Caption | Sample):
        return self.fn(sample, self.adapter, self.max_length)
