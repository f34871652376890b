"""Fused Triton kernels of the SARE step over flat buffers: sum of squares, perturb, restore.

Imported lazily by `sare_kernels.dispatch` (never at `import sare_kernels`), because importing triton
is slow and fails where it is absent, and because `@triton.jit` decides at decoration time
whether a kernel is compiled (CUDA) or interpreted (`TRITON_INTERPRET=1`, CPU tensors).
Callers go through `sare_kernels.sum_of_squares / perturb_ / restore_ / ...`; the functions here
assume the inputs were already validated there (same numel per pair, contiguous, one device).

One launch per flat buffer (a ZeRO partition or a parameter): elementwise kernels read and
write each element exactly once; the sum of squares is a fixed two-stage (then repeated)
block reduction, so the result does not depend on scheduling. Nothing here reads a value
back to the host: the scale is a device scalar loaded inside the kernel.

Precision contract (what makes the torch path and this one bit-identical, except the norm):
- every value is computed in fp32; loads of bf16/fp16 are exact widenings;
- perturb is round(round(scale * g) + theta) in fp32, i.e. two roundings, as the torch
  reference (`_foreach_mul` then `_foreach_add_`) does. On GPU the compiler would otherwise
  contract it into one FMA (one rounding), so kernels launch with enable_fp_fusion=False;
- the final cast to bf16 is round-to-nearest-even done on the bits (the same rule torch's
  conversion uses), because Triton's CPU interpreter truncates fp32 -> bf16 instead; fp16
  uses the native cast (round-to-nearest-even on GPU and in the interpreter's numpy).
"""
from __future__ import annotations

import triton
import triton.language as tl
import torch

# Whether the kernels below were decorated in interpreter mode (CPU tensors) or compiled.
INTERPRETED = bool(triton.knobs.runtime.interpret)

# Elements per program instance. On GPU, 4096 elements over 8 warps are 16 per thread
# (four 128-bit loads for fp32), enough in flight to saturate HBM. The interpreter pays a
# fixed cost per program instance, so it gets the largest block that keeps numpy fast.
BLOCK = 16384 if INTERPRETED else 4096
NUM_WARPS = 8
# Interpreted kernels ignore the launch options; compiled ones must not fuse mul+add (see above).
_LAUNCH = dict(num_warps=NUM_WARPS, enable_fp_fusion=False)


@triton.jit
def _load_fp32(ptr, offs, mask):
    """Load a block and widen it to fp32 exactly (bf16 by shifting its bits into the high half)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = tl.load(ptr.to(tl.pointer_type(tl.uint16)) + offs, mask=mask, other=0)
        value = (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        value = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return value


@triton.jit
def _store_cast(ptr, offs, value, mask):
    """Store an fp32 block into ptr's dtype, rounding to nearest even (NaN stays NaN)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        # Round to nearest, ties to even: add 0x7FFF plus the lowest kept bit, drop 16 bits.
        # Finite values near the top round up into the inf pattern, as IEEE rounding does.
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(value != value, 0x7FC0, rounded)
        tl.store(ptr.to(tl.pointer_type(tl.uint16)) + offs, rounded.to(tl.uint16), mask=mask)
    else:
        tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _block_sums_kernel(src_ptr, out_ptr, n, SQUARE: tl.constexpr, BLOCK: tl.constexpr):
    """out[b] = sum over block b of src^2 (SQUARE) or src, in fp32; tails masked to zero."""
    pid = tl.program_id(0)
    # int64 offsets: a 1B-element partition times a 4-byte stride overflows int32 addressing.
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = _load_fp32(src_ptr, offs, mask)
    if SQUARE:
        x = x * x
    # A fixed tree inside the block, no atomics: the order never changes. This is what
    # tl.sum(x, 0) expands to, spelled out because tl.sum is itself a @triton.jit function,
    # decorated when triton is imported: had triton been imported before TRITON_INTERPRET=1
    # was set, it would not run in the interpreter. tl.reduce is a builtin, and with this
    # combine function the interpreter sums with numpy (pairwise) instead of a slow Python fold.
    tl.store(out_ptr + pid, tl.reduce(x, 0, tl.standard._sum_combine))


