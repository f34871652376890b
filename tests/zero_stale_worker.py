"""Worker for tests/test_zero_stale_grads.py, run with 2 ranks:

    deepspeed --num_gpus 2 tests/zero_stale_worker.py <tiny_model_dir> <out_dir> <ds_config.json>...

Per DeepSpeed config, given as "<json>[:option+option]" (CPU; fp32 unless option bf16: a bf16
model with fp32 gradient accumulation, data_types.grad_accum_dtype; option offload: optimizer
offload to the CPU), with the projector (the mapping) trainable, three passes with
space.zero_grad() before each:
  pass 0: a backward with boundary=False whose sum is abandoned (never read);
  pass 1: every trainable parameter is reached by the backward;
  pass 2: the projector's first Linear gets no gradient (a forward hook detaches its output).
After passes 1 and 2 the ParameterSpace's view of the gradient (global_grad_norm(), the gathered
per-parameter gradients, and the weights perturb() writes: theta + rho g / ||g||) is compared with
plain torch autograd in one process on the same weights and batches; after a last zero_grad()
the norm must read 0. Every process builds all ranks' batches, so each rank computes the
reference itself: the mean over ranks of the per-rank gradients (DeepSpeed averages over
data-parallel ranks). Writes one JSON report per rank.
The batches and the loss are built here (processor + cross-entropy), not by the trainer, so the
test pins the ParameterSpace alone.
"""
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

import sare_ds  # noqa: E402,F401  (before transformers)
from sare_ds.config import ModelConfig, load_config  # noqa: E402
from sare_ds.dist import init_distributed, run_main  # noqa: E402
from sare_ds.models import load_mllm, select_trainable  # noqa: E402
from sare_ds.train.ds_config import build_ds_config, zero_stage  # noqa: E402
from sare_ds.train.zero_params import zero_parameter_space  # noqa: E402

DETACHED = "multi_modal_projector.linear_1"  # the layer pass 2 does not reach
RHO = 0.5
CAPTIONS = ["A red square next to a blue circle.", "A dog is sitting on a bench near a tree.",
            "There is a green triangle and a cat.", "A man holds an umbrella and a cup.",
            "A bus, a car and a bicycle on the road.", "Clouds, a kite and a bird in the sky.",
            "A clock and a laptop on the table.", "A horse and a boat near the water."]


def model_config(model_dir: str, dtype: str) -> ModelConfig:
    return ModelConfig(name_or_path=model_dir, dtype=dtype)  # trainable = the mapping (projector)


def make_batches(adapter, n: int, per_batch: int = 2) -> list[dict]:
    """n batches of `per_batch` (image, caption) pairs; labels = the tokens, padding ignored."""
    gen = torch.Generator().manual_seed(1234)
    batches = []
    for b in range(n):
        texts, images = [], []
        for j in range(per_batch):
            caption = CAPTIONS[(b * per_batch + j) % len(CAPTIONS)]
            texts.append(adapter.render(adapter.conversation("Describe the image.", caption), False))
            images.append((torch.rand(32, 32, 3, generator=gen) * 255).to(torch.uint8).numpy())
        enc = adapter.processor(images=images, text=texts, return_tensors="pt", padding=True)
        batch = dict(enc)
        batch["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        batches.append(batch)
    return batches


def loss_of(model, adapter, batch) -> torch.Tensor:
    logits = model(**adapter.forward_inputs(batch)).logits.float()
    labels = batch["labels"]
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             labels[:, 1:].reshape(-1), ignore_index=-100)


def detach_hook(_module, _inputs, output):
    return output.detach()


def module_named(model, suffix: str):
    return next(m for n, m in model.named_modules() if n.endswith(suffix))


# The passes: whether each is a reduction boundary, is read, and detaches the DETACHED layer.
PASSES = [{"boundary": False, "read": False, "detach": False},
          {"boundary": True, "read": True, "detach": False},
          {"boundary": True, "read": True, "detach": True}]


def reference(adapter, batches, passes, world):
    """Plain autograd in this process: per pass, the mean over ranks of d loss_r / d theta."""
    named = [(n, p) for n, p in adapter.model.named_parameters() if p.requires_grad]
    theta = {n: p.detach().clone() for n, p in named}
    grads = []
    for k, spec in enumerate(passes):
        for _, p in named:
            p.grad = None
        handle = module_named(adapter.model, DETACHED).register_forward_hook(detach_hook) if spec["detach"] else None
        for r in range(world):
            (loss_of(adapter.model, adapter, batches[k * world + r]) / world).backward()
        if handle is not None:
            handle.remove()
        grads.append({n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for n, p in named})
    return theta, grads


def full_grads(named) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_grad

    # Collective on both stages (ZeRO-3 all-gathers the fp32 partitions, ZeRO-2 all-reduces fragments).
    return {n: safe_get_full_grad(p).detach().float().cpu().reshape(getattr(p, "ds_shape", p.shape)).clone()
            for n, p in named}


