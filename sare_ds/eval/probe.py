"""Sharpness probe: L_neg along the normalised gradient direction vs random directions.

    probe = sharpness_probe(adapter, neg_samples, rho=0.05)
    plot_landscape(probe, "landscape.png")

L_neg = - mean span NLL of the hallucinated (neg) samples (sare_ds.train.losses, the loss
SARE maximises inside its min-max). With g = grad L_neg(theta) over the trainable set (the
mapping layers) and u = g / ||g|| (one norm over all trainable tensors together, as SARE's
eps*), the probe evaluates L_neg(theta + r u) and L_neg(theta + r v_k) for random unit
directions v_k (Gaussian, normalised over all tensors together) at radii r in [0, 2 rho].

At r = rho the gradient-direction rise L_neg(theta + eps*) - L_neg(theta) is exactly the
quantity the training step logs as `sam/sharpness_gap`; the random-direction rise at the same
radius is the baseline. A superficially unlearned model sits in a sharp minimum of the NLL
on hallucinations: a small step along u brings them back (large gap over random).
"""
from __future__ import annotations

from pathlib import Path

from sare_ds.plotting import save_figure

import torch

from sare_ds.config import ModelConfig
from sare_ds.data.samples import BadSampleError


def _neg_loss(adapter, batches, device, dtype) -> torch.Tensor:
    """L_neg over all batches: - the mean span NLL per neg sample (each sample weighs the same,
    whatever the batch sizes; on one batch this is the training step's L_neg)."""
    from sare_ds.data.samples import KIND_INDEX
    from sare_ds.train.losses import kind_losses, per_sample_nll
    from sare_ds.train.step import to_device

    neg_counts = [int((b["kind"] == KIND_INDEX["neg"]).sum()) for b in batches]
    total_neg = sum(neg_counts)
    if total_neg == 0:
        raise ValueError("sharpness_probe: the probe batches hold no neg sample; pass hallucinated (kind neg) samples")
    total = 0.0
    for batch, n_neg in zip(batches, neg_counts):
        if n_neg == 0:
            continue
        b = to_device(batch, device, dtype)
        nll = per_sample_nll(adapter.model(**adapter.forward_inputs(b)).logits, b["labels"])
        # kind_losses gives this batch's mean over its neg samples; weight it by their share.
        total = total + kind_losses(nll, b["kind"], b["score"])["neg"] * (n_neg / total_neg)
    return total


def _unit(vectors: list[torch.Tensor]) -> list[torch.Tensor]:
    norm = torch.sqrt(sum((v.float() ** 2).sum() for v in vectors)).clamp_min(1e-12)
    return [v / norm for v in vectors]


def sharpness_probe(adapter, samples, *, rho: float = 0.05, num_radii: int = 9, num_random: int = 4,
                    batch_size: int = 8, seed: int = 0, max_length: int = 2048) -> dict:
    """Losses along the gradient and random directions; the gaps at r = rho."""
    from sare_ds.data.tokenize import collate, tokenize_sample
    from sare_ds.models import select_trainable

    if num_radii < 2 or num_random < 1 or rho <= 0:
        raise ValueError(f"sharpness_probe: needs num_radii >= 2 (got {num_radii}), num_random >= 1 "
                         f"(got {num_random}) and rho > 0 (got {rho})")
    select_trainable(adapter, ModelConfig(trainable="mapping"))
    model = adapter.model
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    device, dtype = params[0].device, params[0].dtype
    tokenized = []
    for s in samples:
        try:
            tokenized.append(tokenize_sample(s, adapter, max_length))
        except BadSampleError:
            pass
    if not tokenized:
        raise ValueError("sharpness_probe: no usable neg sample; check the probe data")
    pad_id = adapter.tokenizer.pad_token_id
    pad_id = adapter.tokenizer.eos_token_id if pad_id is None else pad_id
    batches = [collate(tokenized[i:i + batch_size], pad_id) for i in range(0, len(tokenized), batch_size)]

    model.eval()  # no dropout: the landscape must be deterministic
    loss0 = _neg_loss(adapter, batches, device, dtype)
    grads = torch.autograd.grad(loss0, params, allow_unused=True)
    grad_dir = _unit([g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)])
    gen = torch.Generator().manual_seed(seed)
    random_dirs = [_unit([torch.randn(p.shape, generator=gen).to(device, torch.float32) for p in params])
                   for _ in range(num_random)]
    radii = [2 * rho * i / (num_radii - 1) for i in range(num_radii)]
    backup = [p.detach().clone() for p in params]

    def along(direction) -> list[float]:
        values = []
        with torch.no_grad():
            try:
                for r in radii:
                    for p, b, d in zip(params, backup, direction):
                        p.copy_(b + (r * d).to(p.dtype))
                    values.append(float(_neg_loss(adapter, batches, device, dtype)))
            finally:
                for p, b in zip(params, backup):
                    p.copy_(b)  # theta restored exactly from its copy
        return values

    grad_curve = along(grad_dir)
    random_curves = [along(d) for d in random_dirs]
    for p in params:
        p.requires_grad_(False)
    mean_random = [sum(c[i] for c in random_curves) / num_random for i in range(num_radii)]
    # rho is on the radius grid when num_radii is odd (index (num_radii - 1) / 2); else interpolate.
    at_rho = lambda curve: _interp(radii, curve, rho)  # noqa: E731
    gap_grad, gap_random = at_rho(grad_curve) - grad_curve[0], at_rho(mean_random) - mean_random[0]
    return {
        "rho": rho, "radii": radii, "loss_neg_at_theta": float(loss0.detach()), "grad_norm": _norm(grads),
        "gradient_direction": grad_curve, "random_directions": random_curves, "random_mean": mean_random,
        "sharpness_gap": gap_grad, "random_gap": gap_random, "gap_over_random": gap_grad - gap_random,
        "num_samples": len(tokenized), "trainable_tensors": list(names),
    }


def _norm(grads) -> float:
    return float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))


def _interp(xs: list[float], ys: list[float], x: float) -> float:
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y0
    return ys[-1]


def plot_landscape(probes: dict[str, dict] | dict, path: str | Path) -> Path:
    """1-D landscape PNG: L_neg against radius, gradient direction solid, random mean dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "radii" in probes:
        probes = {"model": probes}
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for i, (name, p) in enumerate(probes.items()):
        colour = f"C{i}"
        ax.plot(p["radii"], p["gradient_direction"], "-o", color=colour, ms=3, label=f"{name}: gradient direction")
        ax.plot(p["radii"], p["random_mean"], "--", color=colour, label=f"{name}: random (mean of {len(p['random_directions'])})")
        ax.axvline(p["rho"], color="grey", lw=0.6, ls=":")
    ax.set_xlabel("radius ||eps|| (dotted: rho)")
    ax.set_ylabel("L_neg = - NLL on hallucinated spans")
    ax.set_title("Loss landscape around the unlearned weights")
    ax.legend(fontsize=7)
    return save_figure(fig, path)
