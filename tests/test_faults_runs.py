"""Runs that never lie (issue 13, part A): one run per directory, atomic checkpoints, resume checked
against the run that wrote the checkpoint, no code from checkpoint files, the learning rate bounded.

DeepSpeed runs here are ZeRO-2 in this process (world of one; ZeRO-3 would build models under zero.Init
while its config object lives); the other world size is a real 2-rank torchrun.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sare_ds.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
Z2 = "distributed.ds_config=ds_configs/zero2_cpu_fp32.json"
KILL_AT = 4  # the simulated kill: the 4th step raises (steps 1-3 logged, the checkpoint of step 2 committed)


def overrides(model_dir, run_dir, *extra) -> list[str]:
    return [f"model.name_or_path={model_dir}", f"output.run_dir={run_dir}", "optim.max_steps=4",
            "data.source=synthetic", "data.num_images=16", "data.captions_per_step=1", "logging.progress_bar=false",
            "output.export_hf=false", *extra]


def config(model_dir, run_dir, *extra):
    return load_config(ROOT / "launch/configs/tiny_random.yaml", overrides(model_dir, run_dir, *extra))


def train_here(model_dir, run_dir, *extra) -> Path:
    from sare_ds.train.trainer import train

    return train(config(model_dir, run_dir, *extra))


def steps_logged(run_dir: Path) -> list[int]:
    return [json.loads(l)["step"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


class SimulatedKill(RuntimeError):
    pass


@pytest.fixture(scope="module")
def distributed_here():
    """This process as a DeepSpeed world of one; the process group and the launcher variables
    init_distributed sets are taken down afterwards (later tests launch their own worlds)."""
    import torch.distributed as dist

    from sare_ds.dist import release_deepspeed_shm

    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.get(k) for k in keys}
    ours = not dist.is_initialized()
    yield
    if ours and dist.is_initialized():
        dist.destroy_process_group()
        release_deepspeed_shm(0)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def killed(tiny_model_dir, tmp_path_factory, distributed_here):
    """A ZeRO-2 run, checkpoint every 2 steps, killed in its 4th step. Returns (folder, summary.json's
    status as read during step 3)."""
    import sare_ds.train.trainer as trainer

    run_dir = tmp_path_factory.mktemp("killed") / "run"
    seen = {}

    class KilledStep(trainer.UnlearningStep):
        calls = 0

        def __call__(self, micro):
            KilledStep.calls += 1
            if KilledStep.calls == 3:
                seen["status"] = summary(run_dir)["status"]
            if KilledStep.calls == KILL_AT:
                raise SimulatedKill("simulated kill in step 4")
            return super().__call__(micro)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "UnlearningStep", KilledStep)
        with pytest.raises(SimulatedKill):
            train_here(tiny_model_dir, run_dir, Z2, "output.save_every=2")
    return run_dir, seen["status"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory, distributed_here):
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    return train_here(tiny_model_dir, run_dir, Z2, "output.save_every=2")


def copy_run(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------- status

def test_summary_says_running_during_the_run_and_failed_after_an_exception(killed):
    run_dir, status_during = killed
    assert status_during == "running"
    s = summary(run_dir)
    assert s["status"] == "failed: SimulatedKill: simulated kill in step 4", s
    assert s["step"] == 3 and s["method"] == "sare" and s["rank"] == 0  # the failing rank names itself
    assert steps_logged(run_dir) == [1, 2, 3]
    # data.json of a failed run is rewritten with the skip counts as they stood (generated captions are
    # tokenised alike on every rank: `skipped`; shards: this rank's own, `skipped_rank0`, below).
    data = json.loads((run_dir / "data.json").read_text())
    assert data["skipped"] == {} and "skipped_rank0" not in data
    from types import SimpleNamespace

    from sare_ds.train.trainer import _final_skips

    stream = SimpleNamespace(skipped={"truncated_shard": 3})
    assert _final_skips(stream, {"skipped": {}}, "shards", complete=False) == {"skipped_rank0": {"truncated_shard": 3}}
    assert not (run_dir / "trainable.safetensors").exists()  # weights of a failed run are not written
    identity = json.loads((run_dir / "run.json").read_text())["identity"]
    assert identity["world_size"] == 1 and identity["method"] == "sare"
    assert identity["data"] == {"source": "synthetic", "num_images": 16, "image_size": 32, "seed": 0,
                                "prompt_sha256": identity["data"]["prompt_sha256"]}
    # The checkpoint of step 2 committed: DeepSpeed's files, the RNG state as safetensors, the manifest, latest.
    tag = run_dir / "checkpoints" / "step0000002"
    manifest = json.loads((tag / "manifest.json").read_text())
    assert manifest["step"] == 2 and manifest["identity"] == identity
    assert set(manifest["files"]) == {p.name for p in tag.iterdir()} - {"manifest.json"}
    assert "rng_rank00000.safetensors" in manifest["files"] and not list(tag.glob("rng_*.pt"))
    assert (run_dir / "checkpoints" / "latest").read_text() == "step0000002"


# --------------------------------------------------------------------------- run folder

def test_rerun_into_a_finished_run_is_refused_and_overwrite_leaves_no_old_file(killed, tiny_model_dir, tmp_path):
    from sare_ds.train.runs import RunDirError

    run_dir = copy_run(killed[0], tmp_path)
    before = sorted(p.name for p in run_dir.rglob("*"))
    with pytest.raises(RunDirError, match=r"holds a run \(summary.json: status 'failed: SimulatedKill.*output\.overwrite "
                                          r"is false.*Fix: choose a new output.run_dir, set output.overwrite=true"):
        train_here(tiny_model_dir, run_dir)
    assert sorted(p.name for p in run_dir.rglob("*")) == before  # untouched
    # overwrite=true: a plain (no DeepSpeed) run of 2 steps replaces the DeepSpeed run entirely.
    train_here(tiny_model_dir, run_dir, "output.overwrite=true", "optim.max_steps=2")
    assert not (run_dir / "checkpoints").exists()
    assert steps_logged(run_dir) == [1, 2]
    assert len(list((run_dir / "tb").iterdir())) == 1
    assert summary(run_dir)["status"] == "completed" and summary(run_dir)["steps"] == 2
    assert json.loads((run_dir / "run.json").read_text())["resumed"] == []
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(
        ["config.yaml", "run.json", "summary.json", "metrics.jsonl", "data.json", "trainable.safetensors", "tb"])


def test_overwrite_refuses_folders_a_run_did_not_write(tiny_model_dir, tmp_path):
    from sare_ds.train.runs import RunDirError

    other = tmp_path / "notes"
    other.mkdir()
    (other / "thesis.tex").write_text("x")
    with pytest.raises(RunDirError, match=r"holds no sare_ds training run .*does not empty other folders"):
        train_here(tiny_model_dir, other, "output.overwrite=true")
    assert (other / "thesis.tex").is_file()
    # Another trainer's run folder (its own config.yaml, checkpoints/, tb/, metrics.jsonl): not sare_ds's, kept.
    foreign = tmp_path / "other_trainer"
    (foreign / "checkpoints").mkdir(parents=True)
    (foreign / "tb").mkdir()
    (foreign / "config.yaml").write_text("lr: 0.1\n")
    (foreign / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(RunDirError, match=r"holds no sare_ds training run"):
        train_here(tiny_model_dir, foreign, "output.overwrite=true")
    assert sorted(p.name for p in foreign.iterdir()) == ["checkpoints", "config.yaml", "metrics.jsonl", "tb"]
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "summary.json").write_text('{"status": "completed", "method": "sare"}')
    (mixed / ".summary.json.tmp4242").write_text("x")  # a killed writer's temporary file is the run's, not foreign
    (mixed / "eval_notes.md").write_text("x")
    with pytest.raises(RunDirError, match=r"files a training run does not write \(eval_notes.md\)"):
        train_here(tiny_model_dir, mixed, "output.overwrite=true")
    assert sorted(p.name for p in mixed.iterdir()) == [".summary.json.tmp4242", "eval_notes.md", "summary.json"]


def test_overwrite_defaults_to_false():
    assert load_config(None, []).output.overwrite is False


# --------------------------------------------------------------------------- resume

def test_resume_after_a_kill_skips_the_incomplete_checkpoint_and_repeats_no_step(killed, uninterrupted, tiny_model_dir,
                                                                                 tmp_path, caplog):
    run_dir = copy_run(killed[0], tmp_path)
    # An earlier attempt's final weights are not this run's result: resume drops them, evaluation refuses
    # a run whose summary says running or failed.
    (run_dir / "trainable.safetensors").write_bytes(b"stale")
    from sare_ds.eval.weights import load_method_model

    with pytest.raises(ValueError, match=r"summary.json says the run is 'failed: SimulatedKill"):
        load_method_model(run_dir)
    # A kill while checkpoint 3 was written: DeepSpeed's files there, no manifest.
    partial = run_dir / "checkpoints" / "step0000003"
    partial.mkdir()
    for f in (run_dir / "checkpoints" / "step0000002").glob("*.pt"):
        shutil.copy(f, partial / f.name)
    with caplog.at_level(logging.WARNING, logger="sare_ds.train"):
        train_here(tiny_model_dir, run_dir, Z2, "output.save_every=2", "output.resume=true", "logging.log_every=1")
    assert any("step0000003 skipped: incomplete: no manifest.json" in r.getMessage() for r in caplog.records)
    assert steps_logged(run_dir) == [1, 2, 3, 4]
    s = summary(run_dir)
    assert s["status"] == "completed" and s["resumed_from_step"] == 2
    resumed = json.loads((run_dir / "run.json").read_text())["resumed"]
    assert resumed[-1]["step"] == 2 and resumed[-1]["skipped"][0][0] == "step0000003"
    assert (run_dir / "checkpoints" / "latest").read_text() == "step0000004"
    # TensorBoard: every step once (the events of step 3 before the kill are purged).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss/pos")] == [1, 2, 3, 4]
    # The same weights and losses as the run that was never killed (RNG and data position restored).
    from safetensors.torch import load_file

    want, got = load_file(str(uninterrupted / "trainable.safetensors")), load_file(str(run_dir / "trainable.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(l) for l in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss/pos"] for r in rows] == [r["loss/pos"] for r in ref]


def test_resume_with_a_changed_config_is_refused_naming_the_fields(killed, tiny_model_dir, tmp_path):
    from sare_ds.train.checkpoint import CheckpointError

    run_dir = copy_run(killed[0], tmp_path)
    with pytest.raises(CheckpointError) as err:
        train_here(tiny_model_dir, run_dir, Z2, "output.save_every=2", "output.resume=true", "method.name=efuf",
                   "optim.lr=0.002")
    msg = str(err.value)
    assert "step0000002 was written with another config" in msg
    assert "method.name: 'sare' -> 'efuf'" in msg and "optim.lr: 0.001 -> 0.002" in msg
    assert "only output/logging fields may change" in msg
    assert summary(run_dir)["status"].startswith("failed: SimulatedKill")  # the folder is left as it was
    assert "name: sare" in (run_dir / "config.yaml").read_text()


def test_resume_with_another_world_size_is_refused_clearly(killed, tiny_model_dir, tmp_path):
    run_dir = copy_run(killed[0], tmp_path)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port", str(port),
           str(ROOT / "launch/train.py"), "--config", str(ROOT / "launch/configs/tiny_random.yaml"),
           *overrides(tiny_model_dir, run_dir, Z2, "output.save_every=2"), "--resume"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    errors = [l for l in proc.stderr.splitlines() if l.startswith("launch/train.py: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "written by 1 ranks and this run has 2" in errors[0]
    assert "ZeRO partitions the optimizer state" in errors[0] and "resume with 1 ranks" in errors[0]
    assert summary(run_dir)["status"].startswith("failed: SimulatedKill")


def _manifest(tag_dir: Path, step: int, files: dict[str, bytes]) -> None:
    import hashlib

    for name, data in files.items():
        (tag_dir / name).write_bytes(data)
    entries = {n: {"size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in files.items()}
    (tag_dir / "manifest.json").write_text(json.dumps(
        {"format": "sare_ds checkpoint v1", "tag": tag_dir.name, "step": step, "world_size": 2, "files": entries}))


def test_newest_complete_checkpoint_is_found_and_incomplete_ones_are_named(tmp_path):
    from sare_ds.train.checkpoint import CheckpointError, find_checkpoint, verify_checkpoint

    ckpt = tmp_path / "checkpoints"
    files = {"zero_pp_rank_0_mp_rank_00_optim_states.pt": b"a" * 10, "zero_pp_rank_1_mp_rank_00_optim_states.pt": b"b" * 10}
    for step in (3, 4, 5, 6, 7):
        (ckpt / f"step{step:07d}").mkdir(parents=True)
        _manifest(ckpt / f"step{step:07d}", step, files)
    (ckpt / "step0000007" / "manifest.json").unlink()  # killed before its manifest
    (ckpt / "step0000006" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()  # a rank file missing
    (ckpt / "step0000005" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"a" * 4)  # truncated
    (ckpt / "step0000004" / "manifest.json").write_text('{"format": "sare_ds checkpoint v1", "tag": "step00')  # torn
    (ckpt / "latest").write_text("step0000007")  # advisory only
    found = find_checkpoint(tmp_path)
    assert found.tag == "step0000003" and found.manifest["step"] == 3
    reasons = dict(found.skipped)
    assert list(reasons) == ["step0000007", "step0000006", "step0000005", "step0000004"]
    assert "no manifest.json" in reasons["step0000007"]
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt, listed in its manifest, is missing" in reasons["step0000006"]
    assert "has 4 bytes, its manifest says 10" in reasons["step0000005"]
    assert "not readable JSON" in reasons["step0000004"]
    verify_checkpoint(tmp_path, found.tag, found.manifest)
    # Same size, other bytes: changed after the commit, refused rather than skipped.
    (ckpt / "step0000003" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"c" * 10)
    with pytest.raises(CheckpointError, match=r"the sha256 of zero_pp_rank_1_mp_rank_00_optim_states.pt does not match the one recorded"):
        verify_checkpoint(tmp_path, found.tag, found.manifest)
    # A file added after the commit (e.g. a planted pickle) is refused: a loader might read it.
    (ckpt / "step0000003" / "mp_rank_01_model_states.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"holds mp_rank_01_model_states.pt, not listed in its manifest.json"):
        find_checkpoint(tmp_path)


def test_resume_without_a_complete_checkpoint_names_what_was_skipped(tiny_model_dir, tmp_path, distributed_here):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step0000002").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text("")  # DeepSpeed's empty `latest`: once a bare AssertionError
    with pytest.raises(FileNotFoundError, match=r"has no complete checkpoint to resume from \(skipped as incomplete: "
                                                r"step0000002: incomplete: no manifest.json"):
        train_here(tiny_model_dir, run_dir, Z2, "output.resume=true")


# --------------------------------------------------------------------------- no code from files

class _Planted:
    """Unpickling this creates the marker file (what a malicious checkpoint would do, harmlessly)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_weights_only_loads_refuse_a_planted_pickle(tmp_path):
    from sare_ds.train.checkpoint import UnsafeCheckpointError, weights_only_loads

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"module": _Planted(marker)}, path)
    with weights_only_loads():
        with pytest.raises(UnsafeCheckpointError, match=r"evil.pt: refused to load: .*Unsupported global: GLOBAL (io|builtins).open"):
            torch.load(path, map_location="cpu", weights_only=False)  # what DeepSpeed asks for
    assert not marker.exists()
    assert torch.load is not None and "guarded" not in getattr(torch.load, "__name__", "")  # restored


