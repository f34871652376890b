"""SARE's variants (method.rho_mode=adaptive, method.ascent_every=k) against plain references.

The references recompute everything with torch.func.functional_call and torch.autograd.grad on the
tiny model (tests/test_step.py's helpers, which never call the library's loss code); the
distributed runs go through `deepspeed launch/train.py` against the single-process run, as every
ZeRO path is tested (tests/test_zero.py).
"""
from __future__ import annotations

import pytest
import torch

import sare_kernels as kernels
from sare_ds.config import ConfigError, load_config
from tests.test_step import (
    RHO,
    RecordingSpace,
    SeparatePassesSpace,
    flat,
    groups,
    make_step,
    micro_batches,
    record_forward_weights,
    ref_grad,
    ref_kind_loss,
    snapshot,
)

ETA = 0.01
LAM1, LAM2, LR = 0.3, 0.25, 0.1


def asam_eps(theta: dict, g: list[torch.Tensor], rho: float, eta: float) -> dict:
    """ASAM (Kwon et al. 2021): eps = rho T^2 g / ||T g||, T = |theta| + eta elementwise (float64)."""
    t = {n: theta[n].double().abs() + eta for n in theta}
    tg = [t[n] * gi.double() for n, gi in zip(theta, g)]
    norm = flat(tg).norm()
    return {n: rho * t[n] * x / norm for n, x in zip(theta, tg)}


def sam_eps(theta: dict, g: list[torch.Tensor], rho: float) -> dict:
    norm = flat(g).norm()
    return {n: rho * gi.double() / norm for n, gi in zip(theta, g)}


def ref_update(adapter, theta: dict, eps: dict, micro) -> dict:
    """One SGD step of SARE given eps*: theta - lr (lambda1 grad L_neg(theta + eps) + grad L_cap(theta))."""
    theta_eps = {n: (theta[n].double() + eps[n]).float() for n in theta}
    g_neg = ref_grad(adapter, theta_eps, lambda w: -LAM1 * ref_kind_loss(adapter, w, micro, "neg"))
    g_cap = ref_grad(adapter, theta, lambda w: ref_kind_loss(adapter, w, micro, "pos")
                     + LAM2 * ref_kind_loss(adapter, w, micro, "sent"))
    return {n: (theta[n].double() - LR * (gn.double() + gc.double())).float()
            for n, gn, gc in zip(theta, g_neg, g_cap)}


def neg_grad(adapter, theta, micro):
    return ref_grad(adapter, theta, lambda w: -ref_kind_loss(adapter, w, micro, "neg"))


def load_weights(adapter, weights: dict) -> None:
    with torch.no_grad():
        for n, p in adapter.model.named_parameters():
            if n in weights:
                p.copy_(weights[n])


# ------------------------------------------------------------------------ adaptive radius (ASAM)

@pytest.mark.parametrize("space_cls", [RecordingSpace, SeparatePassesSpace], ids=["shared", "separate"])
def test_adaptive_eps_is_asams(adapter, space_cls):
    micro = micro_batches(adapter, n_micro=2)
    theta = snapshot(adapter)
    rho = 0.5
    expected = asam_eps(theta, neg_grad(adapter, theta, micro), rho, ETA)
    step, _ = make_step(adapter, "sare", rho=rho, rho_mode="adaptive", adaptive_eta=ETA, space_cls=space_cls)
    seen, handle = record_forward_weights(adapter)
    metrics = step(groups(adapter, micro, "sare"))
    handle.remove()
    perturbed = seen[2]  # 2 micro-batches forwarded at theta (either schedule), then theta + eps*
    for n in theta:
        torch.testing.assert_close(perturbed[n].double() - theta[n].double(), expected[n], rtol=1e-4, atol=1e-8)
    # ||T^-1 eps|| = rho (the adaptive radius); ||eps|| itself is reported.
    t_inv = flat([(perturbed[n].double() - theta[n].double()) / (theta[n].double().abs() + ETA) for n in theta])
    assert t_inv.norm().item() == pytest.approx(rho, rel=1e-4)
    assert metrics["sam/eps_norm"].item() == pytest.approx(flat(list(expected.values())).norm().item(), rel=1e-5)
    # Weights of larger magnitude get a larger share of the radius than under the absolute rule.
    absolute = sam_eps(theta, neg_grad(adapter, theta, micro), rho)
    assert not torch.allclose(flat(list(absolute.values())), flat(list(expected.values())))


