"""The unlearning step (FT / EFUF / SARE) on the tiny model against independent references.

References here never call the library's loss code: span NLLs are recomputed per sample
with F.cross_entropy and gradients with torch.func.functional_call + torch.autograd.grad; a
kind's loss is the mean over all its samples in the step (pooled over micro-batches).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from sare_ds.config import MethodConfig
from sare_ds.data.synthetic import generate_samples
from sare_ds.data.samples import Caption
from sare_ds.data.tokenize import tokenize_caption
from sare_ds.models import select_trainable
from sare_ds.config import ModelConfig
from sare_ds.train.losses import kind_losses
from sare_ds.train.params import NonFiniteError, PlainParameterSpace
from sare_ds.train.step import UnlearningStep

RHO = 0.05


def _grads(params):
    return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]


class RecordingSpace(PlainParameterSpace):
    """Records lambda1 g_neg (what the perturbed pass added to the gradient), the composed gradient
    and the weights at the optimizer step."""

    def perturb(self, scale, direction=None):
        self._before = _grads(self.params) if self.separate_direction else None
        super().perturb(scale, direction)

    def restore(self):
        if self._backup is not None:
            now = _grads(self.params)
            self.neg_grads = now if self._before is None else [a - b for a, b in zip(now, self._before)]
        super().restore()

    def clip_and_step(self, grad_norm):
        self.composed = _grads(self.params)
        self.weights_at_step = [p.detach().clone() for p in self.params]
        super().clip_and_step(grad_norm)


class SeparatePassesSpace(RecordingSpace):
    """The ZeRO schedule (three passes, the direction in the gradient) on plain tensors."""

    separate_direction = False


def trainable(adapter):
    select_trainable(adapter, ModelConfig())
    return {n: p for n, p in adapter.model.named_parameters() if p.requires_grad}


def micro_batches(adapter, kinds=("pos", "neg", "sent"), n_micro=2, per_kind=1, seed=0):
    samples = generate_samples(24, 32, "Describe the image.", seed)
    by_kind = {k: [tokenize_caption(Caption.from_sample(s), adapter, 512)[0] for s in samples if s.kind == k]
               for k in kinds}
    return [{k: by_kind[k][i * per_kind:(i + 1) * per_kind] for k in kinds} for i in range(n_micro)]


def make_step(adapter, method, *, optimizer="sgd", lr=0.1, clip=0.0, space_cls=RecordingSpace, **method_kw):
    params = list(trainable(adapter).values())
    opt = (torch.optim.SGD(params, lr=lr) if optimizer == "sgd"
           else torch.optim.AdamW(params, lr=lr, weight_decay=0.05))
    space = space_cls(params, opt, None, clip)
    cfg = MethodConfig(name=method, **{"rho": RHO, **method_kw})
    step = UnlearningStep(adapter.model, adapter.forward_inputs, space, cfg, device=torch.device("cpu"),
                          dtype=torch.float32, pad_token_id=adapter.tokenizer.pad_token_id)
    return step, space


def groups(adapter, micro, method):
    """The step takes the micro-batches as they come ({kind: [sequences]}); every method reads the same data."""
    return micro


# ----------------------------------------------------------------------- independent reference

def ref_kind_loss(adapter, weights: dict, micro, kind: str) -> torch.Tensor:
    """Mean over ALL `kind` samples of the step (every micro-batch) of each sample's span NLL."""
    nlls = []
    for mb in micro:
        for s in mb.get(kind, []):
            out = functional_call(adapter.model, weights, args=(), kwargs={
                "input_ids": s.input_ids[None], "attention_mask": torch.ones_like(s.input_ids)[None],
                "pixel_values": s.image["pixel_values"]})
            logits = out.logits[0]
            pos = (s.labels != -100).nonzero().flatten()
            nlls.append(F.cross_entropy(logits[pos - 1].float(), s.labels[pos]))
    return torch.stack(nlls).mean() if nlls else torch.zeros(())


def ref_grad(adapter, weights: dict, fn) -> list[torch.Tensor]:
    w = {n: t.detach().clone().requires_grad_(True) for n, t in weights.items()}
    return list(torch.autograd.grad(fn(w), list(w.values()), allow_unused=False))


def snapshot(adapter):
    """The mapping-layer (trainable) weights, in parameter order."""
    names = set(adapter.mapping_parameter_names())
    return {n: p.detach().clone() for n, p in adapter.model.named_parameters() if n in names}


def flat(ts):
    return torch.cat([t.flatten().double() for t in ts])


def record_forward_weights(adapter):
    """Forward pre-hook recording the trainable weights each forward sees."""
    seen = []
    handle = adapter.model.register_forward_pre_hook(lambda *_: seen.append(snapshot(adapter)))
    return seen, handle


