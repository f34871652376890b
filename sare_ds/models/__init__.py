"""Model layer: load an MLLM through its family adapter and choose what trains.

    adapter = load_mllm(cfg.model)          # local directory, hub id or preset:<name>
    names = select_trainable(adapter, cfg.model)
    adapter = load_mllm(cfg.model, device="meta")   # shapes only, no memory (the memory plan, tests)

Every source goes through the same steps: read the checkpoint's `model_type` (or the preset's)
before any weight exists, pick the adapter (refusing a `model.family` that does not match), then
build or load the model, checking that every weight was found.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

# Importing a family module registers its adapter(s).
from sare_ds.models import llava  # noqa: F401
from sare_ds.models import idefics3, instructblip, internvl, onevision, paligemma, qwen2_vl  # noqa: F401
from sare_ds.models import presets
from sare_ds.models.adapter import (
    ImageInputs,
    MLLMAdapter,
    UnknownModelLayoutError,
    WeightsMismatchError,
    adapter_class,
    register_adapter,
)
from sare_ds.models.trainable import NoTrainableParametersError, select_trainable

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
log = logging.getLogger("sare_ds.models")

# Layouts that are LLaVA but not in the transformers (llava-hf) format.
ORIGINAL_LAYOUTS = {"llava_original", "llava_llama", "llava_mistral", "llava_mpt", "share4v"}

# Published layouts sare_ds cannot load, and why (docs/models.md, "Not supported").
_OWL_WHY = ("mPLUG-Owl's checkpoints are built by its own `mplug_owl` / `mplug_owl2` packages (their modelling code is "
            "not shipped with the weights, so transformers cannot build them even with trust_remote_code)")
UNSUPPORTED_LAYOUTS = {
    "mplug-owl": _OWL_WHY, "mplug_owl": _OWL_WHY, "mplug_owl2": _OWL_WHY,
    "minigpt4": ("MiniGPT-4 is a LAVIS-style checkpoint (a projection-layer .pth, separate Vicuna and BLIP-2 weights "
                 "and a LAVIS yaml), not a transformers model"),
    "internvl_chat": ("this is InternVL's original remote-code layout; transformers loads the converted `-hf` "
                      "checkpoints (e.g. OpenGVLab/InternVL3-8B-hf)"),
}


def checkpoint_model_type(name_or_path: str, trust_remote_code: bool = False) -> str:
    """`model_type` of a checkpoint, read from its config.json (no weights, no modelling code).

    An original-layout LLaVA / ShareGPT4V config (LLaVA's own `mm_*` fields on a flat Llama config, no
    `text_config`) is reported as `llava_original` whatever its model_type says (liuhaotian's
    checkpoints say `llava`, like transformers' layout)."""
    path = Path(name_or_path)
    if path.is_dir() and not (path / "config.json").is_file() and any(
            "minigpt" in f.name.lower() for f in path.iterdir()):
        return "minigpt4"  # its files name it; refused by resolve_adapter with the reason
    if (path / "config.json").is_file():
        try:
            raw = json.loads((path / "config.json").read_text())
            if "text_config" not in raw and any(k in raw for k in ("mm_vision_tower", "mm_projector_type")):
                return "llava_original"
            return str(raw["model_type"])
        except (ValueError, KeyError) as e:
            raise OSError(f"model.name_or_path = {name_or_path!r}: {path / 'config.json'} has no readable "
                          f"`model_type` ({e}); fix: point it at a transformers checkpoint directory") from e
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code).model_type
    except (OSError, ValueError) as e:
        raise OSError(
            f"model.name_or_path = {name_or_path!r}: cannot read a transformers config ({e}). "
            "Fix: point it at a checkpoint directory with config.json, a hub id available offline, or a "
            f"preset ({', '.join('preset:' + n for n in presets.preset_names())})."
        ) from e


