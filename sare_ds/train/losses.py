"""Span losses: per-sample mean token NLL of the target span, and the kind losses.

Training (packed or not) uses `chunked_span_sums`: from the final hidden states of the labelled
positions only (`collate_captions`'s `keep`), the LM head and an fp32 cross-entropy over one chunk of
those positions at a time (a frozen head: the hidden states' gradient computed in the forward, nothing
recomputed; a ZeRO-3-partitioned or trainable head: checkpointed calls recomputed in the backward),
and per kind the weighted sum that `UnlearningStep` divides by the step's span count (pooled means).
`span_sums` is the same sum from logits already computed (one piece; the reference of the chunks). `per_sample_nll` and
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
from torch.utils.checkpoint import checkpoint

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


# The fused head takes at least this many positions a chunk: each chunk reads the whole head weight
# twice, so tiny chunks would cost weight traffic without saving memory worth having.
MIN_FUSED_CHUNK = 32


class _FusedHeadNLL(torch.autograd.Function):
    """Weighted NLL sums of a frozen Linear LM head over [N, H] hidden states, chunk by chunk, with the
    gradient with respect to the hidden states computed in the forward.

    Each position's NLL depends on its own hidden state only, and the head is frozen, so the backward
    needs one vector per position, d nll_n / d h_n = (softmax(z_n) - onehot(t_n)) W (z_n its logits):
    computed chunk by chunk in the forward and kept ([N, H], the size of the hidden states themselves).
    The backward then scales it by sum_k grad_k w[k, n]: no logits are kept or recomputed, and a second
    backward through the same graph (SARE's shared forward) costs nothing more."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, weights, size):
        n = hidden.shape[0]
        sums = torch.zeros(weights.shape[0], dtype=torch.float32, device=hidden.device)
        dnll = torch.empty_like(hidden)
        for lo in range(0, n, size):
            hi = min(lo + size, n)
            logits = F.linear(hidden[lo:hi], weight, bias).float()
            t = targets[lo:hi]
            valid = t != IGNORE_INDEX
            safe = t.clamp_min(0).unsqueeze(1)
            lse = torch.logsumexp(logits, dim=-1)
            nll = torch.where(valid, lse - logits.gather(1, safe).squeeze(1), torch.zeros_like(lse))
            sums += weights[:, lo:hi].to(nll.dtype) @ nll
            probs = logits.sub_(lse.unsqueeze(1)).exp_()           # softmax, in the logits' storage
            probs.scatter_add_(1, safe, -torch.ones_like(safe, dtype=probs.dtype))
            probs.mul_(valid.unsqueeze(1))                          # an unlabelled position has no gradient
            dnll[lo:hi] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(dnll, weights)
        return sums

    @staticmethod
    def backward(ctx, grad):
        dnll, weights = ctx.saved_tensors
        coef = grad.to(torch.float32) @ weights.to(torch.float32)  # [N]: d loss / d nll_n
        return dnll * coef.to(dnll.dtype).unsqueeze(1), None, None, None, None, None


def _chunk_sums(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[C, H] hidden, [C] targets, [n_kinds, C] weights -> [n_kinds] weighted NLL sums of one chunk."""
    nll = F.cross_entropy(head(hidden).float(), targets, ignore_index=IGNORE_INDEX, reduction="none")
    return weights.to(nll.dtype) @ nll


def chunked_span_sums(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                      chunks: int, partitioned: bool = False) -> torch.Tensor:
    """`span_sums(head(hidden), targets, weights)` without the [B, K, V] logits: [B, K, H] final hidden
    states at the kept positions, the LM head module, [B, K] targets, [B, n_kinds, K] weights ->
    [n_kinds] fp32. At most a chunk of positions has logits at any time, so the loss path holds a few
    chunk x V fp32 tensors instead of a few (B*K) x V. Two ways, the same sums and gradients:

    - a frozen nn.Linear head whose weight is an ordinary tensor (one process, ZeRO-2): `_FusedHeadNLL`,
      the hidden states' gradient computed in the forward; at most `chunks` chunks of at least
      MIN_FUSED_CHUNK positions. Forward + backward cost the head's two matmuls, as without chunks.
    - otherwise (a ZeRO-3-partitioned head, `partitioned`; a trainable or non-Linear head): exactly
      `chunks` calls of the head module, each under torch.utils.checkpoint and recomputed in every
      backward (the last chunks empty when there are fewer positions). Under ZeRO-3 every rank must
      make the same module calls (each may gather the head's weight), and B*K differs between ranks,
      hence a fixed count. A partitioned head uses the reentrant checkpoint: DeepSpeed empties the
      weight after each module call, which the non-reentrant checkpoint's comparison of recomputed
      and saved tensors reads as a mismatch (CheckpointError); the reentrant one recomputes and
      back-propagates inside its own backward, where DeepSpeed's hooks gather the weight. It does not
      support torch.autograd.grad, which the one-process space uses, hence non-reentrant elsewhere."""
    if chunks < 1:
        raise ValueError(f"chunked_span_sums: chunks = {chunks}; give 1 or more")
    b, k, h = hidden.shape
    n = b * k
    hidden = hidden.reshape(n, h)
    targets = targets.reshape(n)
    weights = weights.transpose(0, 1).reshape(weights.shape[1], n)
    params = list(head.parameters())
    if not partitioned and type(head) is torch.nn.Linear and not any(p.requires_grad for p in params):
        size = max(MIN_FUSED_CHUNK, -(-n // chunks))
        return _FusedHeadNLL.apply(hidden, head.weight, head.bias, targets, weights, size)
    size = max(1, -(-n // chunks))
    total = None
    for i in range(chunks):
        lo, hi = min(i * size, n), min((i + 1) * size, n)
        part = checkpoint(_chunk_sums, head, hidden[lo:hi], targets[lo:hi], weights[:, lo:hi], use_reentrant=partitioned)
        total = part if total is None else total + part
    return total


def span_sums(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[B, K, V] logits at the kept positions, [B, K] targets (IGNORE_INDEX: none), [B, n_kinds, K]
    token weights -> [n_kinds] fp32: per kind, the weighted sum of token NLLs (sum over spans of
    their mean NLL, with collate_captions' weights). Only the K labelled positions are ever
    materialised in fp32 (not the whole sequence times the vocabulary)."""
    b, k, v = logits.shape
    nll = F.cross_entropy(logits.reshape(b * k, v).float(), targets.reshape(b * k), ignore_index=IGNORE_INDEX,
                          reduction="none").view(b, k)
    return torch.einsum("bk,bjk->j", nll, weights.to(nll.dtype))