def test_planted_pickle_in_a_checkpoint_is_not_executed(killed, tiny_model_dir, tmp_path):
    """The attacker rewrites the manifest too (sha256 and size match): the weights-only load still refuses."""
    import hashlib

    from sare_ds.train.checkpoint import UnsafeCheckpointError

    run_dir = copy_run(killed[0], tmp_path)
    marker = tmp_path / "pwned"
    tag = run_dir / "checkpoints" / "step0000002"
    target = tag / "mp_rank_00_model_states.pt"
    torch.save({"module": _Planted(marker), "step": 2}, target)
    manifest = json.loads((tag / "manifest.json").read_text())
    data = target.read_bytes()
    manifest["files"][target.name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (tag / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UnsafeCheckpointError, match=r"mp_rank_00_model_states.pt: refused to load"):
        train_here(tiny_model_dir, run_dir, Z2, "output.save_every=2", "output.resume=true")
    assert not marker.exists()
    assert summary(run_dir)["status"].startswith("failed: UnsafeCheckpointError: ")


def test_no_torch_load_without_weights_only_in_sare_ds():
    offenders = []
    for path in (ROOT / "sare_ds").rglob("*.py"):
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(", text):
            call = text[m.start(): text.find("\n", text.find(")", m.start()))]
            if "weights_only=True" not in call and path.name != "checkpoint.py":
                offenders.append(f"{path.relative_to(ROOT)}: {call.strip()[:80]}")
    assert offenders == []


# --------------------------------------------------------------------------- learning rate, messages

@pytest.mark.parametrize("lr, needle", [
    ("inf", "optim.lr = inf is invalid: must be a finite number"),
    (".nan", "optim.lr = nan is invalid: must be a finite number"),
    ("1e30", "optim.lr = 1e+30 is invalid: must be at most optim.max_lr = 1"),
    ("1e39", "optim.lr = 1e+39 is invalid: must be at most optim.max_lr = 1"),
])
def test_learning_rate_must_be_finite_and_bounded(lr, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"optim.lr={lr}"])
    assert needle in str(err.value) and "Fix:" in str(err.value)


def test_max_lr_is_the_override_for_unusual_optimizers():
    assert load_config(None, ["optim.optimizer=sgd", "optim.lr=20", "optim.max_lr=50"]).optim.lr == 20
    with pytest.raises(ConfigError, match="optim.max_lr = inf is invalid: must be a finite number"):
        load_config(None, ["optim.lr=20", "optim.max_lr=inf"])


def test_non_finite_metrics_with_the_check_on_say_what_happened(tiny_model_dir, tmp_path, monkeypatch):
    """The per-step check saw finite gradients, yet a logged value is not finite: the message must not
    blame optim.check_finite=false (it is on)."""
    import sare_ds.train.trainer as trainer

    class InfStep(trainer.UnlearningStep):
        def __call__(self, micro):
            out = super().__call__(micro)
            return {**out, "loss/pos": torch.tensor(float("inf"))}

    monkeypatch.setattr(trainer, "UnlearningStep", InfStep)
    run_dir = tmp_path / "run"
    with pytest.raises(trainer.NonFiniteError) as err:
        train_here(tiny_model_dir, run_dir, "optim.max_steps=2")
    msg = str(err.value)
    assert "check_finite=false" not in msg and "although every gradient norm was finite" in msg
    assert "loss/pos" in msg
    assert summary(run_dir)["status"].startswith("stopped: non-finite metrics although every gradient was finite")
    assert not (run_dir / "trainable.safetensors").exists()


def test_data_fingerprint_of_shards_names_what_changed(tmp_path):
    from sare_ds.train.runs import _data_differences, data_fingerprint

    curated = tmp_path / "curated"
    curated.mkdir()
    (curated / "manifest.json").write_text(json.dumps(
        {"format": "captions", "shards": [{"name": "cap-000000.tar", "count": 1}, {"name": "cap-000001.tar", "count": 1}]}))
    for name in ("cap-000000.tar", "cap-000001.tar"):
        (curated / name).write_bytes(b"x" * 1024)
    cfg = load_config(None, [f"data.shards={curated}"])
    before = data_fingerprint(cfg)
    assert before["source"] == "shards" and set(before["manifests"]) == {str(curated)}
    assert [s["size"] for s in before["shards"]] == [1024, 1024]
    assert data_fingerprint(cfg) == before and _data_differences(before, before) == []
    (curated / "cap-000001.tar").write_bytes(b"x" * 512)  # truncated
    changed = _data_differences(before, data_fingerprint(cfg))
    assert changed == [f"shards changed (1: {curated / 'cap-000001.tar'}; missing, added or of another size)"]


def test_the_deepspeed_json_contents_belong_to_the_run(tmp_path):
    """Editing the ds_config file between save and resume changes what is trained: the comparable config
    holds its contents, so the resume check names the edited key."""
    from sare_ds.train.runs import comparable_config, config_differences

    path = tmp_path / "zero2.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": 5e8}}))
    cfg = load_config(None, [f"distributed.ds_config={path}"])
    before = comparable_config(cfg)
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": 5e7}}))
    diff = config_differences(before, comparable_config(cfg))
    assert diff == ["ds_config_file.zero_optimization.reduce_bucket_size: 500000000.0 -> 50000000.0"]


def test_a_shard_run_writes_its_exact_skip_counts(tiny_model_dir, tmp_path):
    """A training run on caption shards with corrupt records (data.skip_corrupt): data.json and summary.json
    hold the stream's final counts, each corrupt record once, however often top-ups re-read it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("faults_data", Path(__file__).with_name("test_faults_data.py"))
    faults_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(faults_data)
    shards = tmp_path / "curated"
    faults_data.write_captions(shards, [8, 8], corrupt_every=4)  # 4 corrupt records of 16
    run_dir = train_here(tiny_model_dir, tmp_path / "run", "data.source=shards", f"data.shards={shards}",
                         "data.skip_corrupt=true", "optim.max_steps=0", "optim.epochs=2", "method.name=efuf",
                         "data.captions_per_step=2")
    data = json.loads((run_dir / "data.json").read_text())
    assert data["skipped"]["corrupt_member"] == 4, data["skipped"]
    assert summary(run_dir)["status"] == "completed"
    assert summary(run_dir)["skipped"] == data["skipped"]
