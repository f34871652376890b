"""True-shape presets of published MLLMs: their architecture, processor and chat template, no weights.

    model.name_or_path=preset:llava-1.5-7b                          # full shape, random init
    model.name_or_path=preset:llava-1.5-7b,text_layers=8             # the same, 8 LLM layers
    model.name_or_path=preset:llava-1.5-7b-reduced                   # 2 + 2 layers, small widths

A preset reproduces the values of a published `config.json` (the hub id in `Preset.source`),
the checkpoint's image processor (CLIP-L/14-336 preprocessing) and its chat template, so the
model layer, the memory plan and the token arithmetic see the real shapes. The weights are
random (or absent: `build_model(..., device="meta")` allocates nothing). The tokenizer is a
stand-in of the real one's layout: a SentencePiece-style (Metaspace) BPE with byte fallback,
`<unk>`/`<s>`/`</s>` at ids 0-2, the 256 byte tokens, 32,000 pieces, then `<image>` (32000) and
`<pad>` (32001), trained here (no download) on English words taken from open_clip's BPE
vocabulary: common English words are one piece each, so a 100-word caption is 120-130 tokens
(tests/test_real_shapes.py checks 110-150; the issue's real LLaVA-1.5 samples of 596-693 tokens imply
a similar rate; the ids differ from Llama's and it was not compared with Llama's own tokenizer,
which is not available offline). It is built once and cached under
`$SARE_CACHE` (default `~/.cache/sare_ds`).

Overrides after the name (comma-separated `key=value`) change the depth or width, keeping the
token structure (image size, patch, vocabulary, template): see `OVERRIDES`.
"""
from __future__ import annotations

import copy
import gzip
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "preset:"

# Chat templates. LLaVA-1.5 (llava-hf): "USER: <image>\n{prompt} ASSISTANT: {response} ";
# every message's text is followed by a space, images come first, no EOS is rendered.
LLAVA15_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for item in message['content'] if item['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for item in message['content'] if item['type'] == 'text' %}{{ item['text'] + ' ' }}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# LLaVA-NeXT on Mistral-7B-Instruct: "[INST] <image>\n{prompt} [/INST] {response}</s>".
MISTRAL_INST_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for item in message['content'] if item['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for item in message['content'] if item['type'] == 'text' %}{{ item['text'] }}{% endfor %}"
    "{{ ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% for item in message['content'] if item['type'] == 'text' %}{{ ' ' + item['text'] + eos_token }}{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
)

# CLIP-L/14-336 (openai/clip-vit-large-patch14-336), the vision tower of every preset here.
CLIP_L14_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
                    layer_norm_eps=1e-5)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                 hidden_act="silu", tie_word_embeddings=False)
IMAGE_TOKEN_ID, PAD_TOKEN_ID, VOCAB = 32000, 32001, 32064


@dataclass(frozen=True)
class Preset:
    name: str
    model_type: str            # llava / llava_next
    source: str                # the hub id whose config.json this reproduces
    text_model_type: str       # llama / mistral
    text: dict
    vision: dict = field(default_factory=lambda: dict(CLIP_L14_336))
    top: dict = field(default_factory=dict)   # further LlavaConfig / LlavaNextConfig values
    template: str = LLAVA15_TEMPLATE
    note: str = ""


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("llava-1.5-7b", "llava", "llava-hf/llava-1.5-7b-hf", "llama", dict(LLAMA2_7B),
           note="Vicuna-7B v1.5 + CLIP-L/14-336, MLP projector; 576 image tokens"),
    Preset("llava-1.5-13b", "llava", "llava-hf/llava-1.5-13b-hf", "llama",
           dict(LLAMA2_7B, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40),
           note="Vicuna-13B v1.5 + CLIP-L/14-336"),
    Preset("sharegpt4v-7b", "llava", "Lin-Chen/ShareGPT4V-7B (converted to the llava-hf layout)", "llama",
           dict(LLAMA2_7B), note="LLaVA-1.5-7B's architecture (its vision tower is fine-tuned, same shape)"),
    Preset("llava-next-mistral-7b", "llava_next", "llava-hf/llava-v1.6-mistral-7b-hf", "mistral",
           dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1000000.0,
                sliding_window=None, hidden_act="silu", tie_word_embeddings=False),
           top=dict(image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
                    use_image_newline_parameter=True),
           template=MISTRAL_INST_TEMPLATE, note="Mistral-7B-Instruct v0.2 + CLIP-L/14-336, AnyRes tiles"),
)}
# Same token structure as LLaVA-1.5-7B (336 px, patch 14, 576 image tokens, vocabulary 32,064,
# its chat template) at a size a CPU trains in seconds: the real-shape CPU tests use it.
REDUCED = "text_layers=2,vision_layers=2,text_hidden=64,text_intermediate=128,text_heads=4,text_kv_heads=4," \
          "vision_hidden=64,vision_intermediate=128,vision_heads=2"
