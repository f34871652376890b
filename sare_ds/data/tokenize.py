"""Chat-template tokenisation with labels on the target span only, and batch collation.

The sample is rendered as the model's own conversation (user: image + prompt; assistant:
context + target), the text is cut right after the target (so pos/neg samples never see
what followed in the caption), and tokenised once with character offsets. Tokens whose
characters overlap the target carry labels; everything else (prompt, context, image) is
-100. Sent samples append EOS, which is labelled too. Finally the image placeholder is
expanded to the number of positions the model's processor assigns it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sare_ds.data.samples import KIND_INDEX, BadSampleError, Sample

IGNORE_INDEX = -100


@dataclass
class TokenizedSample:
    input_ids: torch.Tensor  # [T] long, image placeholder expanded
    labels: torch.Tensor  # [T] long, IGNORE_INDEX outside the target span
    image: dict  # tensors of the image (pixel_values [1, ...], ...)
    kind: int
    score: float
    image_id: str = ""

    @property
    def num_target_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def needs_bos(tokenizer, ids: list[int]) -> bool:
    """Whether BOS goes in front of `ids` (tokenised without special tokens): the tokenizer adds one
    and the chat template did not render it already."""
    bos = tokenizer.bos_token_id
    return bos is not None and getattr(tokenizer, "add_bos_token", True) and (not ids or ids[0] != bos)


def tokenize_sample(sample: Sample, adapter, max_length: int) -> TokenizedSample:
    sample.check()
    tokenizer = adapter.tokenizer
    if not getattr(tokenizer, "is_fast", False):
        raise BadSampleError(
            f"{adapter.source}: span labels need a fast tokenizer (character offsets); "
            "fix: ship tokenizer.json with the checkpoint or load it with use_fast=True"
        )
    response = sample.context + sample.target
    text = adapter.render(adapter.conversation(sample.prompt, response), add_generation_prompt=False)
    start = text.rfind(response)
    if start < 0:
        raise BadSampleError(
            f"sample (image {sample.image_id}): the chat template altered the response text, so the target "
            "span cannot be located; fix: strip template control strings from the caption"
        )
    t_begin, t_end = start + len(sample.context), start + len(response)
    text = text[:t_end]

    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = list(enc["offset_mapping"])
    if needs_bos(tokenizer, ids):
        ids.insert(0, tokenizer.bos_token_id)
        offsets.insert(0, (0, 0))
    labels = [tid if (e > t_begin and s < t_end) else IGNORE_INDEX for tid, (s, e) in zip(ids, offsets)]
    if sample.kind == "sent":
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)

    image = adapter.image_inputs(sample.image)
    image_token_id = adapter.image_token_id
    n_placeholders = ids.count(image_token_id)
    if n_placeholders != 1:
        raise BadSampleError(
            f"sample (image {sample.image_id}): expected one image placeholder in the rendered prompt, found "
            f"{n_placeholders}; fix: remove image tokens from prompt/caption text"
        )
    pos = ids.index(image_token_id)
    n = image.num_image_tokens
    ids = ids[:pos] + [image_token_id] * n + ids[pos + 1:]
    labels = labels[:pos] + [IGNORE_INDEX] * n + labels[pos + 1:]
    if len(ids) > max_length:
        raise BadSampleError(
            f"sample (image {sample.image_id}): {len(ids)} tokens ({n} of them the image's) exceed data.max_length = "
            f"{max_length}; fix: raise data.max_length (the launch/configs/ recipe of this model sets one that fits) "
            "or shorten the caption", reason=f"longer than data.max_length = {max_length}")
    if all(l == IGNORE_INDEX for l in labels):
        raise BadSampleError(f"sample (image {sample.image_id}): the target span has no tokens; fix: drop it")
    return TokenizedSample(
        input_ids=torch.tensor(ids, dtype=torch.long),
        labels=torch.tensor(labels, dtype=torch.long),
        image=image.tensors,
        kind=KIND_INDEX[sample.kind],
        score=float(sample.score),
        image_id=sample.image_id,
    )


# Probe images for the fixed part of a sample's length: small square, landscape 4:3, portrait 3:4 and
# a large square (LLaVA-NeXT's image token count depends on size and aspect ratio: 1,176 / 2,340 /
# 2,352 / 2,928 for these on LLaVA-NeXT-Mistral-7B, the large square its maximum; LLaVA-1.5: 576 each).
PROBE_SIZES = ((336, 336), (640, 480), (480, 640), (640, 640))
TYPICAL_CAPTION_TOKENS = 150  # a 100-word caption, as EFUF's prompt asks for (~1.3 tokens a word)


def fixed_sample_tokens(adapter, prompt: str) -> dict[str, int]:
    """Tokens every sample of `prompt` has before its caption text: BOS + chat template + prompt, and
    the image's positions (min and max over PROBE_SIZES)."""
    from PIL import Image

    text = adapter.render(adapter.conversation(prompt), add_generation_prompt=True)
    ids = adapter.tokenizer(text, add_special_tokens=False)["input_ids"]
    image_tokens = [adapter.image_inputs(Image.new("RGB", size)).num_image_tokens for size in PROBE_SIZES]
    # The placeholder itself is replaced by the image's positions; BOS is added in front (as
    # tokenize_sample does: unless the template rendered it already).
    text_tokens = len(ids) - ids.count(adapter.image_token_id) + int(needs_bos(adapter.tokenizer, ids))
    return {"text": text_tokens, "image_min": min(image_tokens), "image_max": max(image_tokens)}


def _cat_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along dim 0, zero-padding dim 1 when it differs (LLaVA-NeXT patch counts)."""
    if len({t.shape[1:] for t in tensors}) == 1:
        return torch.cat(tensors, 0)
    width = max(t.shape[1] for t in tensors)
    padded = []
    for t in tensors:
        pad = t.new_zeros((t.shape[0], width - t.shape[1], *t.shape[2:]))
        padded.append(torch.cat([t, pad], 1))
    return torch.cat(padded, 0)


def collate(samples: list[TokenizedSample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels, image tensors, kind, score."""
    length = max(len(s.input_ids) for s in samples)
    b = len(samples)
    input_ids = torch.full((b, length), pad_token_id, dtype=torch.long)
    labels = torch.full((b, length), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((b, length), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        input_ids[i, :n], labels[i, :n], attention[i, :n] = s.input_ids, s.labels, 1
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention,
             "kind": torch.tensor([s.kind for s in samples], dtype=torch.long),
             "score": torch.tensor([s.score for s in samples], dtype=torch.float32)}
    for key in samples[0].image:
        batch[key] = _cat_padded([s.image[key] for s in samples])
    return batch
