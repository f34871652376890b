"""Chat-template tokenisation with labels on the target spans only, and batch collation.

Two units, one rule for which tokens carry a span's loss (those whose characters overlap it):

- a caption (`tokenize_caption`, packed training): the conversation is rendered and tokenised
  ONCE with the whole response; every span of the caption (pos, neg) and the sent response
  (+ EOS) get per-token loss weights over that one token sequence, so one forward gives every
  span's NLL. With packing off it returns the per-sample view instead (one sequence per span,
  each cut after its span), which is how EFUF's own code forwards the data.
- a sample (`tokenize_sample`, the per-sample reference; evaluation): described below.

The boundary rule. A token belongs to a span when its characters overlap the span's. In the
packed tokenisation the text after a span is present, so a tokenizer may merge the span's last
characters with what follows (SentencePiece-style vocabularies have pieces such as "s," or
"."-merges); that token then belongs to the span (it is the token the model emitted when it wrote
the caption). The per-sample cut never sees the following text, so its last token can differ
there; everywhere else the two give the same tokens, labels and NLL (tests/test_packing.py).

The sample is rendered as the model's own conversation (user: image + prompt; assistant:
context + target), the text is cut right after the target (so pos/neg samples never see
what followed in the caption), and tokenised once with character offsets. Tokens whose
characters overlap the target carry labels; everything else (prompt, context, image) is
-100. Sent samples append EOS, which is labelled too. Finally the image placeholder is
expanded to the number of positions the model's processor assigns it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sare_ds.data.samples import KIND_INDEX, KINDS, BadSampleError, Caption, Sample

IGNORE_INDEX = -100


@dataclass
class TokenizedSample:
    input_ids: torch.Tensor  # [T] long, image placeholder expanded
    labels: torch.Tensor  # [T] long, IGNORE_INDEX outside the target span
    image: dict  # tensors of the image (pixel_values [1, ...], ...)
    kind: int
    score: float
    image_id: str = ""
    token_tensors: dict = field(default_factory=dict)  # per-token forward inputs [T] (adapter.token_tensors)

    @property
    def num_target_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front when asked for special tokens (what it does, not its
    `add_bos_token` attribute: a reloaded tokenizer may report False and still add one)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def needs_bos(tokenizer, ids: list[int]) -> bool:
    """Whether BOS goes in front of `ids` (tokenised without special tokens): the tokenizer adds one
    and the chat template did not render it already (transformers' processors follow the same rule)."""
    return adds_bos(tokenizer) and (not ids or ids[0] != tokenizer.bos_token_id)


def _fast_tokenizer(adapter):
    tokenizer = adapter.tokenizer
    if not getattr(tokenizer, "is_fast", False):
        raise BadSampleError(
            f"{adapter.source}: span labels need a fast tokenizer (character offsets); "
            "fix: ship tokenizer.json with the checkpoint or load it with use_fast=True")
    return tokenizer


def _render_response(adapter, prompt: str, response: str, where: str, what: str):
    """The conversation (user: image + prompt; assistant: response) rendered with the chat template, cut
    right after the response (end-of-turn strings carry no loss) and tokenised with character offsets
    (BOS in front where the tokenizer adds one). Returns (text, response start, ids, offsets)."""
    tokenizer = _fast_tokenizer(adapter)
    text = adapter.render(adapter.conversation(prompt, response), add_generation_prompt=False)
    start = text.rfind(response)
    if start < 0:
        raise BadSampleError(
            f"{where}: the chat template altered the response text, so the {what} cannot be located; fix: "
            "strip template control strings from the caption")
    text = text[:start + len(response)]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = list(enc["offset_mapping"])
    if needs_bos(tokenizer, ids):
        ids.insert(0, tokenizer.bos_token_id)
        offsets.insert(0, (0, 0))
    return text, start, ids, offsets


def _image_position(ids: list[int], adapter, where: str) -> int:
    """Index of the one image placeholder in `ids` (the processor expands it to the image's positions)."""
    n_placeholders = ids.count(adapter.placeholder_token_id)
    if n_placeholders != 1:
        raise BadSampleError(
            f"{where}: expected one image placeholder in the rendered prompt, found {n_placeholders}; fix: remove "
            "image tokens from prompt/caption text")
    return ids.index(adapter.placeholder_token_id)


def _expand(adapter, text: str, ids: list[int], offsets: list, image, prompt: str, where: str):
    """Expand the one image placeholder of `ids` as the family's processor does (checked against it):
    returns (ids, offsets, image tensors, the image's positions); image positions get empty offsets."""
    _image_position(ids, adapter, where)
    e = adapter.expand_image(text, ids, image, prompt, where)
    offsets = offsets[:e.start] + [(0, 0)] * e.length + offsets[e.start + 1:]
    return e.ids, offsets, e.tensors, e.length


def _response_start(offsets: list, start: int) -> int:
    """Index of the first token of the response (its characters start at `start`)."""
    return next((t for t, (a, b) in enumerate(offsets) if b > start), len(offsets))


def tokenize_sample(sample: Sample, adapter, max_length: int) -> TokenizedSample:
    sample.check()
    tokenizer = adapter.tokenizer
    response = sample.context + sample.target
    where = f"sample (image {sample.image_id})"
    text, start, ids, offsets = _render_response(adapter, sample.prompt, response, where, "target span")
    ids, offsets, image, n = _expand(adapter, text, ids, offsets, sample.image, sample.prompt, where)
    t_begin, t_end = start + len(sample.context), start + len(response)
    labels = [tid if (e > t_begin and s < t_end) else IGNORE_INDEX for tid, (s, e) in zip(ids, offsets)]
    if sample.kind == "sent":
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
        offsets.append((len(text), len(text)))
    token_tensors = adapter.token_tensors(ids, _response_start(offsets, start))
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
        image=image,
        kind=KIND_INDEX[sample.kind],
        score=float(sample.score),
        image_id=sample.image_id,
        token_tensors={k: torch.tensor(v, dtype=torch.long) for k, v in token_tensors.items()},
    )


