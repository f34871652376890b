"""Model layer: load an MLLM through its family adapter and choose what trains.

    adapter = load_mllm(cfg.model)          # local directory or hub id
    names = select_trainable(adapter, cfg.model)
"""
from __future__ import annotations

import torch

from sare_ds.models import llava  # noqa: F401  (registers the LLaVA adapters)
from sare_ds.models.adapter import (
    ImageInputs,
    MLLMAdapter,
    UnknownModelLayoutError,
    adapter_class,
    register_adapter,
)
from sare_ds.models.trainable import NoTrainableParametersError, select_trainable

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_mllm(model_cfg) -> MLLMAdapter:
    """Load model + processor from `model_cfg.name_or_path` with the right adapter."""
    family = model_cfg.family
    if family == "auto":
        from transformers import AutoConfig

        try:
            hf_cfg = AutoConfig.from_pretrained(model_cfg.name_or_path, trust_remote_code=model_cfg.trust_remote_code)
        except (OSError, ValueError) as e:
            raise OSError(
                f"model.name_or_path = {model_cfg.name_or_path!r}: cannot read a transformers config ({e}). "
                "Fix: point it at a checkpoint directory with config.json or a hub id available offline "
                "(for the tiny test model: python -m sare_ds.models.tiny <dir>)."
            ) from e
        family = hf_cfg.model_type
    cls = adapter_class(family, f"model.name_or_path = {model_cfg.name_or_path!r}")
    return cls.load(model_cfg.name_or_path, DTYPES[model_cfg.dtype], model_cfg.trust_remote_code)


__all__ = [
    "DTYPES", "ImageInputs", "MLLMAdapter", "NoTrainableParametersError", "UnknownModelLayoutError",
    "adapter_class", "load_mllm", "register_adapter", "select_trainable",
]
