"""A method's model for evaluation: the base checkpoint plus a run's trained weights.

    adapter = load_method_model("runs/efuf")                 # base from runs/efuf/config.yaml
    adapter = load_method_model(None, base="runs/models/tiny-llava")   # the unmodified base
    adapter = load_method_model("runs/sare", zero3=True)      # sharded over the ranks (ZeRO-3)

A training run writes only its trainable parameters, by name, to
`<run>/trainable.safetensors`. This loads the base checkpoint (the run's `model.name_or_path`
unless `base` is given), re-creates the LoRA wrapping when the run trained LoRA (so the
parameter names match), copies the tensors in and freezes everything.

With `zero3=True` (several ranks, e.g. a 13B model that fits no single GPU) the model is built
under ZeRO-3 partitioning (`zero.Init` through transformers' HfDeepSpeedConfig), the run's
tensors are written into the partitions while gathered, and DeepSpeed's engine adds the
parameter gathering hooks; every rank must then join every forward (`synced_gpus=True`).
The DeepSpeed side of this (the ZeRO-3 inference config, partitioned loading, the gathered write,
the engine) is sare_ds.train.backend's `inference_backend`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from sare_ds.config import ModelConfig, load_config
from sare_ds.train.backend import inference_backend, parameter_shape, zero3_inference_config  # noqa: F401


class RunWeightsError(ValueError):
    """A run's weights do not fit the model they are loaded into."""


def _run_status(run_dir: Path) -> str | None:
    """summary.json's status of a training run folder (None: no readable summary, e.g. older runs)."""
    import json

    try:
        return str(json.loads((run_dir / "summary.json").read_text()).get("status"))
    except (OSError, ValueError, AttributeError):
        return None


def load_method_model(run_dir: str | Path | None, *, base: str | None = None, dtype: str | None = None,
                      device: str | torch.device = "cpu", zero3: bool = False):
    """Adapter of base + run weights (or the bare base when run_dir is None), frozen, eval mode."""
    from safetensors.torch import load_file

    from sare_ds.models import select_trainable

    model_cfg = ModelConfig()
    weights = None
    if run_dir is not None:
        run_dir = Path(run_dir)
        weights = run_dir / "trainable.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} does not exist; pass the directory of a finished training run "
                                    "(it writes trainable.safetensors) or no run for the base model")
        status = _run_status(run_dir)
        if status is not None and (status == "running" or status.startswith("failed")):
            raise ValueError(f"{run_dir}: summary.json says the run is {status!r}, so its trainable.safetensors is not "
                             "this run's result (a resumed or failed run keeps no final weights). Fix: evaluate a "
                             "completed run, or finish this one (output.resume=true)")
        if (run_dir / "config.yaml").is_file():
            model_cfg = load_config(run_dir / "config.yaml").model
    if base is not None:
        model_cfg.name_or_path = str(base)
    if dtype is not None:
        model_cfg.dtype = dtype
    backend = inference_backend(model_cfg.dtype, zero3)
    adapter = backend.load_model(model_cfg)  # ZeRO-3: from_pretrained partitions while `backend` lives
    if weights is not None:
        if model_cfg.trainable == "mapping+lora":
            select_trainable(adapter, model_cfg)  # wraps the LLM with the same LoRA layout
        state = load_file(str(weights))
        # Full shapes (a ZeRO-3 partitioned parameter keeps its own in ds_shape).
        own = {n: parameter_shape(p) for n, p in adapter.model.named_parameters()}
        unknown = [k for k in state if k not in own]
        wrong = [k for k in state if k in own and own[k] != tuple(state[k].shape)]
        if unknown or wrong:
            raise RunWeightsError(
                f"{weights}: {len(unknown)} tensors have no parameter of that name in {model_cfg.name_or_path} "
                f"(e.g. {unknown[:3]}) and {len(wrong)} have another shape (e.g. {wrong[:3]}); fix: pass the base "
                "checkpoint the run was trained from (base=...)")
        backend.load_state(adapter.model, state)  # ZeRO-3: into the partitions while gathered
    for p in adapter.model.parameters():
        p.requires_grad_(False)
    adapter.model = backend.build_inference(adapter.model, device)  # eval mode; ZeRO-3: the engine's module
    return adapter
