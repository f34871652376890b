"""Compose optimizer steps from items of one or more kinds (captions, or per-kind samples).

Caption data has one kind, `cap`: each micro-batch holds data.captions_per_step captions and an
epoch is one pass over them. Per-kind samples (the shard format before caption records) have
pos / neg / sent. Each optimizer step has `grad_accum_steps x world_size` micro-batches of
per_step[kind] items; rank r trains on micro-batches
[r * grad_accum_steps, (r + 1) * grad_accum_steps) of that list. So one rank with
accumulation 2 and two ranks with accumulation 1 see exactly the same step. An epoch is one pass over the neg samples, the set being unlearned
(or over pos, then sent, when a method draws no neg samples); the other kinds cycle, each
cycle reshuffled. Deterministic for a seed.
"""
from __future__ import annotations

import random
from typing import Generic, Iterator, TypeVar

from sare_ds.data.samples import KINDS
from sare_ds.methods import get_method

T = TypeVar("T")
CAPTIONS = "cap"  # the one stream kind of caption data
STREAM_KINDS = (CAPTIONS, *KINDS)


def per_step_counts(data_cfg, method: str, data_format: str = "captions") -> dict[str, int]:
    """Items of each stream kind in one micro-batch: captions, or per-kind samples of the kinds the
    method reads (plain fine-tuning never draws hallucinated samples)."""
    if data_format == "captions":
        return {CAPTIONS: data_cfg.captions_per_step}
    kinds = get_method(method).kinds
    return {k: getattr(data_cfg, f"{k}_per_step") if k in kinds else 0 for k in KINDS}


class StepComposer(Generic[T]):
    def __init__(self, by_kind: dict[str, list[T]], per_step: dict[str, int], grad_accum_steps: int,
                 epochs: int, seed: int, max_steps: int = 0, rank: int = 0, world_size: int = 1,
                 start_step: int = 0):
        self.by_kind = by_kind
        self.per_step = {k: per_step.get(k, 0) for k in STREAM_KINDS if per_step.get(k, 0) or k in KINDS}
        self.grad_accum_steps = grad_accum_steps
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.start_step = start_step  # resume: the first start_step steps are composed and passed over
        for k, n in self.per_step.items():
            if n > 0 and not by_kind.get(k):
                raise ValueError(
                    f"each step needs {n} {k} item(s) but the data has none; "
                    + ((f"fix: provide {k} samples (curate captions naming hallucinated objects); only "
                        "method.name=ft trains without them" if k == "neg" else
                        f"fix: set data.{k}_per_step=0 or provide {k} samples") if k in KINDS else
                       "fix: provide captions with spans of the kinds the method trains")
                )
        self.driver = next(k for k in (CAPTIONS, "neg", "pos", "sent") if self.per_step.get(k, 0) > 0)
        per_opt_step = self.per_step[self.driver] * grad_accum_steps * world_size
        self.steps_per_epoch = len(by_kind[self.driver]) // per_opt_step
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{len(by_kind[self.driver])} {self.driver} samples are fewer than one step needs "
                f"({per_opt_step} over all ranks); fix: lower "
                f"data.{'captions' if self.driver == CAPTIONS else self.driver}_per_step or optim.grad_accum_steps, "
                "or add data"
            )
        total = self.steps_per_epoch * epochs
        self.num_steps = min(total, max_steps) if max_steps > 0 else total

    def __len__(self) -> int:
        return self.num_steps

    def _stream(self, kind: str) -> Iterator[T]:
        rng = random.Random(f"{self.seed}-{kind}")
        items = list(self.by_kind[kind])
        while True:
            order = list(range(len(items)))
            rng.shuffle(order)
            for i in order:
                yield items[i]

    def __iter__(self) -> Iterator[list[dict[str, list[T]]]]:
        streams = {k: self._stream(k) for k, n in self.per_step.items() if n > 0}
        for index in range(self.num_steps):
            step = [
                {k: [next(streams[k]) for _ in range(n)] for k, n in self.per_step.items() if n > 0}
                for _ in range(self.grad_accum_steps * self.world_size)
            ]
            if index >= self.start_step:
                yield step[self.rank * self.grad_accum_steps:(self.rank + 1) * self.grad_accum_steps]
