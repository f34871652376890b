"""LLaVA family adapter: LLaVA-1.5 (7B/13B), ShareGPT4V (LLaVA layout) and LLaVA-NeXT.

Mapping layers: `multi_modal_projector` (and LLaVA-NeXT's learned `image_newline`).
Images go through the checkpoint's own processor; the number of LLM positions an image
expands to is read from that processor (fixed for 1.5, resolution dependent for NeXT), so
no per-variant arithmetic lives here.
"""
from __future__ import annotations

import logging

import torch

from sare_ds.models.adapter import MLLMAdapter, check_loading_info, register_adapter, seeded_random_init

log = logging.getLogger("sare_ds.models")
PRESET_INIT_SEED = 0  # presets are randomly initialised from a fixed seed: the same weights every build


@register_adapter
class LlavaAdapter(MLLMAdapter):
    family = "llava"
    model_types = ("llava",)
    mapping_patterns = (r"(^|\.)multi_modal_projector\.",)

    @classmethod
    def _model_class(cls):
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration

    @classmethod
    def load(cls, name_or_path: str, dtype: torch.dtype, trust_remote_code: bool = False,
             **model_kwargs) -> "LlavaAdapter":
        from transformers import AutoProcessor

        model, info = cls._model_class().from_pretrained(
            name_or_path, dtype=dtype, trust_remote_code=trust_remote_code, output_loading_info=True,
            # Mis-shaped weights are reported (and refused by check_loading_info, naming them), not raised
            # as transformers' own multi-line error.
            ignore_mismatched_sizes=True, **model_kwargs)
        loading = check_loading_info(info, f"model.name_or_path = {name_or_path!r}", log)
        processor = AutoProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        return cls(model, processor, name_or_path, loading)

    @classmethod
    def from_config(cls, config, processor, dtype: torch.dtype, source: str, *, device=None,
                    **model_kwargs) -> "LlavaAdapter":
        model_cls = cls._model_class()
        if device is not None and str(device) == "meta":
            with torch.device("meta"):
                model = model_cls._from_config(config, dtype=dtype, **model_kwargs)
        else:
            # Under a live HfDeepSpeedConfig (ZeRO-3) _from_config builds inside zero.Init, so each
            # rank materialises only its partition. Its own random init depends on how the model was
            # built, so the weights are then set from (seed, name) alone: the same in every layout.
            model = model_cls._from_config(config, dtype=dtype, **model_kwargs)
            seeded_random_init(model, PRESET_INIT_SEED)
        pad = getattr(config, "pad_token_id", None)
        if pad is None:  # a checkpoint's LlavaConfig keeps it on the text config only
            pad = getattr(config.text_config, "pad_token_id", None)
        model.generation_config.pad_token_id = pad
        return cls(model, processor, source)

    @property
    def image_token_id(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "image_token_id", None) or cfg.image_token_index)


@register_adapter
class LlavaNextAdapter(LlavaAdapter):
    family = "llava_next"
    model_types = ("llava_next",)
    mapping_patterns = (r"(^|\.)multi_modal_projector\.", r"(^|\.)image_newline$")

    @classmethod
    def _model_class(cls):
        from transformers import LlavaNextForConditionalGeneration

        return LlavaNextForConditionalGeneration
