"""Generation quality: BLEU-1/2/4, perplexity, caption length.

    bleu(["a dog on a mat"], [["a dog is on the mat", "a puppy on a mat"]])   # {'BLEU-1': ..., ...}
    perplexity(adapter, images, prompts, texts)

BLEU is corpus-level, word-level, cumulative (BLEU-n = geometric mean of the 1..n-gram
precisions times the brevity penalty), computed by nltk's `corpus_bleu` against all reference
captions of the image (closest reference length for the brevity penalty), no smoothing.
Words are lower-cased runs of letters and digits; inner hyphens and apostrophes stay inside
the word ("t-shirt", "dog's"), other punctuation separates words and is dropped. (CHAIR's
object matching, sare_ds/objects.py, splits at apostrophes instead; BLEU scores wording.)

Perplexity is exp of the token-weighted mean NLL of `texts` as the assistant's answer to
(image, prompt), under the evaluated model: on reference captions it measures how well the
model still models grounded text (it rises in a distribution collapse).
"""
from __future__ import annotations

import math
import re
import warnings

import torch

_WORD = re.compile(r"[^\W_]+(?:[-'][^\W_]+)*")
BLEU_ORDERS = {"BLEU-1": (1.0,), "BLEU-2": (0.5, 0.5), "BLEU-4": (0.25, 0.25, 0.25, 0.25)}


def words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def bleu(hypotheses: list[str], references: list[list[str]]) -> dict[str, float]:
    """Corpus BLEU-1/2/4 in [0, 1]; hypotheses without any reference are skipped (and counted)."""
    from nltk.translate.bleu_score import corpus_bleu

    if len(hypotheses) != len(references):
        raise ValueError(f"bleu: {len(hypotheses)} hypotheses but {len(references)} reference lists; pass one each")
    pairs = [(words(h), [words(r) for r in refs]) for h, refs in zip(hypotheses, references) if refs]
    out: dict[str, float] = {"bleu_skipped_no_reference": len(hypotheses) - len(pairs)}
    with warnings.catch_warnings():
        # nltk warns when an n-gram order has no overlap; the score is then 0 by definition
        # (no smoothing, as in the COCO caption evaluation), which the report shows as 0.
        warnings.filterwarnings("ignore", message=r"(?s).*-gram overlaps", category=UserWarning)
        for name, weights in BLEU_ORDERS.items():
            out[name] = float(corpus_bleu([r for _, r in pairs], [h for h, _ in pairs], weights=weights)) if pairs else 0.0
    return out


def mean_length(texts: list[str]) -> float:
    """Mean number of words per text."""
    return sum(len(words(t)) for t in texts) / len(texts) if texts else 0.0


@torch.no_grad()
def token_nll_sums(adapter, images: list, prompts: list[str] | str, texts: list[str], *, batch_size: int = 8,
                   max_length: int = 2048, synced_gpus: bool = False) -> list[tuple[float, int]]:
    """Per text: (sum of token NLLs, token count) as the answer to (image, prompt); (0.0, 0) if it has no tokens.

    synced_gpus (ZeRO-3, every forward is a collective): all ranks run the same number of
    forwards, whatever number of their texts tokenise (see padded_batch_plan).
    """
    from sare_ds.data.samples import BadSampleError, Sample
    from sare_ds.data.tokenize import collate, tokenize_sample
    from sare_ds.models.generate import batch_count_all_ranks, padded_batch_plan
    from sare_ds.train.losses import per_sample_nll
    from sare_ds.train.step import to_device

    prompts = [prompts] * len(texts) if isinstance(prompts, str) else list(prompts)
    model = adapter.model
    param = next(model.parameters())
    tokenized: list = []
    for image, prompt, text in zip(images, prompts, texts):
        try:
            # kind "pos": the text alone carries labels, no EOS appended (a caption cut at
            # max_new_tokens has no end to predict).
            tokenized.append(tokenize_sample(Sample(image, prompt, "", text, "pos"), adapter, max_length))
        except BadSampleError:
            tokenized.append(None)  # counted as (0.0, 0): an empty text has nothing to score
    real = [i for i, t in enumerate(tokenized) if t is not None]
    groups = [real[lo:lo + batch_size] for lo in range(0, len(real), batch_size)]
    # Collective under synced_gpus: reached by every rank, before any data-dependent branch.
    plan = padded_batch_plan(len(groups), batch_count_all_ranks(len(groups), synced_gpus))
    pad_id = adapter.tokenizer.pad_token_id
    pad_id = adapter.tokenizer.eos_token_id if pad_id is None else pad_id
    was_training = model.training
    model.eval()
    out: list[tuple[float, int]] = [(0.0, 0)] * len(texts)
    placeholder = None
    try:
        for index, keep in plan:
            if index is None:
                placeholder = placeholder or [_placeholder_row(adapter, images, prompts, max_length)]
                rows = placeholder
            else:
                rows = [tokenized[i] for i in groups[index]]
            batch = to_device(collate(rows, pad_id), param.device, param.dtype)
            logits = model(**adapter.forward_inputs(batch)).logits
            if not keep:
                continue  # a forward only to keep the ranks' collectives aligned
            counts = (batch["labels"][:, 1:] != -100).sum(1)
            sums = per_sample_nll(logits, batch["labels"]) * counts
            for i, total, n in zip(groups[index], sums.tolist(), counts.tolist()):
                out[i] = (float(total), int(n))
    finally:
        model.train(was_training)
    return out


def _placeholder_row(adapter, images: list, prompts: list[str], max_length: int):
    """A row for a rank whose texts all failed to tokenise, forwarded and dropped (synced_gpus)."""
    from sare_ds.data.samples import BadSampleError, Sample
    from sare_ds.data.tokenize import tokenize_sample

    if not images:
        raise ValueError("token_nll_sums: this rank has no item while others forward under synced_gpus; "
                         "give every rank at least one item (sare_ds.eval.distributed pads the shards)")
    try:
        return tokenize_sample(Sample(images[0], prompts[0], "", "A photo.", "pos"), adapter, max_length)
    except BadSampleError as e:
        raise ValueError(f"token_nll_sums: none of this rank's texts tokenises and neither does a placeholder "
                         f"with its first image and prompt ({e}); fix that prompt, or the other ranks wait "
                         "for this one's forwards") from e


def perplexity_from_sums(sums: list[tuple[float, int]]) -> dict:
    """exp(total NLL / total tokens) of token_nll_sums results (nan without tokens)."""
    nll, tokens = sum(s for s, _ in sums), sum(n for _, n in sums)
    mean_nll = nll / tokens if tokens else float("nan")
    return {"perplexity": math.exp(mean_nll) if tokens else float("nan"), "mean_nll": mean_nll, "tokens": tokens}


def perplexity(adapter, images: list, prompts: list[str] | str, texts: list[str], *, batch_size: int = 8) -> dict:
    """exp(total NLL / total tokens) of the texts as answers to (image, prompt)."""
    return perplexity_from_sums(token_nll_sums(adapter, images, prompts, texts, batch_size=batch_size))
