"""Batched generation through the adapter's chat template (plain model or ZeRO-3 shard).

    texts = generate_responses(adapter, [img1, img2], "Describe the image.", max_new_tokens=64)

Prompts are rendered as the model's own conversation (user: image + prompt, then the
generation prompt), batches are left-padded (so every row's new tokens start at the same
column) and only the new text is returned, special tokens stripped.

Under ZeRO-3 every rank holds a partition of each weight and a forward is a collective:
with `synced_gpus=True` the ranks keep stepping until all are done, and this function also
makes every rank run the same number of `generate` calls (a rank with fewer batches repeats
its last one and drops the result), otherwise a rank would leave the collective early and
the others would hang.
"""
from __future__ import annotations

import contextlib
import math

import torch


def _as_prompt_list(prompts: list[str] | str, n: int) -> list[str]:
    if isinstance(prompts, str):
        return [prompts] * n
    prompts = list(prompts)
    if len(prompts) != n:
        raise ValueError(f"generate_responses: got {n} images but {len(prompts)} prompts; "
                         "pass one prompt per image or a single prompt string for all")
    return prompts


def _unwrap(model):
    """The module that has `.generate` (a DeepSpeed engine wraps it as `.module`)."""
    return model.module if not hasattr(model, "generate") and hasattr(model, "module") else model


def _model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        # Under ZeRO-3 a partitioned parameter's local tensor may be empty; its device and
        # dtype are still those of the forward.
        return p.device, p.dtype
    return torch.device("cpu"), torch.float32


@contextlib.contextmanager
def _left_padding(tokenizer):
    # Left padding puts every row's last prompt token in the same column, so the new tokens
    # of all rows start at input length; the training path pads on the right, so restore.
    previous = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = previous


def batch_count_all_ranks(local: int, synced_gpus: bool) -> int:
    """The largest per-rank batch count under synced_gpus (ZeRO-3), else `local`."""
    if not (synced_gpus and torch.distributed.is_available() and torch.distributed.is_initialized()):
        return local
    # Collective: every rank must reach this line (it is outside any data-dependent branch).
    count = torch.tensor([local], dtype=torch.long,
                         device="cuda" if torch.distributed.get_backend() == "nccl" else "cpu")
    torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
    return int(count.item())


def padded_batch_plan(local_batches: int, total_batches: int) -> list[tuple[int | None, bool]]:
    """One (local batch index, keep the result) per forward, `total_batches` forwards in all.

    Batches past this rank's own repeat its last one and are dropped, so every rank runs the
    same number of forwards (ZeRO-3 collectives line up). A rank with no batch of its own gets
    index None: the caller must forward a placeholder row.
    """
    if local_batches > total_batches:
        raise ValueError(f"padded_batch_plan: {local_batches} local batches exceed the total {total_batches}; "
                         "the total must be the maximum over ranks (batch_count_all_ranks)")
    if local_batches == 0:
        return [(None, False)] * total_batches
    return [(min(b, local_batches - 1), b < local_batches) for b in range(total_batches)]


@torch.no_grad()
def generate_responses(adapter, images: list, prompts: list[str] | str, *, max_new_tokens: int = 128,
                       do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                       num_beams: int = 1, batch_size: int = 8, synced_gpus: bool = False,
                       device=None) -> list[str]:
    """Left-padded batches; returns only the newly generated text, special tokens stripped."""
    images = list(images)
    prompts = _as_prompt_list(prompts, len(images))
    if batch_size < 1:
        raise ValueError(f"generate_responses: batch_size = {batch_size} must be >= 1")
    model = _unwrap(adapter.model)
    param_device, dtype = _model_device_dtype(model)
    device = torch.device(device) if device is not None else param_device
    tokenizer = adapter.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    local_batches = math.ceil(len(images) / batch_size)
    plan = padded_batch_plan(local_batches, batch_count_all_ranks(local_batches, synced_gpus))
    if plan and local_batches == 0:
        raise ValueError("generate_responses: this rank has no images while others do, but ZeRO-3 generation "
                         "(synced_gpus=True) needs every rank to forward; give every rank at least one image "
                         "(sare_ds.eval.distributed.shard_indices(..., pad=True) pads the shards)")

    sampling = {"do_sample": do_sample, "num_beams": num_beams}
    if do_sample:
        # Only pass sampling knobs when sampling: greedy decoding with them set warns and they do nothing.
        sampling.update(temperature=temperature, top_p=top_p)

    was_training = model.training
    model.eval()
    texts: list[str] = []
    try:
        with _left_padding(tokenizer):
            for index, keep in plan:
                # A rank past its own data repeats its last batch so the ZeRO-3 collectives line up.
                lo = index * batch_size
                batch_images = images[lo: lo + batch_size]
                rendered = [adapter.render(adapter.conversation(p), add_generation_prompt=True)
                            for p in prompts[lo: lo + batch_size]]
                inputs = adapter.processor(images=adapter.generation_images(batch_images), text=rendered, padding=True, return_tensors="pt",
                                           add_special_tokens=adapter.add_special_tokens(rendered[0]))
                inputs = {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
                          for k, v in inputs.items()}
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, synced_gpus=synced_gpus,
                                     pad_token_id=pad_id, **sampling)
                if not keep:
                    continue
                new_tokens = out[:, inputs["input_ids"].shape[1]:]
                texts.extend(t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return texts