def full_weights(named, stage: int) -> dict[str, torch.Tensor]:
    if stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            return {n: p.detach().float().cpu().clone() for n, p in named}
    return {n: p.detach().float().cpu().clone() for n, p in named}


def rel_err(got: dict, want: dict, scale: float) -> dict[str, float]:
    """||got - want|| per parameter, relative to `scale` (the global norm: a parameter's own may be 0)."""
    return {n: float((got[n].double() - want[n].double()).norm()) / scale for n in want}


def run(model_dir: str, ds_path: str, options: set[str], info) -> dict:
    import deepspeed

    offload = "offload" in options
    dtype = "bfloat16" if "bf16" in options else "float32"
    cfg = load_config(None, [f"model.name_or_path={model_dir}", f"distributed.ds_config={ds_path}",
                             f"model.dtype={dtype}"])
    ds = build_ds_config(cfg, info.world_size, False)
    stage = zero_stage(ds)
    if dtype == "bfloat16":
        # fp32 accumulation of bf16 gradients: ZeRO-2 then keeps them in one flat fp32 buffer per group.
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    client_optimizer = None
    if offload:
        # Optimizer state and fp32 gradients on the CPU. No step is taken, so a torch AdamW stands
        # in for DeepSpeedCPUAdam (which would be compiled on first use).
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
        ds.pop("optimizer", None)
        ds["zero_force_ds_cpu_optimizer"] = False
        ds["zero_allow_untested_optimizer"] = True
    passes = PASSES
    plain = load_mllm(model_config(model_dir, dtype))
    select_trainable(plain, model_config(model_dir, dtype))
    batches = make_batches(plain, len(passes) * info.world_size)
    for batch in batches:
        batch["pixel_values"] = batch["pixel_values"].to(getattr(torch, dtype))
    theta_ref, grads_ref = reference(plain, batches, passes, info.world_size)
    del plain

    keep = None
    if stage == 3:
        from transformers.integrations.deepspeed import HfDeepSpeedConfig

        keep = HfDeepSpeedConfig(ds)  # noqa: F841  (from_pretrained partitions under zero.Init)
    adapter = load_mllm(model_config(model_dir, dtype))
    select_trainable(adapter, model_config(model_dir, dtype))
    params = [p for p in adapter.model.parameters() if p.requires_grad]
    if offload:
        client_optimizer = torch.optim.AdamW(params, lr=1e-3)
    engine, _, _, _ = deepspeed.initialize(model=adapter.model, model_parameters=params, optimizer=client_optimizer,
                                           config=ds)
    space = zero_parameter_space(engine, stage)
    named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    assert [n for n, _ in named] == list(theta_ref), "trainable parameters differ from the reference"
    assert any(DETACHED in n for n, _ in named), DETACHED

    rows = []
    for k, spec in enumerate(passes):
        space.zero_grad()
        handle = module_named(engine.module, DETACHED).register_forward_hook(detach_hook) if spec["detach"] else None
        space.backward(loss_of(engine, adapter, batches[k * info.world_size + info.rank]), boundary=spec["boundary"])
        if handle is not None:
            handle.remove()
        if not spec["read"]:
            continue
        norm = float(space.global_grad_norm())
        want = grads_ref[k]
        ref_norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in want.values())))
        ref_detached = float(torch.sqrt(sum((g.double() ** 2).sum() for n, g in want.items() if DETACHED in n)))
        row = {"detach": spec["detach"], "norm": norm, "ref_norm": ref_norm, "ref_detached_norm": ref_detached,
               "grad_err": rel_err(full_grads(named), want, ref_norm)}
        # perturb() reads the same gradient storage: theta + rho g / ||g|| with the reference g.
        space.perturb(torch.tensor(RHO / norm, dtype=torch.float32))
        perturbed = full_weights(named, stage)
        space.restore()
        row["perturb_err"] = rel_err(perturbed, {n: theta_ref[n] + (RHO / ref_norm) * want[n] for n in want}, RHO)
        rows.append(row)
    space.zero_grad()
    after_zero_grad = float(space.global_grad_norm())
    offloaded = bool(getattr(engine.optimizer, "offload_optimizer", getattr(engine.optimizer, "cpu_offload", False)))
    del keep
    return {"config": Path(ds_path).name, "stage": stage, "offload": offloaded, "dtype": dtype, "passes": rows,
            "norm_after_zero_grad": after_zero_grad}


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    model_dir, out_dir, configs = args[0], Path(args[1]), args[2:]
    info = init_distributed("gloo")
    results = []
    for spec in configs:
        path, _, options = spec.partition(":")
        results.append(run(model_dir, path, set(filter(None, options.split("+"))), info))
    (out_dir / f"rank{info.rank}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    run_main(main)  # process groups torn down, then os._exit (no gloo teardown abort)
