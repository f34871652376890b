"""Torch reference of the SARE primitives over lists of tensors (foreach ops, no host sync).

- sum_of_squares(grads): fp32 sum of g^2 over all tensors, in a fixed order (deterministic).
- perturb_(params, masters, grads, scale): params <- cast(master_fp32 + scale * g), with the
  scalar `scale` a device tensor (rho / ||g||), so no value crosses to the host.
- restore_(params, masters): params <- cast(master). Exact: the weights are re-derived from
  the master copy, never by subtracting eps again (which is not exact in low precision).
"""
from __future__ import annotations

import torch


def sum_of_squares(tensors: list[torch.Tensor]) -> torch.Tensor:
    """fp32 scalar sum of squares of all elements (zero for an empty list)."""
    if not tensors:
        return torch.zeros((), dtype=torch.float32)
    norms = torch._foreach_norm([t.float() for t in tensors], 2)
    return torch.stack(norms).square().sum()


def perturb_(params: list[torch.Tensor], masters: list[torch.Tensor], grads: list[torch.Tensor],
             scale: torch.Tensor) -> None:
    """In place: params[i] <- cast(masters[i] + scale * grads[i]) (computed in fp32)."""
    if not params:
        return
    scale = scale.to(torch.float32)
    shifted = torch._foreach_mul([g.float() for g in grads], scale)
    torch._foreach_add_(shifted, [m.float() for m in masters])
    torch._foreach_copy_(params, shifted)


def restore_(params: list[torch.Tensor], masters: list[torch.Tensor]) -> None:
    """In place: params[i] <- cast(masters[i])."""
    if params:
        torch._foreach_copy_(params, masters)
