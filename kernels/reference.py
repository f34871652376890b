"""Torch reference of the SARE primitives over lists of tensors (foreach ops, no host sync).

Used wherever Triton cannot run, and the reference the fused kernels (`sare_kernels.triton_sam`)
are tested against. Callers go through `kernels` (dispatch and input checks); these
functions assume valid inputs.

- sum_of_squares(grads): fp32 sum of g^2 over all tensors, in a fixed order (deterministic).
- perturb_(params, masters, grads, scale): params <- cast(master_fp32 + scale * g), with the
  scalar `scale` a device tensor (rho / ||g||), so no value crosses to the host.
- restore_(params, masters): params <- cast(master). Exact: the weights are re-derived from
  the master copy, never by subtracting eps again (which is not exact in low precision).
- perturb_with_backup_(params, grads, scale, backups) / restore_from_(params, backups): the
  same for weights with no separate master (plain training): theta goes to `backups` (which
  may be the gradient buffers themselves) in the same call, and comes back bit-exactly.

Precision order (the fused kernels follow it exactly): fp32 product scale * g, rounded; fp32
sum with theta, rounded; one cast to the parameter dtype, round-to-nearest-even.
"""
from __future__ import annotations

import torch


# CPU sum of squares: rows of 1024 elements, one norm per row, then a cascade sum of the
# squared row norms. The CPU norm kernel accumulates nearly sequentially (one whole-tensor
# norm: relative error 2e-5 at 1e6 elements, 7e-4 at 1e7); over 1024-element rows it stays
# at ~1e-7 and costs one op per chunk (measured 1.3 ms for 1e7 fp32 on 2 cores, vs 10 ms for
# _foreach_norm). Low-precision chunks are widened first; the chunk bounds that temporary.
_CPU_ROW = 1024
_CPU_CHUNK = 1 << 24


def _cpu_sum_of_squares(t: torch.Tensor) -> list[torch.Tensor]:
    parts = []
    for chunk in t.reshape(-1).split(_CPU_CHUNK):
        chunk = chunk.float()
        rows = chunk.numel() // _CPU_ROW
        if rows:
            row_norms = torch.linalg.vector_norm(chunk[:rows * _CPU_ROW].view(rows, _CPU_ROW), dim=1)
            parts.append(row_norms.square().sum())
        if chunk.numel() > rows * _CPU_ROW:
            parts.append(torch.linalg.vector_norm(chunk[rows * _CPU_ROW:]).square())
    return parts


def sum_of_squares(tensors: list[torch.Tensor]) -> torch.Tensor:
    """fp32 scalar sum of squares of all elements (zero for an empty list)."""
    if not tensors:
        return torch.zeros((), dtype=torch.float32)
    if tensors[0].device.type == "cuda":
        # One fused launch; CUDA's reduction is a fixed tree, so fp32 stays accurate and the
        # result deterministic. (norm then square adds about 2 ulp.)
        norms = torch._foreach_norm([t.float() for t in tensors], 2)
        return torch.stack(norms).square().sum()
    # Partials summed in a fixed order: deterministic.
    parts = [part for t in tensors if t.numel() for part in _cpu_sum_of_squares(t)]
    return torch.stack(parts).sum() if parts else torch.zeros((), dtype=torch.float32)


def _scaled_fp32(grads: list[torch.Tensor], scale: torch.Tensor) -> list[torch.Tensor]:
    """New fp32 buffers holding round(scale * g): the only temporary of perturb (4 bytes/element)."""
    scale = scale.to(torch.float32)
    if all(g.dtype == torch.float32 for g in grads):
        return torch._foreach_mul(grads, scale)  # one pass: read g, write the product
    # Low-precision gradients are widened exactly into their own copy first (a bf16 * fp32
    # 0-dim product would stay bf16), then scaled in place.
    shifted = [g.to(torch.float32, copy=True) for g in grads]
    torch._foreach_mul_(shifted, scale)
    return shifted


def perturb_(params: list[torch.Tensor], masters: list[torch.Tensor], grads: list[torch.Tensor],
             scale: torch.Tensor) -> None:
    """In place: params[i] <- cast(masters[i] + scale * grads[i]) (computed in fp32)."""
    if not params:
        return
    shifted = _scaled_fp32(grads, scale)
    torch._foreach_add_(shifted, masters)  # fp32 += master (widened exactly), rounded once
    torch._foreach_copy_(params, shifted)


def restore_(params: list[torch.Tensor], masters: list[torch.Tensor]) -> None:
    """In place: params[i] <- cast(masters[i])."""
    if params:
        torch._foreach_copy_(params, masters)


def perturb_with_backup_(params: list[torch.Tensor], grads: list[torch.Tensor], scale: torch.Tensor,
                         backups: list[torch.Tensor]) -> None:
    """In place: backups[i] <- params[i] (exact), params[i] <- cast(params[i] + scale * grads[i])."""
    if not params:
        return
    # The shifted weights are formed in new fp32 buffers before anything is overwritten, so
    # `backups` may alias `grads` (the gradient is dead once eps* is formed).
    shifted = _scaled_fp32(grads, scale)
    torch._foreach_add_(shifted, params)
    torch._foreach_copy_(backups, params)
    torch._foreach_copy_(params, shifted)


def restore_from_(params: list[torch.Tensor], backups: list[torch.Tensor]) -> None:
    """In place: params[i] <- backups[i] (exact: a backup holds every value of its param)."""
    restore_(params, backups)


def scale_by_abs_(tensors: list[torch.Tensor], weights: list[torch.Tensor], eta: float) -> None:
    """In place: tensors[i] <- cast(tensors[i] * (|weights[i]| + eta)), computed in fp32 (ASAM's T_theta)."""
    for t, w in zip(tensors, weights):
        factor = w.to(device=t.device, dtype=torch.float32).abs().add_(eta).reshape(t.shape)
        t.copy_(factor.mul_(t))