ALIASES = {"llava-1.5-7b-reduced": f"llava-1.5-7b,{REDUCED}"}

# Override keys -> (sub-config, field).
OVERRIDES = {
    "text_layers": ("text", "num_hidden_layers"),
    "text_hidden": ("text", "hidden_size"),
    "text_intermediate": ("text", "intermediate_size"),
    "text_heads": ("text", "num_attention_heads"),
    "text_kv_heads": ("text", "num_key_value_heads"),
    "vision_layers": ("vision", "num_hidden_layers"),
    "vision_hidden": ("vision", "hidden_size"),
    "vision_intermediate": ("vision", "intermediate_size"),
    "vision_heads": ("vision", "num_attention_heads"),
}


class PresetError(ValueError):
    """An unknown preset or a malformed override."""


def is_preset(name_or_path: str) -> bool:
    return str(name_or_path).startswith(PREFIX)


def preset_names() -> list[str]:
    return sorted(PRESETS) + sorted(ALIASES)


def parse(spec: str) -> tuple[Preset, dict[str, int]]:
    """`preset:NAME[,key=value...]` -> (the preset, its overrides)."""
    body = spec[len(PREFIX):] if is_preset(spec) else spec
    name, *items = [s.strip() for s in body.split(",")]
    if name in ALIASES:
        name, *more = ALIASES[name].split(",")
        items = more + items
    if name not in PRESETS:
        raise PresetError(f"model.name_or_path = {spec!r}: unknown preset `{name}`; known: "
                          f"{', '.join(preset_names())}. Fix: use one of them, e.g. preset:llava-1.5-7b")
    overrides: dict[str, int] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in OVERRIDES or not value.isdigit() or int(value) < 1:
            raise PresetError(f"model.name_or_path = {spec!r}: override `{item}` is not `key=positive integer` with "
                              f"key one of {', '.join(OVERRIDES)}. Fix: e.g. preset:{name},text_layers=8")
        overrides[key] = int(value)
    return PRESETS[name], overrides


