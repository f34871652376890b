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

Presets of the other families (`FamilyPreset`: preset:qwen2.5-vl-7b, preset:llava-onevision-7b,
preset:idefics3-8b, preset:internvl3-8b) are data: sare_ds/resources/presets/<name>.json holds the
published `config.json` architecture fields of the checkpoint (built with transformers'
`AutoConfig.for_model`, so every value the JSON does not state is the family config class's
default), its image preprocessing settings (preprocessor_config.json: sizes, min/max pixels,
patch/merge sizes, tiling) and processor settings (tokens an image, feature strategy), the
special-token layout of its tokenizer and its chat template (written here from the published
template's format), plus where each value came from (`values`). Their tokenizer is a stand-in too: a
byte-level BPE (GPT-2 pre-tokenisation) with 32,000 pieces trained here on the same English word list,
unused filler pieces up to the checkpoint's first special id, then the checkpoint's special tokens at
their real ids (e.g. Qwen2.5-VL's <|im_start|> = 151644, <|image_pad|> = 151655; Llama-3's
<|begin_of_text|> = 128000 and Idefics3's <image> = 128257). Text tokenises to other ids than the real
vocabulary's and at a similar rate (common English words are one piece each); every id is below the
model's vocabulary size except InternVL's `<video>` placeholder (151674, as the transformers layout
needs a video token; it never reaches the model, the processor replaces it). The overrides apply to
them as well, mapped to each family's field names (Qwen2.5-VL's vision `depth` / `num_heads`; its
merger output follows the LLM width and its M-RoPE sections the head size).

preset:instructblip-vicuna-7b and preset:paligemma2-10b-448 have no chat template (their adapters build the
sequence). Their stand-ins put the checkpoint's leading special tokens at ids 0.. (`leading_specials`: Vicuna's
<unk> <s> </s>, Gemma's <pad> <eos> <bos> <unk>) and the BPE pieces after them; InstructBLIP's [PAD] / <image>
are at 32000 / 32001, PaliGemma's <locNNNN> / <segNNN> from 256000 and <image> at 257152. InstructBLIP's
Q-Former reads the prompt through a bert-base-uncased-layout WordPiece stand-in (`build_qformer_tokenizer`,
[DEC] at 30522), and its `-reduced` alias also shrinks the Q-Former (`qformer_*` overrides; the Q-Former's
cross-attention width follows the vision width). PaliGemma 2 must be built with
model.attn_implementation=eager (its adapter refuses sdpa; a preset does not carry the attention kernel):
`load_mllm(ModelConfig(name_or_path="preset:paligemma2-10b-448", attn_implementation="eager"), device="meta")`;
training it also needs model.lm_head_chunks=0 (launch/configs/paligemma2_10b_sare.yaml sets both).
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


RESOURCES = Path(__file__).resolve().parents[1] / "resources" / "presets"


@dataclass(frozen=True)
class FamilyPreset:
    """A preset of another family, read from sare_ds/resources/presets/<name>.json (see the module docstring)."""

    name: str
    model_type: str            # the checkpoint's model_type (picks the adapter)
    source: str                # the hub id whose config.json this reproduces
    note: str
    path: Path

    @property
    def data(self) -> dict:
        return _family_data(self.path)


_DATA_CACHE: dict[Path, dict] = {}


def _family_data(path: Path) -> dict:
    if path not in _DATA_CACHE:
        _DATA_CACHE[path] = json.loads(path.read_text())
    return copy.deepcopy(_DATA_CACHE[path])


def _family_presets() -> dict[str, FamilyPreset]:
    found = {}
    for path in sorted(RESOURCES.glob("*.json")):
        raw = json.loads(path.read_text())
        found[raw["name"]] = FamilyPreset(raw["name"], raw["model_type"], raw["source"], raw["note"], path)
    return found


PRESETS.update(_family_presets())

# Same token structure as LLaVA-1.5-7B (336 px, patch 14, 576 image tokens, vocabulary 32,064,
# its chat template) at a size a CPU trains in seconds: the real-shape CPU tests use it.
REDUCED = "text_layers=2,vision_layers=2,text_hidden=64,text_intermediate=128,text_heads=4,text_kv_heads=4," \
          "vision_hidden=64,vision_intermediate=128,vision_heads=2"
ALIASES = {"llava-1.5-7b-reduced": f"llava-1.5-7b,{REDUCED}"}
# The other families' presets at the same reduced size (their image processing, vocabulary and template kept).
ALIASES.update({f"{name}-reduced": f"{name},{REDUCED}" for name, p in PRESETS.items() if isinstance(p, FamilyPreset)})
# ... and the Q-Former of InstructBLIP at the same size (its 12 BERT-base layers would dwarf the reduced rest).
REDUCED_QFORMER = "qformer_layers=2,qformer_hidden=64,qformer_intermediate=128,qformer_heads=2"
ALIASES.update({f"{name}-reduced": f"{name},{REDUCED},{REDUCED_QFORMER}" for name, p in PRESETS.items()
                if isinstance(p, FamilyPreset) and "qformer_config" in p.data["config"]})

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
    # InstructBLIP's Q-Former (qformer_config; refused for a preset without one)
    "qformer_layers": ("qformer", "num_hidden_layers"),
    "qformer_hidden": ("qformer", "hidden_size"),
    "qformer_intermediate": ("qformer", "intermediate_size"),
    "qformer_heads": ("qformer", "num_attention_heads"),
}