@pytest.mark.parametrize("space_cls", [RecordingSpace, SeparatePassesSpace], ids=["shared", "separate"])
def test_adaptive_step_equals_the_reference_update(adapter, space_cls):
    micro = micro_batches(adapter, n_micro=2)
    theta = snapshot(adapter)
    eps = asam_eps(theta, neg_grad(adapter, theta, micro), RHO * 10, ETA)
    want = ref_update(adapter, theta, eps, micro)
    step, _ = make_step(adapter, "sare", rho=RHO * 10, rho_mode="adaptive", adaptive_eta=ETA, lambda1=LAM1,
                        lambda2=LAM2, lr=LR, space_cls=space_cls)
    step(groups(adapter, micro, "sare"))
    got = snapshot(adapter)
    for n in theta:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-7)


def test_adaptive_restores_theta_bit_exactly(adapter):
    micro = micro_batches(adapter, n_micro=1)
    theta = snapshot(adapter)
    step, space = make_step(adapter, "sare", rho=0.5, rho_mode="adaptive")
    step(groups(adapter, micro, "sare"))
    assert all(torch.equal(w, theta[n]) for w, n in zip(space.weights_at_step, theta))


# ------------------------------------------------------------------------ reused ascent direction

@pytest.mark.parametrize("space_cls", [RecordingSpace, SeparatePassesSpace], ids=["shared", "separate"])
@pytest.mark.parametrize("rho_mode", ["absolute", "adaptive"])
def test_ascent_every_two_equals_the_reference(adapter, space_cls, rho_mode):
    """k = 2 over 3 steps: steps 1 and 3 compute eps* at their theta, step 2 perturbs by step 1's eps*."""
    micro = [micro_batches(adapter, n_micro=2, seed=s) for s in (0, 1, 2)]
    rho = 0.3

    def eps_at(theta, m):
        g = neg_grad(adapter, theta, m)
        return asam_eps(theta, g, rho, ETA) if rho_mode == "adaptive" else sam_eps(theta, g, rho)

    theta1 = snapshot(adapter)
    eps1 = eps_at(theta1, micro[0])
    theta2 = ref_update(adapter, theta1, eps1, micro[0])
    theta3 = ref_update(adapter, theta2, eps1, micro[1])  # reused
    eps3 = eps_at(theta3, micro[2])
    theta4 = ref_update(adapter, theta3, eps3, micro[2])

    load_weights(adapter, theta1)
    step, _ = make_step(adapter, "sare", rho=rho, rho_mode=rho_mode, adaptive_eta=ETA, ascent_every=2,
                        lambda1=LAM1, lambda2=LAM2, lr=LR, space_cls=space_cls)
    seen, handle = record_forward_weights(adapter)
    ascents, forwards = [], []
    for m in micro:
        before = len(seen)
        metrics = step(groups(adapter, m, "sare"))
        ascents.append(metrics["sam/ascent"].item())
        forwards.append(len(seen) - before)
    handle.remove()
    assert ascents == [1.0, 0.0, 1.0]
    # The reusing step skips the neg pass at theta: the separate schedule forwards one pass fewer; the
    # shared one forwards the same but runs no direction backward (its forward serves the capability loss).
    if space_cls is SeparatePassesSpace:
        assert forwards == [6, 4, 6]
    else:
        assert forwards == [4, 4, 4]
    got = snapshot(adapter)
    for n in theta1:
        torch.testing.assert_close(got[n], theta4[n], rtol=1e-4, atol=1e-7)


