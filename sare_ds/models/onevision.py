"""LLaVA-OneVision family adapter (transformers' `LlavaOnevisionForConditionalGeneration`).

Checkpoints covered (model_type `llava_onevision`): llava-hf/llava-onevision-qwen2-0.5b-ov-hf, -7b-ov-hf,
-72b-ov-hf, their single-image stage (-si-hf) and -ov-chat-hf variants: SigLIP-so400m tower, Qwen2 LLM.

Mapping layers: `multi_modal_projector` (Linear-GELU-Linear) and the learned `image_newline` vector
appended after every row of the tiled features (the same pair as LLaVA-NeXT).

Image expansion (AnyRes-max): the image is resized onto the best grid of `image_grid_pinpoints` and cut
into tiles of the tower's size, plus the whole image resized as a base tile. The placeholder `<image>`
becomes base features (729 for 384-px SigLIP) + the tiles' features unpadded to the image's aspect
ratio, downscaled bilinearly when they exceed `anyres_max_9` (9 tiles' worth), with one `image_newline`
a row. sare_ds reads the count from the processor (the same arithmetic the model uses) and checks the rest
of the sequence. An image's tensors are `pixel_values` [1, tiles, 3, H, W], `image_sizes` [1, 2] and
`batch_num_images` [1]: concatenated over a batch (tiles zero-padded to the longest) they are the
processor's own batched output, and the model takes each row's first tiles by its image size, so the
padding never reaches a feature.

Conversation: Qwen2 ChatML without a system turn and without BOS; the user turn renders every image as
`<image>\\n` before its text.

Refused, with an error naming the input and the fix: a chat template that renders no `<image>` for the
image (the processor would not expand it; see InternVL's check_rendered_image). Several images per
sample (OneVision's multi-image path: base features only) are outside sare_ds's one-image samples.
"""
from __future__ import annotations

from pathlib import Path

from sare_ds.models.internvl import check_rendered_image
from sare_ds.models.llava import LlavaNextAdapter
from sare_ds.models.adapter import register_adapter

ENDOFTEXT, IM_START, IM_END, IMAGE, VIDEO = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"

# llava-hf's OneVision conversation format: "<|im_start|>{role}\n", then each image as "<image>\n" and each
# video as "<video>\n" (images first), then the text, then "<|im_end|>\n"; assistant text inside a
# generation block (transformers' assistant-token mask); "<|im_start|>assistant\n" as generation prompt.
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ item['text'] }}{% endgeneration %}"
    "{% else %}{{ item['text'] }}{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@register_adapter
class LlavaOnevisionAdapter(LlavaNextAdapter):
    family = "llava_onevision"
    model_types = ("llava_onevision",)
    mapping_patterns = (r"(^|\.)multi_modal_projector\.", r"(^|\.)image_newline$")
    forward_keys = ("input_ids", "attention_mask", "pixel_values", "image_sizes", "batch_num_images")

    @classmethod
    def _model_class(cls):
        from transformers import LlavaOnevisionForConditionalGeneration

        return LlavaOnevisionForConditionalGeneration

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        text = super().render(messages, add_generation_prompt)
        check_rendered_image(self, messages, text)
        return text

    @classmethod
    def build_tiny(cls, out_dir, *, seed: int = 0, corpus: list[str] | None = None):
        return build_tiny_onevision(out_dir, seed=seed, corpus=corpus)


def build_tiny_onevision(out_dir, *, seed: int = 0, corpus: list[str] | None = None, tile_size: int = 32,
                         patch_size: int = 8, max_grid: int = 6, hidden_size: int = 64,
                         vision_hidden_size: int = 32, num_layers: int = 2, vocab_size: int = 600) -> Path:
    """A tiny random llava-onevision-qwen2-ov-hf-layout checkpoint (SigLIP tower, Qwen2 LLM, ChatML).

    Tiles of `tile_size` px, (tile/patch)^2 = 16 features each (no CLS: `full` selection, last layer, as
    the real checkpoints); pinpoints every grid up to `max_grid` x `max_grid` tiles (the real 384..2304 px
    grid scaled down) and anyres_max_9. A 32-px image takes 16 base + 16 tile + 4 newline = 36 positions."""
    import torch
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    from sare_ds.models.tiny import save_tiny, tiny_corpus, train_tokenizer

    tokenizer = train_tokenizer(
        tiny_corpus(corpus), vocab_size=vocab_size,
        special_tokens=[ENDOFTEXT, IM_START, IM_END, IMAGE, VIDEO], bos=None, eos=IM_END, pad=ENDOFTEXT,
        unk=None, add_bos=False, chat_template=ONEVISION_CHAT_TEMPLATE,
        extra_special_tokens={"image_token": IMAGE, "video_token": VIDEO})
    pinpoints = [[tile_size * h, tile_size * w] for h in range(1, max_grid + 1) for w in range(1, max_grid + 1)]
    vision = SiglipVisionConfig(
        hidden_size=vision_hidden_size, intermediate_size=2 * vision_hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=2, image_size=tile_size, patch_size=patch_size, vision_use_head=False)
    text = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False)
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        video_token_index=tokenizer.convert_tokens_to_ids(VIDEO), vision_feature_select_strategy="full",
        vision_feature_layer=-1, image_grid_pinpoints=pinpoints, vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    mean, std = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]  # SigLIP's normalisation, as the real processor config
    image_processor = LlavaOnevisionImageProcessor(
        size={"height": tile_size, "width": tile_size}, image_grid_pinpoints=pinpoints, image_mean=mean,
        image_std=std)
    video_processor = LlavaOnevisionVideoProcessor(size={"height": tile_size, "width": tile_size},
                                                   image_mean=mean, image_std=std)
    processor = LlavaOnevisionProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
        num_image_tokens=(tile_size // patch_size) ** 2, vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9", chat_template=ONEVISION_CHAT_TEMPLATE)
    return save_tiny(out_dir, model, processor, family="llava_onevision", seed=seed, tile_size=tile_size)