# Probe images for the fixed part of a sample's length: small square, landscape 4:3, portrait 3:4 and
# a large square (LLaVA-NeXT's image token count depends on size and aspect ratio: 1,176 / 2,340 /
# 2,352 / 2,928 for these on LLaVA-NeXT-Mistral-7B, the large square its maximum; LLaVA-1.5: 576 each).
PROBE_SIZES = ((336, 336), (640, 480), (480, 640), (640, 640))
TYPICAL_CAPTION_TOKENS = 150  # a 100-word caption, as EFUF's prompt asks for (~1.3 tokens a word)


def fixed_sample_tokens(adapter, prompt: str) -> dict[str, int]:
    """Tokens every sample of `prompt` has before its caption text: the chat template + prompt with the
    special tokens the model's processor adds (BOS; PaliGemma's BOS and newline; InstructBLIP's query
    positions count as the image's), and the image's positions (min and max over PROBE_SIZES, markers
    such as <global-img> or <img> included)."""
    from PIL import Image

    text = adapter.render(adapter.conversation(prompt), add_generation_prompt=True)
    image_tokens, text_tokens = [], None
    for size in PROBE_SIZES:
        image = Image.new("RGB", size)
        n = adapter.image_inputs(image).num_image_tokens
        image_tokens.append(n)
        if text_tokens is None:  # the processor's own sequence of the generation prompt, less the image
            out = adapter.processor(images=adapter.generation_images([image]), text=[text], return_tensors="pt",
                                    add_special_tokens=adapter.add_special_tokens(text))
            text_tokens = int(out["input_ids"].shape[1]) - n
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
    token = {key: torch.zeros((b, length), dtype=torch.long) for key in samples[0].token_tensors}
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        input_ids[i, :n], labels[i, :n], attention[i, :n] = s.input_ids, s.labels, 1
        for key, t in token.items():
            t[i, :n] = s.token_tensors[key]
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention,
             "kind": torch.tensor([s.kind for s in samples], dtype=torch.long),
             "score": torch.tensor([s.score for s in samples], dtype=torch.float32), **token}
    for key in samples[0].image:
        batch[key] = _cat_padded([s.image[key] for s in samples])
    return batch


# ------------------------------------------------------------------------------ packed captions

EFUF_NEG_SCORE_CEILING = 55.0  # EFUF's code weights a neg span by (55 - score), a pos span by its score