def test_ascent_every_one_is_the_paper(adapter):
    micro = micro_batches(adapter, n_micro=1)
    theta = snapshot(adapter)
    a, _ = make_step(adapter, "sare", rho=0.3)
    a(groups(adapter, micro, "sare"))
    a(groups(adapter, micro, "sare"))
    after_default = snapshot(adapter)
    load_weights(adapter, theta)
    b, _ = make_step(adapter, "sare", rho=0.3, ascent_every=1)
    b(groups(adapter, micro, "sare"))
    m = b(groups(adapter, micro, "sare"))
    assert m["sam/ascent"].item() == 1.0 and b._kept_eps is None  # nothing kept at k = 1
    assert all(torch.equal(after_default[n], v) for n, v in snapshot(adapter).items())


def test_variants_are_refused_where_the_space_hides_its_direction(adapter):
    """ZeRO-3 with optimizer offload reads a CPU copy of the gradient that the variants cannot scale or keep."""

    class Hidden(SeparatePassesSpace):
        exposes_direction = False

    for kw in ({"rho_mode": "adaptive"}, {"ascent_every": 2}):
        with pytest.raises(ValueError, match="offload_optimizer"):
            make_step(adapter, "sare", space_cls=Hidden, **kw)
    make_step(adapter, "sare", space_cls=Hidden)  # the paper's SARE runs there
    make_step(adapter, "efuf", space_cls=Hidden, rho_mode="adaptive")  # no ascent: nothing to refuse


# ------------------------------------------------------------------------ kernel and config

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scale_by_abs_is_the_elementwise_product(dtype):
    gen = torch.Generator().manual_seed(0)
    d = [torch.randn(5, 7, generator=gen).to(dtype), torch.randn(3, generator=gen).to(dtype)]
    w = [torch.randn(35, generator=gen), torch.randn(3, generator=gen)]  # a flat master pairs with a shaped d
    want = [(x.float() * (y.float().abs().reshape(x.shape) + 0.01)).to(dtype) for x, y in zip(d, w)]
    kernels.scale_by_abs_(d, w, 0.01)
    assert all(torch.equal(a, b) for a, b in zip(d, want))
    with pytest.raises(ValueError, match="elements"):
        kernels.scale_by_abs_([torch.zeros(3)], [torch.zeros(4)], 0.01)


@pytest.mark.parametrize("override, needle", [
    ("method.rho_mode=relative", "method.rho_mode"),
    ("method.adaptive_eta=0", "method.adaptive_eta"),
    ("method.ascent_every=0", "method.ascent_every"),
])
def test_variant_config_errors_name_field_and_fix(override, needle):
    from tests.test_zero import ROOT

    with pytest.raises(ConfigError, match=needle) as e:
        load_config(ROOT / "launch/configs/tiny_random.yaml", [override])
    assert "Fix:" in str(e.value)


# ------------------------------------------------------------------------ ZeRO on 2 ranks

BOTH = ("method.ascent_every=2", "method.rho_mode=adaptive", "method.rho=0.5")


# Both variants at once in each run (ascent steps use the adaptive radius, reusing steps its kept eps*):
# every path of each is exercised, in the three schedules DeepSpeed runs.
@pytest.mark.parametrize("variant, stage", [
    (BOTH, "zero3"),
    (BOTH, "zero2"),
    ((*BOTH, "distributed.zero3_shared_forward=false"), "zero3"),
], ids=["zero3-shared", "zero2", "zero3-separate"])
def test_variants_on_two_ranks_equal_the_single_process_run(tiny_model_dir, tmp_path, variant, stage):
    from sare_ds.train.trainer import train
    from tests.test_zero import assert_same_run, common, launch, metrics

    ref = tmp_path / "ref"
    args = common(tiny_model_dir, ref, *variant, "optim.grad_accum_steps=2")
    train(load_config(args[1], args[2:]))
    z = tmp_path / stage
    launch("deepspeed", common(tiny_model_dir, z, *variant, f"distributed.ds_config=ds_configs/{stage}_cpu_fp32.json"))
    assert_same_run(ref, z)
    rows = metrics(z)
    if "method.ascent_every=2" in variant:
        assert [r["sam/ascent"] for r in rows] == [1.0, 0.0, 1.0, 0.0]
