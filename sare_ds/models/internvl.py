"""InternVL family adapter: transformers' native InternVL layout (`-hf` checkpoints).

Checkpoints covered (model_type `internvl`, `InternVLForConditionalGeneration`):
OpenGVLab/InternVL3-1B-hf, -2B-hf, -8B-hf, -14B-hf, -38B-hf, -78B-hf (InternViT + Qwen2.5) and the
converted InternVL2.5-MPO checkpoints (OpenGVLab/InternVL2_5-8B-MPO-hf: InternViT + InternLM2 in Llama
layout), all in the layout of transformers' conversion script. The original remote-code checkpoints
(OpenGVLab/InternVL3-8B without `-hf`, model_type `internvl_chat`) are not this layout and are refused by
the registry (no adapter for `internvl_chat`): load the `-hf` conversion instead.

Mapping layers: `multi_modal_projector` (LayerNorm over the pixel-shuffled vision features, then
Linear-GELU-Linear into the LLM; the original code's `mlp1`).

Image expansion: the chat template renders the image as `<IMG_CONTEXT>` (the tokenizer's
`context_image_token`, also the model's `image_token_id`) followed by a newline; the processor replaces
it by `<img>` + `<IMG_CONTEXT>` x (image_seq_length x tiles) + `</img>`. Tiles come from the image
processor's dynamic tiling (`crop_to_patches`): the grid of at most `max_patches` tiles whose aspect ratio
is closest to the image's, plus a thumbnail tile when there is more than one, so the count depends on the
image's size and aspect ratio. sare_ds reads the expansion from the processor itself and checks the rest
of the sequence (MLLMAdapter.expand_image); an image's `pixel_values` are its tiles
[tiles, 3, H, W], which concatenate along dim 0 into exactly the batched forward input.

Refused, with an error naming the input and the fix:
- a chat template that renders an image as something other than the processor's image token (the
  first `-hf` revisions rendered `<image>`, which this transformers' InternVLProcessor no longer expands:
  the image would silently not be fed);
- a tokenizer whose `context_image_token` is not the model config's `image_token_id` (the model would
  find no image positions).
"""
from __future__ import annotations

from pathlib import Path

from sare_ds.models.adapter import MLLMAdapter, register_adapter

IMG_START, IMG_END, IMG_CONTEXT, VIDEO = "<img>", "</img>", "<IMG_CONTEXT>", "<video>"
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

