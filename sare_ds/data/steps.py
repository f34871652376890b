"""Compose optimizer steps from samples of the three kinds.

Each optimizer step has `grad_accum_steps x world_size` micro-batches of (pos_per_step,
neg_per_step, sent_per_step) samples; rank r trains on micro-batches
[r * grad_accum_steps, (r + 1) * grad_accum_steps) of that list. So one rank with
accumulation 2 and two ranks with accumulation 1 see exactly the same step. An epoch is one pass over the neg samples, the set being unlearned
(or over pos, then sent, when a method draws no neg samples); the other kinds cycle, each
cycle reshuffled. Deterministic for a seed.
"""
from __future__ import annotations

import random
from typing import Generic, Iterator, TypeVar

from sare_ds.data.samples import KINDS

T = TypeVar("T")


def per_step_counts(data_cfg, method: str) -> dict[str, int]:
    """Samples of each kind in one micro-batch; plain fine-tuning never sees hallucinated spans."""
    return {"pos": data_cfg.pos_per_step, "neg": 0 if method == "ft" else data_cfg.neg_per_step,
            "sent": data_cfg.sent_per_step}


class StepComposer(Generic[T]):
    def __init__(self, by_kind: dict[str, list[T]], per_step: dict[str, int], grad_accum_steps: int,
                 epochs: int, seed: int, max_steps: int = 0, rank: int = 0, world_size: int = 1,
                 start_step: int = 0):
        self.by_kind = by_kind
        self.per_step = {k: per_step.get(k, 0) for k in KINDS}
        self.grad_accum_steps = grad_accum_steps
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.start_step = start_step  # resume: the first start_step steps are composed and passed over
        for k, n in self.per_step.items():
            if n > 0 and not by_kind.get(k):
                raise ValueError(
                    f"each step needs {n} {k} sample(s) but the data has none; "
                    f"fix: set data.{k}_per_step=0 or provide {k} samples"
                )
        self.driver = next(k for k in ("neg", "pos", "sent") if self.per_step[k] > 0)
        per_opt_step = self.per_step[self.driver] * grad_accum_steps * world_size
        self.steps_per_epoch = len(by_kind[self.driver]) // per_opt_step
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{len(by_kind[self.driver])} {self.driver} samples are fewer than one step needs "
                f"({per_opt_step} over all ranks); fix: lower data.{self.driver}_per_step or optim.grad_accum_steps, "
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
