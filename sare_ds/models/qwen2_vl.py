"""Qwen2-VL and Qwen2.5-VL family adapters.

Checkpoints covered (transformers layout; the published `visual.*` / `model.*` key names are mapped
by transformers on load): Qwen/Qwen2-VL-7B-Instruct (and the 2B/72B of that layout, model_type
`qwen2_vl`), Qwen/Qwen2.5-VL-7B-Instruct and Qwen/Qwen2.5-VL-3B-Instruct (and 32B/72B, model_type
`qwen2_5_vl`).

Mapping layers (the paper-style trainable set): the vision merger, `model.visual.merger.*`: the
norm `ln_q` (LayerNorm in Qwen2-VL, RMSNorm without bias in Qwen2.5-VL) and the two-layer MLP
`mlp.0` / `mlp.2` that maps each 2 x 2 group of ViT patches (4 x vision width) to the LLM width.
LoRA (trainable=mapping+lora) is restricted to `model.language_model.*`: Qwen2.5-VL's vision
blocks have their own gate_proj / up_proj / down_proj, which stay frozen.

Image expansion rule (dynamic resolution, no tiles): the image processor resizes the image to
sides that are multiples of patch_size x merge_size (28 px on the real checkpoints) with its pixel
count within [min_pixels, max_pixels], cuts it into patch_size patches (grid_t = 1 for an image,
the frame repeated temporal_patch_size times), and the processor replaces the one `<|image_pad|>`
of `<|vision_start|><|image_pad|><|vision_end|>` by grid_t * grid_h * grid_w / merge_size^2 copies
of `<|image_pad|>`. The forward takes the flat patches (`pixel_values` [patches, 3 * 2 * 14 * 14]),
`image_grid_thw` [images, 3] (so a batch is the concatenation of its rows' tensors along dim 0, as
sare_ds's collate does) and `mm_token_type_ids` (1 at image positions), which the 3-D (M-RoPE)
position index needs; it is rebuilt from input_ids in `forward_inputs`, so right-padded and
trimmed batches carry it exactly. Real checkpoints: a 336 x 336 image gives 144 positions, a
COCO 640 x 480 image 391 (resized to 644 x 476).

Refused, with the input, the rule and the fix named:
- a processor whose patch / merge / temporal patch size is not the model's (the image features
  would not match the number of image positions);
- an image whose aspect ratio is beyond the image processor's limit (200:1);
- a batch whose image positions do not match its `image_grid_thw` (a sequence cut inside the image).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sare_ds.data.samples import BadSampleError
from sare_ds.models.adapter import MLLMAdapter, register_adapter


class ImageGeometryMismatchError(ValueError):
    """The processor cuts images into other patches than the model's vision tower expects."""


# Qwen2's special tokens in the order of the published vocabulary (<|endoftext|> = 151643 onwards).
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# The structure of the Qwen2-VL / Qwen2.5-VL Instruct chat template (ChatML): a default system turn
# when the conversation opens without one, each turn `<|im_start|>{role}\n...<|im_end|>\n`, an image
# as `<|vision_start|><|image_pad|><|vision_end|>` where it appears in the content, no BOS.
QWEN_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' or 'image' in item or 'image_url' in item %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif item['type'] == 'video' or 'video' in item %}"
    "{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif 'text' in item %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

QWEN_CORPUS = [
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n",
    "<|im_start|>assistant\nThe image shows",
]

# Tiny geometry: 4-px patches merged 2 x 2 (8-px units): a 32-px image is 8 x 8 patches, 16 positions;
# the pixel bounds keep every image between 4 and 36 positions.
TINY_PATCH, TINY_MERGE, TINY_TEMPORAL = 4, 2, 2
TINY_MIN_PIXELS, TINY_MAX_PIXELS = 16 * 16, 48 * 48
MAX_ASPECT_RATIO = 200  # transformers' smart_resize refuses images more elongated than this


