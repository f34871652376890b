"""Tiny randomly initialised LLaVA (CLIP vision tower + Llama), built offline.

The result is saved with `save_pretrained` (model, tokenizer, image processor, chat
template) so tests and the quickstart load it through exactly the path a real checkpoint
takes (`sare_ds.models.load_mllm`). No download: the tokenizer is a byte-level BPE trained
here on a small corpus, and the chat template is LLaVA-1.5's conversation format.

    python -m sare_ds.models.tiny runs/models/tiny-llava
    python -m sare_ds.models.tiny --family qwen2_vl runs/models/tiny-qwen2-vl   # another family's tiny model
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]

# LLaVA-1.5's conversation format: "USER: <image>\n{prompt} ASSISTANT: {response}</s>".
LLAVA15_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' }}{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\n' }}{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ ' ' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

DEFAULT_CORPUS = [
    "USER: ASSISTANT: Please describe the image in great detail. Your response should have at least 100 words.",
    "The image shows a dog, a cat, a person, a car, a bicycle, a bus, a truck, a boat, a bird and a horse.",
    "There is a red square, a blue circle and a green triangle on the table next to the chair.",
    "A man is sitting on a bench near a tree, holding an umbrella and a cup of coffee.",
    "In the background there are clouds, a kite, a frisbee, a clock, a laptop and a bottle.",
    "Is there a dog in the image? Yes, there is. No, there is not.",
]


def train_tokenizer(corpus: list[str], vocab_size: int = 600, *, special_tokens: list[str] | None = None,
                    bos: str | None = "<s>", eos: str = "</s>", pad: str = "<pad>", unk: str | None = "<unk>",
                    extra_special_tokens: dict[str, str] | None = None, chat_template: str = LLAVA15_CHAT_TEMPLATE,
                    add_bos: bool = True):
    """Byte-level BPE trained offline, wrapped as a PreTrainedTokenizerFast.

    The defaults are LLaVA-1.5's layout; other families pass their own special tokens (all of
    `special_tokens` get the first ids, in order), named tokens (`extra_special_tokens`, e.g.
    {"image_token": "<|image_pad|>"}), chat template and BOS behaviour (`bos=None` or
    `add_bos=False` for tokenizers that add none, as Qwen2's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(special_tokens if special_tokens is not None else SPECIAL_TOKENS)
    tok = Tokenizer(models.BPE(unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    named = {"unk_token": unk, "bos_token": bos, "eos_token": eos, "pad_token": pad}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        **{k: v for k, v in named.items() if v is not None},
        extra_special_tokens=dict(extra_special_tokens if extra_special_tokens is not None
                                  else {"image_token": IMAGE_TOKEN}),
        model_max_length=2048,
    )
    fast.add_bos_token = bool(add_bos and bos is not None)
    fast.chat_template = chat_template
    return fast


def make_tiny_llava(
    tokenizer,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    vision_hidden_size: int = 32,
    vision_layers: int = 2,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
):
    """A tiny random LLaVA-1.5-layout model and its processor (nothing written)."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden_size, intermediate_size=2 * vision_hidden_size, num_hidden_layers=vision_layers,
        num_attention_heads=2, image_size=image_size, patch_size=patch_size, projection_dim=vision_hidden_size,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    num_image_tokens = (image_size // patch_size) ** 2
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=image_token_id,
        image_seq_length=num_image_tokens, vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LLAVA15_CHAT_TEMPLATE,
    )
    return model, processor


def tiny_corpus(corpus: list[str] | None = None) -> list[str]:
    """The texts a tiny tokenizer is trained on: `corpus`, or the default (DEFAULT_CORPUS and the synthetic
    scenes' captions)."""
    if corpus is not None:
        return list(corpus)
    from sare_ds.data.synthetic import caption_corpus

    return DEFAULT_CORPUS + caption_corpus()


def save_tiny(out_dir: str | Path, model, processor, **record) -> Path:
    """Save a tiny checkpoint as a real one (model + processor) and its build record (sare_tiny.json)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    (out_dir / "sare_tiny.json").write_text(json.dumps(record, indent=1))
    return out_dir


def make_tiny_llava_next(tokenizer, *, tile: int = 32, patch_size: int = 8, hidden_size: int = 64, seed: int = 0):
    """A tiny random LLaVA-NeXT (AnyRes tiles of `tile` px, grid pinpoints up to 2 x 2 tiles, the learned
    image newline) and its processor (nothing written)."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    pinpoints = [[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile]]
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=tile, patch_size=patch_size, projection_dim=32)
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                             image_grid_pinpoints=pinpoints, vision_feature_select_strategy="default",
                             vision_feature_layer=-2, image_seq_length=(tile // patch_size) ** 2)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config)
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, key, getattr(tokenizer, key))
    image_processor = LlavaNextImageProcessor(size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile},
                                              image_grid_pinpoints=pinpoints, do_pad=True)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=LLAVA15_CHAT_TEMPLATE)
    return model, processor


def build_tiny_llava_next(out_dir: str | Path, *, corpus: list[str] | None = None, vocab_size: int = 600,
                          seed: int = 0) -> Path:
    """Build, save and return the directory of a tiny random LLaVA-NeXT checkpoint."""
    out_dir = Path(out_dir)
    tokenizer = train_tokenizer(list(corpus or DEFAULT_CORPUS), vocab_size=vocab_size)
    model, processor = make_tiny_llava_next(tokenizer, seed=seed)
    return save_tiny(out_dir, model, processor, family="llava_next", seed=seed)


def build_tiny_llava(
    out_dir: str | Path,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 64,
    num_layers: int = 2,
    corpus: list[str] | None = None,
    vocab_size: int = 600,
    seed: int = 0,
) -> Path:
    """Build, save and return the directory of a tiny random LLaVA-1.5-layout checkpoint."""
    out_dir = Path(out_dir)
    tokenizer = train_tokenizer(list(corpus or DEFAULT_CORPUS), vocab_size=vocab_size)
    model, processor = make_tiny_llava(tokenizer, image_size=image_size, patch_size=patch_size,
                                       hidden_size=hidden_size, num_layers=num_layers, seed=seed)
    return save_tiny(out_dir, model, processor, seed=seed, image_size=image_size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--family", default="llava",
                    help="model family of the tiny checkpoint (any registered adapter with a tiny builder; "
                         "docs/models.md lists them)")
    ap.add_argument("--image-size", type=int, default=32, help="image size of the tiny LLaVA (other families: fixed)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    from sare_ds.data.synthetic import caption_corpus
    from sare_ds.models import adapter_class

    corpus = DEFAULT_CORPUS + caption_corpus()
    if a.family == "llava":
        print(build_tiny_llava(a.out_dir, image_size=a.image_size, seed=a.seed, corpus=corpus))
    else:
        print(adapter_class(a.family, "--family").build_tiny(a.out_dir, seed=a.seed, corpus=corpus))


if __name__ == "__main__":
    main()
