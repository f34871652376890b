"""Fused Triton kernels (kernels/triton_sam.py) and their dispatch against the torch reference.

    DS_ACCELERATOR=cpu .venv/bin/python -m pytest tests/test_kernels.py -q

On a CPU-only machine the kernels run in Triton's interpreter: a copy of the kernel module is
loaded with TRITON_INTERPRET=1 (the flag is read when `@triton.jit` decorates) and handed to
the dispatcher, so the rest of the suite keeps the fast torch path. Sizes are small and the
interpreter's blocks large (16384), so the file runs in seconds. The same tests run again on
CUDA with the compiled kernels when a GPU is present ("cuda" parameters, skipped otherwise).

Tolerances, and why:
- restore and restore_from: bit-exact (compared as raw bits): a cast copy has one correctly
  rounded answer (round to nearest even), and an exact backup has no rounding at all;
- perturb: bit-exact against the reference computed in the same order (fp32 scale * g,
  rounded; + theta, rounded; one cast). IEEE fp32 multiply and add are correctly rounded on
  every backend, the kernels forbid FMA contraction, and the bf16 cast is round-to-nearest-
  even in both, so there is nothing left to differ;
- sum of squares: 1e-6 relative to a float64 sum. Reduction orders differ (a block tree in
  the kernel, torch's own in the reference), each with error O(log n * 2^-24) << 1e-6.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import sare_kernels as kernels
from sare_kernels import dispatch, reference

ROOT = Path(__file__).resolve().parents[1]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Odd lengths: a single element, less than a block, one over a block, several blocks + tail.
LENGTHS = [1, 7, 16385, 40001]
HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not HAS_CUDA, reason="compiled Triton kernels need a CUDA GPU; the CPU cases run them interpreted"))]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bit pattern, so -0.0 vs 0.0 and every rounding difference count."""
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def _assert_bit_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype, what
    diff = (_bits(actual) != _bits(expected)).nonzero()
    assert diff.numel() == 0, (
        f"{what}: {diff.numel()} elements differ, first at {diff[0].tolist()}: "
        f"{actual.flatten()[diff[0, 0]].item()!r} vs {expected.flatten()[diff[0, 0]].item()!r}")


