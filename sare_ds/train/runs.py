"""A run directory belongs to one run: its identity, its status from the first moment, and the rules
for writing into a folder that already holds something (docs/runs.md).

    identity = run_identity(cfg, world_size)       # config hash, method, world size, data fingerprint
    resume = prepare_run_dir(cfg, info, identity)   # refuse / clear / pick the checkpoint; rank 0 writes
                                                    # config.yaml, run.json and summary.json "running"

The identity's config is the resolved tree without the fields that do not change what is trained
(VOLATILE_SECTIONS: where and how the run writes, how it logs); a resume must match it exactly.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from sare_ds.config import TrainConfig, save_config, to_dict
from sare_ds.dist import DistInfo, broadcast_object
from sare_ds.train import checkpoint as ckpt_mod
from sare_ds.train.checkpoint import CHECKPOINTS, CheckpointError, write_atomic

log = logging.getLogger("sare_ds.train")

VOLATILE_SECTIONS = ("output", "logging")
"""Config sections a resume may change: where and how a run writes and logs, not what it trains."""
RUN_FILES = ("config.yaml", "run.json", "summary.json", "metrics.jsonl", "data.json", "trainable.safetensors",
             "tb", "hf", CHECKPOINTS)
"""Everything a training run writes into its directory."""
RUN_MARKERS = ("config.yaml", "summary.json", "run.json")
"""The files by which a folder may be a training run's (`is_sare_run` reads them)."""
_TMP = re.compile(r"^\..+\.tmp\d+$")  # write_atomic's temporary file, left by a killed writer
RUNNING = "running"


class RunDirError(FileExistsError):
    """output.run_dir cannot be used as asked; the message names the folder, the reason and the fix."""


# ------------------------------------------------------------------------------ identity

def comparable_config(cfg: TrainConfig) -> dict:
    """The config a resume must match: every section but output/logging, and the DeepSpeed JSON's
    contents (`ds_config_file`: editing the file between save and resume changes the run too)."""
    out = {k: v for k, v in to_dict(cfg).items() if k not in VOLATILE_SECTIONS}
    if cfg.distributed.ds_config:
        try:
            out["ds_config_file"] = json.loads(Path(cfg.distributed.ds_config).read_text())
        except (OSError, ValueError):
            out["ds_config_file"] = f"<unreadable: {cfg.distributed.ds_config}>"
    return out


def config_hash(comparable: dict) -> str:
    return hashlib.sha256(json.dumps(comparable, sort_keys=True, default=str).encode()).hexdigest()


def shard_spec(shards: str, allow_remote: bool = False) -> list[str]:
    """data.shards as the shard reader takes it: brace patterns expanded before the list is cut at its
    commas, each expanded name checked for being remote (sare_ds.data.shards.shard_list)."""
    from sare_ds.data.shards import shard_list

    return shard_list(shards, allow_remote=allow_remote)


def data_fingerprint(cfg: TrainConfig) -> dict:
    """What the run reads: the synthetic source's parameters, or each shard's path and size and the sha256 of
    each curation manifest (the shards' contents are not hashed: they may be hundreds of GB)."""
    d = cfg.data
    if d.source == "synthetic":
        return {"source": "synthetic", "num_images": d.num_images, "image_size": d.image_size,
                "prompt_sha256": hashlib.sha256(d.prompt.encode()).hexdigest(), "seed": cfg.optim.seed}
    from sare_ds.data.shards import MANIFEST, is_remote, list_shards

    items = shard_spec(d.shards, d.allow_remote)
    manifests, shards = {}, []
    for item in map(str, items):
        if not is_remote(item) and Path(item).is_dir() and (Path(item) / MANIFEST).is_file():
            manifests[item] = ckpt_mod.sha256_file(Path(item) / MANIFEST)
    for url in list_shards(items, allow_remote=d.allow_remote):
        shards.append({"url": url} if is_remote(url) else {"path": url, "size": os.path.getsize(url)})
    return {"source": "shards", "manifests": manifests, "shards": shards}


def run_identity(cfg: TrainConfig, world_size: int) -> dict:
    comparable = comparable_config(cfg)
    return {"config_sha256": config_hash(comparable), "method": cfg.method.name, "world_size": world_size,
            "data": data_fingerprint(cfg)}


def run_record(cfg: TrainConfig, identity: dict) -> dict:
    """What a checkpoint's manifest keeps of the run that wrote it."""
    return {"identity": identity, "config": comparable_config(cfg)}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(old: dict, new: dict) -> list[str]:
    """`section.field: old -> new` for every field that differs (missing on one side: <absent>)."""
    a, b = _flat(old), _flat(new)
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]


def _data_differences(old: dict, new: dict) -> list[str]:
    if old == new:
        return []
    if old.get("source") != new.get("source"):
        return [f"data source {old.get('source')} -> {new.get('source')}"]
    out = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            if key == "shards":
                was = {s.get("path", s.get("url")): s.get("size") for s in old.get(key, [])}
                now = {s.get("path", s.get("url")): s.get("size") for s in new.get(key, [])}
                changed = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
                out.append(f"shards changed ({len(changed)}: {', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''}"
                           "; missing, added or of another size)")
            elif key == "manifests":
                out.append(f"curation manifest changed ({', '.join(sorted(set(old.get(key, {})) | set(new.get(key, {}))))})")
            else:
                out.append(f"data {key}: {old.get(key)!r} -> {new.get(key)!r}")
    return out


