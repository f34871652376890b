"""DeepSpeed ZeRO paths against the single-process reference (CPU, gloo, 2 ranks).

Every distributed run here goes through `launch/train.py` exactly as a user starts it
(deepspeed / torchrun / mpirun / two "nodes" over loopback); the reference is the same
config trained in one process with PlainParameterSpace and the accumulation that makes
the steps identical (2 ranks x 1 micro-batch == 1 process x 2 micro-batches).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sare_ds.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STEPS = 4
LOSSES = ("loss/pos", "loss/neg", "loss/sent")
Z3 = "distributed.ds_config=ds_configs/zero3_cpu_fp32.json"
Z2 = "distributed.ds_config=ds_configs/zero2_cpu_fp32.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def common(model_dir, run_dir, *extra) -> list[str]:
    return ["--config", str(ROOT / "launch/configs/tiny_random.yaml"), f"model.name_or_path={model_dir}",
            f"output.run_dir={run_dir}", f"optim.max_steps={STEPS}", "data.source=synthetic", "data.num_images=16",
            # One caption per micro-batch: half the generated captions have no neg span, so ranks meet
            # micro-batches with nothing for SARE's neg passes (lockstep) and uneven span counts (pooled means).
            "data.captions_per_step=1", "logging.progress_bar=false", *extra]


def env() -> dict:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (proc.stdout[-2000:] + proc.stderr[-6000:])


def launch(kind: str, args: list[str], nproc: int = 2) -> None:
    train = str(ROOT / "launch/train.py")
    port = str(free_port())
    if kind == "deepspeed":
        cmd = [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", port, train, *args]
    elif kind == "torchrun":
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", port, train, *args]
    elif kind == "mpirun":
        cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(nproc), "-x", "DS_ACCELERATOR",
               "-x", "OMP_NUM_THREADS", "-x", f"MASTER_PORT={port}", sys.executable, train, *args]
    else:
        raise ValueError(kind)
    check(subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600))


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir) / "trainable.safetensors"))


def assert_same_run(a: Path, b: Path, rtol: float = 1e-5) -> None:
    ra, rb = metrics(a), metrics(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == list(range(1, STEPS + 1))
    for x, y in zip(ra, rb):
        for k in LOSSES:
            if k in x:
                assert y[k] == pytest.approx(x[k], rel=rtol), (k, x["step"])
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        rel = ((wa[k].double() - wb[k].double()).norm() / wa[k].double().norm()).item()
        assert rel <= rtol, (k, rel)


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    """Single-process runs (no DeepSpeed) per method, 2 micro-batches per step."""
    from sare_ds.train.trainer import train

    out = {}
    for method in ("sare", "efuf", "ft"):
        run_dir = tmp_path_factory.mktemp(f"ref-{method}")
        args = common(tiny_model_dir, run_dir, f"method.name={method}", "optim.grad_accum_steps=2")
        cfg = load_config(args[1], args[2:])
        train(cfg)
        out[method] = run_dir
    return out


@pytest.fixture(scope="module")
def sare_zero3(tiny_model_dir, tmp_path_factory):
    """SARE, ZeRO-3 fp32, 2 ranks, through the `deepspeed` launcher, checkpoint every 2 steps."""
    run_dir = tmp_path_factory.mktemp("z3-sare")
    launch("deepspeed", common(tiny_model_dir, run_dir, Z3, "output.save_every=2"))
    return run_dir


def test_sare_zero3_two_ranks_matches_single_process(reference, sare_zero3):
    assert_same_run(reference["sare"], sare_zero3)
    row = metrics(sare_zero3)[0]
    for tag in ("sam/grad_norm_neg", "sam/eps_norm", "sam/sharpness_gap", "train/grad_norm", "train/lr",
                "perf/step_time_s", "perf/samples_per_s", "perf/tokens_per_s", "perf/phase/theta",
                "perf/phase/perturb", "perf/phase/neg_at_eps", "perf/phase/restore", "perf/phase/optimizer_step"):
        assert tag in row, tag
    assert row["sam/eps_norm"] == pytest.approx(0.05, rel=1e-5)
    ref_row = metrics(reference["sare"])[0]
    for k in ("sam/grad_norm_neg", "sam/sharpness_gap", "train/grad_norm"):
        assert row[k] == pytest.approx(ref_row[k], rel=1e-4, abs=1e-7), k
    assert json.loads((sare_zero3 / "summary.json").read_text())["world_size"] == 2


def test_sare_zero3_separate_passes_match_single_process(reference, tiny_model_dir, tmp_path):
    """distributed.zero3_shared_forward=false: the three-pass schedule (no direction buffer)."""
    launch("deepspeed", common(tiny_model_dir, tmp_path, Z3, "distributed.zero3_shared_forward=false"))
    assert_same_run(reference["sare"], tmp_path)
    row = metrics(tmp_path)[0]
    assert {"perf/phase/neg_at_theta", "perf/phase/capability"} <= set(row) and "perf/phase/theta" not in row


@pytest.mark.parametrize("method", ["efuf", "ft"])
def test_efuf_and_ft_zero3_match_single_process(reference, tiny_model_dir, tmp_path, method):
    launch("torchrun", common(tiny_model_dir, tmp_path, Z3, f"method.name={method}", "output.export_hf=false"))
    assert_same_run(reference[method], tmp_path)


def test_world_size_one_equals_two(sare_zero3, tiny_model_dir, tmp_path):
    launch("torchrun", common(tiny_model_dir, tmp_path, Z3, "optim.grad_accum_steps=2", "output.export_hf=false"),
           nproc=1)
    assert_same_run(sare_zero3, tmp_path)


def test_gradient_checkpointing_zero3_equals_plain_backward(sare_zero3, tiny_model_dir, tmp_path):
    """ZeRO-3 on 2 ranks: the SARE step with gradient checkpointing (recomputes gather the partitions
    again, also inside the perturbed pass) == without, fp32, to 1e-6."""
    launch("torchrun", common(tiny_model_dir, tmp_path, Z3, "model.gradient_checkpointing=true",
                              "output.export_hf=false"))
    assert load_config(tmp_path / "config.yaml").model.gradient_checkpointing
    assert_same_run(sare_zero3, tmp_path, rtol=1e-6)


def test_zero2_equals_zero3(sare_zero3, tiny_model_dir, tmp_path):
    launch("torchrun", common(tiny_model_dir, tmp_path, Z2, "output.export_hf=false"))
    assert_same_run(sare_zero3, tmp_path)


@pytest.mark.parametrize("persistence", [0, 100000])
def test_hpz_sare_equals_zero3(sare_zero3, tiny_model_dir, tmp_path, persistence):
    """ZeRO++ hierarchical partitioning: forwards gather from a secondary partition that DeepSpeed renews
    only at the optimizer step, so SARE must make the perturbed forward read theta + eps* (all weights
    partitioned: persistence 0; the tiny projector persistent: 1e5)."""
    ds = json.loads((ROOT / "ds_configs/zero3_cpu_fp32.json").read_text())
    ds["zero_optimization"].update({"zero_hpz_partition_size": 2, "stage3_param_persistence_threshold": persistence})
    path = tmp_path / "zero3_hpz.json"
    path.write_text(json.dumps(ds))
    run_dir = tmp_path / "run"
    launch("deepspeed", common(tiny_model_dir, run_dir, f"distributed.ds_config={path}", "output.export_hf=false"))
    assert_same_run(sare_zero3, run_dir)


def test_resume_equals_uninterrupted(sare_zero3, tiny_model_dir, tmp_path):
    # Killed while checkpoint 4 was being written (its rank files there, no manifest yet) and before the end
    # of the run: resume skips it, takes the committed checkpoint of step 2 and continues to step 4 on 2 ranks.
    run_dir = tmp_path / "run"
    shutil.copytree(sare_zero3, run_dir)
    (run_dir / "checkpoints" / "step0000004" / "manifest.json").unlink()
    for name in ("trainable.safetensors", "summary.json", "hf"):
        shutil.rmtree(run_dir / name) if (run_dir / name).is_dir() else (run_dir / name).unlink()
    launch("torchrun", common(tiny_model_dir, run_dir, Z3, "output.save_every=2", "--resume", "output.export_hf=false"))
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3, 4]  # steps 3-4 logged once
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from_step"] == 2
    want, got = weights(sare_zero3), weights(run_dir)
    for k in want:
        assert torch.equal(want[k], got[k]), k


def test_mpirun_path(reference, tiny_model_dir, tmp_path):
    if shutil.which("mpirun") is None:
        pytest.fail("mpirun missing: launch/setup_env.sh installs openmpi-bin")
    launch("mpirun", common(tiny_model_dir, tmp_path, Z3, "output.export_hf=false"))
    assert_same_run(reference["sare"], tmp_path)


@pytest.mark.parametrize("kind", ["torchrun", "mpirun"])
def test_refused_run_dir_stops_every_rank(tiny_model_dir, tmp_path, kind):
    """A refusal found on rank 0 (an existing run directory) stops all ranks at once with one line,
    under torchrun and under mpirun (no rank is left waiting in a collective)."""
    (tmp_path / "old.txt").write_text("a previous run")
    args = common(tiny_model_dir, tmp_path, Z3, "output.overwrite=false")
    port = str(free_port())
    train = str(ROOT / "launch/train.py")
    cmd = ([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", port, train, *args] if kind == "torchrun"
           else ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", "-x", "DS_ACCELERATOR", "-x",
                 "OMP_NUM_THREADS", "-x", f"MASTER_PORT={port}", sys.executable, train, *args])
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    errors = [l for l in proc.stderr.splitlines() if l.startswith("launch/train.py: error:")]
    assert len(errors) == 1 and "output.overwrite is false" in errors[0], proc.stderr[-3000:]
    assert "sare_ds/" not in proc.stderr  # no traceback through sare_ds (torchrun prints its own on exit 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.txt"]  # nothing written


def test_two_nodes_over_loopback(reference, tiny_model_dir, tmp_path):
    port = str(free_port())
    procs = [subprocess.Popen(
        [str(BIN / "torchrun"), "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1",
         "--master_addr", "127.0.0.1", "--master_port", port, str(ROOT / "launch/train.py"),
         *common(tiny_model_dir, tmp_path, Z3, "output.export_hf=false")],
        cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-4000:]
    assert_same_run(reference["sare"], tmp_path)


def test_bf16_zero3_within_bf16_tolerance(reference, tiny_model_dir, tmp_path):
    launch("torchrun", common(tiny_model_dir, tmp_path, Z3, "model.dtype=bfloat16", "output.export_hf=false"))
    ref, got = metrics(reference["sare"]), metrics(tmp_path)
    for x, y in zip(ref, got):
        for k in LOSSES:
            assert y[k] == pytest.approx(x[k], rel=2e-2), (k, x["step"])
    w_ref, w_got = weights(reference["sare"]), weights(tmp_path)
    assert all(w_got[k].dtype == torch.bfloat16 for k in w_got)
    # Over all trained weights together: AdamW's normalised update can flip the sign of a
    # near-zero gradient element under bf16, which a tiny zero-initialised bias alone magnifies.
    ref = torch.cat([w_ref[k].flatten() for k in sorted(w_ref)])
    got = torch.cat([w_got[k].float().flatten() for k in sorted(w_ref)])
    assert ((ref - got).norm() / ref.norm()).item() < 1e-2


def test_perturb_restore_bit_identical_on_every_rank(tiny_model_dir, tmp_path):
    port = str(free_port())
    check(subprocess.run(
        [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", port, str(ROOT / "tests/zero_worker.py"),
         str(tiny_model_dir), str(tmp_path)], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600))
    for rank in (0, 1):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert [r["persistent"] for r in results] == [4, 0, 0]  # projector kept whole / partitioned
        assert [r["shared"] for r in results] == [True, True, False]  # the shared forward, the separate passes
        for r in results:
            # The direction buffer: one rank's gradient partition (half the trainable elements on 2 ranks, up
            # to one padding element a tensor), none for the separate passes.
            if r["shared"]:
                assert r["direction_numel"] == r["flat_numel"]
                assert 2 * r["direction_numel"] <= r["trainable_numel"] + 2 * r["trainable_tensors"]
            else:
                assert r["direction_numel"] == 0
        for r in results:
            assert r["perturbed_differs"] and r["restored_identical"] and r["persistent_gathered"], r
            assert r["raised"] and r["after_exception_identical"], r


def test_hf_export_loads_without_sare_ds(sare_zero3):
    # Only this machine's torchvision trap is worked around here (see docs/install.md); sare_ds is not imported.
    script = f"""