@triton.jit
def _perturb_kernel(param_ptr, master_ptr, grad_ptr, scale_ptr, n, BLOCK: tl.constexpr):
    """param <- cast(master + scale * grad), all in fp32."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    # The scale is read on the device (rho / ||g||, produced by the previous kernels), so the
    # host never waits for the norm.
    scale = tl.load(scale_ptr).to(tl.float32)
    master = _load_fp32(master_ptr, offs, mask)
    grad = _load_fp32(grad_ptr, offs, mask)
    _store_cast(param_ptr, offs, master + scale * grad, mask)


@triton.jit
def _perturb_with_backup_kernel(param_ptr, grad_ptr, scale_ptr, backup_ptr, n, BLOCK: tl.constexpr):
    """backup <- param (exact); param <- cast(param + scale * grad). backup may alias grad."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    scale = tl.load(scale_ptr).to(tl.float32)
    theta = _load_fp32(param_ptr, offs, mask)
    # Both loads come before either store of the same elements in this program, so a backup
    # buffer that is the gradient buffer itself is safe: each element is read, then overwritten.
    grad = _load_fp32(grad_ptr, offs, mask)
    # theta is a widened param value and backup is param's dtype or fp32: the store is exact.
    _store_cast(backup_ptr, offs, theta, mask)
    _store_cast(param_ptr, offs, theta + scale * grad, mask)


@triton.jit
def _cast_copy_kernel(dst_ptr, src_ptr, n, BLOCK: tl.constexpr):
    """dst <- cast(src): restore of the low-precision weights from their fp32 source."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    _store_cast(dst_ptr, offs, _load_fp32(src_ptr, offs, mask), mask)


def _grid(n: int) -> tuple[int]:
    return (triton.cdiv(n, BLOCK),)


def sum_of_squares(tensors: list[torch.Tensor]) -> torch.Tensor:
    """fp32 0-dim tensor: sum of x^2 over all tensors, in a fixed reduction order."""
    tensors = [t for t in tensors if t.numel() > 0]
    device = tensors[0].device
    # Stage 1: one launch per buffer, each writing its per-block partial sums into its own
    # slice of one shared buffer (slices are pointer offsets: no copy, no sync).
    counts = [triton.cdiv(t.numel(), BLOCK) for t in tensors]
    partials = torch.empty(sum(counts), dtype=torch.float32, device=device)
    start = 0
    for t, count in zip(tensors, counts):
        _block_sums_kernel[(count,)](t, partials[start:], t.numel(), SQUARE=True, BLOCK=BLOCK, **_LAUNCH)
        start += count
    # Stage 2+: sum blocks of partials until one value is left. A block tree at every level
    # keeps the rounding error O(log n * eps) instead of O(n * eps) for a running sum.
    while partials.numel() > 1:
        n = partials.numel()
        sums = torch.empty(triton.cdiv(n, BLOCK), dtype=torch.float32, device=device)
        _block_sums_kernel[_grid(n)](partials, sums, n, SQUARE=False, BLOCK=BLOCK, **_LAUNCH)
        partials = sums
    return partials.reshape(())


def perturb_(params, masters, grads, scale: torch.Tensor) -> None:
    for p, m, g in zip(params, masters, grads):
        if p.numel():
            _perturb_kernel[_grid(p.numel())](p, m, g, scale, p.numel(), BLOCK=BLOCK, **_LAUNCH)


def perturb_with_backup_(params, grads, scale: torch.Tensor, backups) -> None:
    for p, g, b in zip(params, grads, backups):
        if p.numel():
            _perturb_with_backup_kernel[_grid(p.numel())](p, g, scale, b, p.numel(), BLOCK=BLOCK, **_LAUNCH)


def restore_(params, masters) -> None:
    """params <- cast(masters): the fp32 master (or backup) is theta, so no other copy is needed."""
    for p, m in zip(params, masters):
        if p.numel():
            _cast_copy_kernel[_grid(p.numel())](p, m, p.numel(), BLOCK=BLOCK, **_LAUNCH)


# The undo of perturb_with_backup_ is the same cast copy (exact: the backup holds theta).
restore_from_ = restore_