class PresetError(ValueError):
    """An unknown preset or a malformed override."""


def is_preset(name_or_path: str) -> bool:
    return str(name_or_path).startswith(PREFIX)


def preset_names() -> list[str]:
    return sorted(PRESETS) + sorted(ALIASES)


def parse(spec: str) -> tuple[Preset | FamilyPreset, dict[str, int]]:
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
    if isinstance(preset, FamilyPreset):
        return _family_config(spec, preset, overrides)
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
    if isinstance(preset, FamilyPreset):
        return _family_processor(preset, config)
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


# ------------------------------------------------------------------------------ other families

def _vision_field(vision: dict, generic: str) -> str:
    """The vision config's name for a generic field (Qwen2.5-VL's ViT says depth / num_heads)."""
    qwen = "depth" in vision
    return {"num_hidden_layers": "depth" if qwen else "num_hidden_layers",
            "num_attention_heads": "num_heads" if qwen else "num_attention_heads"}.get(generic, generic)


def _family_config(spec: str, preset: FamilyPreset, overrides: dict[str, int]):
    """The transformers config of a family preset: the published values, then the overrides."""
    from transformers import AutoConfig

    raw = preset.data["config"]
    text = raw.get("text_config", raw)  # Qwen2.5-VL's config.json is flat: the LLM's fields at the top
    vision = raw["vision_config"]
    qformer = raw.get("qformer_config")  # InstructBLIP
    for key, value in overrides.items():
        where, name = OVERRIDES[key]
        if where == "text":
            text[name] = value
        elif where == "vision":
            vision[_vision_field(vision, name)] = value
        elif qformer is None:
            raise PresetError(f"model.name_or_path = {spec!r}: override `{key}` applies to a Q-Former, which preset "
                              f"{preset.name} ({preset.model_type}) does not have; fix: drop it")
        else:
            qformer[name] = value
    if qformer is not None:
        if qformer["hidden_size"] % qformer["num_attention_heads"]:
            raise PresetError(f"model.name_or_path = {spec!r}: Q-Former hidden size {qformer['hidden_size']} is not a "
                              f"multiple of its {qformer['num_attention_heads']} heads; fix the overrides")
        qformer["encoder_hidden_size"] = vision["hidden_size"]  # its cross-attention reads the vision tower
    heads = text["num_attention_heads"]
    if text["hidden_size"] % heads:
        raise PresetError(f"model.name_or_path = {spec!r}: text hidden size {text['hidden_size']} is not a multiple "
                          f"of its {heads} heads; fix the overrides")
    if heads % text["num_key_value_heads"]:
        raise PresetError(f"model.name_or_path = {spec!r}: {heads} attention heads are not a multiple of "
                          f"{text['num_key_value_heads']} key/value heads; fix the overrides")
    v_heads = vision[_vision_field(vision, "num_attention_heads")]
    if vision["hidden_size"] % v_heads:
        raise PresetError(f"model.name_or_path = {spec!r}: vision hidden size {vision['hidden_size']} is not a "
                          f"multiple of its {v_heads} heads; fix the overrides")
    head_dim = text.get("head_dim") or text["hidden_size"] // heads
    resized = any(OVERRIDES[k][0] == "text" and OVERRIDES[k][1] in ("hidden_size", "num_attention_heads")
                  for k in overrides)
    if resized:  # a published head_dim (Gemma-2 9B's 256 with 3,584 / 16 = 224) holds at the published width only
        head_dim = text["hidden_size"] // heads
        if "head_dim" in text:
            text["head_dim"] = head_dim
        if "query_pre_attn_scalar" in text:  # Gemma-2 scales the scores by 1/sqrt(head_dim)
            text["query_pre_attn_scalar"] = head_dim
    if "projection_dim" in vision:  # PaliGemma: the projector maps the vision width into the LLM's
        vision["projection_dim"] = text["hidden_size"]
        raw["projection_dim"] = text["hidden_size"]
    if "out_hidden_size" in vision:  # Qwen2.5-VL: the merger projects into the LLM's width
        vision["out_hidden_size"] = text["hidden_size"]
    if "fullatt_block_indexes" in vision:  # full-attention blocks beyond a reduced depth do not exist
        vision["fullatt_block_indexes"] = [i for i in vision["fullatt_block_indexes"] if i < vision["depth"]]
    rope = text.get("rope_scaling") or {}
    if "mrope_section" in rope and sum(rope["mrope_section"]) != head_dim // 2:
        # M-RoPE splits half the head's rotary dims 1 : 1.5 : 1.5 over (time, height, width), 16/24/24 at 128.
        half = head_dim // 2
        hw = (half - half // 4) // 2
        rope["mrope_section"] = [half - 2 * hw, hw, hw]
    model_type = raw.pop("model_type")
    raw.pop("architectures", None)
    cfg = AutoConfig.for_model(model_type, **raw)
    return cfg


def _filled_vocab(base: dict, size: int) -> dict:
    """`base` (piece -> id, ids 0..n-1) extended with unused filler pieces up to `size` entries."""
    vocab = dict(base)
    for i in range(len(vocab), size):
        vocab[f"<|sare_unused_{i}|>"] = i
    return vocab


def _shifted_vocab(vocab: dict, merges: list, leading: list[str], first: int) -> tuple[dict, list]:
    """`leading` at ids 0.., the base BPE's pieces after them; the last merges (and the pieces they make) are
    dropped when the pieces would otherwise reach id `first`."""
    lead = len(leading)
    drop = max(0, len(vocab) + lead - first)
    if drop:
        kept = len(vocab) - drop
        removed = {piece for piece, i in vocab.items() if i >= kept}
        made = {"".join(m if isinstance(m, list) else m.split(" ")) for m in merges[-drop:]}
        if removed != made:  # a BPE trainer's vocabulary is its alphabet, then each merge's piece in order
            raise AssertionError("the base tokenizer's last pieces are not its last merges' pieces")
        vocab = {piece: i for piece, i in vocab.items() if i < kept}
        merges = merges[:-drop]
    return {**{t: i for i, t in enumerate(leading)}, **{piece: i + lead for piece, i in vocab.items()}}, merges


BYTE_LEVEL_FORMAT = 1  # bump when the construction below changes (part of the cache key)


def _byte_level_base() -> Path:
    """A 32,000-piece byte-level BPE trained on English words (the base of every family stand-in); cached."""
    cached = cache_root() / "presets" / f"bytelevel-{BYTE_LEVEL_FORMAT}" / "tokenizer.json"
    if cached.is_file():
        return cached
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=32_000, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())

    def corpus():
        for word, weight in _english_words():
            for variant, w in ((word, weight), (word.capitalize(), max(1, weight // 8))):
                yield " ".join([variant] * w)

    tok.train_from_iterator(corpus(), trainer=trainer)
    cached.parent.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cached.parent.parent, prefix=".tmp-"))
    tok.save(str(tmp / "tokenizer.json"))
    try:
        tmp.rename(cached.parent)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
    return cached


def build_family_tokenizer(preset: FamilyPreset):
    """The stand-in tokenizer of a family preset (see the module docstring): the byte-level base, filler
    pieces up to the first special id, the checkpoint's special tokens at their ids, its BOS behaviour."""
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    spec = preset.data["tokenizer"]
    first, specials = spec["first_special_id"], spec["specials"]
    leading = spec.get("leading_specials", [])
    key = hashlib.sha256(json.dumps([BYTE_LEVEL_FORMAT, spec], sort_keys=True).encode()).hexdigest()[:12]
    cached = cache_root() / "presets" / f"{preset.name}-tokenizer-{key}.json"
    if cached.is_file():
        tok = Tokenizer.from_file(str(cached))
    else:
        raw = json.loads(_byte_level_base().read_text())
        if leading:  # Llama / Gemma layouts: <unk> <s> </s> or <pad> <eos> <bos> <unk> first, the pieces after
            raw["model"]["vocab"], raw["model"]["merges"] = _shifted_vocab(
                raw["model"]["vocab"], raw["model"]["merges"], leading, first)
        raw["model"]["vocab"] = _filled_vocab(raw["model"]["vocab"], first)
        tok = Tokenizer.from_str(json.dumps(raw))
        if leading:
            tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in leading])
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        if spec["add_bos"]:
            bos = spec["bos"]
            tok.post_processor = TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                    special_tokens=[(bos, tok.token_to_id(bos))])
        fd, tmp = tempfile.mkstemp(dir=cached.parent, prefix=".tmp-", suffix=".json")
        os.close(fd)
        tok.save(tmp)
        os.replace(tmp, cached)  # atomic: a concurrent build writes the same file
    ids = [tok.token_to_id(t) for t in specials]
    if ids != list(range(first, first + len(specials))):
        raise AssertionError(f"preset {preset.name}: special tokens landed at {ids[:3]}..., not from {first}")
    if [tok.token_to_id(t) for t in leading] != list(range(len(leading))):
        raise AssertionError(f"preset {preset.name}: the leading special tokens {leading} are not at ids 0..")
    named = {"bos_token": spec["bos"], "eos_token": spec["eos"], "pad_token": spec["pad"]}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **{k: v for k, v in named.items() if v is not None},
                                   extra_special_tokens=dict(spec["extra_special_tokens"]),
                                   model_max_length=spec["model_max_length"], padding_side="right")
    fast.add_bos_token = bool(spec["add_bos"])
    fast.chat_template = preset.data["chat_template"]
    return fast