# ------------------------------------------------------------------------------ the folder

def _describe(run_dir: Path) -> str:
    summary = run_dir / "summary.json"
    if summary.is_file():
        try:
            s = json.loads(summary.read_text())
            return (f"holds a run (summary.json: status {s.get('status')!r}, method {s.get('method')}, "
                    f"{s.get('steps')} steps)")
        except ValueError:
            return "holds a run (summary.json unreadable)"
    names = sorted(p.name for p in run_dir.iterdir())
    return f"is not empty ({', '.join(names[:5])}{' ...' if len(names) > 5 else ''})"


def is_sare_run(run_dir: Path) -> bool:
    """The folder was written by a sare_ds training run: its run.json holds a run identity, or its
    summary.json a status and a method, or its config.yaml is sare_ds's resolved config (runs written
    before run.json). A foreign trainer's config.yaml, checkpoints/ or tb/ alone do not count."""
    def read(name):
        try:
            return json.loads((run_dir / name).read_text())
        except (OSError, ValueError):
            return None

    record, summary = read("run.json"), read("summary.json")
    if isinstance(record, dict) and "identity" in record:
        return True
    if isinstance(summary, dict) and {"status", "method"} <= set(summary):
        return True
    try:
        with open(run_dir / "config.yaml", encoding="utf-8") as f:
            return f.readline().startswith("# Resolved sare_ds configuration")
    except OSError:
        return False


def _clear_previous_run(run_dir: Path) -> None:
    """overwrite=true: remove every file of the previous run; refuse a folder a run did not write."""
    entries = sorted(run_dir.iterdir())
    if not entries:
        return
    names = {p.name for p in entries if not _TMP.match(p.name)}
    if not is_sare_run(run_dir):
        raise RunDirError(
            f"output.run_dir = {run_dir} {_describe(run_dir)} and holds no sare_ds training run (no run.json "
            "with a run identity, summary.json with a status, or sare_ds config.yaml): output.overwrite=true only replaces a previous run's directory, it does "
            "not empty other folders. Fix: choose a new or empty output.run_dir")
    foreign = sorted(names - set(RUN_FILES))
    if foreign:
        raise RunDirError(
            f"output.run_dir = {run_dir} holds a previous run plus files a training run does not write "
            f"({', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}); output.overwrite=true removes the "
            "previous run's files and would leave these mixed with the new run. Fix: move them out of the "
            "folder, or choose a new output.run_dir")
    for p in entries:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    log.info("output.overwrite=true: removed the previous run's files from %s", run_dir)


@dataclass
class ResumePoint:
    tag: str
    manifest: dict
    skipped: list

    @property
    def step(self) -> int:
        return int(self.manifest["step"])


def _check_resume(cfg: TrainConfig, run_dir: Path, identity: dict) -> ResumePoint:
    if not run_dir.is_dir():
        raise FileNotFoundError(f"output.resume=true but output.run_dir = {run_dir} does not exist; fix: point "
                                "output.run_dir at the interrupted run, or drop output.resume to start a new one")
    found = ckpt_mod.find_checkpoint(run_dir)
    if found.tag is None:
        why = (f" (skipped as incomplete: {found.skipped_text()})" if found.skipped
               else f" ({run_dir / CHECKPOINTS} holds none)")
        raise FileNotFoundError(
            f"output.resume=true but {run_dir} has no complete checkpoint to resume from{why}. Fix: start the "
            "run again (output.resume=false, output.overwrite=true replaces this folder's run), or point "
            "output.run_dir at the interrupted run")
    where = run_dir / CHECKPOINTS / found.tag
    old = found.manifest.get("identity", {})
    if old.get("world_size") != identity["world_size"]:
        raise CheckpointError(
            f"output.resume=true: checkpoint {where} was written by {old.get('world_size')} ranks and this run has "
            f"{identity['world_size']}. ZeRO partitions the optimizer state (and under stage 3 the weights) into "
            f"one file per rank, each holding 1/{old.get('world_size')} of every tensor, and the data order is "
            "split by rank, so it resumes only with the same number of ranks. Fix: resume with "
            f"{old.get('world_size')} ranks (e.g. deepspeed --num_gpus {old.get('world_size')}), or start a new "
            "run (a new output.run_dir)")
    diffs = config_differences(found.manifest.get("config", {}), comparable_config(cfg))
    if diffs:
        raise CheckpointError(
            f"output.resume=true: checkpoint {where} was written with another config; only "
            f"{'/'.join(VOLATILE_SECTIONS)} fields may change on resume. Differs: {'; '.join(diffs)}. Fix: resume "
            f"with the config of that run ({run_dir / 'config.yaml'} holds it), or start a new run (a new "
            "output.run_dir, or output.overwrite=true to replace this one)")
    data = _data_differences(old.get("data", {}), identity["data"])
    if data:
        raise CheckpointError(
            f"output.resume=true: checkpoint {where} was trained on other data: {'; '.join(data)}. Resuming would "
            "continue a data order that no longer exists. Fix: restore the data of that run, or start a new run")
    return ResumePoint(found.tag, found.manifest, found.skipped)


