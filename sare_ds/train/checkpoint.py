"""DeepSpeed checkpoints that commit atomically and load without running code from files.

    <run_dir>/checkpoints/
      step0000020/                 one checkpoint (tag = step, 7 digits)
        *_model_states.pt, *_optim_states.pt    DeepSpeed's files (every rank's partitions)
        rng_rank00000.safetensors  each rank's RNG streams (tensors + JSON metadata; no pickle)
        manifest.json              written last: files, sizes, sha256, step, run identity
      latest                       the tag of the last committed checkpoint (replaced atomically)

Commit order (`save_checkpoint`, every rank): DeepSpeed writes its files (with `save_latest=False`:
its own `latest`, written before the rank files are complete, is never written), each rank writes
its RNG file, a barrier, every file is hashed (the files shared out over the ranks), then rank 0
writes `manifest.json` and replaces `latest`, each through a temporary file and `os.replace`.
A checkpoint without its manifest, or whose manifest lists a file that is missing or has another
size, was interrupted: resume skips it and names it (`find_checkpoint`). A file whose size matches
but whose sha256 does not was changed after the commit: resume refuses it.

Loading (`load_checkpoint`): DeepSpeed 0.19 reads its files with `torch.load(..., weights_only=False)`
(deepspeed/runtime/checkpoint_engine/torch_checkpoint_engine.py), which runs whatever a pickle names.
`weights_only_loads()` turns every `torch.load` made while it is active into `weights_only=True`
with an allow-list of the few plain types DeepSpeed's ZeRO checkpoints hold (SAFE_GLOBALS); a file
naming anything else is refused with `UnsafeCheckpointError` before any of its objects is built.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sare_ds.config import ConfigError
from sare_ds.dist import barrier, broadcast_object, rank_and_world

log = logging.getLogger("sare_ds.train")

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
LATEST = "latest"
FORMAT = "sare_ds checkpoint v1"
TAG_RE = re.compile(r"^step(\d{7,})$")
HASH_CHUNK = 1 << 22


class CheckpointError(ConfigError):
    """A checkpoint cannot be resumed from (with this config); the message names it, the reason and the fix.
    A ConfigError, so launch/train.py reports it in one line, as it does a config mistake."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file holds objects other than tensors and plain data (it could run code)."""


def tag_of(step: int) -> str:
    return f"step{step:07d}"


# ------------------------------------------------------------------------- collectives

def all_gather(obj) -> list:
    """Every rank's `obj`, in rank order (a collective: every rank calls it; [obj] in one process)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _rank_world() -> tuple[int, int]:
    return rank_and_world()  # sare_ds.dist's, the package's one helper


# ------------------------------------------------------------------------------ files

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so a reader sees the old content or the new, never a part."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _files_of(tag_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(tag_dir)) for p in tag_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


def _hash_share(tag_dir: Path, names: list[str]) -> dict[str, dict]:
    """This rank's share of the files (every world-th one), hashed: {name: {size, sha256}}."""
    rank, world = _rank_world()
    out = {}
    for i, name in enumerate(names):
        if i % world == rank:
            path = tag_dir / name
            out[name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    return out


# ------------------------------------------------------------------------------- RNG state

def save_rng(path: Path) -> None:
    """This process's RNG streams (torch, CUDA, Python, NumPy) as tensors plus JSON metadata."""
    from safetensors.torch import save_file

    version, mt, gauss = random.getstate()
    algorithm, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "python_mt": torch.tensor(mt, dtype=torch.int64),
               "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64))}
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    for i, state in enumerate(cuda):
        tensors[f"cuda{i}"] = state
    meta = {"python": json.dumps({"version": version, "gauss_next": gauss}),
            "numpy": json.dumps({"algorithm": algorithm, "pos": int(pos), "has_gauss": int(has_gauss),
                                 "cached_gaussian": float(cached)}),
            "cuda_devices": str(len(cuda))}
    save_file(tensors, str(path), metadata=meta)


def load_rng(path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    torch.set_rng_state(tensors["torch"])
    py = json.loads(meta["python"])
    random.setstate((py["version"], tuple(int(x) for x in tensors["python_mt"].tolist()), py["gauss_next"]))
    npm = json.loads(meta["numpy"])
    np.random.set_state((npm["algorithm"], tensors["numpy_keys"].numpy().astype(np.uint32), npm["pos"],
                         npm["has_gauss"], npm["cached_gaussian"]))
    n_cuda = int(meta.get("cuda_devices", "0"))
    if n_cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[f"cuda{i}"] for i in range(n_cuda)])