@dataclass
class TokenizedCaption:
    """One forward's worth of a caption: tokens, and per kind the loss weight of every token.

    weights[k, t] = sum over spans s of kind KINDS[k] covering token t of w_s / n_s (n_s: the span's
    token count; w_s: 1, or EFUF's score weight), so sum_t weights[k, t] * NLL_t is the sum over the
    caption's spans of kind k of their mean token NLL. counts[k] is the number of those spans: the
    step divides by the step's total count, which makes L_k a mean over spans.
    """

    input_ids: torch.Tensor  # [T] long, image placeholder expanded
    labels: torch.Tensor  # [T] long: the token where any span weights it, IGNORE_INDEX elsewhere
    weights: torch.Tensor  # [len(KINDS), T] float32
    counts: torch.Tensor  # [len(KINDS)] float32, spans per kind
    image: dict
    image_id: str = ""
    dropped: dict | None = None  # spans left out (longer than max_length), by reason
    token_tensors: dict = field(default_factory=dict)  # per-token forward inputs [T] (adapter.token_tensors)

    @property
    def num_target_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def last_position(self, kinds: tuple[str, ...]) -> int:
        """Index of the last token weighted for any of `kinds` (-1 when none)."""
        rows = self.weights[[KIND_INDEX[k] for k in kinds]].sum(0)
        hit = (rows != 0).nonzero()
        return int(hit[-1]) if len(hit) else -1