# The `-hf` checkpoints' conversation format (ChatML, no system turn, no BOS): each turn is
# "<|im_start|>{role}\n" + content + "<|im_end|>\n"; an image item renders "<IMG_CONTEXT>\n" where it
# stands in the content, a video "<video>\n".
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif item['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ChatTemplateImageError(ValueError):
    """The chat template renders the image as something the model's processor does not expand."""


def check_rendered_image(adapter: MLLMAdapter, messages: list[dict], text: str) -> None:
    """A conversation with an image must render the processor's image token (what it expands)."""
    has_image = any(isinstance(m.get("content"), list) and any(c.get("type") == "image" for c in m["content"])
                    for m in messages)
    token = getattr(adapter.processor, "image_token", None)
    if has_image and token and token not in text:
        raise ChatTemplateImageError(
            f"{adapter.source}: the chat template rendered the image as {text!r}, without the processor's image "
            f"token {token!r}; the {adapter.family} processor expands only that token, so the image would not "
            f"reach the model. Fix: use the checkpoint's current chat template (it renders {token!r} where the "
            "image stands; older revisions of the InternVL `-hf` checkpoints rendered '<image>'), e.g. set "
            "`chat_template` in its chat_template.jinja / processor_config.json.")


@register_adapter
class InternVLAdapter(MLLMAdapter):
    family = "internvl"
    model_types = ("internvl",)
    mapping_patterns = (r"(^|\.)multi_modal_projector\.",)
    forward_keys = ("input_ids", "attention_mask", "pixel_values")

    @classmethod
    def _model_class(cls):
        from transformers import InternVLForConditionalGeneration

        return InternVLForConditionalGeneration

    def __init__(self, model, processor, source, loading=None):
        super().__init__(model, processor, source, loading)
        tok = getattr(processor, "tokenizer", None)
        if tok is not None and getattr(tok, "context_image_token_id", None) is not None:
            if int(tok.context_image_token_id) != int(model.config.image_token_id):
                raise ValueError(
                    f"{source}: the tokenizer's context_image_token {tok.context_image_token!r} has id "
                    f"{tok.context_image_token_id} but the model's config says image_token_id = "
                    f"{model.config.image_token_id}; the model would find no image positions. Fix: load the "
                    "tokenizer saved with this checkpoint (or correct image_token_id in config.json).")

    @property
    def placeholder_token_id(self) -> int:
        # What the chat template renders and the processor expands: the tokenizer's context image token
        # (the model's image token); `<img>`/`</img>` around the expansion come from the processor.
        tok = self.tokenizer
        token_id = getattr(tok, "context_image_token_id", None)
        return int(token_id) if token_id is not None else self.image_token_id

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        text = super().render(messages, add_generation_prompt)
        check_rendered_image(self, messages, text)
        return text

    @classmethod
    def build_tiny(cls, out_dir, *, seed: int = 0, corpus: list[str] | None = None):
        return build_tiny_internvl(out_dir, seed=seed, corpus=corpus)


def build_tiny_internvl(out_dir, *, seed: int = 0, corpus: list[str] | None = None, tile_size: int = 32,
                        patch_size: int = 4, max_patches: int = 6, hidden_size: int = 64,
                        vision_hidden_size: int = 32, num_layers: int = 2, vocab_size: int = 600) -> Path:
    """A tiny random InternVL3-hf-layout checkpoint (InternViT-style tower + Qwen2 LLM, ChatML, no BOS).

    Tiles of `tile_size` px in `patch_size` px patches: (tile/patch)^2 patches, pixel-shuffled by 0.5, give
    image_seq_length = (tile / patch / 2)^2 = 16 positions a tile; a 32-px image is one tile (18 positions
    with <img> and </img>), larger ones tile dynamically up to `max_patches` (+ a thumbnail)."""
    import torch
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
        InternVLVisionConfig,
        Qwen2Config,
    )

    from sare_ds.models.tiny import save_tiny, tiny_corpus, train_tokenizer

    specials = [ENDOFTEXT, IM_START, IM_END, IMG_START, IMG_END, IMG_CONTEXT, VIDEO]
    tokenizer = train_tokenizer(
        tiny_corpus(corpus), vocab_size=vocab_size, special_tokens=specials,
        bos=None, eos=IM_END, pad=ENDOFTEXT, unk=None, add_bos=False, chat_template=INTERNVL_CHAT_TEMPLATE,
        extra_special_tokens={"start_image_token": IMG_START, "end_image_token": IMG_END,
                              "context_image_token": IMG_CONTEXT, "video_token": VIDEO})
    image_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
    vision = InternVLVisionConfig(
        hidden_size=vision_hidden_size, intermediate_size=2 * vision_hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=2, image_size=tile_size, patch_size=patch_size, use_absolute_position_embeddings=True)
    text = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False)
    seq = (tile_size // patch_size // 2) ** 2
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                            image_seq_length=seq, downsample_ratio=0.5, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    # The real checkpoints' image processor (GotOcr2, ImageNet mean/std); the processor turns tiling on.
    image_processor = GotOcr2ImageProcessor(
        size={"height": tile_size, "width": tile_size}, image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225], min_patches=1, max_patches=max_patches)
    video_processor = InternVLVideoProcessor(size={"height": tile_size, "width": tile_size},
                                             image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    processor = InternVLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                  video_processor=video_processor, image_seq_length=seq,
                                  chat_template=INTERNVL_CHAT_TEMPLATE)
    return save_tiny(out_dir, model, processor, family="internvl", seed=seed, tile_size=tile_size)
