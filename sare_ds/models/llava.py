"""LLaVA family adapter: LLaVA-1.5 (7B/13B), ShareGPT4V (LLaVA layout) and LLaVA-NeXT.

Mapping layers: `multi_modal_projector` (and LLaVA-NeXT's learned `image_newline`).
Images go through the checkpoint's own processor; the number of LLM positions an image
expands to is read from that processor (fixed for 1.5, resolution dependent for NeXT), so
no per-variant arithmetic lives here.
"""
from __future__ import annotations

from sare_ds.models.adapter import MLLMAdapter, register_adapter


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
    def build_tiny(cls, out_dir, *, seed: int = 0, corpus: list[str] | None = None):
        from sare_ds.models.tiny import build_tiny_llava

        return build_tiny_llava(out_dir, seed=seed, corpus=corpus)


@register_adapter
class LlavaNextAdapter(LlavaAdapter):
    family = "llava_next"
    model_types = ("llava_next",)
    mapping_patterns = (r"(^|\.)multi_modal_projector\.", r"(^|\.)image_newline$")

    @classmethod
    def _model_class(cls):
        from transformers import LlavaNextForConditionalGeneration

        return LlavaNextForConditionalGeneration

    @classmethod
    def build_tiny(cls, out_dir, *, seed: int = 0, corpus: list[str] | None = None):
        from sare_ds.models.tiny import build_tiny_llava_next

        return build_tiny_llava_next(out_dir, seed=seed, corpus=corpus)
