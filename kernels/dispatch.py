"""Choose, per call, the fused Triton kernels or the torch reference for the SARE primitives.

    backend setting      where it comes from                    what a call does
    "auto" (default)     sare_kernels.set_backend(...) if called,    Triton where it can run, else torch
    "triton"             else the env var SARE_KERNELS          Triton, or an error saying why not
    "torch"                                                      the torch reference (foreach ops)

Triton "can run" for a call when all its tensors are contiguous floating tensors on one
device and either the device is CUDA and Triton compiles, or the device is the CPU and
`TRITON_INTERPRET=1` was set before the kernels were first used (the interpreter; slow,
for tests). Triton is imported only on the first call that can use it, so `import sare_kernels`
stays cheap and works where triton is absent.

Both paths give bit-identical perturb and restore results; the sum of squares agrees to
about 1e-7 relative (different but fixed reduction orders). See docs/kernels.md.
"""
from __future__ import annotations

import importlib.util
import math
import os
from types import ModuleType

import torch

from . import reference

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "SARE_KERNELS"
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_forced: str | None = None
_triton_module: ModuleType | None = None


# -- the setting ---------------------------------------------------------------------------
def _check_backend(name: str, source: str) -> str:
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"{source} = {name!r}: unknown kernel backend; use one of {', '.join(BACKENDS)}")
    return name


def set_backend(name: str | None) -> None:
    """Force the kernel backend ("auto", "triton", "torch"); None returns to $SARE_KERNELS."""
    global _forced
    _forced = None if name is None else _check_backend(name, "sare_kernels.set_backend(name)")


def get_backend() -> str:
    """The backend setting in force: set_backend's, else $SARE_KERNELS, else "auto"."""
    if _forced is not None:
        return _forced
    return _check_backend(os.environ.get(ENV_VAR, "auto") or "auto", f"${ENV_VAR}")


# -- can Triton run these tensors? ----------------------------------------------------------
def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _load_triton() -> ModuleType | None:
    """Import sare_kernels.triton_sam once; None where triton is missing or fails to import."""
    global _triton_module
    if _triton_module is None:
        if importlib.util.find_spec("triton") is None:
            return None
        try:
            from . import triton_sam
        except Exception:  # a broken triton install: the torch path still works
            return None
        _triton_module = triton_sam
    return _triton_module


def triton_unavailable_reason(tensors: list[torch.Tensor]) -> str | None:
    """Why the Triton kernels cannot run on `tensors` (None if they can)."""
    device = tensors[0].device
    if any(not t.is_contiguous() for t in tensors):
        return "a tensor is not contiguous (the kernels address flat buffers)"
    if device.type == "cpu":
        if not _interpret_requested():
            return "CPU tensors run in Triton only with TRITON_INTERPRET=1 (set before first use)"
    elif device.type != "cuda":
        return f"device {device.type!r} has no Triton backend here"
    module = _load_triton()
    if module is None:
        return "triton is not installed or fails to import"
    if device.type == "cpu" and not module.INTERPRETED:
        return "the kernels were already compiled without TRITON_INTERPRET=1 (set it before the first call)"
    if device.type == "cuda" and module.INTERPRETED:
        return "the kernels were loaded in interpreter mode (TRITON_INTERPRET=1); unset it for CUDA"
    return None


def _implementation(tensors: list[torch.Tensor], what: str) -> ModuleType:
    backend = get_backend()
    if backend == "torch":
        return reference
    reason = triton_unavailable_reason(tensors)
    if reason is None:
        return _load_triton()
    if backend == "auto":
        return reference
    raise RuntimeError(
        f"{what}: kernel backend 'triton' is forced but cannot run: {reason}. Fix: run on a CUDA "
        f"device, set TRITON_INTERPRET=1 before the first call for CPU tensors, or choose "
        f"{ENV_VAR}=auto|torch (sare_kernels.set_backend('auto'))."
    )