import sys, torch
try:
    import torchvision  # noqa
except Exception:
    lib = torch.library.Library("torchvision", "DEF")
    for n in ("nms", "qnms"):
        lib.define(n + "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
from transformers import AutoProcessor, LlavaForConditionalGeneration
from safetensors.torch import load_file
m = LlavaForConditionalGeneration.from_pretrained({str(sare_zero3 / 'hf')!r})
AutoProcessor.from_pretrained({str(sare_zero3 / 'hf')!r})
sd = m.state_dict()
trained = load_file({str(sare_zero3 / 'trainable.safetensors')!r})
assert trained and all(torch.equal(sd[k], v) for k, v in trained.items())
assert "sare_ds" not in sys.modules
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd="/", env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


# ------------------------------------------------------------------ config generation

def test_ds_config_is_generated_from_the_training_config():
    from sare_ds.train.ds_config import build_ds_config

    cfg = load_config(None, [Z3, "optim.clip_grad_norm=0.5", "data.sent_per_step=2", "model.dtype=bfloat16"])
    ds = build_ds_config(cfg, world_size=4, on_gpu=False)
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["train_batch_size"] == 16
    assert ds["gradient_accumulation_steps"] == 1 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["optimizer"]["params"]["lr"] == cfg.optim.lr and ds["optimizer"]["params"]["weight_decay"] == 0.05


def _with(tmp_path, **changes) -> str:
    ds = json.loads((ROOT / "ds_configs/zero3_cpu_fp32.json").read_text())
    for key, value in changes.items():
        if key == "stage":
            ds["zero_optimization"]["stage"] = value
        else:
            ds[key] = value
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    return str(path)


@pytest.mark.parametrize("changes, needle", [
    ({"gradient_clipping": 0.3}, "gradient_clipping"),
    ({"train_micro_batch_size_per_gpu": 8}, "train_micro_batch_size_per_gpu"),
    ({"gradient_accumulation_steps": 4}, "optim.grad_accum_steps"),
    ({"stage": 1}, "stage = 1 is not supported"),
    ({"optimizer": {"type": "Adam"}}, "optimizer"),
])
def test_ds_config_mismatches_are_errors(tmp_path, changes, needle):
    from sare_ds.train.ds_config import build_ds_config

    cfg = load_config(None, [f"distributed.ds_config={_with(tmp_path, **changes)}"])
    with pytest.raises(ConfigError, match=needle):
        build_ds_config(cfg, world_size=2, on_gpu=False)


def test_shipped_ds_configs_all_build():
    from sare_ds.train.ds_config import build_ds_config

    for path in sorted((ROOT / "ds_configs").glob("*.json")):
        cfg = load_config(None, [f"distributed.ds_config={path}", "model.dtype=bfloat16"])
        ds = build_ds_config(cfg, world_size=8, on_gpu=True)
        assert ds["gradient_clipping"] == cfg.optim.clip_grad_norm, path.name


def test_zero3_sharded_generation_equals_plain(sare_zero3, tmp_path):
    """Evaluation with the model partitioned over 2 ranks (ZeRO-3, synced generation) gives the
    same greedy captions and metrics as the plain single-process model."""
    args = [str(ROOT / "launch/evaluate.py"), "--run", f"sare={sare_zero3}", "--scenes", str(tmp_path / "scenes"),
            "--scene-images", "6", "--max-new-tokens", "10", "--perplexity", "false"]
    check(subprocess.run([sys.executable, *args, "--out", str(tmp_path / "plain")], cwd=ROOT, env=env(),
                         capture_output=True, text=True, timeout=600))
    check(subprocess.run([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), *args,
                          "--synced-gpus", "true", "--out", str(tmp_path / "zero3")],
                         cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600))
    plain = (tmp_path / "plain" / "sare" / "captions.jsonl").read_text().splitlines()
    zero3 = (tmp_path / "zero3" / "sare" / "captions.jsonl").read_text().splitlines()
    assert len(plain) == 6 and plain == zero3
    a = json.loads((tmp_path / "plain" / "sare" / "eval.json").read_text())
    b = json.loads((tmp_path / "zero3" / "sare" / "eval.json").read_text())
    for key in ("CHAIR_S", "CHAIR_I", "num_mentions", "BLEU-4"):
        if key in a["captions"]:
            assert a["captions"][key] == b["captions"][key], key
    assert a["pope"]["mean"] == b["pope"]["mean"]


def test_a_refused_update_on_two_ranks_keeps_the_stop_status(tiny_model_dir, tmp_path):
    """Every rank meets the non-finite gradient alike; summary.json keeps the stop's status (no rank writes a
    `failed` over it) and the last good weights are saved."""
    port = str(free_port())
    args = common(tiny_model_dir, tmp_path, Z3, "optim.lr=1e30", "optim.max_lr=1e31", "optim.optimizer=sgd",
                  "optim.clip_grad_norm=0", "optim.max_steps=3", "output.export_hf=false")
    proc = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", port,
                           str(ROOT / "launch/train.py"), *args], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode != 0 and "non-finite gradient norm" in proc.stderr, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"].startswith("stopped: non-finite gradient, update refused"), summary
    assert "rank" not in summary and (tmp_path / "trainable.safetensors").is_file()