# ------------------------------------------------------------------------------------ save

def save_checkpoint(engine, run_dir: Path, step: int, record: dict) -> Path:
    """Every rank: write checkpoint `step` and commit it (manifest, then `latest`); see the module doc.

    `record`: {"identity": ..., "config": ...} of the run (sare_ds.train.runs), kept in the manifest so a
    resume can be checked against the run that wrote it.
    """
    rank, world = _rank_world()
    ckpt = Path(run_dir) / CHECKPOINTS
    tag = tag_of(step)
    tag_dir = ckpt / tag
    if rank == 0:
        ckpt.mkdir(parents=True, exist_ok=True)
        if tag_dir.exists():  # an earlier attempt at this step (e.g. a resumed finished run): never mix files
            shutil.rmtree(tag_dir)
    barrier()
    # save_latest=False: DeepSpeed would write `latest` before every rank's files exist.
    engine.save_checkpoint(str(ckpt), tag=tag, client_state={"step": step}, save_latest=False)
    save_rng(tag_dir / f"rng_rank{rank:05d}.safetensors")
    barrier()  # every rank's files are written
    names = broadcast_object(_files_of(tag_dir) if rank == 0 else None)
    files: dict[str, dict] = {}
    for share in all_gather(_hash_share(tag_dir, names)):
        files.update(share)
    if rank == 0:
        manifest = {"format": FORMAT, "tag": tag, "step": step, "world_size": world,
                    "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **record,
                    "files": {k: files[k] for k in sorted(files)}}
        write_atomic(tag_dir / MANIFEST, json.dumps(manifest, indent=1))
        write_atomic(ckpt / LATEST, tag)
    barrier()  # committed everywhere before any rank goes on
    return tag_dir


# ------------------------------------------------------------------------------------ find

@dataclass
class Found:
    """The checkpoint resume takes (or None) and the newer ones it skipped, with why."""

    tag: str | None = None
    manifest: dict | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def skipped_text(self) -> str:
        return "; ".join(f"{t}: {why}" for t, why in self.skipped)


def _incomplete_reason(tag_dir: Path) -> tuple[str | None, dict | None]:
    path = tag_dir / MANIFEST
    if not path.is_file():
        if list(tag_dir.glob("rng_rank*.pt")):
            return (f"written by a sare_ds before checkpoint manifests (no {MANIFEST}; its RNG state is a pickle, "
                    "which is not loaded): start a new run", None)
        return (f"incomplete: no {MANIFEST} (written last, so the run stopped while writing this checkpoint)", None)
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return f"incomplete: {MANIFEST} is not readable JSON ({e})", None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        return f"{MANIFEST} is not a sare_ds checkpoint manifest ({FORMAT!r})", None
    if manifest.get("tag") != tag_dir.name:
        return f"{MANIFEST} names checkpoint {manifest.get('tag')!r}, not {tag_dir.name}", None
    for name, entry in manifest["files"].items():
        p = tag_dir / name
        if not p.is_file():
            return f"incomplete: {name}, listed in its manifest, is missing", None
        if p.stat().st_size != entry.get("size"):
            return f"incomplete: {name} has {p.stat().st_size} bytes, its manifest says {entry.get('size')}", None
    extra = [n for n in _files_of(tag_dir) if n not in manifest["files"]]
    if extra:
        # Not an interrupted write (the manifest comes last): something was added afterwards.
        raise CheckpointError(
            f"{tag_dir}: holds {', '.join(extra[:4])}{' ...' if len(extra) > 4 else ''}, not listed in its "
            f"{MANIFEST}: files were added after the checkpoint was committed, and a loader could read them. "
            f"Fix: remove them (or the whole {tag_dir.name}/ to resume from the previous checkpoint)")
    return None, manifest


def find_checkpoint(run_dir: Path) -> Found:
    """The newest complete checkpoint of `run_dir` (rank 0; reads sizes, not contents), newer
    incomplete ones skipped and named. `latest` is advisory: a kill between a manifest and `latest`
    leaves a complete checkpoint newer than it, which is taken."""
    ckpt = Path(run_dir) / CHECKPOINTS
    found = Found()
    if not ckpt.is_dir():
        return found
    tags = sorted((p for p in ckpt.iterdir() if p.is_dir() and TAG_RE.match(p.name)),
                  key=lambda p: int(TAG_RE.match(p.name).group(1)), reverse=True)
    for tag_dir in tags:
        reason, manifest = _incomplete_reason(tag_dir)
        if reason is None:
            found.tag, found.manifest = tag_dir.name, manifest
            break
        found.skipped.append((tag_dir.name, reason))
        log.warning("checkpoint %s skipped: %s", tag_dir, reason)
    return found