# ----------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_sare_with_rho_zero_equals_efuf(adapter, optimizer):
    micro = micro_batches(adapter)
    theta = snapshot(adapter)
    efuf, efuf_space = make_step(adapter, "efuf", optimizer=optimizer, lr=1e-3)
    efuf(groups(adapter, micro, "efuf"))
    after_efuf = snapshot(adapter)

    with torch.no_grad():
        for n, p in adapter.model.named_parameters():
            if n in theta:
                p.copy_(theta[n])
    sare, sare_space = make_step(adapter, "sare", optimizer=optimizer, lr=1e-3, rho=0.0)
    sare(groups(adapter, micro, "sare"))
    after_sare = snapshot(adapter)

    g_e, g_s = flat(efuf_space.composed), flat(sare_space.composed)
    # Same gradient up to the order of the fp32 sums (one backward of the sum vs two accumulated):
    # a few ulps (fp32 epsilon 1.19e-7).
    assert ((g_e - g_s).norm() / g_e.norm()).item() <= 3e-7
    d_e = flat([after_efuf[n] - theta[n] for n in theta])
    d_s = flat([after_sare[n] - theta[n] for n in theta])
    assert ((d_e - d_s).norm() / d_e.norm()).item() <= 1e-5


def test_eps_has_norm_rho_and_the_global_gradient_direction(adapter):
    micro = micro_batches(adapter, n_micro=2)
    theta = snapshot(adapter)
    g = ref_grad(adapter, theta, lambda w: -ref_kind_loss(adapter, w, micro, "neg"))
    g_norm = flat(g).norm()
    expected = {n: theta[n].double() + RHO * gi.double() / g_norm for n, gi in zip(theta, g)}

    step, _ = make_step(adapter, "sare")
    seen, handle = record_forward_weights(adapter)
    metrics = step(groups(adapter, micro, "sare"))
    handle.remove()
    # Forwards: one per micro-batch at theta (serving g and g_cap), one per micro-batch at theta + eps*.
    assert len(seen) == 4
    perturbed = seen[2]
    eps = flat([perturbed[n].double() - theta[n].double() for n in theta])
    assert abs(eps.norm().item() - RHO) / RHO < 1e-4  # fp32 weights: eps recovered by subtraction
    assert torch.nn.functional.cosine_similarity(eps, flat(g), dim=0).item() > 1 - 1e-6
    for n in theta:
        torch.testing.assert_close(perturbed[n].double(), expected[n], rtol=0, atol=1e-7)
    # One eps over all tensors together: per-tensor normalisation would give rho * sqrt(4).
    assert metrics["sam/eps_norm"].item() == pytest.approx(RHO, rel=1e-6)
    assert metrics["sam/grad_norm_neg"].item() == pytest.approx(g_norm.item(), rel=1e-5)


def test_neg_gradient_is_autograd_at_the_perturbed_point(adapter):
    micro = micro_batches(adapter, n_micro=2)
    theta = snapshot(adapter)
    lam1 = 0.3
    g = ref_grad(adapter, theta, lambda w: -ref_kind_loss(adapter, w, micro, "neg"))
    g_norm = flat(g).norm()
    theta_eps = {n: theta[n] + (RHO * gi / g_norm).float() for n, gi in zip(theta, g)}
    g_at_eps = ref_grad(adapter, theta_eps, lambda w: -lam1 * ref_kind_loss(adapter, w, micro, "neg"))
    g_cap = ref_grad(adapter, theta, lambda w: ref_kind_loss(adapter, w, micro, "pos")
                     + 0.25 * ref_kind_loss(adapter, w, micro, "sent"))

    step, space = make_step(adapter, "sare", lambda1=lam1, lambda2=0.25)
    step(groups(adapter, micro, "sare"))
    for got, want in zip(space.neg_grads, g_at_eps):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    for got, gn, gc in zip(space.composed, g_at_eps, g_cap):
        torch.testing.assert_close(got, gn + gc, rtol=1e-4, atol=1e-7)


def test_restore_is_bit_exact(adapter):
    micro = micro_batches(adapter, n_micro=1)
    theta = snapshot(adapter)
    step, space = make_step(adapter, "sare", rho=0.5)
    seen, handle = record_forward_weights(adapter)
    step(groups(adapter, micro, "sare"))
    handle.remove()
    at_theta, perturbed = seen
    assert all(not torch.equal(perturbed[n], theta[n]) for n in theta if n.endswith("weight"))
    assert all(torch.equal(w, theta[n]) for w, n in zip(space.weights_at_step, theta))  # restored before the update
    assert all(torch.equal(at_theta[n], theta[n]) for n in theta)


