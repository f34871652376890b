"""Flat-buffer primitives of the SARE step: gradient sum of squares, perturb and restore.

    sum_of_squares(tensors) -> fp32 0-dim tensor         deterministic, fp32 accumulation
    perturb_(params, masters, grads, scale)               params <- cast(master + scale * g)
    restore_(params, masters)                             params <- cast(master), bit-exact
    perturb_with_backup_(params, grads, scale, backups)   no-master mode: theta -> backups
    restore_from_(params, backups)                        params <- backups, bit-exact
    scale_by_abs_(tensors, weights, eta)                  tensors <- tensors * (|weights| + eta) (ASAM)
    set_backend("auto" | "triton" | "torch" | None)       or env SARE_KERNELS; see dispatch

Each call runs the fused Triton kernels (`sare_kernels.triton_sam`) where Triton can run, and the
torch reference (`sare_kernels.reference`, foreach ops) otherwise; both give the same results.
Triton is imported lazily, on the first call that can use it. Benchmark: `python -m sare_kernels.bench`.
"""
from .dispatch import (
    BACKENDS,
    get_backend,
    perturb_,
    perturb_with_backup_,
    restore_,
    restore_from_,
    scale_by_abs_,
    set_backend,
    sum_of_squares,
    triton_unavailable_reason,
)

__all__ = [
    "BACKENDS",
    "get_backend",
    "perturb_",
    "perturb_with_backup_",
    "restore_",
    "restore_from_",
    "scale_by_abs_",
    "set_backend",
    "sum_of_squares",
    "triton_unavailable_reason",
]
