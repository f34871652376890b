"""zero_grad() under DeepSpeed ZeRO leaves no gradient behind (CPU, gloo, 2 ranks).

A trainable parameter that a backward does not reach must read as a zero gradient after
`space.zero_grad()`, as in PlainParameterSpace (grad None): in ||g||, in the gradients the
optimizer steps on and in the perturbation eps* = rho g / ||g||. DeepSpeed's own
`optimizer.zero_grad()` leaves the reduced gradients in place (ZeRO-3: the fp32 grad partitions;
ZeRO-2: an abandoned accumulation, and with fp32 accumulation of bf16 gradients every pass since
the last step; with optimizer offload: the CPU fp32 gradients), so an unreached parameter kept
the previous pass's gradient. tests/zero_stale_worker.py runs the passes
on every config below and compares with plain autograd in one process; this file checks its reports.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# "<ds json>[:options]": offload = optimizer offload to the CPU; bf16 = bf16 model, fp32 accumulation.
CONFIGS = ["ds_configs/zero3_cpu_fp32.json", "ds_configs/zero2_cpu_fp32.json",
           "ds_configs/zero3_cpu_fp32.json:offload", "ds_configs/zero2_cpu_fp32.json:offload",
           "ds_configs/zero3_cpu_fp32.json:bf16", "ds_configs/zero2_cpu_fp32.json:bf16"]
RTOL = 1e-6
# bf16: the reference computes in bf16 as well, but perturb() rounds theta + eps* to bf16. A stale
# gradient shows as an error of 0.1 or more either way.
RTOL_BF16 = {"norm": 1e-4, "grad": 1e-4, "perturb": 1e-2}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reports(tiny_model_dir, tmp_path_factory) -> list[list[dict]]:
    """reports[rank][config]: one launch of the worker on 2 ranks for all configs."""
    out = tmp_path_factory.mktemp("zero-stale")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(_free_port()),
           str(ROOT / "tests/zero_stale_worker.py"), str(tiny_model_dir), str(out), *CONFIGS]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.parametrize("index", range(len(CONFIGS)), ids=[c.replace("ds_configs/", "") for c in CONFIGS])
def test_unreached_parameter_reads_zero_after_zero_grad(reports, index):
    """Abandoned pass -> zero_grad -> full pass -> zero_grad -> pass with projector.linear_1 detached:
    ||g||, the gathered gradients and perturb()'s weights match plain autograd at every read."""
    spec = CONFIGS[index]
    stage = 3 if "zero3" in spec else 2
    bf16 = spec.endswith(":bf16")
    tol = RTOL_BF16 if bf16 else {"norm": RTOL, "grad": RTOL, "perturb": RTOL}
    for rank, per_rank in enumerate(reports):
        r = per_rank[index]
        assert r["stage"] == stage and r["offload"] == spec.endswith(":offload"), r
        assert r["dtype"] == ("bfloat16" if bf16 else "float32"), r
        full, detached = r["passes"]
        # The test is meaningful: pass 1 gives linear_1 a gradient, pass 2 none.
        assert not full["detach"] and full["ref_detached_norm"] > 1e-3, full
        assert detached["detach"] and detached["ref_detached_norm"] == 0.0, detached
        for row in (full, detached):
            where = (spec, rank, "detached pass" if row["detach"] else "full pass")
            assert row["norm"] == pytest.approx(row["ref_norm"], rel=tol["norm"]), where
            assert max(row["grad_err"].values()) <= tol["grad"], (where, row["grad_err"])
            assert max(row["perturb_err"].values()) <= tol["perturb"], (where, row["perturb_err"])
        # After zero_grad() (no backward since) the gradient reads as zero.
        assert r["norm_after_zero_grad"] == 0.0, r["norm_after_zero_grad"]
    assert [p["norm"] for p in reports[0][index]["passes"]] == [p["norm"] for p in reports[1][index]["passes"]]