@register_adapter
class Qwen2VLAdapter(MLLMAdapter):
    family = "qwen2_vl"
    model_types = ("qwen2_vl",)
    mapping_patterns = (r"(^|\.)visual\.merger\.",)
    language_model_pattern = r"(^|\.)language_model\."
    forward_keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")

    def __init__(self, model: torch.nn.Module, processor: Any, source: str, loading: dict | None = None):
        super().__init__(model, processor, source, loading)
        self._check_geometry()

    @classmethod
    def _model_class(cls):
        from transformers import Qwen2VLForConditionalGeneration

        return Qwen2VLForConditionalGeneration

    def _vision_config(self):
        return self.model.config.vision_config

    def _check_geometry(self) -> None:
        """Refuse a processor that cuts images otherwise than the vision tower expects."""
        ip = getattr(self.processor, "image_processor", None)
        if ip is None:  # shapes-only builds (the memory plan) carry no processor
            return
        vc = self._vision_config()
        pairs = (("patch_size", "patch_size"), ("merge_size", "spatial_merge_size"),
                 ("temporal_patch_size", "temporal_patch_size"))
        bad = [(p, getattr(ip, p, None), m, getattr(vc, m, None)) for p, m in pairs
               if getattr(ip, p, None) != getattr(vc, m, None)]
        if bad:
            what = "; ".join(f"image processor {p} = {a} but vision_config.{m} = {b}" for p, a, m, b in bad)
            raise ImageGeometryMismatchError(
                f"{self.source}: {what}. Every {self.family} image's positions are grid_t * grid_h * grid_w / "
                "merge_size^2 of the processor's grid, which must be the vision tower's own, or the image features "
                "would not fill the image positions. Fix: use the checkpoint's own preprocessor_config.json "
                "(patch_size, merge_size, temporal_patch_size equal to its vision_config).")

    # -- images --------------------------------------------------------------------------
    def processor_outputs(self, text: str, image, prompt: str) -> dict[str, torch.Tensor]:
        size = getattr(image, "size", None)
        if size is not None and min(size) > 0 and max(size) / min(size) > MAX_ASPECT_RATIO:
            raise BadSampleError(
                f"{self.source}: an image of {size[0]} x {size[1]} px has an aspect ratio of "
                f"{max(size) / min(size):.0f}:1; the {self.family} image processor resizes only images up to "
                f"{MAX_ASPECT_RATIO}:1 (each side a multiple of patch_size x merge_size). Fix: crop or pad the "
                "image to a less elongated shape before curation/training.",
                reason=f"image aspect ratio beyond {MAX_ASPECT_RATIO}:1")
        return super().processor_outputs(text, image, prompt)

    def forward_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The forward's inputs, with `mm_token_type_ids` (1 at image positions, 0 elsewhere, padding
        included) rebuilt from input_ids: it is what the processor returns, and the 3-D rope index reads
        it (with attention_mask, so right padding leaves every row's positions as they are alone)."""
        inputs = super().forward_inputs(batch)
        ids = inputs["input_ids"]
        image_positions = ids == self.image_token_id
        inputs["mm_token_type_ids"] = image_positions.to(torch.long)
        grid = inputs.get("image_grid_thw")
        if grid is not None:
            merge = int(self._vision_config().spatial_merge_size)
            expected = int(grid.prod(-1).sum()) // (merge * merge)
            found = int(image_positions.sum())
            if found != expected:
                raise ValueError(
                    f"{self.source}: the batch has {found} image positions (`{self.placeholder_text}`) but its "
                    f"image_grid_thw {grid.tolist()} gives {expected} (grid_t * grid_h * grid_w / {merge}^2 per "
                    "image): a sequence was cut inside its image, or image tensors of other rows were collated. "
                    "Fix: keep each image whole (raise data.max_length) and collate each row's pixel_values and "
                    "image_grid_thw with its input_ids.")
        return inputs

    # -- tiny checkpoint -----------------------------------------------------------------
    @classmethod
    def _tiny_config(cls, tokenizer, hidden_size: int, num_layers: int):
        from transformers import Qwen2VLConfig

        return Qwen2VLConfig(
            text_config=cls._tiny_text_config(tokenizer, hidden_size, num_layers),
            vision_config=dict(depth=2, embed_dim=32, hidden_size=hidden_size, mlp_ratio=2, num_heads=2,
                               patch_size=TINY_PATCH, spatial_merge_size=TINY_MERGE,
                               temporal_patch_size=TINY_TEMPORAL),
            **cls._tiny_token_ids(tokenizer))

    @staticmethod
    def _tiny_text_config(tokenizer, hidden_size: int, num_layers: int) -> dict:
        heads = 4
        half = hidden_size // heads // 2  # M-RoPE sections (t, h, w) split half the head dim as 16/24/24 of 64
        t = half // 4
        h = (half - t) // 2
        return dict(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                    num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=2,
                    max_position_embeddings=2048, rms_norm_eps=1e-6,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                     "mrope_section": [t, h, half - t - h]},
                    bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)

    @staticmethod
    def _tiny_token_ids(tokenizer) -> dict:
        ids = tokenizer.convert_tokens_to_ids
        return dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                    vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))

    @classmethod
    def _tiny_processor(cls, tokenizer):
        from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

        geometry = dict(patch_size=TINY_PATCH, temporal_patch_size=TINY_TEMPORAL, merge_size=TINY_MERGE,
                        min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS)
        image_processor = Qwen2VLImageProcessor(**geometry)
        video_processor = Qwen2VLVideoProcessor(**geometry)
        return cls._processor_class()(image_processor=image_processor, video_processor=video_processor,
                                      tokenizer=tokenizer, chat_template=QWEN_VL_CHAT_TEMPLATE)

    @classmethod
    def _processor_class(cls):
        from transformers import Qwen2VLProcessor

        return Qwen2VLProcessor

    @classmethod
    def build_tiny(cls, out_dir, *, seed: int = 0, corpus: list[str] | None = None, hidden_size: int = 64,
                   num_layers: int = 2, vocab_size: int = 600) -> Path:
        """A tiny random checkpoint of the family: Qwen2 special tokens and ChatML template, no BOS, EOS
        `<|im_end|>`, pad `<|endoftext|>`; 4-px patches merged 2 x 2 (a 32-px image: 16 positions)."""
        from sare_ds.models.tiny import save_tiny, tiny_corpus, train_tokenizer

        corpus = tiny_corpus(corpus)
        tokenizer = train_tokenizer(
            QWEN_CORPUS + list(corpus), vocab_size, special_tokens=QWEN_SPECIAL_TOKENS, bos=None,
            eos="<|im_end|>", pad="<|endoftext|>", unk=None,
            extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                  "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"},
            chat_template=QWEN_VL_CHAT_TEMPLATE, add_bos=False)
        config = cls._tiny_config(tokenizer, hidden_size, num_layers)
        torch.manual_seed(seed)
        model = cls._model_class()(config)
        gen = model.generation_config
        gen.bos_token_id = None
        gen.eos_token_id = [tokenizer.eos_token_id, tokenizer.pad_token_id]  # <|im_end|>, <|endoftext|>
        gen.pad_token_id = tokenizer.pad_token_id
        processor = cls._tiny_processor(tokenizer)
        return save_tiny(out_dir, model, processor, family=cls.family, seed=seed)


@register_adapter
class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    family = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)

    @classmethod
    def _model_class(cls):
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration

    @classmethod
    def _processor_class(cls):
        from transformers import Qwen2_5_VLProcessor

        return Qwen2_5_VLProcessor

    @classmethod
    def _tiny_config(cls, tokenizer, hidden_size: int, num_layers: int):
        from transformers import Qwen2_5_VLConfig

        # Window attention over 2 x 2 merged units (window_size in pixels: patch x merge x 2), the last
        # of the two blocks full attention, as Qwen2.5-VL alternates them (7, 15, 23, 31 of 32).
        return Qwen2_5_VLConfig(
            text_config=cls._tiny_text_config(tokenizer, hidden_size, num_layers),
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                               out_hidden_size=hidden_size, patch_size=TINY_PATCH, spatial_merge_size=TINY_MERGE,
                               temporal_patch_size=TINY_TEMPORAL, window_size=TINY_PATCH * TINY_MERGE * 2,
                               fullatt_block_indexes=[1]),
            **cls._tiny_token_ids(tokenizer))