# -- input checks (the same for both paths, so they fail alike) -----------------------------
def _check_lists(what: str, **lists: list[torch.Tensor]) -> None:
    names = list(lists)
    first = names[0]
    lengths = {name: len(ts) for name, ts in lists.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{what}: {lengths} must all have the same length (one entry per buffer)")
    device = lists[first][0].device if lists[first] else None
    for name, ts in lists.items():
        for i, t in enumerate(ts):
            if t.dtype not in _FLOAT_DTYPES:
                raise TypeError(f"{what}: {name}[{i}] has dtype {t.dtype}; the kernels take float32, "
                                "bfloat16 or float16 tensors")
            if t.device != device:
                raise ValueError(f"{what}: {name}[{i}] is on {t.device} but {first}[0] on {device}; "
                                 "move all buffers to one device")
            if t.numel() != lists[first][i].numel():
                raise ValueError(f"{what}: {name}[{i}] has {t.numel()} elements but {first}[{i}] has "
                                 f"{lists[first][i].numel()}; pair each buffer with its own partition")


def _check_scale(what: str, scale: torch.Tensor, device: torch.device) -> None:
    if not isinstance(scale, torch.Tensor) or scale.numel() != 1 or not scale.is_floating_point():
        raise TypeError(f"{what}: scale must be a one-element floating tensor (rho / ||g|| on the device), "
                        f"got {type(scale).__name__}; wrap a number with torch.tensor(x, device=...)")
    if scale.device != device:
        raise ValueError(f"{what}: scale is on {scale.device} but the parameters on {device}; keep "
                         "it on the parameters' device (a host scale would force a sync)")


# -- the primitives ---------------------------------------------------------------------------
def sum_of_squares(tensors: list[torch.Tensor]) -> torch.Tensor:
    """fp32 0-dim tensor: sum of squares of all elements of all tensors, deterministic."""
    tensors = list(tensors)
    _check_lists("sum_of_squares", tensors=tensors)
    if not any(t.numel() for t in tensors):
        device = tensors[0].device if tensors else None
        return torch.zeros((), dtype=torch.float32, device=device)
    return _implementation(tensors, "sum_of_squares").sum_of_squares(tensors)


def perturb_(params: list[torch.Tensor], masters: list[torch.Tensor], grads: list[torch.Tensor],
             scale: torch.Tensor) -> None:
    """In place: params[i] <- cast(masters[i] + scale * grads[i]), computed in fp32."""
    params, masters, grads = list(params), list(masters), list(grads)
    _check_lists("perturb_", params=params, masters=masters, grads=grads)
    if not params:
        return
    _check_scale("perturb_", scale, params[0].device)
    _implementation(params + masters + grads, "perturb_").perturb_(params, masters, grads, scale)


def restore_(params: list[torch.Tensor], masters: list[torch.Tensor]) -> None:
    """In place: params[i] <- cast(masters[i]); bit-exact re-derivation from the master."""
    params, masters = list(params), list(masters)
    _check_lists("restore_", params=params, masters=masters)
    if params:
        _implementation(params + masters, "restore_").restore_(params, masters)


def _check_backups(what: str, params: list[torch.Tensor], backups: list[torch.Tensor]) -> None:
    for i, (p, b) in enumerate(zip(params, backups)):
        # A backup must hold every value of its parameter: same dtype, or fp32 (which contains
        # every bf16 and fp16 value), otherwise the round trip would not be exact.
        if b.dtype not in (p.dtype, torch.float32):
            raise TypeError(f"{what}: backups[{i}] is {b.dtype} but params[{i}] is {p.dtype}; a backup "
                            "must be the parameter's dtype or float32 to restore exactly")
        if b.data_ptr() == p.data_ptr() and p.numel():
            raise ValueError(f"{what}: backups[{i}] is params[{i}] itself; pass a separate buffer "
                             "(the gradient buffer is a good one)")


def perturb_with_backup_(params: list[torch.Tensor], grads: list[torch.Tensor], scale: torch.Tensor,
                         backups: list[torch.Tensor]) -> None:
    """For weights with no separate master copy (plain fp32 training), in one pass:
    backups[i] <- params[i] exactly, then params[i] <- cast(params[i] + scale * grads[i]).

    `backups` may be `grads` itself: each element of the gradient is read before its slot
    receives theta, and the gradient is not needed after eps* is formed, so the backup costs
    no memory. Undo with `restore_from_(params, backups)`.
    """
    params, grads, backups = list(params), list(grads), list(backups)
    _check_lists("perturb_with_backup_", params=params, grads=grads, backups=backups)
    if not params:
        return
    _check_scale("perturb_with_backup_", scale, params[0].device)
    _check_backups("perturb_with_backup_", params, backups)
    impl = _implementation(params + grads + backups, "perturb_with_backup_")
    impl.perturb_with_backup_(params, grads, scale, backups)


def restore_from_(params: list[torch.Tensor], backups: list[torch.Tensor]) -> None:
    """In place: params[i] <- backups[i], the bit-exact undo of perturb_with_backup_."""
    params, backups = list(params), list(backups)
    _check_lists("restore_from_", params=params, backups=backups)
    if params:
        _check_backups("restore_from_", params, backups)
        _implementation(params + backups, "restore_from_").restore_from_(params, backups)


def scale_by_abs_(tensors: list[torch.Tensor], weights: list[torch.Tensor], eta: float) -> None:
    """In place: tensors[i] <- cast(tensors[i] * (|weights[i]| + eta)), in fp32: ASAM's elementwise operator
    T_theta applied to the ascent direction (method.rho_mode=adaptive). The torch path on every device (not
    fused: it runs twice per ascent, on the trainable set or this rank's partition)."""
    tensors, weights = list(tensors), list(weights)
    _check_lists("scale_by_abs_", tensors=tensors, weights=weights)
    if not (eta >= 0 and math.isfinite(eta)):
        raise ValueError(f"scale_by_abs_: eta = {eta} must be finite and >= 0")
    if tensors:
        reference.scale_by_abs_(tensors, weights, float(eta))
