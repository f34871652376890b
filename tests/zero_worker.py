"""Worker for tests/test_zero.py, run with 2 ranks:

    torchrun --nproc_per_node 2 tests/zero_worker.py <tiny_model_dir> <out_dir>

On ZeRO-3 partitions, with persistent parameters (default threshold) and without
(threshold 0), checks on every rank that
  - the forward at theta + eps* sees changed partitions,
  - the capability pass after restore sees partitions (and the gathered copies of
    persistent parameters) bit-identical to theta,
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
from sare_ds.models import load_mllm, select_trainable  # noqa: E402
from sare_ds.train.ds_config import build_ds_config  # noqa: E402
from sare_ds.train.step import UnlearningStep  # noqa: E402
from sare_ds.train.trainer import build_data, build_deepspeed, sequences  # noqa: E402

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


def run(model_dir: str, threshold: float, info) -> dict:
    cfg = load_config(ROOT / "launch/configs/tiny_random.yaml", [
        f"model.name_or_path={model_dir}", "distributed.ds_config=ds_configs/zero3_cpu_fp32.json",
        "method.rho=0.5", "data.source=synthetic", "data.num_images=16", "optim.max_steps=2"])
    ds = build_ds_config(cfg, info.world_size, False)
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = threshold
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    keep = HfDeepSpeedConfig(ds)  # noqa: F841
    adapter = load_mllm(cfg.model)
    select_trainable(adapter, cfg.model)
    params = [p for p in adapter.model.parameters() if p.requires_grad]
    rt = build_deepspeed(cfg, adapter.model, params, ds, info, 4)
    step = UnlearningStep(rt.model, adapter.forward_inputs, rt.space, cfg.method, device=rt.device,
                          dtype=torch.float32, pad_token_id=adapter.tokenizer.pad_token_id)
    composer, _ = build_data(cfg, adapter, info, 0)
    batches = [[sequences(mb) for mb in micro] for micro in composer]
    tparams = rt.space.params
    persistent = sum(bool(getattr(p, "ds_persist", False)) for p in tparams)

    before = state(tparams)
    seen = []
    handle = rt.engine.module.register_forward_pre_hook(lambda *_: seen.append(state(tparams)))
    step(batches[0])
    handle.remove()
    perturbed_differs = not same(seen[1], before)
    # Forwards: neg at theta, neg at theta + eps*, capability at theta (1 micro-batch).
    restored_identical = same(seen[2], before) and same(seen[2], seen[0])
    persistent_gathered = all(x[1] is not None for x, p in zip(seen[2], tparams) if getattr(p, "ds_persist", False))


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
    return {"threshold": threshold, "persistent": persistent, "persistent_gathered": persistent_gathered, "trainable": len(tparams),
            "perturbed_differs": perturbed_differs, "restored_identical": restored_identical,
            "raised": raised, "after_exception_identical": after_exception_identical}


def main() -> None:
    model_dir, out_dir = sys.argv[1], Path(sys.argv[2])
    info = init_distributed("gloo")
    results = [run(model_dir, t, info) for t in (1e5, 0)]
    (out_dir / f"rank{info.rank}.json").write_text(json.dumps(results))
    shutdown()  # releases DeepSpeed's CPU shared-memory buffer (sare_ds.dist.release_deepspeed_shm)


if __name__ == "__main__":
    main()