def truncate_metrics(path: Path, step: int) -> int:
    """Keep the rows of metrics.jsonl up to `step` (a resumed run logs the later steps again); returns
    how many rows were dropped (a torn last line included)."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            dropped += 1
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line)
        else:
            dropped += 1
    write_atomic(path, "".join(k + "\n" for k in kept))
    return dropped


def purge_tensorboard(tb_dir: Path, step: int) -> None:
    """TensorBoard hides every event at a step > `step` written before now (a SessionLog START marker at
    step + 1, what SummaryWriter(purge_step=...) writes): a resumed run's steps are not shown twice."""
    from torch.utils.tensorboard import SummaryWriter

    SummaryWriter(str(tb_dir), purge_step=step + 1).close()


def write_summary(run_dir: Path, summary: dict) -> None:
    write_atomic(run_dir / "summary.json", json.dumps(summary, indent=1, default=str))


def prepare_run_dir(cfg: TrainConfig, info: DistInfo) -> tuple[Path, dict, ResumePoint | None]:
    """Every rank (rank 0 decides and writes; its verdict goes to every rank, so all stop alike): the run's
    identity; refuse an occupied folder, clear a previous run (overwrite), or check the resume checkpoint
    against this run; then config.yaml, run.json and summary.json ("running") are written.
    Returns the folder, the identity and the checkpoint to resume from (None: a new run)."""
    run_dir = Path(cfg.output.run_dir)
    verdict: object = None
    if info.is_main:
        try:
            identity = run_identity(cfg, info.world_size)
            verdict = (identity, _decide(cfg, run_dir, identity))
        except Exception as e:  # noqa: BLE001  (every rank must learn of it, or the others wait forever)
            verdict = e
            try:
                pickle.dumps(e)
            except Exception:  # noqa: BLE001
                verdict = RuntimeError(f"{type(e).__name__}: {e}")
    verdict = broadcast_object(verdict)
    if isinstance(verdict, BaseException):
        raise verdict
    identity, resume = verdict
    if resume is not None:
        ckpt_mod.verify_checkpoint(run_dir, resume.tag, resume.manifest)  # every rank hashes its share
    if info.is_main:
        save_config(cfg, run_dir / "config.yaml")
        record_path = run_dir / "run.json"
        record = {"identity": identity, "config": comparable_config(cfg),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(), "pid": os.getpid(),
                  "resumed": []}
        if resume is not None and record_path.is_file():
            try:
                record = {**json.loads(record_path.read_text()), "identity": identity}
            except ValueError:
                pass
            record.setdefault("resumed", []).append({"step": resume.step, "checkpoint": resume.tag,
                                                     "skipped": resume.skipped, "host": socket.gethostname(),
                                                     "pid": os.getpid(),
                                                     "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        write_atomic(record_path, json.dumps(record, indent=1, default=str))
        write_summary(run_dir, {"status": RUNNING, "method": cfg.method.name, "world_size": info.world_size,
                                "steps": None, "step": resume.step if resume else 0,
                                "config_sha256": identity["config_sha256"]})
        if resume is not None:
            # The final weights of an earlier attempt are not this run's result until it completes again.
            for stale in ("trainable.safetensors", "hf"):
                path = run_dir / stale
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                elif path.exists() or path.is_symlink():
                    path.unlink()
            dropped = truncate_metrics(run_dir / "metrics.jsonl", resume.step)
            if dropped:
                log.info("metrics.jsonl: %d rows after step %d dropped (they are logged again)", dropped, resume.step)
            if cfg.logging.tensorboard:
                purge_tensorboard(run_dir / "tb", resume.step)
    return run_dir, identity, resume


def _decide(cfg: TrainConfig, run_dir: Path, identity: dict) -> ResumePoint | None:
    if cfg.output.resume:
        return _check_resume(cfg, run_dir, identity)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"output.run_dir = {run_dir} is a file; fix: choose a directory path")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not cfg.output.overwrite:
            if not is_sare_run(run_dir):
                raise RunDirError(
                    f"output.run_dir = {run_dir} {_describe(run_dir)} and output.overwrite is false; it holds no "
                    "training run, so there is no run to replace or resume there. Fix: choose a new or empty "
                    "output.run_dir")
            fixes = ["choose a new output.run_dir",
                     "set output.overwrite=true to replace that run (all its files are removed)"]
            if (run_dir / CHECKPOINTS).is_dir():
                fixes.append("set output.resume=true to continue it")
            raise RunDirError(
                f"output.run_dir = {run_dir} {_describe(run_dir)} and output.overwrite is false: a run directory "
                f"belongs to one run. Fix: {', '.join(fixes[:-1])}, or {fixes[-1]}")
        _clear_previous_run(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return None
