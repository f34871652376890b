"""One optimizer step of FT, EFUF or SARE, written once against a ParameterSpace.

SARE (targeted SAM, docs/method.md section 4), per optimizer step over all micro-batches:

    1. g      = grad L_neg(theta)                          neg pass at theta
    2. eps*   = rho * g / ||g||_2                          norm over ALL trainable params, all ranks
    3. theta' = theta + eps*;  g_neg = grad L_neg(theta')  perturbed neg pass
    4. restore theta exactly                               (also when step 3 raises)
    5. g_cap  = grad [L_pos + lambda2 L_sent](theta)       capability pass at theta
    6. g      = lambda1 g_neg + g_cap; clip; optimizer step

Steps 3 and 5 accumulate into the same gradient storage (g_neg is cleared of step 1's g
first), so the composed gradient costs no extra buffer. EFUF is L_pos + lambda1 L_neg +
lambda2 L_sent in one backward; FT is the capability losses alone. With rho = 0 SARE's
update equals EFUF's (up to the order of the gradient sums).

No value crosses to the host inside the step (the returned metrics are device tensors),
except the optional finite check before the optimizer step.
"""
from __future__ import annotations

import torch

from sare_ds.data.tokenize import collate
from sare_ds.train.losses import kind_losses, per_sample_nll
from sare_ds.train.params import ParameterSpace
from sare_ds.train.timing import PhaseTimer

# The collated groups of samples each method needs in a micro-batch.
METHOD_GROUPS = {"ft": ("cap",), "efuf": ("all",), "sare": ("neg", "cap")}
_TINY_NORM = 1e-12


def to_device(batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict:
    """Move a collated batch; floating image tensors take the model's dtype (bf16 forward)."""
    out = {}
    for k, v in batch.items():
        if k in ("pixel_values",) and v.is_floating_point():
            out[k] = v.to(device=device, dtype=dtype, non_blocking=True)
        else:
            out[k] = v.to(device, non_blocking=True)
    return out


class UnlearningStep:
    """Callable: `metrics = step(micro_batches)`; each micro-batch maps group -> batch."""

    def __init__(self, model, forward_inputs, space: ParameterSpace, method_cfg, *,
                 device: torch.device, dtype: torch.dtype, check_finite: bool = True,
                 timer: PhaseTimer | None = None):
        self.model = model
        self.forward_inputs = forward_inputs
        self.space = space
        self.method = method_cfg
        self.device = device
        self.dtype = dtype
        self.check_finite = check_finite
        self.timer = timer or PhaseTimer(device, enabled=False)
        self._last_losses: dict[str, torch.Tensor] = {}

    # -- losses of one group over all micro-batches, accumulated into the gradient -------
    def _terms(self, batch: dict) -> dict[str, torch.Tensor]:
        batch = to_device(batch, self.device, self.dtype)
        logits = self.model(**self.forward_inputs(batch)).logits
        nll = per_sample_nll(logits, batch["labels"])
        return kind_losses(nll, batch["kind"], batch["score"], self.method.score_weighting)

    def _accumulate(self, micro_batches: list[dict], group: str, weights: dict[str, float],
                    read_after: bool = True) -> dict:
        """Backward of sum_k weights[k] * L_k, averaged over micro-batches; returns the L_k (detached).

        read_after: the gradient is read right after this pass (norm, perturbation or optimizer
        step), so its last backward is a reduction boundary.
        """
        n = len(micro_batches)
        last = max((i for i, mb in enumerate(micro_batches) if mb.get(group) is not None), default=-1)
        means: dict[str, torch.Tensor] = {}
        for i, mb in enumerate(micro_batches):
            batch = mb.get(group)
            if batch is None:
                continue
            terms = self._terms(batch)
            loss = sum(w * terms[k] for k, w in weights.items())
            self.space.backward(loss / n, boundary=read_after and i == last)
            for k in weights:
                means[k] = means.get(k, 0.0) + terms[k].detach() / n
        return means

    # -- the step ------------------------------------------------------------------------
    def __call__(self, micro_batches: list[dict]) -> dict[str, torch.Tensor]:
        m = self.method
        capability = {"pos": 1.0, "sent": m.lambda2}
        metrics: dict[str, torch.Tensor] = {}
        self.space.zero_grad()

        t = self.timer
        if m.name == "ft":
            with t("capability"):
                metrics.update(self._accumulate(micro_batches, "cap", capability))
        elif m.name == "efuf":
            with t("efuf"):
                metrics.update(self._accumulate(micro_batches, "all", {"pos": 1.0, "neg": m.lambda1, "sent": m.lambda2}))
        elif m.name == "sare":
            with t("neg_at_theta"):                                                      # 1. g
                neg_at_theta = self._accumulate(micro_batches, "neg", {"neg": 1.0})["neg"]
            with t("grad_norm"):                                                         # 2. ||g||
                grad_norm_neg = self.space.global_grad_norm()
                scale = m.rho / grad_norm_neg.clamp_min(_TINY_NORM)                      #    eps* = scale * g
            with t("perturb"):
                self.space.perturb(scale)                                                # 3. theta + eps*
            try:
                with t("neg_at_eps"):
                    self.space.zero_grad()
                    has_cap = any(mb.get("cap") is not None for mb in micro_batches)
                    neg_at_eps = self._accumulate(micro_batches, "neg", {"neg": m.lambda1},
                                                  read_after=not has_cap)["neg"]
            finally:
                with t("restore"):
                    self.space.restore()                                                 # 4. theta, exactly
            with t("capability"):                          # 5. capability gradient at theta adds to lambda1 g_neg
                metrics.update(self._accumulate(micro_batches, "cap", capability))
            metrics.update({
                "neg": neg_at_theta,
                "sam/grad_norm_neg": grad_norm_neg,
                "sam/eps_norm": scale * grad_norm_neg,
                "sam/sharpness_gap": neg_at_eps - neg_at_theta,
            })
        else:
            raise ValueError(f"method.name = {m.name!r}: unknown method; use ft, efuf or sare")

        self._last_losses = {k: v for k, v in metrics.items() if not k.startswith("sam/")}
        with t("optimizer_step"):
            metrics["train/grad_norm"] = self.space.step(self.check_finite, self._describe)  # 6.
        return {(k if "/" in k else f"loss/{k}"): v for k, v in metrics.items()}

    def _describe(self) -> str:
        parts = ", ".join(f"loss/{k}={float(v):.4g}" for k, v in self._last_losses.items())
        return f"at step losses ({parts})" if parts else ""


def collate_groups(micro_batch: dict[str, list], method: str, pad_token_id: int) -> dict[str, dict | None]:
    """Collate the sample groups `method` forwards: neg alone, pos+sent (cap), or all kinds."""
    members = {"neg": ("neg",), "cap": ("pos", "sent"), "all": ("pos", "neg", "sent")}
    out: dict[str, dict | None] = {}
    for group in METHOD_GROUPS[method]:
        samples = [s for kind in members[group] for s in micro_batch.get(kind, [])]
        out[group] = collate(samples, pad_token_id) if samples else None
    return out
