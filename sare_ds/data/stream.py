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
    decode_members,
    is_remote,
    list_shards,
    read_manifest,
    shard_counts,
    shard_format,
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
                    + ("; with none at all, check the curation manifest's counts and thresholds"
                       + ("" if captions else f", or set data.{kind}_per_step=0") if not totals[kind] else ""))
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
        """Samples skipped while streaming, by reason (corrupt members, untokenisable samples, top-ups)."""

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
        local = [u for u in urls if not is_remote(u)]
        manifests = {}
        for d in {os.path.dirname(u) for u in local}:
            manifests[d] = read_manifest(d) or {}
        counts = {}
        for u in local:
            counts.update(shard_counts([u], manifests[os.path.dirname(u)]))
        for u in urls:
            if is_remote(u):  # no manifest to hand: stream the shard once to count its samples
                counts[u] = sum(1 for _ in wds.DataPipeline(wds.SimpleShardList([u]), wds.tarfile_to_samples()))
        return counts

    def __len__(self) -> int:
        return self.num_steps

    # ----------------------------------------------------------------------- one worker
    def _on_tar_error(self, stats: dict) -> Callable[[Exception], bool]:
        def handler(exn: Exception) -> bool:
            if self.skip_corrupt:
                stats["corrupt_member"] = stats.get("corrupt_member", 0) + 1
                log.warning("skipping corrupt shard data: %s", exn)
                return True  # continue with the next member / shard
            raise CorruptShardError(
                f"corrupt shard data ({type(exn).__name__}: {exn}); fix: re-run curation for that shard (delete "
                "it and its .chunks record, run launch/curate.py again) or pass data.skip_corrupt=true to skip "
                "and count corrupt members") from exn
        return handler

    def _pass(self, kind: str, node: int, worker: int, label: str, skip: int, stats: dict) -> Iterator[Any]:
        """One pass over a slot's shards of one kind: stages 4-7."""
        pieces = list(self.slots[kind][node][worker])
        rng = random.Random(f"{self.seed}/{kind}/{label}/{node}/{worker}")
        rng.shuffle(pieces)  # stage 4a: piece order of this pass
        raw = wds.DataPipeline(
            functools.partial(_piece_samples, pieces, self._on_tar_error(stats)),
            wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100), rng=rng),  # stage 4b
        )
        for sample in itertools.islice(iter(raw), skip, None):  # stage 5: resume skip, undecoded
            members = {k: v for k, v in sample.items() if not k.startswith("__")}
            where = f"shard {sample.get('__url__', '?')}"
            try:
                decoded = decode_members(sample["__key__"], members, where)  # stage 6
                if not isinstance(decoded, self._record_type):
                    raise CorruptShardError(
                        f"{where}: sample {sample['__key__']} is a {type(decoded).__name__} record in a "
                        f"{self.format!r}-format source; one format per source")
            except CorruptShardError as e:
                if not self.skip_corrupt:
                    raise CorruptShardError(
                        f"{e}; fix: re-run curation for that shard (delete it and its .chunks record, run "
                        "launch/curate.py again) or pass data.skip_corrupt=true to skip and count such members"
                    ) from e
                stats["corrupt_member"] = stats.get("corrupt_member", 0) + 1
                continue
            try:
                yield self.tokenize(decoded)  # stage 7
            except BadSampleError as e:
                stats[e.reason] = stats.get(e.reason, 0) + 1
                self._last_skip[kind] = str(e)
                log.warning("skipping %s", e)

    def _no_usable(self, kind: str, node: int, worker: int, stats: dict) -> "NoUsableSampleError":
        shards = sorted({p[0] if isinstance(p, (tuple, list)) else str(p) for p in self.slots[kind][node][worker]})
        last = self._last_skip.get(kind)
        return NoUsableSampleError(
            f"no usable {kind} sample in the shards of rank {node} worker {worker} ({', '.join(map(str, shards))}): "
            f"every one was skipped. Skipped so far by this worker (all kinds), by reason: "
            f"{skip_report({k: v for k, v in stats.items() if k != 'topped_up'})}."
            + (f" The last one: {last}" if last else " Fix: check the shards with launch/curate.py's manifest."))

    def _cycled(self, kind: str, node: int, worker: int, skip: int, stats: dict) -> Iterator[Any]:
        """Endless passes, each reshuffled; `skip` samples passed over (whole passes not even read)."""
        n = _piece_size(self.slots[kind][node][worker])  # >= 1: checked at construction
        for cycle in itertools.count(skip // n):
            got = 0
            for item in self._pass(kind, node, worker, f"cycle{cycle}", skip % n if cycle == skip // n else 0, stats):
                got += 1
                yield item
            if got == 0 and cycle > skip // n:
                raise self._no_usable(kind, node, worker, stats)

    def _driver(self, node: int, worker: int, epoch: int, skip: int, need: int, stats: dict) -> Iterator[Any]:
        """`need` samples of this epoch's pass; a pass left short by skipped samples is topped up from a
        reshuffled extra pass, so every rank still makes the same number of steps."""
        got = 0
        for item in self._pass(self.driver, node, worker, f"epoch{epoch}", skip, stats):
            if got == need:
                return
            got += 1
            yield item
        for topup in itertools.count():
            if got == need:
                return
            before = got
            for item in self._pass(self.driver, node, worker, f"epoch{epoch}-topup{topup}", 0, stats):
                if got == need:
                    return
                got += 1
                stats["topped_up"] = stats.get("topped_up", 0) + 1
                yield item
            if got == before:
                raise self._no_usable(self.driver, node, worker, stats)

    def worker_steps(self, node: int, worker: int, start_step: int = 0) -> Iterator[tuple[list, dict]]:
        """(step, skip counters) for the steps p of this rank with p % W == worker, p >= start_step."""
        W, m, A = self.workers, self.steps_per_worker_epoch, self.grad_accum_steps
        mine = range(worker, self.num_steps, W)
        first = sum(1 for p in mine if p < start_step)  # this worker's steps already done
        stats: dict[str, int] = {}
        others = [k for k in self.kinds if k != self.driver]
        streams = {k: self._cycled(k, node, worker, first * self.per_step[k] * A, stats) for k in others}
        per_driver = self.per_step[self.driver] * A
        local = first
        total_local = len(mine)
        while local < total_local:
            epoch, in_epoch = divmod(local, m)
            driver = self._driver(node, worker, epoch, in_epoch * per_driver, (m - in_epoch) * per_driver, stats)
            streams[self.driver] = driver
            for _ in range(m - in_epoch):
                if local >= total_local:
                    break
                # Stage 8: batch.
                step = [{k: [next(streams[k]) for _ in range(self.per_step[k])] for k in self.kinds}
                        for _ in range(A)]
                yield step, dict(stats)
                local += 1

    # ----------------------------------------------------------------------- the rank
    def __iter__(self) -> Iterator[list[dict[str, list]]]:
        if self.num_workers == 0:
            source = self.worker_steps(self.rank, 0, self.start_step)
            for step, stats in source:
                self.skipped = stats
                yield step
            return
        loader = torch.utils.data.DataLoader(
            _RankSteps(self), batch_size=None, num_workers=self.num_workers, collate_fn=_keep,
            persistent_workers=False)
        latest: dict[int, dict] = {}
        for p, (step, stats, worker) in enumerate(loader, start=self.start_step):
            if worker != p % self.workers:  # the round-robin order resume depends on
                raise RuntimeError(f"step {p} came from worker {worker}, expected {p % self.workers}; "
                                   "the DataLoader no longer returns workers round-robin")
            latest[worker] = stats
            self.skipped = {}
            for s in latest.values():
                for k, v in s.items():
                    self.skipped[k] = self.skipped.get(k, 0) + v
            yield step


def _piece_samples(pieces: list[Piece], handler: Callable[[Exception], bool]) -> Iterator[dict]:
    """WebDataset source stage: the raw samples (key + members) of some pieces of shards, in the
    given piece order. A piece is read from the start of its shard (tar has no index), samples
    before its first one passed over without decoding."""
    for url, lo, hi in pieces:
        shard = wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples(handler=handler))
        yield from itertools.islice(iter(shard), lo, hi)


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
        for step, stats in self.stream.worker_steps(self.stream.rank, role, self.stream.start_step):
            yield step, stats, role


class _Tokenizer:
    """tokenize_caption / tokenize_sample bound to an adapter and max_length (a class, not a lambda, so it
    pickles)."""

    def __init__(self, adapter, max_length: int, fn):
        self.adapter, self.max_length, self.fn = adapter, max_length, fn

    def __call__(self, sample: Caption | Sample):
        return self.fn(sample, self.adapter, self.max_length)
