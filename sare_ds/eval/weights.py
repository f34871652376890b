"""A method's model for evaluation: the base checkpoint plus a run's trained weights.

    adapter = load_method_model("runs/efuf")                 # base from runs/efuf/config.yaml
    adapter = load_method_model(None, base="runs/models/tiny-llava")   # the unmodified base

A training run writes only its trainable parameters, by name, to
`<run>/trainable.safetensors`. This loads the base checkpoint (the run's `model.name_or_path`
unless `base` is given), re-creates the LoRA wrapping when the run trained LoRA (so the
parameter names match), copies the tensors in and freezes everything.
"""
from __future__ import annotations

from pathlib import Path

import torch

from sare_ds.config import ModelConfig, load_config


class RunWeightsError(ValueError):
    """A run's weights do not fit the model they are loaded into."""


def load_method_model(run_dir: str | Path | None, *, base: str | None = None, dtype: str | None = None,
                      device: str | torch.device = "cpu"):
    """Adapter of base + run weights (or the bare base when run_dir is None), frozen, eval mode."""
    from safetensors.torch import load_file

    from sare_ds.models import load_mllm, select_trainable

    model_cfg = ModelConfig()
    weights = None
    if run_dir is not None:
        run_dir = Path(run_dir)
        weights = run_dir / "trainable.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} does not exist; pass the directory of a finished training run "
                                    "(it writes trainable.safetensors) or no run for the base model")
        if (run_dir / "config.yaml").is_file():
            model_cfg = load_config(run_dir / "config.yaml").model
    if base is not None:
        model_cfg.name_or_path = str(base)
    if dtype is not None:
        model_cfg.dtype = dtype
    adapter = load_mllm(model_cfg)
    if weights is not None:
        if model_cfg.trainable == "mapping+lora":
            select_trainable(adapter, model_cfg)  # wraps the LLM with the same LoRA layout
        state = load_file(str(weights))
        own = adapter.model.state_dict()
        unknown = [k for k in state if k not in own]
        wrong = [k for k in state if k in own and own[k].shape != state[k].shape]
        if unknown or wrong:
            raise RunWeightsError(
                f"{weights}: {len(unknown)} tensors have no parameter of that name in {model_cfg.name_or_path} "
                f"(e.g. {unknown[:3]}) and {len(wrong)} have another shape (e.g. {wrong[:3]}); fix: pass the base "
                "checkpoint the run was trained from (base=...)")
        adapter.model.load_state_dict(state, strict=False)
    for p in adapter.model.parameters():
        p.requires_grad_(False)
    adapter.model.to(device).eval()
    return adapter
