"""The GPU check's logic on the CPU (sare_ds/gpu_check.py, launch/gpu_check.sh): what runs without CUDA.

    DS_ACCELERATOR=cpu .venv/bin/python -m pytest tests/test_gpu_check.py -q

Argument handling, the refusal without CUDA, the dry run, the device peak table, MFU and bandwidth
arithmetic, reading fabricated run directories and benchmark JSON, the markdown summary with a
failed part, the time budget, the wheel selection, timeouts that kill a process group, and the
plan-driven choice of depth. The GPU parts themselves need a GPU (docs/memory_plan.md says how to run them).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sare_ds import gpu_check as gc

ROOT = Path(__file__).resolve().parents[1]


# -- arguments and refusal -------------------------------------------------------------------------
@pytest.mark.parametrize("argv,words", [
    (["--parts", "kernels,gpu"], "--parts 'kernels,gpu': gpu not among"),
    (["--methods", "sare,dpo"], "--methods 'sare,dpo': dpo not among"),
    (["--steps", "2"], "--steps 2: needs at least 3"),
    (["--minutes", "0"], "--minutes 0"),
    (["--bench-sizes", "lots"], "--bench-sizes 'lots'"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
])
def test_bad_arguments_are_refused_by_name(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        gc.parse_args(argv)
    assert e.value.code == 2
    assert words in capsys.readouterr().err


def test_defaults():
    args = gc.parse_args([])
    assert args.parts == list(gc.PARTS) and args.methods == ["ft", "efuf", "sare"]
    assert (args.minutes, args.steps, args.model, args.bench_sizes) == (8.0, 8, "preset:llava-1.5-7b", [10**7, 10**8])


def test_refuses_without_cuda_with_a_clear_message(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a machine with a GPU
    assert gc.main(["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device is visible" in err and "--dry-run" in err and "--allow-cpu" in err
    assert not (tmp_path / "out").exists()


def test_shell_script_refuses_without_cuda_and_dry_runs(tmp_path):
    script = ROOT / "launch" / "gpu_check.sh"
    # No visible device, also on a machine with a GPU.
    env = {"SARE_PY": sys.executable, "PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run(["bash", str(script), "--out", str(tmp_path / "a")], capture_output=True, text=True, env=env)
    assert res.returncode == 2 and "no CUDA device" in res.stderr
    res = subprocess.run(["bash", str(script), "--dry-run", "--out", str(tmp_path / "b"), "--minutes", "4"],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    summary = (tmp_path / "b" / "gpu_check.md").read_text()
    assert "dry run: " in summary and "deepspeed.launcher.runner --num_gpus 1" in summary
    assert "No part failed (5 not run" in summary
    record = json.loads((tmp_path / "b" / "gpu_check.json").read_text())
    assert [p["name"] for p in record["parts"]] == list(gc.PARTS)
    assert sum(p["budget_s"] for p in record["parts"]) == pytest.approx(240, abs=1)


# -- peaks, MFU, bandwidth ------------------------------------------------------------------------
@pytest.mark.parametrize("name,label,gbps,tflops", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 3350, 989),
    ("NVIDIA H100 PCIe", "H100 PCIe", 2000, 756),
    ("NVIDIA H200", "H200", 4800, 989),
    ("NVIDIA A100-SXM4-80GB", "A100 80GB SXM", 2039, 312),
    ("NVIDIA A100-SXM4-40GB", "A100 40GB", 1555, 312),
    ("NVIDIA A100-PCIE-40GB", "A100 40GB", 1555, 312),
])
def test_device_peaks(name, label, gbps, tflops):
    peak = gc.device_peak(name)
    assert (peak.label, peak.bandwidth_gbps, peak.bf16_tflops) == (label, gbps, tflops)


def test_unknown_device_has_no_peak():
    assert gc.device_peak("NVIDIA L4") is None and gc.device_peak("") is None


def test_mfu_arithmetic():
    assert gc.mfu(494.5e12, 1.0, 989.0) == pytest.approx(50.0)
    assert gc.mfu(100e12, 0.5, 312.0) == pytest.approx(100 * 200 / 312)
    assert gc.mfu(1e12, 1.0, None) is None and gc.mfu(1e12, 0.0, 989.0) is None


def _bench_json() -> dict:
    rows = [{"method": m, "elements": 10**8, "dtype": "bf16", "tensors": 24, "norm_ms": 0.1, "perturb_ms": 0.2,
             "restore_ms": 0.1, "cycle_ms": c, "gbps": g, "pct_peak": 0.0, "peak_extra_mib": 0.0}
            for m, c, g in (("fused", 0.9, 2680.0), ("foreach", 3.1, 780.0))]
    return {"device": "NVIDIA H100 80GB HBM3", "peak_gbps": 3350.0, "peak_source": "datasheet", "notes": [],
            "rows": rows}


def test_bench_figures_give_percent_of_the_datasheet_peak():
    fig = gc.bench_figures(_bench_json(), "NVIDIA H100 80GB HBM3")
    assert fig["peak_gbps"] == 3350.0 and fig["rows"][0]["pct_peak"] == pytest.approx(80.0)
    unknown = gc.bench_figures(_bench_json(), "NVIDIA L4")
    assert unknown["peak_gbps"] is None and unknown["rows"][0]["pct_peak"] is None


# -- runs and the summary -------------------------------------------------------------------------
def _fake_run(run_dir: Path, method: str, step_time: float, steps: int = 5, peak: float | None = 17.5,
              status: str = "completed") -> None:
    run_dir.mkdir(parents=True)
    phases = {"ft": ["capability"], "efuf": ["efuf"],
              "sare": ["neg_at_theta", "grad_norm", "perturb", "neg_at_eps", "restore", "capability"]}[method]
    with open(run_dir / "metrics.jsonl", "w") as f:
        for i in range(1, steps + 1):
            t = step_time * (3 if i == 1 else 1)  # a slow first step: left out of the median
            row = {"step": i, "loss/pos": 1.0, "perf/step_time_s": t, "perf/samples_per_s": 3 / t,
                   "perf/tokens_per_s": 3 * 640 / t, **{f"perf/phase/{p}": t / len(phases) for p in phases}}
            if peak is not None:
                row["perf/peak_mem_gb"] = peak
            f.write(json.dumps(row) + "\n")
    (run_dir / "summary.json").write_text(json.dumps({"status": status, "peak_memory_gb": peak}))


def test_read_run_takes_medians_after_warm_up(tmp_path):
    _fake_run(tmp_path / "sare", "sare", 0.5)
    run = gc.read_run(tmp_path / "sare")
    assert run["steps_logged"] == 5 and run["steps_used"] == 3
    assert run["medians"]["perf/step_time_s"] == pytest.approx(0.5)
    assert run["peak_memory_gib"] == 17.5 and run["status"] == "completed"
    assert set(run["phases"]) == {"neg_at_theta", "grad_norm", "perturb", "neg_at_eps", "restore", "capability"}
    mean, lengths = gc.run_lengths(run, {"pos": 1, "neg": 1, "sent": 1}, 1, "ft")
    assert mean == pytest.approx(640) and lengths == {"pos": [640.0], "neg": [], "sent": [640.0]}
    with pytest.raises(FileNotFoundError, match="metrics.jsonl is missing"):
        gc.read_run(tmp_path / "nothing")


def test_summary_of_fabricated_runs_with_a_failed_part(tmp_path):
    info = {"device": "NVIDIA H100 80GB HBM3", "device_memory_gib": 79.2, "driver": "580.1", "cuda": "13.0",
            "python": "3.12.3", "torch": "2.11.0"}
    runs = {}
    for method, t in (("ft", 0.3), ("efuf", 0.45), ("sare", 0.6)):
        _fake_run(tmp_path / method, method, t)
        run = gc.read_run(tmp_path / method)
        flops = {"ft": 60e12, "efuf": 90e12, "sare": 120e12}[method]
        run.update(mean_tokens_per_sample=640.0, model_tflop_per_step=flops / 1e12,
                   hardware_tflop_per_step=1.5 * flops / 1e12, mfu_pct=gc.mfu(flops, t, 989.0),
                   hfu_pct=gc.mfu(1.5 * flops, t, 989.0), predicted_peak_gib=17.0)
        runs[method] = run
    runs["efuf"] = {"error": "FileNotFoundError: metrics.jsonl is missing"}
    results = [
        gc.PartResult("env", gc.PASS, 5, 24, "all imports work"),
        gc.PartResult("kernels", gc.FAIL, 40, 72, "pytest exit 1: 2 failed, 0 errors",
                      {"passed": 52, "failed": 2, "skipped": 0, "cuda_skipped": 0}, "logs/kernels.log"),
        gc.PartResult("bench", gc.PASS, 30, 48, "2 rows", gc.bench_figures(_bench_json(), info["device"])),
        gc.PartResult("train", gc.FAIL, 200, 216, "efuf: exit 1",
                      {"model": "preset:llava-1.5-7b", "choice": {"full_depth": True, "layers": 32},
                       "ds_config": "ds_configs/zero3_bf16.json", "runs": runs}),
        gc.PartResult("quickstart", gc.FAIL, 0, 120, "not started: the time budget is spent"),
    ]
    text = gc.write_summary(tmp_path / "out" / "gpu_check.md", info, results, gc.parse_args([]),
                            {"deepspeed": "0.19.8"}, "2026-11-29 12:00:00")
    assert (tmp_path / "out" / "gpu_check.md").read_text() == text
    assert "| device | NVIDIA H100 80GB HBM3 (79.2 GiB) |" in text and "| deepspeed | 0.19.8 |" in text
    assert "H100 SXM: 3350 GB/s, bf16 dense 989 TFLOP/s" in text
    assert "| kernels | **FAIL** | 40 | 72 | pytest exit 1: 2 failed, 0 errors |" in text
    assert "| fused | 1e+08 | bf16 | 0.900 | 2680.0 | 80.0 | 0.0 |" in text
    # SARE: 120 TFLOP in 0.6 s on a 989 TFLOP/s part = 20.2 % MFU; measured 17.5 GiB vs plan 17.0 GiB.
    assert "| sare | 0.600 | 3200 | 640 | 120.0 | 20.2 | 30.3 | 17.50 | 17.00 | 1.03 | completed |" in text
    assert "| efuf | | | | | | | | | | FileNotFoundError: metrics.jsonl is missing |" in text
    assert "## Failures" in text and "- **quickstart**: not started: the time budget is spent" in text
    assert "full depth" in text


def test_summary_without_peak_memory_and_unknown_device(tmp_path):
    _fake_run(tmp_path / "ft", "ft", 0.3, peak=None)
    run = gc.read_run(tmp_path / "ft")
    run.update(mfu_pct=None, predicted_peak_gib=12.0)
    results = [gc.PartResult("train", gc.PASS, 50, 216, "1 run(s) completed",
                             {"model": "m", "choice": {"full_depth": False, "layers": 20, "full_needed_gib": 90.0},
                              "ds_config": "z", "runs": {"ft": run}})]
    text = gc.write_summary(tmp_path / "s.md", {"device": "NVIDIA L4"}, results)
    assert "unknown device" in text and "not logged" in text and "cut to 20 LLM layers" in text
    assert "## All parts passed" in text


# -- budget, processes, wheels, depth ---------------------------------------------------------------
def test_budget_shares_and_roll_over():
    budget = gc.Budget(8, gc.PARTS)
    assert sum(budget.shares.values()) == pytest.approx(480)
    granted = budget.take("kernels")
    assert granted == pytest.approx(480 * 0.12, abs=0.5)
    budget.give_back("kernels", 30, granted)  # 27.6 s unused roll over to the next part
    assert budget.take("bench") == pytest.approx(480 * 0.08 + (480 * 0.12 - 30), abs=0.5)
    only = gc.Budget(2, ["train"])
    assert only.take("train") == pytest.approx(120, abs=0.5)


def test_run_command_kills_the_process_group_on_timeout(tmp_path):
    log = tmp_path / "t.log"
    start = time.monotonic()
    rc, timed_out, seconds = gc.run_command(["bash", "-c", "sleep 60 & sleep 60"], 1.5, log)
    assert (rc, timed_out) == (124, True) and time.monotonic() - start < 15
    assert "timed out" in log.read_text()
    rc, timed_out, _ = gc.run_command([sys.executable, "-c", "print('hi')"], 30, log)
    assert (rc, timed_out) == (0, False) and "hi" in log.read_text()


def test_missing_wheels_leave_installed_packages_alone(tmp_path):
    for name in ("deepspeed-0.19.8-py3-none-any.whl", "open_clip_torch-3.3.0-py3-none-any.whl",
                 "pydantic_core-2.50.5-cp312-cp312-manylinux_2_17_x86_64.whl", "README.txt"):
        (tmp_path / name).write_text("")
    installed = {"open-clip-torch"}
    names = [w.name for w in gc.missing_wheels(tmp_path, lambda n: n in installed)]
    assert names == ["deepspeed-0.19.8-py3-none-any.whl", "pydantic_core-2.50.5-cp312-cp312-manylinux_2_17_x86_64.whl"]
    assert gc.missing_wheels(tmp_path / "absent") == []


def test_parse_pytest_counts_and_cuda_skips():
    text = ("SKIPPED [3] tests/test_kernels.py:169: compiled Triton kernels need a CUDA GPU; the CPU cases run\n"
            "SKIPPED [6] tests/test_kernels.py:191: compiled Triton kernels need a CUDA GPU; the CPU cases run\n"
            "33 passed, 21 skipped in 5.88s")
    assert gc.parse_pytest(text) == {"passed": 33, "skipped": 21, "cuda_skipped": 9}
    assert gc.parse_pytest("1 failed, 53 passed, 2 errors in 9s") == {"failed": 1, "passed": 53, "error": 2,
                                                                       "cuda_skipped": 0}


def test_depth_follows_the_plan():
    ds = ROOT / gc.GPU_DS_CONFIG
    spec, info = gc.choose_depth("preset:llava-1.5-7b", 80, 1024, ["sare", "efuf"], ds)
    assert spec == "preset:llava-1.5-7b" and info["full_depth"] and info["needed_gib"] < 80
    spec, info = gc.choose_depth("preset:llava-1.5-7b", 12, 1024, ["sare", "efuf"], ds)
    assert spec == f"preset:llava-1.5-7b,text_layers={info['layers']}" and 1 <= info["layers"] < 32
    assert info["needed_gib"] <= 12 < info["full_needed_gib"]
    deeper, _ = gc.choose_depth("preset:llava-1.5-7b", 13, 1024, ["sare", "efuf"], ds)
    assert int(deeper.rsplit("=", 1)[1]) >= info["layers"]


def test_train_command_is_the_documented_one(tmp_path):
    cmd = gc.train_command("preset:llava-1.5-7b,text_layers=20", "sare", 8, tmp_path / "r", gc.GPU_DS_CONFIG,
                           False, 29555)
    text = " ".join(map(str, cmd))
    for piece in ("-m deepspeed.launcher.runner --num_gpus 1 --master_port 29555 launch/train.py",
                  "--config launch/configs/llava15_7b_sare.yaml",
                  "model.name_or_path=preset:llava-1.5-7b,text_layers=20",
                  "data.source=synthetic", "data.image_size=336", "optim.max_steps=8", "logging.log_every=1",
                  "output.export_hf=false", "distributed.ds_config=ds_configs/zero3_bf16.json", "method.name=sare"):
        assert piece in text
    # The overrides are valid for the training config tree.
    from sare_ds.config import load_config

    overrides = [c for c in map(str, cmd[cmd.index("--config") + 2:])]
    cfg = load_config(ROOT / gc.RECIPE, [o for o in overrides if not o.startswith("distributed.")])
    assert cfg.optim.max_steps == 8 and cfg.data.source == "synthetic" and cfg.method.name == "sare"
