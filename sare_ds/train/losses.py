"""Span losses: per-sample mean token NLL of the target span, and the kind losses.

Training (packed or not) uses `span_sums`: the logits of the labelled positions only
(`collate_captions`'s `keep`), one fp32 cross-entropy over them, and per kind the weighted sum
that `UnlearningStep` divides by the step's span count (pooled means). `per_sample_nll` and
`kind_losses` are the per-sample forms (full logits): the sharpness probe (eval/probe.py) and
evaluation's perplexity use them, and tests use them as references.

    L_pos  = mean NLL over pos samples       (keep grounded text likely)
    L_neg  = - mean NLL over neg samples     (gradient ascent on hallucinated spans)
    L_sent = mean NLL over sent samples      (keep whole responses fluent)

All reductions are masked tensor ops: no host sync, and a batch lacking a kind gives 0 for
that term. With `score_weighting` (EFUF's code), pos NLL is multiplied by the CLIP score and
neg NLL by (55 - score): more confident samples count more.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sare_ds.data.samples import KIND_INDEX
from sare_ds.data.tokenize import EFUF_NEG_SCORE_CEILING, IGNORE_INDEX


def per_sample_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, T, V] logits, [B, T] labels -> [B] fp32 mean NLL over each sample's labelled tokens."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    token_nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="none",
    ).view(shift_labels.shape)
    mask = (shift_labels != IGNORE_INDEX).float()
    return (token_nll * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def kind_losses(nll: torch.Tensor, kind: torch.Tensor, score: torch.Tensor,
                score_weighting: bool = False) -> dict[str, torch.Tensor]:
    """{'pos': L_pos, 'neg': L_neg (= -NLL), 'sent': L_sent}, each a mean over its samples."""
    out = {}
    for name, sign in (("pos", 1.0), ("neg", -1.0), ("sent", 1.0)):
        mask = (kind == KIND_INDEX[name]).to(nll.dtype)
        weight = mask
        if score_weighting and name == "pos":
            weight = mask * score.to(nll.dtype)
        elif score_weighting and name == "neg":
            weight = mask * (EFUF_NEG_SCORE_CEILING - score.to(nll.dtype))
        out[name] = sign * (nll * weight).sum() / mask.sum().clamp_min(1.0)
    return out


# The sign of each kind's loss: L_neg = -NLL (gradient ascent), the others +NLL.
KIND_SIGN = {"pos": 1.0, "neg": -1.0, "sent": 1.0}


def span_sums(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[B, K, V] logits at the kept positions, [B, K] targets (IGNORE_INDEX: none), [B, n_kinds, K]
    token weights -> [n_kinds] fp32: per kind, the weighted sum of token NLLs (sum over spans of
    their mean NLL, with collate_captions' weights). Only the K labelled positions are ever
    materialised in fp32 (not the whole sequence times the vocabulary)."""
    b, k, v = logits.shape
    nll = F.cross_entropy(logits.reshape(b * k, v).float(), targets.reshape(b * k), ignore_index=IGNORE_INDEX,
                          reduction="none").view(b, k)
    return torch.einsum("bk,bjk->j", nll, weights.to(nll.dtype))
