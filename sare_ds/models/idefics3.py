"""Idefics3 and SmolVLM: a SigLIP-style vision tower, a pixel-shuffle `connector`, a Llama-style LLM.

Checkpoints covered
  - model_type `idefics3` (Idefics3ForConditionalGeneration): HuggingFaceM4/Idefics3-8B-Llama3 and
    HuggingFaceTB/SmolVLM-Instruct (SmolVLM v1 is published under the Idefics3 layout).
  - model_type `smolvlm` (SmolVLMForConditionalGeneration): HuggingFaceTB/SmolVLM2-2.2B-Instruct (and the
    smaller SmolVLM2 checkpoints of the same layout). Its processor needs the `num2words` package.

Mapping layers (the paper-style trainable set): `model.connector.*`, which in transformers 5 is the single
bias-free linear `model.connector.modality_projection.proj.weight` [text hidden, vision hidden * scale_factor**2]
applied after the parameter-free pixel shuffle. LoRA targets are restricted to `model.text_model.*` (the vision
tower has q_proj/k_proj/v_proj/out_proj of its own).

Image expansion rule (the model's own processor does it; sare_ds checks it against its tokenisation): the one
`<image>` placeholder of the chat template becomes
  - un-tiled (do_image_splitting off, or an image that fits one tile):
        <fake_token_around_image><global-img><image> x image_seq_len<fake_token_around_image>
  - tiled into R rows x C columns of max_image_size tiles, for every row r and column c
        <fake_token_around_image><row_r_col_c><image> x image_seq_len
    with "\\n" after each row, then "\\n" and the global (down-sized whole) image as above.
`<global-img>` and `<row_r_col_c>` are single added tokens in some checkpoints (SmolVLM2) and plain text that
the tokenizer splits in others (SmolVLM-Instruct): either way the processor's tokenisation is taken as is. The
forward gets pixel_values [1, tiles, 3, S, S] and pixel_attention_mask [1, tiles, S, S] per image (S =
max_image_size); the collate zero-pads the tile dimension, and the model drops all-zero tiles, so a batch of
images with different tile counts gives each row what it gets alone.

The chat template renders BOS itself (`<|begin_of_text|>`, SmolVLM's `<|im_start|>`): sare_ds then adds none
(tokenize.needs_bos / MLLMAdapter.add_special_tokens see it in the text).

Refused (at load, naming the two values and the fix), because the forward would otherwise fail deep inside
transformers or fill the wrong positions:
  - a processor whose `<image>` token id is not the model config's `image_token_id`;
  - a processor whose `image_seq_len` is not what the model's connector produces per tile
    ((vision image_size // patch_size)**2 / scale_factor**2);
  - an image processor whose tile size (max_image_size.longest_edge) is not the vision tower's image_size.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from sare_ds.models.adapter import MLLMAdapter, register_adapter, seeded_random_init


class Idefics3LayoutError(ValueError):
    """The processor and the model of an Idefics3/SmolVLM checkpoint disagree on the image layout."""


FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
IMAGE_TOKEN = "<image>"
END_OF_UTTERANCE = "<end_of_utterance>"
GLOBAL_IMAGE_TOKEN = "<global-img>"
ROW_COL_TOKENS = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]


def chat_template(bos_text: str) -> str:
    """The Idefics3/SmolVLM conversation format: "<bos>User:<image>{prompt}<end_of_utterance>\\nAssistant:
    {response}<end_of_utterance>\\n" (":" directly before an image, ": " before text), generation prompt
    "Assistant:"; the template writes BOS itself."""
    return (
        bos_text
        + "{% for message in messages %}{{ message['role'] | capitalize }}"
        "{% if message['content'] is string %}{{ ': ' + message['content'] }}"
        "{% else %}{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
        "{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}{{ '<image>' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{% endif %}"
        "<end_of_utterance>\n{% endfor %}"
        "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
    )


IDEFICS3_CHAT_TEMPLATE = chat_template("<|begin_of_text|>")
SMOLVLM_CHAT_TEMPLATE = chat_template("<|im_start|>")

# Strings of the templates, so the tiny BPE has pieces for them.
TEMPLATE_CORPUS = ["User: Assistant:", "User:Describe the image.", "Assistant: The image shows"]


@register_adapter
class Idefics3Adapter(MLLMAdapter):
    family = "idefics3"
    model_types = ("idefics3",)
    mapping_patterns = (r"(^|\.)connector\.",)
    language_model_pattern = r"(^|\.)text_model\."
    forward_keys: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask")

    # The tiny checkpoint's layout (build_tiny).
    tiny_bos: ClassVar[str] = "<|begin_of_text|>"
    tiny_eos: ClassVar[str] = END_OF_UTTERANCE
    tiny_pad: ClassVar[str] = "<|reserved_special_token_0|>"
    tiny_add_bos: ClassVar[bool] = True  # Llama-3's tokenizer adds BOS (the template renders it: none added)
    tiny_template: ClassVar[str] = IDEFICS3_CHAT_TEMPLATE

    def __init__(self, model, processor, source, loading=None):
        super().__init__(model, processor, source, loading)
        if processor is not None:
            self.check_layout()

    @classmethod
    def _model_class(cls):
        from transformers import Idefics3ForConditionalGeneration

        return Idefics3ForConditionalGeneration

    def generation_images(self, images: list) -> list[list]:
        """Images of a batch of one-image prompts as the processor must get them: one list per prompt.
        (SmolVLMProcessor reads a flat list as ONE prompt with all the images and refuses a batch of
        prompts; Idefics3Processor takes either.)"""
        return [[image] for image in images]

    # -- checks --------------------------------------------------------------------------
    def model_image_seq_len(self) -> int:
        """Positions the connector produces per tile: (image_size // patch_size)**2 / scale_factor**2."""
        cfg = self.model.config
        vision = cfg.vision_config
        return int((vision.image_size // vision.patch_size) ** 2 // cfg.scale_factor ** 2)

    def check_layout(self) -> None:
        """Refuse a processor that would build inputs this model cannot take (see the module docstring)."""
        cfg = self.model.config
        image_token = getattr(self.processor, "image_token", IMAGE_TOKEN)
        tok_id = self.tokenizer.convert_tokens_to_ids(image_token)
        if tok_id != cfg.image_token_id:
            raise Idefics3LayoutError(
                f"{self.source}: the tokenizer's {image_token} is id {tok_id} but the model's config.image_token_id "
                f"is {cfg.image_token_id}: the image features would be written over other tokens. Fix: use the "
                "tokenizer/processor saved with this checkpoint (or set config.image_token_id to the tokenizer's id)")
        seq = getattr(self.processor, "image_seq_len", None)
        if seq is not None and int(seq) != self.model_image_seq_len():
            v = cfg.vision_config
            raise Idefics3LayoutError(
                f"{self.source}: the processor expands every image tile to image_seq_len = {seq} {IMAGE_TOKEN} "
                f"tokens, but the model's connector gives {self.model_image_seq_len()} per tile ((image_size "
                f"{v.image_size} // patch_size {v.patch_size})**2 / scale_factor {cfg.scale_factor}**2): every forward "
                "would fail on the image-token count. Fix: set image_seq_len in processor_config.json to "
                f"{self.model_image_seq_len()} (the processor saved with this checkpoint has it)")
        image_processor = getattr(self.processor, "image_processor", None)
        tile = (getattr(image_processor, "max_image_size", None) or {}).get("longest_edge")
        if tile is not None and int(tile) != int(cfg.vision_config.image_size):
            raise Idefics3LayoutError(
                f"{self.source}: the image processor cuts images into tiles of max_image_size.longest_edge = {tile} "
                f"px but the vision tower takes image_size = {cfg.vision_config.image_size} px: each tile would give "
                f"another number of positions than the {self.model_image_seq_len()} the text reserves. Fix: set "
                f"max_image_size = {{'longest_edge': {cfg.vision_config.image_size}}} in preprocessor_config.json")

    # -- tiny checkpoint -----------------------------------------------------------------
    @classmethod
    def tiny_special_tokens(cls) -> list[str]:
        return [cls.tiny_bos, "<|end_of_text|>", cls.tiny_pad, FAKE_IMAGE_TOKEN, IMAGE_TOKEN, END_OF_UTTERANCE,
                GLOBAL_IMAGE_TOKEN, *ROW_COL_TOKENS]

    @classmethod
    def tiny_tokenizer(cls, corpus: list[str] | None = None, *, markers_as_tokens: bool = True):
        """The family's byte-level BPE: BOS/EOS/pad as the checkpoint names them, the image tokens special;
        `markers_as_tokens=False` leaves <global-img> and <row_r_col_c> as plain text (SmolVLM-Instruct)."""
        from sare_ds.models.tiny import tiny_corpus, train_tokenizer

        specials = cls.tiny_special_tokens()
        if not markers_as_tokens:
            specials = [s for s in specials if s != GLOBAL_IMAGE_TOKEN and s not in ROW_COL_TOKENS]
        text = tiny_corpus(corpus) + TEMPLATE_CORPUS
        return train_tokenizer(text, vocab_size=600, special_tokens=specials, bos=cls.tiny_bos, eos=cls.tiny_eos,
                               pad=cls.tiny_pad, unk=None, extra_special_tokens={"image_token": IMAGE_TOKEN},
                               chat_template=cls.tiny_template, add_bos=cls.tiny_add_bos)

    @classmethod
    def _tiny_config_classes(cls):
        from transformers import Idefics3Config, Idefics3VisionConfig

        return Idefics3Config, Idefics3VisionConfig

    @classmethod
    def tiny_processor(cls, tokenizer, *, tile: int = 32, longest_edge: int = 64, image_seq_len: int = 4,
                       do_image_splitting: bool = True):
        from transformers import Idefics3ImageProcessor, Idefics3Processor

        image_processor = Idefics3ImageProcessor(size={"longest_edge": longest_edge},
                                                 max_image_size={"longest_edge": tile},
                                                 do_image_splitting=do_image_splitting)
        return Idefics3Processor(image_processor, tokenizer, image_seq_len=image_seq_len,
                                 chat_template=cls.tiny_template)

    @classmethod
    def tiny_model(cls, tokenizer, *, seed: int = 0, tile: int = 32, patch: int = 8, scale_factor: int = 2,
                   hidden_size: int = 64, vision_hidden_size: int = 32, num_layers: int = 2):
        from transformers import LlamaConfig

        config_cls, vision_cls = cls._tiny_config_classes()
        vision = vision_cls(hidden_size=vision_hidden_size, intermediate_size=2 * vision_hidden_size,
                            num_hidden_layers=num_layers, num_attention_heads=2, image_size=tile, patch_size=patch)
        text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                           num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                           rms_norm_eps=1e-5)
        config = config_cls(vision_config=vision, text_config=text, scale_factor=scale_factor,
                            image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                            pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
        model = cls._model_class()(config)
        seeded_random_init(model, seed)
        gen = model.generation_config
        gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = (tokenizer.bos_token_id, tokenizer.eos_token_id,
                                                                tokenizer.pad_token_id)
        return model

    @classmethod
    def build_tiny(cls, out_dir, *, seed: int = 0, corpus: list[str] | None = None) -> Path:
        """A 32-px-tile model (4 positions a tile; a 32-64 px image is upscaled to 64 px and tiled 2 x 2 plus
        the global image: 34 positions with the markers), 2 layers, hidden 64, saved as a real checkpoint."""
        from sare_ds.models.tiny import save_tiny

        tokenizer = cls.tiny_tokenizer(corpus)
        processor = cls.tiny_processor(tokenizer)
        model = cls.tiny_model(tokenizer, seed=seed)
        return save_tiny(out_dir, model, processor, family=cls.family, seed=seed)


@register_adapter
class SmolVLMAdapter(Idefics3Adapter):
    """SmolVLM2 (model_type `smolvlm`): the Idefics3 layout with SmolLM2 as LLM and a processor that also
    takes videos (sare_ds feeds it images only)."""

    family = "smolvlm"
    model_types = ("smolvlm",)

    tiny_bos: ClassVar[str] = "<|im_start|>"
    tiny_eos: ClassVar[str] = END_OF_UTTERANCE
    tiny_pad: ClassVar[str] = "<|im_end|>"
    tiny_add_bos: ClassVar[bool] = False  # SmolLM2's tokenizer adds no BOS; the template writes <|im_start|>
    tiny_template: ClassVar[str] = SMOLVLM_CHAT_TEMPLATE

    @classmethod
    def _model_class(cls):
        from transformers import SmolVLMForConditionalGeneration

        return SmolVLMForConditionalGeneration

    @classmethod
    def tiny_special_tokens(cls) -> list[str]:
        return ["<|endoftext|>", cls.tiny_bos, cls.tiny_pad, FAKE_IMAGE_TOKEN, IMAGE_TOKEN, END_OF_UTTERANCE,
                GLOBAL_IMAGE_TOKEN, *ROW_COL_TOKENS]

    @classmethod
    def _tiny_config_classes(cls):
        from transformers import SmolVLMConfig, SmolVLMVisionConfig

        return SmolVLMConfig, SmolVLMVisionConfig

    @classmethod
    def tiny_processor(cls, tokenizer, *, tile: int = 32, longest_edge: int = 64, image_seq_len: int = 4,
                       do_image_splitting: bool = True):
        from transformers import SmolVLMImageProcessor, SmolVLMProcessor, SmolVLMVideoProcessor

        image_processor = SmolVLMImageProcessor(size={"longest_edge": longest_edge},
                                                max_image_size={"longest_edge": tile},
                                                do_image_splitting=do_image_splitting)
        video_processor = SmolVLMVideoProcessor(
            size={"longest_edge": tile}, max_image_size={"longest_edge": tile},
            video_sampling={"max_frames": 4, "fps": 1, "video_size": {"longest_edge": tile}})
        return SmolVLMProcessor(image_processor, tokenizer, video_processor, image_seq_len=image_seq_len,
                                chat_template=cls.tiny_template)