def verify_checkpoint(run_dir: Path, tag: str, manifest: dict) -> None:
    """Every rank: the sha256 of each file of the checkpoint (shared out over the ranks) against its
    manifest; a mismatch (changed after the commit) is an error on every rank alike."""
    tag_dir = Path(run_dir) / CHECKPOINTS / tag
    names = sorted(manifest["files"])
    bad: list[str] = []
    for share in all_gather(_hash_share(tag_dir, names)):
        bad += [n for n, e in share.items() if e["sha256"] != manifest["files"][n]["sha256"]]
    if bad:
        raise CheckpointError(
            f"{tag_dir}: the sha256 of {', '.join(sorted(bad)[:4])}{' ...' if len(bad) > 4 else ''} does not match "
            f"the one recorded in its {MANIFEST} when the checkpoint was committed: the files were changed or damaged "
            f"afterwards. Fix: restore them, or remove {tag_dir.name}/ to resume from the previous checkpoint")


# ------------------------------------------------------------------------------------ load

def safe_globals() -> list:
    """The non-tensor types DeepSpeed 0.19's ZeRO-2/3 checkpoints hold (enums, a dataclass, loss scalers):
    plain data, rebuilt without calling any of their code."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, OffloadDeviceEnum, LossScaler, DynamicLossScaler, fragment_address]


@contextlib.contextmanager
def weights_only_loads():
    """While active, every `torch.load` (DeepSpeed's included, which asks for weights_only=False) is a
    `weights_only=True` load with SAFE_GLOBALS allowed; a refused file raises UnsafeCheckpointError."""
    original = torch.load
    allowed = safe_globals()

    def guarded(f, *args, **kwargs):
        kwargs.pop("weights_only", None)
        kwargs.pop("pickle_module", None)  # weights_only uses its own restricted unpickler
        if len(args) > 1:  # (map_location, pickle_module): keep map_location only
            args = args[:1]
        try:
            with torch.serialization.safe_globals(allowed):
                return original(f, *args, weights_only=True, **kwargs)
        except pickle.UnpicklingError as e:
            lines = [ln.strip() for ln in str(e).splitlines() if "Unsupported" in ln or "error" in ln.lower()]
            why = lines[-1] if lines else str(e).splitlines()[0]
            raise UnsafeCheckpointError(
                f"{f}: refused to load: it is a pickle that names objects other than tensors and plain data "
                f"({why}). Loading it would run code chosen by whoever wrote the file; DeepSpeed checkpoints "
                "written by sare_ds hold only tensors and the types in sare_ds.train.checkpoint.safe_globals(). "
                "Fix: do not resume from this checkpoint (remove its folder to resume from the previous one); "
                "if it is your own, from a DeepSpeed setup sare_ds has not met, add the named type there") from None

    torch.load = guarded
    try:
        yield
    finally:
        torch.load = original


def load_checkpoint(engine, run_dir: Path, tag: str, manifest: dict) -> int:
    """Every rank: load checkpoint `tag` (found and verified) into `engine` and this rank's RNG streams;
    returns its step."""
    rank, _ = _rank_world()
    ckpt = Path(run_dir) / CHECKPOINTS
    with weights_only_loads():
        path, client = engine.load_checkpoint(str(ckpt), tag=tag)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {ckpt / tag} (its log above says why)")
    step = int(manifest["step"])
    if int(client.get("step", -1)) != step:
        raise CheckpointError(f"{ckpt / tag}: DeepSpeed's client state says step {client.get('step')}, the "
                              f"manifest {step}; the checkpoint is inconsistent. Fix: remove {tag}/ to resume from "
                              "the previous checkpoint")
    rng = ckpt / tag / f"rng_rank{rank:05d}.safetensors"
    if not rng.is_file():
        raise CheckpointError(f"{rng} is missing (its manifest lists the files of {manifest['world_size']} ranks)")
    load_rng(rng)
    log.info("resumed from %s at step %d", ckpt / tag, step)
    return step
