"""Worker for tests/test_zero.py, run with 2 ranks:

    torchrun --nproc_per_node 2 tests/zero_worker.py <tiny_model_dir> <out_dir>

On ZeRO-3 partitions, with persistent parameters (default threshold) and without
(threshold 0), in the shared-forward schedule and (threshold 0) the separate passes, checks on
every rank that
  - the forward at theta + eps* sees changed partitions,
  - after restore the partitions (and the gathered copies of persistent parameters) are
    bit-identical to theta, and the separate schedule's capability pass sees them so,
  - an exception inside the perturbed pass leaves them bit-identical too.
Writes one JSON verdict per rank; the test asserts on them.
"""
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

import sare_ds  # noqa: E402,F401
from sare_ds.config import load_config  # noqa: E402
from sare_ds.dist import init_distributed, shutdown  # noqa: E402
from sare_ds.models import select_trainable  # noqa: E402
from sare_ds.train.backend import DeepSpeedBackend  # noqa: E402
from sare_ds.train.ds_config import build_ds_config  # noqa: E402
from sare_ds.train.step import UnlearningStep  # noqa: E402
from sare_ds.train.trainer import build_data, sequences  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def state(params):
    """Partitions, and the gathered full tensors of persistent parameters (when materialised)."""
    return [(p.ds_tensor.detach().clone(),
             p.data.detach().clone() if getattr(p, "ds_persist", False) and p.data.numel() > 0 else None)
            for p in params]


def same(a, b):
    """Bitwise equal partitions, and equal full copies where both states hold one."""
    return all(torch.equal(x[0], y[0]) and (x[1] is None or y[1] is None or torch.equal(x[1], y[1]))
               for x, y in zip(a, b))


def run(model_dir: str, threshold: float, shared: bool, info) -> dict:
    cfg = load_config(ROOT / "launch/configs/tiny_random.yaml", [
        f"model.name_or_path={model_dir}", "distributed.ds_config=ds_configs/zero3_cpu_fp32.json",
        f"distributed.zero3_shared_forward={str(shared).lower()}",
        "method.rho=0.5", "data.source=synthetic", "data.num_images=16", "optim.max_steps=2"])
    ds = build_ds_config(cfg, info.world_size, False)
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = threshold
    backend = DeepSpeedBackend(ds, info)  # the trainer's build (sare_ds.train.backend)
    adapter = backend.load_model(cfg.model)  # partitioned (zero.Init) while `backend` lives
    select_trainable(adapter, cfg.model)
    params = [p for p in adapter.model.parameters() if p.requires_grad]
    rt = backend.build(cfg, adapter.model, params, 4)
    step = UnlearningStep(rt.model, adapter.forward_inputs, rt.space, cfg.method, device=rt.device,
                          dtype=torch.float32, pad_token_id=adapter.tokenizer.pad_token_id)
    composer, _ = build_data(cfg, adapter, info, 0)
    batches = [[sequences(mb) for mb in micro] for micro in composer]
    tparams = rt.space.params
    persistent = sum(bool(getattr(p, "ds_persist", False)) for p in tparams)

    before = state(tparams)
    seen, restored = [], []
    handle = rt.engine.module.register_forward_pre_hook(lambda *_: seen.append(state(tparams)))
    restore = rt.space.restore
    rt.space.restore = lambda: (restore(), restored.append(state(tparams)))
    step(batches[0])
    handle.remove()
    del rt.space.restore
    # Forwards (1 micro-batch): at theta (shared: both gradients; separate: neg), at theta + eps*, and in
    # the separate schedule the capability pass at theta.
    assert len(seen) == (2 if shared else 3) and rt.space.separate_direction == shared, (len(seen), shared)
    perturbed_differs = not same(seen[1], before)
    restored_identical = same(restored[0], before) and same(restored[0], seen[0])
    if not shared:
        restored_identical = restored_identical and same(seen[2], before)
    persistent_gathered = all(x[1] is not None for x, p in zip(restored[0], tparams) if getattr(p, "ds_persist", False))
    # SARE's extra memory: the shared forward's direction buffer is one rank's gradient partition (the
    # optimizer's flat buffer), not the trainable set; the separate passes have none.
    direction = rt.space._direction
    buffer = {"direction_numel": 0 if direction is None else direction.numel(),
              "flat_numel": rt.engine.optimizer.grad_partitions_flat_buffer.numel(),
              "trainable_numel": sum(p.ds_numel for p in tparams), "trainable_tensors": len(tparams)}


    before = state(tparams)
    calls = []

    def explode(*_):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom in the perturbed pass")

    handle = rt.engine.module.register_forward_pre_hook(explode)
    raised = False
    try:
        step(batches[1])
    except RuntimeError:
        raised = True
    handle.remove()
    after_exception_identical = same(state(tparams), before)
    return {"threshold": threshold, "shared": shared, "persistent": persistent, "persistent_gathered": persistent_gathered, "trainable": len(tparams),
            "perturbed_differs": perturbed_differs, "restored_identical": restored_identical,
            "raised": raised, "after_exception_identical": after_exception_identical, **buffer}


def main() -> None:
    model_dir, out_dir = sys.argv[1], Path(sys.argv[2])
    info = init_distributed("gloo")
    results = [run(model_dir, t, shared, info) for t, shared in ((1e5, True), (0, True), (0, False))]
    (out_dir / f"rank{info.rank}.json").write_text(json.dumps(results))
    shutdown()  # releases DeepSpeed's CPU shared-memory buffer (sare_ds.dist.release_deepspeed_shm)


if __name__ == "__main__":
    main()
