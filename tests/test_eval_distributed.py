"""Rank sharding + gather of evaluation, and ZeRO-3-style synced generation, on 2 CPU processes (gloo).

    .venv/bin/python -m pytest tests/test_eval_distributed.py -q

What a CPU machine cannot test: generation of a model actually partitioned by ZeRO-3
(synced_gpus makes the ranks step together; here the model is a plain replica per rank, so
the test checks the bookkeeping that keeps the collectives aligned, not DeepSpeed's gathers).
"""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from sare_ds.eval.distributed import distributed_map, shard_indices


def test_shard_indices_cover_every_item_once():
    shards = [shard_indices(5, r, 2, pad=False) for r in range(2)]
    assert shards == [([0, 2, 4], 3), ([1, 3], 2)]
    assert shard_indices(5, 1, 2, pad=True) == ([1, 3, 3], 2)       # padded to equal length
    assert shard_indices(1, 1, 2, pad=True) == ([0], 0)             # a rank without items repeats item 0
    assert distributed_map(lambda xs: [x * 10 for x in xs], [1, 2, 3]) == [10, 20, 30]  # no process group
    with pytest.raises(RuntimeError, match="one result per item"):
        distributed_map(lambda xs: xs[:1], [1, 2])


def test_padded_batch_plan_gives_every_rank_the_same_number_of_forwards():
    from sare_ds.models.generate import padded_batch_plan

    assert padded_batch_plan(3, 3) == [(0, True), (1, True), (2, True)]
    assert padded_batch_plan(1, 3) == [(0, True), (0, False), (0, False)]   # repeats its last batch, drops it
    assert padded_batch_plan(0, 2) == [(None, False), (None, False)]        # nothing of its own: placeholder
    assert padded_batch_plan(0, 0) == []
    with pytest.raises(ValueError, match="maximum over ranks"):
        padded_batch_plan(2, 1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, model_dir: str, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import sare_ds  # noqa: F401
        from PIL import Image

        from sare_ds.config import ModelConfig
        from sare_ds.models import load_mllm
        from sare_ds.models.generate import generate_responses

        seen = []
        out = distributed_map(lambda xs: (seen.extend(xs), [f"item{x}" for x in xs])[1], list(range(5)), synced=True)
        torch.manual_seed(0)
        adapter = load_mllm(ModelConfig(name_or_path=model_dir))
        images = [Image.new("RGB", (32, 32), (40 * i, 80, 0)) for i in range(3)]
        # Rank 0 has 3 batches, rank 1 one: with synced_gpus the short rank must keep joining.
        mine = images if rank == 0 else images[:1]
        synced = generate_responses(adapter, mine, "Describe.", max_new_tokens=5, batch_size=1, synced_gpus=True)
        plain = generate_responses(adapter, mine, "Describe.", max_new_tokens=5, batch_size=1)

        # Perplexity under synced_gpus: texts that fail to tokenise (empty) must not cost a rank
        # its forwards. Rank 0: 3 scorable texts; rank 1: 1 of 2, then none at all.
        from sare_ds.eval.quality import token_nll_sums

        forwards = []
        hook = adapter.model.register_forward_hook(lambda *_: forwards.append(1))
        texts = ["A red box.", "A green box.", "A blue box."] if rank == 0 else ["", "A red box."]
        nll_synced = token_nll_sums(adapter, images[:len(texts)], "Describe.", texts, batch_size=1, synced_gpus=True)
        first_count = len(forwards)
        texts_none = ["A red box."] if rank == 0 else [""]
        nll_none = token_nll_sums(adapter, images[:1], "Describe.", texts_none, batch_size=1, synced_gpus=True)
        hook.remove()
        nll_plain = token_nll_sums(adapter, images[:len(texts)], "Describe.", texts, batch_size=1)
        results[rank] = {"out": out, "seen": seen, "synced": synced, "plain": plain,
                         "forwards": (first_count, len(forwards) - first_count),
                         "nll_synced": nll_synced, "nll_plain": nll_plain, "nll_none": nll_none}
    finally:
        torch.distributed.destroy_process_group()


def test_two_ranks_shard_gather_and_synced_generation(tiny_model_dir):
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        port = _free_port()
        procs = [ctx.Process(target=_worker, args=(r, 2, port, str(tiny_model_dir), results)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=150)
        assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
        results = dict(results)
    for rank in range(2):
        assert results[rank]["out"] == [f"item{i}" for i in range(5)]  # full, ordered, on every rank
    assert results[0]["seen"] == [0, 2, 4] and results[1]["seen"] == [1, 3, 3]  # rank 1 padded with a repeat
    for rank in range(2):
        assert len(results[rank]["synced"]) == (3 if rank == 0 else 1)
        assert results[rank]["synced"] == results[rank]["plain"]
    # Both ranks forward equally often (3, then 1), whatever tokenised; padded results are dropped.
    assert results[0]["forwards"] == results[1]["forwards"] == (3, 1)
    for rank in range(2):
        synced, plain = results[rank]["nll_synced"], results[rank]["nll_plain"]
        assert [n for _, n in synced] == [n for _, n in plain]
        assert [s for s, _ in synced] == pytest.approx([s for s, _ in plain])
    assert results[1]["nll_synced"][0] == (0.0, 0) and results[1]["nll_synced"][1][1] > 0
    assert results[1]["nll_none"] == [(0.0, 0)] and results[0]["nll_none"][0][1] > 0
