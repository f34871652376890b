"""The first main job end to end: launch/train.py on the tiny model and generated scenes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TAGS = {"loss/pos", "loss/neg", "loss/sent", "sam/grad_norm_neg", "sam/eps_norm", "sam/sharpness_gap",
        "train/grad_norm", "train/lr", "perf/step_time_s", "perf/samples_per_s", "perf/tokens_per_s"}


def run_train(tiny_model_dir, run_dir, *overrides):
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, str(ROOT / "launch/train.py"), "--config", str(ROOT / "launch/configs/tiny_random.yaml"),
           f"model.name_or_path={tiny_model_dir}", f"output.run_dir={run_dir}", "optim.max_steps=4", "data.source=synthetic",
           "data.num_images=16", "logging.progress_bar=false", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_main_job_writes_the_run_directory(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(tiny_model_dir, run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {"config.yaml", "metrics.jsonl", "trainable.safetensors", "summary.json", "data.json", "tb"} <= {
        p.name for p in run_dir.iterdir()}
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert TAGS <= set(rows[0])
    assert all(r["sam/eps_norm"] == pytest.approx(0.05, rel=1e-5) for r in rows)
    # The trained weights are the projector's, and they moved.
    from transformers import LlavaForConditionalGeneration

    base = LlavaForConditionalGeneration.from_pretrained(tiny_model_dir).state_dict()
    trained = load_file(str(run_dir / "trainable.safetensors"))
    assert trained and all("multi_modal_projector" in k for k in trained)
    assert all(not torch.equal(trained[k], base[k]) for k in trained if k.endswith("weight"))
    # The resolved config re-loads to the same tree.
    from sare_ds.config import load_config

    cfg = load_config(run_dir / "config.yaml")
    assert cfg.output.run_dir == str(run_dir) and cfg.optim.max_steps == 4
    # TensorBoard events carry the same tags.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    assert TAGS <= set(acc.Tags()["scalars"])


def test_bad_config_fails_before_training(tiny_model_dir, tmp_path):
    proc = run_train(tiny_model_dir, tmp_path / "bad", "method.rho=-1")
    assert proc.returncode != 0
    assert "method.rho = -1" in proc.stderr and "Fix" in proc.stderr
    assert not (tmp_path / "bad").exists()


def test_nan_without_per_step_check_stops_at_the_logging_interval(tiny_model_dir, tmp_path):
    # lr = 1e30 blows the weights up in the first update, so the second step's losses are not
    # finite; with the per-step check off the run must still stop at the logging interval.
    proc = run_train(tiny_model_dir, tmp_path / "nan", "optim.check_finite=false", "optim.lr=1e30", "optim.max_lr=1e31",
                     "optim.optimizer=sgd", "optim.clip_grad_norm=0")
    assert proc.returncode != 0
    assert "non-finite metrics at step" in proc.stderr and "checkpoint" in proc.stderr
    summary = json.loads((tmp_path / "nan" / "summary.json").read_text())
    assert "may be corrupt" in summary["status"]
    assert not (tmp_path / "nan" / "trainable.safetensors").exists()


def test_nan_with_per_step_check_keeps_the_last_good_weights(tiny_model_dir, tmp_path):
    proc = run_train(tiny_model_dir, tmp_path / "nan", "optim.lr=1e30", "optim.max_lr=1e31", "optim.optimizer=sgd",
                     "optim.clip_grad_norm=0", "optim.max_steps=3")
    # Step 1's update blows the weights up; step 2's gradient is not finite and is refused.
    assert proc.returncode != 0 and "non-finite gradient norm" in proc.stderr
    summary = json.loads((tmp_path / "nan" / "summary.json").read_text())
    assert summary["status"].startswith("stopped: non-finite gradient, update refused")
    assert (tmp_path / "nan" / "trainable.safetensors").is_file()