def test_restore_after_an_exception_in_the_perturbed_pass(adapter):
    micro = micro_batches(adapter, n_micro=1)
    theta = snapshot(adapter)
    step, space = make_step(adapter, "sare", rho=0.5)
    calls = []

    def explode(*_):
        calls.append(1)
        if len(calls) == 2:  # the forward at theta + eps*
            raise RuntimeError("boom inside the perturbed pass")

    handle = adapter.model.register_forward_pre_hook(explode)
    with pytest.raises(RuntimeError, match="boom"):
        step(groups(adapter, micro, "sare"))
    handle.remove()
    now = snapshot(adapter)
    assert all(torch.equal(now[n], theta[n]) for n in theta)
    assert space._backup is None
    step(groups(adapter, micro, "sare"))  # and training can go on
    assert any(not torch.equal(snapshot(adapter)[n], theta[n]) for n in theta)


def test_neg_only_sare_with_sgd_is_textbook_sam(adapter):
    micro = micro_batches(adapter, kinds=("neg",), n_micro=1, per_kind=2)
    trainable(adapter)  # freeze all but the projector before copying
    ref = copy.deepcopy(adapter.model)
    lr = 0.5
    # Textbook SAM on L_neg (Foret et al.): ascend to the worst point, take its gradient back.
    ref_params = [p for p in ref.parameters() if p.requires_grad]

    def l_neg(model):
        total = []
        for s in micro[0]["neg"]:
            out = model(input_ids=s.input_ids[None], pixel_values=s.image["pixel_values"])
            pos = (s.labels != -100).nonzero().flatten()
            total.append(F.cross_entropy(out.logits[0, pos - 1], s.labels[pos]))
        return -torch.stack(total).mean()

    l_neg(ref).backward()
    with torch.no_grad():
        norm = torch.sqrt(sum((p.grad ** 2).sum() for p in ref_params))
        e_w = [RHO * p.grad / norm for p in ref_params]
        for p, e in zip(ref_params, e_w):
            p.add_(e)
            p.grad = None
    l_neg(ref).backward()
    with torch.no_grad():
        for p, e in zip(ref_params, e_w):
            p.sub_(e)
            p.sub_(lr * p.grad)

    step, _ = make_step(adapter, "sare", lr=lr, lambda1=1.0)
    step(groups(adapter, micro, "sare"))
    got = [p for p in adapter.model.parameters() if p.requires_grad]
    for a, b in zip(got, ref_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_ft_uses_capability_losses_only(adapter):
    micro = micro_batches(adapter, n_micro=1)
    theta = snapshot(adapter)
    want = ref_grad(adapter, theta, lambda w: ref_kind_loss(adapter, w, micro, "pos")
                    + 0.25 * ref_kind_loss(adapter, w, micro, "sent"))
    step, space = make_step(adapter, "ft", lambda2=0.25)
    metrics = step(groups(adapter, micro, "ft"))
    assert "loss/neg" not in metrics
    for got, w in zip(space.composed, want):
        torch.testing.assert_close(got, w, rtol=1e-4, atol=1e-7)


def test_non_finite_loss_stops_before_the_update(adapter):
    micro = micro_batches(adapter, n_micro=1)
    theta = snapshot(adapter)
    step, _ = make_step(adapter, "sare")
    calls = []

    def poison(_module, _inputs, output):
        calls.append(1)
        if len(calls) == 2:  # the perturbed pass (the capability gradient came from the forward at theta)
            # What the loss reads: the logits, or the final hidden states that the chunked LM head takes.
            output.logits = output.logits * float("nan")
            if output.hidden_states is not None:
                output.hidden_states = (*output.hidden_states[:-1], output.hidden_states[-1] * float("nan"))
        return output

    handle = adapter.model.register_forward_hook(poison)
    with pytest.raises(NonFiniteError, match="optim.lr"):
        step(groups(adapter, micro, "sare"))
    handle.remove()
    now = snapshot(adapter)
    assert all(torch.equal(now[n], theta[n]) for n in theta)


def test_score_weighting_follows_efuf():
    nll = torch.tensor([1.0, 2.0, 3.0, 4.0])
    kind = torch.tensor([0, 0, 1, 2])
    score = torch.tensor([30.0, 40.0, 20.0, 33.0])
    plain = kind_losses(nll, kind, score, False)
    weighted = kind_losses(nll, kind, score, True)
    assert plain["pos"].item() == pytest.approx(1.5) and plain["neg"].item() == pytest.approx(-3.0)
    assert plain["sent"].item() == pytest.approx(4.0)
    assert weighted["pos"].item() == pytest.approx((30 * 1 + 40 * 2) / 2)
    assert weighted["neg"].item() == pytest.approx(-(55 - 20) * 3.0)
    assert weighted["sent"].item() == pytest.approx(4.0)