WORDPIECE_FORMAT = 1  # bump when the construction below changes (part of the cache key)


def build_qformer_tokenizer(spec: dict):
    """InstructBLIP's Q-Former tokenizer stand-in: bert-base-uncased's layout ([PAD] 0, [unused0..98],
    [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103, [unused99..] up to the first word piece at 999), a
    lower-casing WordPiece trained here on the same English words, unused fillers up to BERT's 30,522
    entries, then the `[DEC]` BOS token InstructBLIP adds (30522); cached."""
    from transformers import BertTokenizer

    size, first_piece = spec["vocab_size"], spec["first_piece_id"]
    key = hashlib.sha256(json.dumps([WORDPIECE_FORMAT, spec], sort_keys=True).encode()).hexdigest()[:12]
    cached = cache_root() / "presets" / f"qformer-wordpiece-{key}.json"
    if not cached.is_file():
        from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

        wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        wp.normalizer = normalizers.BertNormalizer(lowercase=True)
        wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()

        def corpus():
            for word, weight in _english_words():
                yield " ".join([word.lower()] * weight)

        wp.train_from_iterator(corpus(), trainers.WordPieceTrainer(
            vocab_size=size - first_piece, special_tokens=["[UNK]"], show_progress=False))
        at = {i: t for t, i in spec["specials"].items()}
        ids, unused = {}, 0
        for i in range(first_piece):  # the specials at their ids, [unusedN] around them
            if i in at:
                ids[at[i]] = i
            else:
                ids[f"[unused{unused}]"], unused = i, unused + 1
        pieces = [t for t, _ in sorted(wp.get_vocab().items(), key=lambda x: x[1]) if t not in ids]
        for t in pieces[: size - first_piece]:
            ids[t] = len(ids)
        while len(ids) < size:
            ids[f"[unused_sare_{len(ids)}]"] = len(ids)
        cached.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cached.parent, prefix=".tmp-", suffix=".json")
        os.close(fd)
        Path(tmp).write_text(json.dumps(ids))
        os.replace(tmp, cached)
    vocab = json.loads(cached.read_text())
    tok = BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=spec["model_max_length"],
                        truncation_side=spec.get("truncation_side", "right"))
    tok.add_special_tokens({"bos_token": spec["bos"]})
    if tok.convert_tokens_to_ids(spec["bos"]) != size:
        raise AssertionError(f"Q-Former tokenizer: {spec['bos']} landed at {tok.convert_tokens_to_ids(spec['bos'])}")
    return tok


def _family_processor(preset: FamilyPreset, config):
    """The preset's processor: the published image preprocessing, the stand-in tokenizer, the template."""
    import transformers

    data = preset.data
    spec = data["processor"]
    tok = build_family_tokenizer(preset)
    image_processor = getattr(transformers, spec["image_processor_cls"])(**spec["image_processor"])
    parts = dict(image_processor=image_processor, tokenizer=tok)
    if data.get("qformer_tokenizer"):  # InstructBLIP: the instruction as the Q-Former reads it
        parts["qformer_tokenizer"] = build_qformer_tokenizer(data["qformer_tokenizer"])
    if spec.get("video_processor_cls"):
        parts["video_processor"] = getattr(transformers, spec["video_processor_cls"])()
    return getattr(transformers, spec["cls"])(**parts, chat_template=data["chat_template"], **spec["kwargs"])


def describe() -> str:
    """One line per preset (for --help texts and docs)."""
    lines = [f"  preset:{p.name:<24} {p.source}: {p.note}" for p in PRESETS.values()]
    lines += [f"  preset:{a:<24} = preset:{t}" for a, t in ALIASES.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps({n: hf_config(PREFIX + n).to_dict()["text_config"]["num_hidden_layers"] for n in preset_names()}))
