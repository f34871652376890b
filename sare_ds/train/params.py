"""Where the trainable weights and their gradients live, behind one small interface.

The SARE step (sare_ds/train/step.py) is written once against `ParameterSpace`:

    backward(loss, boundary) accumulate d loss / d theta into this rank's gradient storage;
                            boundary=False: more backwards add to it before it is read
    zero_grad()             clear that storage (and any accumulation state)
    local_grad_sq_sum()     fp32 sum of g^2 over the gradient elements this rank holds
    all_reduce_sum(x)       sum a tensor over ranks (identity in one process)
    perturb(scale)          weights the forward sees <- theta + scale * d (d: the direction, below)
    restore()               weights the forward sees <- theta, exactly
    clip_and_step(norm)     clip the accumulated gradient given its global norm, optimizer step

The direction d of eps* is the gradient storage itself, unless the space has a separate direction
buffer (`separate_direction`: `backward_direction(loss)` accumulates into it), which lets one
forward at theta give both the ascent direction and the capability gradient (sare_ds/train/step.py).
`grad_sum_scale` is the factor that turns the backend's reduction over ranks into a sum (DeepSpeed
averages gradients over data-parallel ranks; the step's losses are already normalised globally).

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
    separate_direction = False
    """backward_direction() exists: the ascent direction has its own buffer."""
    lockstep = False
    """Every rank must run the same forward/backward passes (collectives inside them: ZeRO)."""
    grad_sum_scale = 1.0
    world_size = 1

    @abstractmethod
    def backward(self, loss: torch.Tensor, boundary: bool = True, retain_graph: bool = False) -> None:
        """`boundary` is False when further backwards add to this gradient before anything reads
        it (a backend may then defer its reduction: ZeRO-2 does)."""

    @abstractmethod
    def zero_grad(self) -> None: ...

    @abstractmethod
    def local_grad_sq_sum(self) -> torch.Tensor: ...

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        return value

    @abstractmethod
    def perturb(self, scale: torch.Tensor, direction: list[torch.Tensor] | None = None) -> None:
        """Weights the forward sees <- theta + scale * d, or theta + scale * `direction` (a copy_direction
        result: its tensors pair with direction_tensors()'s; an empty list is d = 0)."""

    @abstractmethod
    def restore(self) -> None: ...

    @abstractmethod
    def clip_and_step(self, grad_norm: torch.Tensor) -> None: ...

    @property
    @abstractmethod
    def lr(self) -> float: ...

    def begin_direction(self) -> None:
        """From now until zero_grad(), the direction of eps* is the direction buffer (zero until
        backward_direction adds to it), not the gradient."""
        raise NotImplementedError(f"{type(self).__name__} has no separate direction buffer")

    def backward_direction(self, loss: torch.Tensor) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no separate direction buffer")

    def local_direction_sq_sum(self) -> torch.Tensor:
        """fp32 sum of d^2 over this rank's elements of the direction of eps*."""
        return self.local_grad_sq_sum()

    # -- SARE variants (method.rho_mode, method.ascent_every) --------------------------------
    exposes_direction = True
    """direction_tensors() returns the storage the norm and perturb read (False: the variants are refused)."""

    def direction_tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(the storage of this rank's elements of the direction d, the weights theta they pair with);
        empty lists when d = 0 (a step without direction losses)."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its direction")

    def scale_direction_by_weights(self, eta: float) -> None:
        """d <- (|theta| + eta) * d elementwise, in place: ASAM's operator T_theta (rho_mode=adaptive)."""
        d, theta = self.direction_tensors()
        if d:
            kernels.scale_by_abs_(d, theta, eta)

    def copy_direction(self, scale: torch.Tensor, out: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """fp32 tensors holding scale * d: an eps* a later step perturbs by again (ascent_every). `out`: the
        previous copy, overwritten in place when it pairs with d (no second copy alive while the new forms)."""
        d, _ = self.direction_tensors()
        if out is not None and len(out) == len(d) and all(
                o.shape == x.shape and o.device == x.device for o, x in zip(out, d)):
            for o, x in zip(out, d):
                o.copy_(x)  # widened exactly, then the same fp32 product as below
                o.mul_(scale.to(x.device))
            return out
        return [x.float() * scale.to(x.device) for x in d]

    # -- written once on top of the primitives -------------------------------------------
    def direction_norm(self) -> torch.Tensor:
        """||d||_2 over all trainable parameters on all ranks (the norm of eps*'s direction)."""
        return self.all_reduce_sum(self.local_direction_sq_sum()).sqrt()

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
    """Trainable tensors of one process (any device), a torch optimizer and LR scheduler.

    Memory beyond the weights and their gradient: ONE buffer of the trainable set's size. It holds
    the ascent direction g (backward_direction), then, from perturb() to restore(), theta itself
    (written over g by the fused perturb: g is dead once eps* is formed). While a later micro-batch's
    direction is added to it, that backward's own gradient tensors exist too (transiently).
    Without backward_direction (the direction in the gradient), perturb() moves the gradient
    tensors into that buffer and the perturbed backward allocates new gradients: the same count.
    """

    separate_direction = True

    def __init__(self, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                 scheduler=None, clip_grad_norm: float = 0.0):
        if not params:
            raise ValueError("PlainParameterSpace needs at least one trainable parameter")
        self.params = list(params)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.clip_grad_norm = clip_grad_norm
        self._backup: list[torch.Tensor] | None = None
        self._direction: list[torch.Tensor] | None = None
        self._direction_mode = False  # begin_direction() was called: d is the buffer (None: d = 0)

    def _grads(self) -> list[torch.Tensor]:
        # A parameter the loss did not reach has grad None: it counts as a zero gradient.
        return [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]

    def backward(self, loss: torch.Tensor, boundary: bool = True, retain_graph: bool = False) -> None:
        loss.backward(retain_graph=retain_graph)

    def begin_direction(self) -> None:
        self._direction_mode = True

    def backward_direction(self, loss: torch.Tensor) -> None:
        if not self._direction_mode:
            raise RuntimeError("backward_direction() before begin_direction()")
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads)]
        if self._direction is None:
            self._direction = grads  # the first micro-batch's gradient becomes the buffer
        else:
            torch._foreach_add_(self._direction, grads)

    def local_direction_sq_sum(self) -> torch.Tensor:
        if not self._direction_mode:
            return self.local_grad_sq_sum()
        if self._direction is None:  # no direction loss in this step (no neg span): d = 0
            return torch.zeros((), dtype=torch.float32, device=self.params[0].device)
        return kernels.sum_of_squares(self._direction)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        if self._backup is None:
            self._direction = None
            self._direction_mode = False

    def local_grad_sq_sum(self) -> torch.Tensor:
        return kernels.sum_of_squares(self._grads())

    def direction_tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if self._direction_mode:
            return (list(self._direction), [p.data for p in self.params]) if self._direction is not None else ([], [])
        for p in self.params:  # the direction is the gradient: give unreached parameters their zero one
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return [p.grad for p in self.params], [p.data for p in self.params]

    @torch.no_grad()
    def perturb(self, scale: torch.Tensor, direction: list[torch.Tensor] | None = None) -> None:
        if self._backup is not None:
            raise RuntimeError("perturb() called twice without restore()")
        if direction is not None:  # a kept eps*: theta goes to a buffer of its own
            self._backup = [torch.empty_like(p) for p in self.params] if direction else []
            if direction:
                kernels.perturb_with_backup_([p.data for p in self.params], direction, scale, self._backup)
            return
        # Plain fp32 training has no separate master copy, so theta must be kept: the fused
        # pass writes it into the direction's buffer (dead once eps* is formed) while writing
        # theta + scale * d into the weights. Restoring copies it back exactly; re-subtracting
        # eps would not be exact.
        if self._direction_mode:
            if self._direction is None:  # d = 0: theta + scale * 0 is theta; nothing to keep
                self._backup = []
                return
            buffer, self._direction = self._direction, None
            kernels.perturb_with_backup_([p.data for p in self.params], buffer, scale, buffer)
        else:
            buffer = self._grads()
            kernels.perturb_with_backup_([p.data for p in self.params], buffer, scale, buffer)
            for p in self.params:
                p.grad = None  # the buffer now holds theta, not a gradient
        self._backup = buffer

    @torch.no_grad()
    def restore(self) -> None:
        if self._backup is None:
            return
        if self._backup:
            kernels.restore_from_([p.data for p in self.params], self._backup)
        self._backup = None

    @torch.no_grad()
    def clip_and_step(self, grad_norm: torch.Tensor) -> None:
        # A parameter no pass reached (e.g. a step without neg spans in SARE's perturbed pass) has a zero
        # gradient, as under ZeRO: the optimizer still steps it (moments, weight decay).
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
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