def resolve_adapter(model_cfg) -> type[MLLMAdapter]:
    """The adapter class for `model_cfg`, checked against the checkpoint's own model_type."""
    source = f"model.name_or_path = {model_cfg.name_or_path!r}"
    if presets.is_preset(model_cfg.name_or_path):
        model_type = presets.parse(model_cfg.name_or_path)[0].model_type
    else:
        model_type = checkpoint_model_type(model_cfg.name_or_path, model_cfg.trust_remote_code)
    if model_type in ORIGINAL_LAYOUTS:
        raise UnknownModelLayoutError(
            f"{source}: model_type `{model_type}` is the original LLaVA/ShareGPT4V layout, not the transformers "
            "(llava-hf) one sare_ds loads. Fix: convert it once with `python -m sare_ds.models.convert "
            f"{model_cfg.name_or_path} <out_dir>` and train from <out_dir>.")
    if model_type in UNSUPPORTED_LAYOUTS:
        raise UnknownModelLayoutError(
            f"{source}: model_type `{model_type}` is not supported by sare_ds: {UNSUPPORTED_LAYOUTS[model_type]}. "
            "Fix: train one of the supported families (docs/models.md lists them and their checkpoints; the "
            "paper's main model is LLaVA-1.5: llava-hf/llava-1.5-7b-hf).")
    if model_cfg.family == "auto":
        return adapter_class(model_type, source)
    cls = adapter_class(model_cfg.family, f"model.family = {model_cfg.family!r}")
    if model_type not in cls.model_types:
        raise UnknownModelLayoutError(
            f"model.family = {model_cfg.family!r} does not match {source}, whose config says model_type "
            f"`{model_type}` (the {cls.family} adapter loads model_type {', '.join(cls.model_types)}). Nothing was "
            "built. Fix: set model.family=auto, or point model.name_or_path at a checkpoint of that family.")
    return cls


def load_mllm(model_cfg, *, device: str | torch.device | None = None) -> MLLMAdapter:
    """Model + processor through the family adapter; `device="meta"` builds shapes only."""
    cls = resolve_adapter(model_cfg)
    dtype = DTYPES[model_cfg.dtype]
    kwargs = {"attn_implementation": getattr(model_cfg, "attn_implementation", "sdpa")}
    name = model_cfg.name_or_path
    if presets.is_preset(name):
        config = presets.hf_config(name)
        processor = presets.build_processor(name, config)
        adapter = cls.from_config(config, processor, dtype, name, device=device, **kwargs)
    elif device is not None and str(device) == "meta":
        from transformers import AutoConfig, AutoProcessor

        config = AutoConfig.from_pretrained(name, trust_remote_code=model_cfg.trust_remote_code)
        try:
            processor = AutoProcessor.from_pretrained(name, trust_remote_code=model_cfg.trust_remote_code)
        except (OSError, ValueError):
            processor = None  # shapes only: the plan needs no processor
        adapter = cls.from_config(config, processor, dtype, name, device="meta", **kwargs)
    else:
        adapter = cls.load(name, dtype, model_cfg.trust_remote_code, **kwargs)
    if getattr(model_cfg, "gradient_checkpointing", False):
        enable_gradient_checkpointing(adapter.model)
    return adapter


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder/encoder layer's activations in the backward instead of keeping them.

    Non-reentrant checkpointing: gradients reach the trainable projector through the frozen LLM
    whether or not the layer inputs require grad, and it composes with ZeRO-3's parameter gathers
    (the recompute gathers again) and with every pass of a SARE step (two backwards through the
    shared forward at theta included).
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the older name is deprecated
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # transformers also hooks every input embedding (the vision tower's patch embedding included) to
    # make its output require grad: needed by reentrant checkpointing only. Left on, the backward
    # would run through the whole frozen vision tower, recomputing it, for nothing.
    if hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()
    model.config.use_cache = False
    text = getattr(model.config, "text_config", None)
    if text is not None:
        text.use_cache = False


__all__ = [
    "DTYPES", "ImageInputs", "MLLMAdapter", "NoTrainableParametersError", "UnknownModelLayoutError",
    "WeightsMismatchError", "adapter_class", "checkpoint_model_type", "enable_gradient_checkpointing", "load_mllm",
    "register_adapter", "resolve_adapter", "select_trainable",
]