def tokenize_caption(caption: Caption, adapter, max_length: int, *, packing: bool = True,
                     kinds: tuple[str, ...] = KINDS, score_weighting: bool = False) -> list[TokenizedCaption]:
    """The sequences one caption is trained on: one (packed) or one per span and sent (packing=False).

    kinds: the span kinds the method trains on (the others get no weight and no sequence of their
    own). Spans whose last token falls beyond max_length are left out and counted in `.dropped`;
    a caption with nothing left to train raises BadSampleError (counted as a skip by the caller).
    """
    caption.check()
    if not packing:
        out, skipped = [], {}
        for sample in caption.unpack():
            if sample.kind not in kinds:
                continue
            try:
                out += tokenize_caption(Caption.from_sample(sample), adapter, max_length, packing=True,
                                        kinds=kinds, score_weighting=score_weighting)
            except BadSampleError as e:
                skipped[e.reason] = skipped.get(e.reason, 0) + 1
        if not out:
            raise BadSampleError(f"caption (image {caption.image_id}): no sample of kinds {kinds} can be trained on "
                                 f"({skip_reasons(skipped) or 'none of these kinds'})",
                                 reason=next(iter(skipped)) if len(skipped) == 1 else f"no span of kinds {kinds}")
        if skipped:
            out[0].dropped = {**(out[0].dropped or {}), **skipped}
        return out

    tokenizer = adapter.tokenizer
    spans = [s for s in caption.spans if s.kind in kinds]
    sent = caption.sent and "sent" in kinds
    if not spans and not sent:
        raise BadSampleError(f"caption (image {caption.image_id}): no span of the kinds this method trains ({kinds})",
                             reason=f"no span of kinds {'/'.join(kinds)}")
    response = caption.caption
    where = f"caption (image {caption.image_id})"
    text, start, ids, offsets = _render_response(adapter, caption.prompt, response, where, "spans")

    ids, offsets, image, n_image = _expand(adapter, text, ids, offsets, caption.image, caption.prompt, where)

    def covering(lo: int, hi: int) -> list[int]:
        return [t for t, (a, b) in enumerate(offsets) if b > lo and a < hi]

    pieces: list[tuple[int, list[int], float]] = []  # (kind index, token positions, weight)
    for s in spans:
        w = 1.0
        if score_weighting:
            w = s.score if s.kind == "pos" else EFUF_NEG_SCORE_CEILING - s.score
        pieces.append((KIND_INDEX[s.kind], covering(start + s.start, start + s.end), w))
    if sent:
        ids.append(tokenizer.eos_token_id)
        offsets.append((len(text), len(text)))
        pieces.append((KIND_INDEX["sent"], covering(start, start + len(response)) + [len(ids) - 1], 1.0))
    total = len(ids)

    weights = torch.zeros(len(KINDS), min(total, max_length), dtype=torch.float32)
    counts = torch.zeros(len(KINDS), dtype=torch.float32)
    dropped: dict[str, int] = {}
    for k, positions, w in pieces:
        if not positions:
            dropped["span has no tokens"] = dropped.get("span has no tokens", 0) + 1
            continue
        if positions[-1] >= max_length:
            reason = f"longer than data.max_length = {max_length}"
            dropped[reason] = dropped.get(reason, 0) + 1
            continue
        weights[k, positions] += w / len(positions)
        counts[k] += 1
    if not counts.any():
        raise BadSampleError(
            f"caption (image {caption.image_id}): {total} tokens ({n_image} of them the image's); no span ends within "
            f"data.max_length = {max_length}; fix: raise data.max_length (the launch/configs/ recipe of this model sets "
            "one that fits) or shorten the caption",
            reason=next(iter(dropped)) if dropped else "no span has tokens")
    length = min(total, max_length)
    input_ids = torch.tensor(ids[:length], dtype=torch.long)
    labels = torch.where(weights.ne(0).any(0), input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    token_tensors = {k: torch.tensor(v[:length], dtype=torch.long)
                     for k, v in adapter.token_tensors(ids, _response_start(offsets, start)).items()}
    return [TokenizedCaption(input_ids, labels, weights, counts, image, caption.image_id, dropped or None,
                             token_tensors)]


def skip_reasons(skipped: dict[str, int]) -> str:
    return ", ".join(f"{n} x {r}" for r, n in sorted(skipped.items(), key=lambda kv: -kv[1]))


def collate_captions(items: list[TokenizedCaption], pad_token_id: int, kinds: tuple[str, ...],
                     trim: bool = True) -> dict[str, torch.Tensor] | None:
    """The batch of one pass over `kinds`: the items with weight on any of them, right-padded and
    cut after the last weighted token (causal attention: what follows cannot change these tokens'
    NLL). None when no item has such a weight.

    Keys: input_ids, attention_mask, image tensors; `keep` [K] the positions whose logits are needed
    (position t - 1 predicts token t), `targets` [B, K] and `weights` [B, len(KINDS), K] at those
    positions (kinds outside `kinds` zeroed).
    """
    rows = [it for it in items if kinds and it.last_position(kinds) >= 0]
    if not rows:
        return None
    mask = torch.zeros(len(KINDS), 1)
    for k in kinds:
        mask[KIND_INDEX[k]] = 1.0
    length = max(it.last_position(kinds) + 1 for it in rows) if trim else max(len(it.input_ids) for it in rows)
    b = len(rows)
    input_ids = torch.full((b, length), pad_token_id, dtype=torch.long)
    labels = torch.full((b, length), IGNORE_INDEX, dtype=torch.long)
    w = torch.zeros((b, len(KINDS), length), dtype=torch.float32)
    attention = torch.zeros((b, length), dtype=torch.long)
    token = {key: torch.zeros((b, length), dtype=torch.long) for key in rows[0].token_tensors}
    for i, it in enumerate(rows):
        n = min(len(it.input_ids), length)
        input_ids[i, :n], attention[i, :n] = it.input_ids[:n], 1
        for key, t in token.items():
            t[i, :n] = it.token_tensors[key][:n]
        w[i, :, :n] = it.weights[:, :n] * mask
        labels[i, :n] = torch.where(w[i, :, :n].ne(0).any(0), it.labels[:n], IGNORE_INDEX)
    # Targets at t >= 1 only (a BOS at 0 is never a target); logits of t - 1 predict them.
    targeted = labels[:, 1:].ne(IGNORE_INDEX).any(0).nonzero().flatten() + 1
    batch = {"input_ids": input_ids, "attention_mask": attention, "keep": targeted - 1,
             "targets": labels[:, targeted], "weights": w[:, :, targeted], **token}
    for key in rows[0].image:
        batch[key] = _cat_padded([it.image[key] for it in rows])
    return batch


def empty_pass_batch(items: list[TokenizedCaption], pad_token_id: int) -> dict[str, torch.Tensor]:
    """A batch of the first item with no weight: what a rank forwards in a pass it has nothing for, so
    every rank runs the same passes and collectives (ZeRO-3 gathers parameters inside each forward)."""
    it = items[0]
    batch = collate_captions([it], pad_token_id, KINDS, trim=True)
    # Cut after the first weighted token (image and prompt kept: every module runs, so every
    # parameter is gathered): the stand-in is never longer than the passes it stands beside.
    first = int(batch["keep"][0]) + 2
    for key in ("input_ids", "attention_mask", *it.token_tensors):
        batch[key] = batch[key][:, :first]
    batch["weights"] = torch.zeros_like(batch["weights"][:, :, :1])
    batch["targets"] = torch.full_like(batch["targets"][:, :1], IGNORE_INDEX)
    batch["keep"] = batch["keep"][:1]
    return batch