@pytest.fixture(scope="module")
def interpreted_module():
    """kernels/triton_sam.py loaded as a separate module with its kernels interpreted."""
    pytest.importorskip("triton", reason="triton is a dependency of the kernels package")
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        spec = importlib.util.spec_from_file_location("sare_kernels._triton_sam_interpreted",
                                                      ROOT / "kernels" / "triton_sam.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = old
    assert module.INTERPRETED
    return module


@pytest.fixture()
def triton_on(request, monkeypatch, interpreted_module):
    """Force the Triton path for `device` ('cpu': interpreter, 'cuda': compiled); yields the device."""
    device = request.param
    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setattr(dispatch, "_triton_module", interpreted_module)
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        import sare_kernels.triton_sam as compiled
        assert not compiled.INTERPRETED, "sare_kernels.triton_sam was imported with TRITON_INTERPRET=1"
        monkeypatch.setattr(dispatch, "_triton_module", compiled)
    kernels.set_backend("triton")
    yield torch.device(device)
    kernels.set_backend(None)


def _spy(monkeypatch, module, name: str) -> list:
    """Count calls of module.name (to prove which path a public call took)."""
    calls = []
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def _masters(n: int, device, seed: int) -> torch.Tensor:
    """fp32 theta with the awkward values: ties of bf16/fp16 rounding, overflow, subnormals, zeros."""
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(n, generator=gen) * 3
    special = torch.tensor([
        1 + 2 ** -8, 1 + 3 * 2 ** -8,     # bf16 ties: round to even (down, then up)
        1 + 2 ** -11, 1 + 3 * 2 ** -11,   # fp16 ties
        3.4e38, -7e4, 7e4,                # overflow to inf in bf16 / fp16 (finite in fp32)
        1e-40, -3e-39, 6e-8,              # fp32/bf16 subnormals, fp16 subnormal
        0.0, -0.0, float("inf"), -float("inf"),
    ])
    k = min(n, special.numel())
    m[:k] = special[:k]
    return m.to(device)


# -- sum of squares ---------------------------------------------------------------------------
@pytest.mark.parametrize("triton_on", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sum_of_squares_matches_float64_and_is_deterministic(triton_on, dtype, monkeypatch):
    gen = torch.Generator().manual_seed(1)
    tensors = [(torch.randn(n, generator=gen) * 2).to(dtype).to(triton_on) for n in LENGTHS]
    tensors.insert(2, torch.empty(0, dtype=dtype, device=triton_on))  # an empty buffer is skipped
    calls = _spy(monkeypatch, dispatch._triton_module, "sum_of_squares")
    got = kernels.sum_of_squares(tensors)
    assert calls, "the Triton path was not taken"
    assert got.dtype == torch.float32 and got.dim() == 0 and got.device == triton_on
    exact = sum((t.double() ** 2).sum() for t in tensors)
    torch.testing.assert_close(got.double().cpu(), exact.cpu(), rtol=1e-6, atol=0)
    torch.testing.assert_close(got.cpu(), reference.sum_of_squares(tensors).cpu(), rtol=1e-6, atol=0)
    _assert_bit_equal(kernels.sum_of_squares(tensors), got, "second call (fixed reduction order)")


@pytest.mark.parametrize("triton_on", ["cpu"], indirect=True)
def test_sum_of_squares_reduces_over_several_levels(triton_on, monkeypatch):
    # With 64-element blocks, 12293 elements give 193 partials -> 4 -> 1: three launches of the
    # block reduction, the path a 1B-element buffer takes with 4096-element blocks.
    monkeypatch.setattr(dispatch._triton_module, "BLOCK", 64)
    x = torch.randn(12293, generator=torch.Generator().manual_seed(2))
    got = kernels.sum_of_squares([x, x[:100]])
    exact = (x.double() ** 2).sum() + (x[:100].double() ** 2).sum()
    torch.testing.assert_close(got.double(), exact, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_path_sum_of_squares_is_accurate_at_a_million_elements(dtype):
    # The CPU norm kernel alone drifts (2e-5 relative at 1e6 elements); the reference's
    # row-wise norms must not, or the two paths could not agree to 1e-6.
    x = (torch.randn(2_000_003, generator=torch.Generator().manual_seed(7)) * 2).to(dtype)
    exact = (x.double() ** 2).sum()
    torch.testing.assert_close(reference.sum_of_squares([x]).double(), exact, rtol=1e-6, atol=0)


def test_sum_of_squares_of_nothing_is_zero():
    assert kernels.sum_of_squares([]).item() == 0.0
    assert kernels.sum_of_squares([torch.empty(0)]).item() == 0.0
    assert reference.sum_of_squares([torch.empty(0)]).item() == 0.0


# -- restore -----------------------------------------------------------------------------------
@pytest.mark.parametrize("triton_on", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
def test_restore_is_bit_exact(triton_on, dtype, monkeypatch):
    masters = [_masters(n, triton_on, seed=n) for n in LENGTHS]
    params = [torch.full((n,), 123.0, dtype=dtype, device=triton_on) for n in LENGTHS]
    calls = _spy(monkeypatch, dispatch._triton_module, "restore_")
    with _no_numpy_overflow_noise():
        kernels.restore_(params, masters)
    assert calls, "the Triton path was not taken"
    for p, m in zip(params, masters):
        _assert_bit_equal(p, m.to(dtype), f"restore {dtype} n={m.numel()}")


@contextmanager
def _no_numpy_overflow_noise():
    """The interpreter's fp16 cast (numpy) warns on values that correctly round to inf."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


# -- perturb -----------------------------------------------------------------------------------
@pytest.mark.parametrize("triton_on", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("master_dtype", [torch.float32, "param"])
def test_perturb_matches_reference_bit_for_bit(triton_on, dtype, master_dtype, monkeypatch):
    gen = torch.Generator().manual_seed(3)
    masters = [_masters(n, triton_on, seed=n + 1) for n in LENGTHS]
    if master_dtype == "param":  # a low-precision theta (plain bf16 training keeps no fp32 copy)
        masters = [m.to(dtype) for m in masters]
    grads = [torch.randn(n, generator=gen).to(triton_on) for n in LENGTHS]
    grads[1] = grads[1].to(dtype)  # gradients may come in the parameter dtype too
    scale = torch.tensor(0.05, device=triton_on) / kernels.sum_of_squares(grads).sqrt()
    params = [torch.empty(n, dtype=dtype, device=triton_on) for n in LENGTHS]
    expected = [torch.empty(n, dtype=dtype, device=triton_on) for n in LENGTHS]
    calls = _spy(monkeypatch, dispatch._triton_module, "perturb_")
    with _no_numpy_overflow_noise():
        kernels.perturb_(params, masters, grads, scale)
        reference.perturb_(expected, masters, grads, scale)
    assert calls, "the Triton path was not taken"
    for p, e, m, g in zip(params, expected, masters, grads):
        _assert_bit_equal(p, e, f"perturb {dtype} n={p.numel()}")
        # ...and the reference is the formula of docs/method.md, in that precision order.
        _assert_bit_equal(e, (m.float() + scale * g.float()).to(dtype), "reference formula")
    assert all(not torch.equal(p.float(), m.float()) for p, m in zip(params[2:], masters[2:]))


@pytest.mark.parametrize("triton_on", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_gradient_gives_no_perturbation_and_no_nan(triton_on, dtype):
    grads = [torch.zeros(n, device=triton_on) for n in LENGTHS]
    norm = kernels.sum_of_squares(grads).sqrt()
    assert norm.item() == 0.0
    scale = 0.05 / norm.clamp_min(1e-12)  # the step's rule: 5e10, finite; eps = scale * 0 = 0
    masters = [torch.randn(n, generator=torch.Generator().manual_seed(n)).to(triton_on) for n in LENGTHS]
    params = [torch.empty(n, dtype=dtype, device=triton_on) for n in LENGTHS]
    kernels.perturb_(params, masters, grads, scale)
    for p, m in zip(params, masters):
        assert not p.isnan().any()
        _assert_bit_equal(p, m.to(dtype), "perturb with a zero gradient")
    weights = [m.to(dtype) for m in masters]
    backups = [g.to(dtype) for g in grads]
    kernels.perturb_with_backup_(weights, backups, scale, backups)
    for w, m in zip(weights, masters):
        assert not w.isnan().any()
        _assert_bit_equal(w, m.to(dtype), "perturb_with_backup_ with a zero gradient")


# -- the no-master mode --------------------------------------------------------------------------
@pytest.mark.parametrize("triton_on", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backup_in", ["grads", "fp32"])
def test_perturb_with_backup_then_restore_from_is_exact(triton_on, dtype, backup_in, monkeypatch):
    gen = torch.Generator().manual_seed(4)
    theta = [_masters(n, triton_on, seed=n + 2).to(dtype) for n in LENGTHS]
    grads = [torch.randn(n, generator=gen).to(dtype).to(triton_on) for n in LENGTHS]
    scale = torch.tensor(0.05, device=triton_on) / kernels.sum_of_squares(grads).sqrt()
    expected = [(t.float() + scale * g.float()).to(dtype) for t, g in zip(theta, grads)]
    params = [t.clone() for t in theta]
    # "grads": theta overwrites the gradient buffer it is computed from (no extra memory);
    # "fp32": a wider buffer also holds every bf16/fp16 value exactly.
    backups = [g.clone() for g in grads] if backup_in == "grads" else \
        [torch.empty(n, device=triton_on) for n in LENGTHS]
    grad_args = backups if backup_in == "grads" else grads
    calls = _spy(monkeypatch, dispatch._triton_module, "perturb_with_backup_")
    with _no_numpy_overflow_noise():
        kernels.perturb_with_backup_(params, grad_args, scale, backups)
    assert calls, "the Triton path was not taken"
    for p, e, b, t in zip(params, expected, backups, theta):
        _assert_bit_equal(p, e, f"perturbed {dtype}")
        _assert_bit_equal(b.to(dtype), t, "backup holds theta")
    kernels.restore_from_(params, backups)
    for p, t in zip(params, theta):
        _assert_bit_equal(p, t, f"restore_from_ {dtype}")


# -- dispatch --------------------------------------------------------------------------------------
def test_auto_uses_torch_on_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("SARE_KERNELS", raising=False)
    kernels.set_backend(None)
    assert kernels.get_backend() == "auto"
    x = [torch.randn(10)]
    assert "TRITON_INTERPRET" in kernels.triton_unavailable_reason(x)
    calls = _spy(monkeypatch, reference, "sum_of_squares")
    kernels.sum_of_squares(x)
    assert calls == ["sum_of_squares"]


@pytest.mark.parametrize("triton_on", ["cpu"], indirect=True)
def test_auto_uses_triton_where_it_can_run_and_torch_when_forced(triton_on, monkeypatch):
    x = [torch.randn(100)]
    kernels.set_backend("auto")
    triton_calls = _spy(monkeypatch, dispatch._triton_module, "sum_of_squares")
    torch_calls = _spy(monkeypatch, reference, "sum_of_squares")
    kernels.sum_of_squares(x)
    assert (len(triton_calls), len(torch_calls)) == (1, 0)
    kernels.set_backend("torch")
    kernels.sum_of_squares(x)
    assert (len(triton_calls), len(torch_calls)) == (1, 1)
    # The env var is the fallback when the setter was not called (or reset with None).
    kernels.set_backend(None)
    monkeypatch.setenv("SARE_KERNELS", "torch")
    kernels.sum_of_squares(x)
    assert (len(triton_calls), len(torch_calls)) == (1, 2)
    # A non-contiguous tensor cannot go to the flat-buffer kernels: auto falls back.
    monkeypatch.setenv("SARE_KERNELS", "auto")
    kernels.sum_of_squares([torch.randn(4, 6).t()])
    assert (len(triton_calls), len(torch_calls)) == (1, 3)


def test_forced_triton_that_cannot_run_says_why_and_how_to_fix(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("SARE_KERNELS", "triton")
    kernels.set_backend(None)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1.*SARE_KERNELS=auto"):
        kernels.restore_([torch.zeros(3)], [torch.ones(3)])


def test_bad_backend_names_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="set_backend.*'fast'.*auto, triton, torch"):
        kernels.set_backend("fast")
    monkeypatch.setenv("SARE_KERNELS", "cuda")
    kernels.set_backend(None)
    with pytest.raises(ValueError, match=r"\$SARE_KERNELS = 'cuda'"):
        kernels.get_backend()


@pytest.mark.parametrize("triton_on", ["cpu"], indirect=True)
def test_both_paths_give_the_same_results_through_the_public_api(triton_on):
    gen = torch.Generator().manual_seed(5)
    masters = [torch.randn(n, generator=gen) for n in LENGTHS]
    grads = [torch.randn(n, generator=gen) for n in LENGTHS]
    results = {}
    for backend in ("triton", "torch"):
        kernels.set_backend(backend)
        sq = kernels.sum_of_squares(grads)
        scale = 0.05 / sq.sqrt().clamp_min(1e-12)
        params = [m.to(torch.bfloat16) for m in masters]
        kernels.perturb_(params, masters, grads, scale)
        perturbed = [p.clone() for p in params]
        kernels.restore_(params, masters)
        results[backend] = (sq, perturbed, params)
    (sq_t, pert_t, rest_t), (sq_r, pert_r, rest_r) = results["triton"], results["torch"]
    torch.testing.assert_close(sq_t, sq_r, rtol=1e-6, atol=0)
    for a, b in zip(pert_t + rest_t, pert_r + rest_r):
        _assert_bit_equal(a, b, "triton vs torch path")


@pytest.mark.parametrize("triton_on", ["cpu"], indirect=True)
def test_plain_parameter_space_runs_the_kernels_through_dispatch(triton_on, monkeypatch):
    from sare_ds.train.params import PlainParameterSpace

    torch.manual_seed(6)
    layer = torch.nn.Linear(33, 17)
    space = PlainParameterSpace(list(layer.parameters()), torch.optim.SGD(layer.parameters(), lr=0.1))
    layer(torch.randn(5, 33)).square().sum().backward()
    theta = [p.detach().clone() for p in layer.parameters()]
    grads = [p.grad.clone() for p in layer.parameters()]
    calls = {name: _spy(monkeypatch, dispatch._triton_module, name)
             for name in ("sum_of_squares", "perturb_with_backup_", "restore_from_")}
    norm = space.global_grad_norm()
    scale = 0.05 / norm.clamp_min(1e-12)
    space.perturb(scale)
    for p, t, g in zip(layer.parameters(), theta, grads):
        _assert_bit_equal(p.detach(), t + scale * g, "perturbed weights")
    space.restore()
    for p, t in zip(layer.parameters(), theta):
        _assert_bit_equal(p.detach(), t, "restored weights")
    assert all(calls.values()), f"PlainParameterSpace did not reach every Triton kernel: {calls}"


# -- input checks -----------------------------------------------------------------------------------
def test_bad_inputs_name_the_input_the_rule_and_the_fix():
    s = torch.tensor(0.1)
    with pytest.raises(ValueError, match="same length"):
        kernels.perturb_([torch.zeros(3)], [], [torch.zeros(3)], s)
    with pytest.raises(ValueError, match=r"masters\[0\] has 4 elements but params\[0\] has 3"):
        kernels.perturb_([torch.zeros(3)], [torch.zeros(4)], [torch.zeros(3)], s)
    with pytest.raises(TypeError, match="scale must be a one-element floating tensor"):
        kernels.perturb_([torch.zeros(3)], [torch.zeros(3)], [torch.zeros(3)], 0.1)
    with pytest.raises(TypeError, match=r"grads\[0\] has dtype torch.int64"):
        kernels.perturb_([torch.zeros(3)], [torch.zeros(3)], [torch.zeros(3, dtype=torch.long)], s)
    with pytest.raises(TypeError, match="backups\\[0\\] is torch.float16 but params\\[0\\] is torch.bfloat16"):
        kernels.perturb_with_backup_([torch.zeros(3, dtype=torch.bfloat16)], [torch.zeros(3)], s,
                                     [torch.zeros(3, dtype=torch.float16)])
    p = torch.zeros(3)
    with pytest.raises(ValueError, match="params\\[0\\] itself"):
        kernels.perturb_with_backup_([p], [torch.zeros(3)], s, [p])


def test_importing_kernels_does_not_import_triton():
    code = "import sys, kernels; kernels.sum_of_squares([__import__('torch').ones(3)]); " \
           "assert 'triton' not in sys.modules, 'triton was imported eagerly'"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True)


def test_checkout_without_install_imports_kernels_as_sare_kernels(tmp_path):
    """The GPU check runs from a checkout through PYTHONPATH: `import sare_ds` maps kernels/ to
    sare_kernels there."""
    code = ("import sys, importlib.machinery as m\n"
            # Drop the editable install's finder: the interpreter sees only PYTHONPATH, as on a fresh machine.
            "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in type(f).__module__ and "
            "'editable' not in getattr(f, '__name__', '')]\n"
            "import sare_ds, sare_kernels, importlib.util\n"
            "from sare_kernels import dispatch\n"
            "print(sare_kernels.__file__, dispatch.__name__)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    kernels_file, dispatch_name = proc.stdout.split()[:2]
    assert Path(kernels_file) == ROOT / "kernels" / "__init__.py"
    assert dispatch_name == "sare_kernels.dispatch"


def test_installed_package_leaves_the_name_kernels_free(tmp_path):
    """Installed (pip install -e .), the folder is `sare_kernels`; `import kernels` is not ours, so
    Hugging Face's `kernels` package (which transformers probes for) is never shadowed."""
    code = ("import importlib.util, sare_kernels\n"
            "spec = importlib.util.find_spec('kernels')\n"
            "print(sare_kernels.__name__, spec.origin if spec else None)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr
    name, origin = proc.stdout.split()
    assert name == "sare_kernels"
    assert origin == "None" or not origin.startswith(str(ROOT))