def hf_config(spec: str):
    """The transformers config of a preset (LlavaConfig or LlavaNextConfig)."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaNextConfig, LlamaConfig, MistralConfig

    preset, overrides = parse(spec)
    text, vision = copy.deepcopy(preset.text), copy.deepcopy(preset.vision)
    for key, value in overrides.items():
        where, name = OVERRIDES[key]
        (text if where == "text" else vision)[name] = value
    for part, sub in (("text", text), ("vision", vision)):
        if sub["hidden_size"] % sub["num_attention_heads"]:
            raise PresetError(f"model.name_or_path = {spec!r}: {part} hidden size {sub['hidden_size']} is not a "
                              f"multiple of its {sub['num_attention_heads']} heads; fix the overrides")
    if text["num_attention_heads"] % text["num_key_value_heads"]:
        raise PresetError(f"model.name_or_path = {spec!r}: {text['num_attention_heads']} attention heads are not a "
                          f"multiple of {text['num_key_value_heads']} key/value heads; fix the overrides")
    text_cls = LlamaConfig if preset.text_model_type == "llama" else MistralConfig
    text_cfg = text_cls(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=PAD_TOKEN_ID, **text)
    vision_cfg = CLIPVisionConfig(**vision)
    cls = LlavaConfig if preset.model_type == "llava" else LlavaNextConfig
    num_image_tokens = (vision["image_size"] // vision["patch_size"]) ** 2
    cfg = cls(vision_config=vision_cfg, text_config=text_cfg, image_token_id=IMAGE_TOKEN_ID,
              projector_hidden_act="gelu", vision_feature_select_strategy="default", vision_feature_layer=-2,
              image_seq_length=num_image_tokens, tie_word_embeddings=False, **preset.top)
    cfg.pad_token_id = PAD_TOKEN_ID
    return cfg


# ------------------------------------------------------------------------------ tokenizer

def cache_root() -> Path:
    return Path(os.environ.get("SARE_CACHE", Path.home() / ".cache" / "sare_ds"))


def _english_words(limit: int = 48_894) -> list[tuple[str, int]]:
    """(word, weight) from the word-final merges of open_clip's BPE vocabulary (CLIP's own
    45k-merge table), most frequent first; the weight falls with the merge rank."""
    import open_clip

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1: limit + 1]
    words, seen = [], set()
    for line in lines:
        merged = line.replace(" ", "")
        if merged.endswith("</w>"):
            word = merged[:-4]
            if word.isalpha() and word.isascii() and word not in seen:
                seen.add(word)
                words.append(word)
    return [(w, max(1, 4000 // (1 + rank // 50))) for rank, w in enumerate(words)]


TOKENIZER_FORMAT = 1  # bump when the construction below changes (part of the cache key)


def build_tokenizer(template: str):
    """The Llama/Mistral-layout stand-in tokenizer (see the module docstring); cached."""
    from transformers import PreTrainedTokenizerFast

    key = hashlib.sha256(f"{TOKENIZER_FORMAT}".encode()).hexdigest()[:12]
    cached = cache_root() / "presets" / f"tokenizer-{key}"
    if not (cached / "tokenizer.json").is_file():
        _train_tokenizer(cached)
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(cached / "tokenizer.json"), unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="<pad>", extra_special_tokens={"image_token": "<image>"}, model_max_length=4096,
        padding_side="right")
    tok.add_bos_token = True
    tok.chat_template = template
    return tok


def _train_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing

    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True),
        pre_tokenizers.Punctuation(behavior="isolated"),  # "background," -> "▁background" ","
        pre_tokenizers.Digits(individual_digits=True),     # Llama splits numbers into digits
    ])
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=32_000, special_tokens=specials, show_progress=False,
                                  initial_alphabet=list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                                        "0123456789.,;:!?'\"()-/&%$#@*+=<>[]{}_\u2581"))

    def corpus():
        for word, weight in _english_words():
            for variant, w in ((word, weight), (word.capitalize(), max(1, weight // 8))):
                yield " ".join([variant] * w)

    tok.train_from_iterator(corpus(), trainer=trainer)
    if tok.get_vocab_size() < 32_000:  # a short corpus: fill with unused pieces so the ids match the real layout
        tok.add_tokens([f"<unused{i}>" for i in range(32_000 - tok.get_vocab_size())])
    tok.add_special_tokens(["<image>", "<pad>"])
    assert tok.token_to_id("<image>") == IMAGE_TOKEN_ID and tok.token_to_id("<pad>") == PAD_TOKEN_ID
    tok.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    tok.save(str(tmp / "tokenizer.json"))
    try:
        tmp.rename(out)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------ processor

def build_processor(spec: str, config=None):
    """The preset's processor: CLIP-L/14-336 preprocessing, the tokenizer, the chat template."""
    from transformers import CLIPImageProcessor, LlavaNextImageProcessor, LlavaNextProcessor, LlavaProcessor

    preset, _ = parse(spec)
    config = config or hf_config(spec)
    tok = build_tokenizer(preset.template)
    size = config.vision_config.image_size
    common = dict(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, do_center_crop=True,
                  image_mean=CLIP_MEAN, image_std=CLIP_STD, resample=3, do_convert_rgb=True)
    patch = config.vision_config.patch_size
    if preset.model_type == "llava":
        return LlavaProcessor(image_processor=CLIPImageProcessor(**common), tokenizer=tok, patch_size=patch,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=preset.template)
    image_processor = LlavaNextImageProcessor(image_grid_pinpoints=config.image_grid_pinpoints, do_pad=True, **common)
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=preset.template)


def describe() -> str:
    """One line per preset (for --help texts and docs)."""
    lines = [f"  preset:{p.name:<24} {p.source}: {p.note}" for p in PRESETS.values()]
    lines += [f"  preset:{a:<24} = preset:{t}" for a, t in ALIASES.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps({n: hf_config(PREFIX + n).to_dict()["text_config"]["num_hidden_layers"] for n in preset_names()}))
