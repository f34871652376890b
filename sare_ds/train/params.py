"""Where the trainable weights and their gradients live, behind one small interface.

The SARE step (sare_ds/train/step.py) is written once against `ParameterSpace`:

    backward(loss, boundary) accumulate d loss / d theta into this rank's gradient storage;
                            boundary=False: more backwards add to it before it is read
    zero_grad()             clear that storage (and any accumulation state)
    local_grad_sq_sum()     fp32 sum of g^2 over the gradient elements this rank holds
    all_reduce_sum(x)       sum a scalar over ranks (identity in one process)
    perturb(scale)          weights the forward sees <- theta + scale * g
    restore()               weights the forward sees <- theta, exactly
    clip_and_step(norm)     clip the accumulated gradient given its global norm, optimizer step

`PlainParameterSpace` holds ordinary tensors in one process; the ZeRO backend (partitioned
parameters and gradients under DeepSpeed) implements the same methods.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

import sare_kernels as kernels


class NonFiniteError(FloatingPointError):
    """A loss or gradient was NaN/inf; the optimizer did not step."""


class ParameterSpace(ABC):
    @abstractmethod
    def backward(self, loss: torch.Tensor, boundary: bool = True) -> None:
        """`boundary` is False when further backwards add to this gradient before anything reads
        it (a backend may then defer its reduction: ZeRO-2 does)."""

    @abstractmethod
    def zero_grad(self) -> None: ...

    @abstractmethod
    def local_grad_sq_sum(self) -> torch.Tensor: ...

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        return value

    @abstractmethod
    def perturb(self, scale: torch.Tensor) -> None: ...

    @abstractmethod
    def restore(self) -> None: ...

    @abstractmethod
    def clip_and_step(self, grad_norm: torch.Tensor) -> None: ...

    @property
    @abstractmethod
    def lr(self) -> float: ...

    # -- written once on top of the primitives -------------------------------------------
    def global_grad_norm(self) -> torch.Tensor:
        """||g||_2 over all trainable parameters on all ranks: local sum of squares, one all-reduce."""
        return self.all_reduce_sum(self.local_grad_sq_sum()).sqrt()

    def step(self, check_finite: bool, describe=lambda: "") -> torch.Tensor:
        """Optimizer step on the accumulated gradient; returns its global norm (before clipping)."""
        grad_norm = self.global_grad_norm()
        # The one host synchronisation of a step (opt-out with optim.check_finite=false): a NaN
        # update would corrupt the weights irreversibly, so it is refused before it happens.
        if check_finite and not math.isfinite(float(grad_norm)):
            self.zero_grad()
            raise NonFiniteError(
                f"non-finite gradient norm ({float(grad_norm)}) {describe()}. The optimizer did not step: the "
                "weights are those of the last good step. Fix: lower optim.lr, method.lambda1 or method.rho, "
                "or enable clipping (optim.clip_grad_norm)."
            )
        self.clip_and_step(grad_norm)
        self.zero_grad()
        return grad_norm


class PlainParameterSpace(ParameterSpace):
    """Trainable tensors of one process (any device), a torch optimizer and LR scheduler."""

    def __init__(self, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                 scheduler=None, clip_grad_norm: float = 0.0):
        if not params:
            raise ValueError("PlainParameterSpace needs at least one trainable parameter")
        self.params = list(params)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.clip_grad_norm = clip_grad_norm
        self._backup: list[torch.Tensor] | None = None

    def _grads(self) -> list[torch.Tensor]:
        # A parameter the loss did not reach has grad None: it counts as a zero gradient.
        return [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]

    def backward(self, loss: torch.Tensor, boundary: bool = True) -> None:
        loss.backward()

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def local_grad_sq_sum(self) -> torch.Tensor:
        return kernels.sum_of_squares(self._grads())

    @torch.no_grad()
    def perturb(self, scale: torch.Tensor) -> None:
        if self._backup is not None:
            raise RuntimeError("perturb() called twice without restore()")
        # Plain fp32 training has no separate master copy, so theta must be kept: the fused
        # pass writes it into the gradient buffer (dead once eps* is formed; no new memory)
        # while writing theta + scale * g into the weights. Restoring copies it back exactly;
        # re-subtracting eps would not be exact.
        grads = self._grads()
        kernels.perturb_with_backup_([p.data for p in self.params], grads, scale, grads)
        self._backup = grads
        for p in self.params:
            p.grad = None  # the buffer now holds theta, not a gradient

    @torch.no_grad()
    def restore(self) -> None:
        if self._backup is None:
            return
        kernels.restore_from_([p.data for p in self.params], self._backup)
        self._backup = None

    @torch.no_grad()
    def clip_and_step(self, grad_norm: torch.Tensor) -> None:
        if self.clip_grad_norm > 0:
            # Same rule as torch.nn.utils.clip_grad_norm_, with the norm already computed.
            coef = (self.clip_grad_norm / (grad_norm + 1e-6)).clamp(max=1.0)
            grads = [p.grad for p in self.params if p.grad is not None]
            torch._foreach_mul_(grads, coef.to(grads[0].device) if grads else coef)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])
