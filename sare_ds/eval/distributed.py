"""Spread evaluation items over ranks and gather the results in the original order.

    results = distributed_map(lambda chunk: generate(...chunk...), items, synced=zero3)

With one process (or no process group) this is `fn(items)`. Under `torch.distributed`,
rank r takes items r, r + W, r + 2W, ... and all ranks exchange their results with
`all_gather_object`, so every rank returns the full, ordered list. With `synced=True`
(ZeRO-3: every forward is a collective) each rank gets the same number of items, the short
ones padded with a repeat of their last item (its result is dropped), so no rank runs out of
work while the others still need it in the collectives.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence, TypeVar

import torch

from sare_ds.dist import rank_and_world  # noqa: F401  (the package's one rank/world helper, re-exported)

T = TypeVar("T")
R = TypeVar("R")


def shard_indices(num_items: int, rank: int, world: int, pad: bool) -> tuple[list[int], int]:
    """Indices of rank `rank`'s items and how many of them are real (the rest is padding)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of {world} processes")
    indices = list(range(rank, num_items, world))
    real = len(indices)
    if pad and num_items > 0:
        per_rank = math.ceil(num_items / world)
        # A rank with no item of its own repeats item 0: it must still join every forward.
        filler = indices[-1] if indices else 0
        indices += [filler] * (per_rank - len(indices))
    return indices, real


def distributed_map(fn: Callable[[list[T]], list[R]], items: Sequence[T], *, synced: bool = False) -> list[R]:
    """fn over this rank's share of `items`; the full, ordered result list on every rank."""
    rank, world = rank_and_world()
    if world == 1:
        out = fn(list(items))
        _check_length(out, len(items))
        return list(out)
    indices, real = shard_indices(len(items), rank, world, pad=synced)
    local = fn([items[i] for i in indices])
    _check_length(local, len(indices))
    pairs = list(zip(indices[:real], local[:real]))
    gathered: list = [None] * world
    # Collective: every rank reaches this line once per call, whatever its share.
    torch.distributed.all_gather_object(gathered, pairs)
    by_index = {i: r for rank_pairs in gathered for i, r in rank_pairs}
    return [by_index[i] for i in range(len(items))]


def _check_length(out, expected: int) -> None:
    if len(out) != expected:
        raise RuntimeError(f"distributed_map: the mapped function returned {len(out)} results for {expected} "
                           "items; it must return exactly one result per item, in order")
