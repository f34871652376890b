"""True-shape presets of the families beyond LLaVA: published configs on the meta device, their processors.

The expected mapping-layer counts are computed by hand from the published widths (not read back
from the model); the totals are the meta build's exact counts, checked against the sizes the
checkpoints publish (8.29B, 8.03B, 8.46B, 7.94B; InstructBLIP-Vicuna-7B 7.91B, PaliGemma 2 10B 9.66B).
Image positions are those of one 640 x 480 image (plan.py's default) through the preset's processor with
the checkpoint's preprocessing.

PaliGemma 2 is built with model.attn_implementation=eager (the documented way: its adapter refuses the
default sdpa, which cannot soft-cap Gemma-2's attention logits); a preset does not carry the attention kernel.
"""
from __future__ import annotations

import functools

import pytest
import torch
from PIL import Image

from sare_ds.config import EFUF_CAPTION_PROMPT, ModelConfig
from sare_ds.data.samples import Sample
from sare_ds.data.tokenize import tokenize_sample
from sare_ds.models import adapter as adapter_module
from sare_ds.models import load_mllm, presets, select_trainable


def linear(i: int, o: int, bias: bool = True) -> int:
    return i * o + (o if bias else 0)


# name: (adapter family, total params, published size in billions, mapping params by hand,
#        image-token id, LLM positions of one 640x480 image, of which image-token positions)
EXPECTED = {
    # merger: RMSNorm(1280) + Linear(4*1280 -> 4*1280) + Linear(5120 -> 3584); 640x480 -> 644x476 px = 46x34
    # patches, merged 2x2 -> 23x17 = 391 tokens.
    "qwen2.5-vl-7b": ("qwen2_5_vl", 8_292_166_656, 8.29, 1280 + linear(5120, 5120) + linear(5120, 3584),
                      151655, 391, 391),
    # projector: Linear(1152 -> 3584) + Linear(3584 -> 3584) + image_newline(3584); AnyRes: 729-token base
    # image + the 768x768 grid's 4 tiles, unpadded and pooled for anyres_max_9, + a newline per row.
    "llava-onevision-7b": ("llava_onevision", 8_030_807_584, 8.03, linear(1152, 3584) + linear(3584, 3584) + 3584,
                           151646, 2929, 2929),
    # connector: pixel shuffle x2 -> Linear(4*1152 -> 4096, no bias); 640x480 -> 1456x1092 -> 4x3 tiles of 364 px
    # + the global image = 13 x 169 <image>; the rest are <fake_token_around_image> and row/column markers.
    "idefics3-8b": ("idefics3", 8_462_086_384, 8.46, linear(4 * 1152, 4096, bias=False), 128257, 2330, 13 * 169),
    # projector: LayerNorm(4*1024) + Linear(4096 -> 3584) + Linear(3584 -> 3584); 12 tiles + thumbnail of 448 px,
    # 256 tokens each, between <img> and </img>.
    "internvl3-8b": ("internvl", 7_944_373_760, 7.94, 2 * 4096 + linear(4096, 3584) + linear(3584, 3584),
                     151667, 2 + 13 * 256, 13 * 256),
    # qformer (qformer_hand below) + query_tokens 32 x 768 + language_projection Linear(768 -> 4096); the 32 query
    # outputs are the image positions whatever the image (224 px, bicubic, no tiling), in front of BOS.
    "instructblip-vicuna-7b": ("instructblip", 7_913_218_816, 7.91, None, 32001, 32, 32),
    # projector: Linear(1152 -> 3584); every image is resized to 448 px: (448 / 14)^2 = 1,024 tokens (no CLS).
    "paligemma2-10b-448": ("paligemma", 9_663_523_568, 9.66, linear(1152, 3584), 257152, 1024, 1024),
}
ATTN = {"paligemma2-10b-448": "eager"}  # Gemma-2: sdpa is refused by the adapter
TIED = {"paligemma2-10b-448"}           # PaliGemma ties the LM head to the input embedding


def qformer_hand(vocab=30523, positions=512, hidden=768, layers=12, intermediate=3072, vision=1408,
                 cross_every=2) -> int:
    """InstructBLIP's Q-Former from its published widths: BERT embeddings (words, positions, LayerNorm); per
    layer self-attention (q, k, v, output + LayerNorm), two feed-forwards (the text's and the queries' own,
    each up + down + LayerNorm), and on every `cross_every`-th layer cross-attention whose keys and values read
    the vision width."""
    ln = 2 * hidden
    embeddings = vocab * hidden + positions * hidden + ln
    self_attention = 4 * linear(hidden, hidden) + ln
    feed_forward = linear(hidden, intermediate) + linear(intermediate, hidden) + ln
    cross = 2 * linear(hidden, hidden) + 2 * linear(vision, hidden) + ln
    n_cross = len(range(0, layers, cross_every))
    return embeddings + layers * (self_attention + 2 * feed_forward) + n_cross * cross


EXPECTED["instructblip-vicuna-7b"] = EXPECTED["instructblip-vicuna-7b"][:3] + (
    qformer_hand() + 32 * 768 + linear(768, 4096),) + EXPECTED["instructblip-vicuna-7b"][4:]
CAPTION_100_WORDS = (
    "The image shows a busy city street with a red bus driving past a row of tall buildings. Several people are "
    "walking on the sidewalk, some carrying umbrellas and shopping bags. A man in a blue jacket is riding a bicycle "
    "near the curb, while a woman holds the hand of a small child. In the background there are traffic lights, a "
    "clock tower and a few parked cars. The sky is cloudy, suggesting it might rain soon. A dog on a leash sits next "
    "to a bench, and a street vendor sells hot food from a small red cart.")


def needs_adapter(model_type: str):
    assert model_type in adapter_module._REGISTRY, f"no adapter registered for {model_type}"


@functools.lru_cache(maxsize=None)
def meta_adapter(name: str):
    return load_mllm(ModelConfig(name_or_path=f"preset:{name}", dtype="bfloat16",
                                 attn_implementation=ATTN.get(name, "sdpa")), device="meta")


def test_hand_counts():
    assert EXPECTED["qwen2.5-vl-7b"][3] == 44_574_464
    assert EXPECTED["llava-onevision-7b"][3] == 16_984_576
    assert EXPECTED["idefics3-8b"][3] == 18_874_368
    assert EXPECTED["internvl3-8b"][3] == 27_540_480
    assert qformer_hand() == 185_660_160
    assert EXPECTED["instructblip-vicuna-7b"][3] == 188_834_560  # the ~188.8M of the Q-Former setup
    assert EXPECTED["paligemma2-10b-448"][3] == 4_132_352


def test_family_presets_are_listed_with_sources():
    names = presets.preset_names()
    for name in EXPECTED:
        assert name in names and f"{name}-reduced" in names
        p = presets.PRESETS[name]
        assert isinstance(p, presets.FamilyPreset) and "/" in p.source and p.data["values"]
    assert presets.PRESETS["qwen2.5-vl-7b"].source == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert "preset:internvl3-8b" in presets.describe()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_published_config_values(name):
    cfg = presets.hf_config(f"preset:{name}")
    published = presets.PRESETS[name].data["config"]
    text_published = published.get("text_config", published)
    text = cfg.get_text_config()
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "rms_norm_eps"):
        assert getattr(text, key) == text_published[key], key
    for key, value in published["vision_config"].items():
        if key not in ("architectures", "model_type"):
            assert getattr(cfg.vision_config, key) == value, key
    assert cfg.model_type == presets.PRESETS[name].model_type
    assert bool(cfg.tie_word_embeddings) == (name in TIED)
    if "qformer_config" in published:
        for key, value in published["qformer_config"].items():
            if key not in ("architectures", "model_type"):
                assert getattr(cfg.qformer_config, key) == value, key
        assert cfg.num_query_tokens == published["num_query_tokens"] == 32


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_stand_in_tokenizer_layout(name):
    _, _, _, _, image_id, _, _ = EXPECTED[name]
    cfg = presets.hf_config(f"preset:{name}")
    processor = presets.build_processor(f"preset:{name}", cfg)
    tok = processor.tokenizer
    spec = presets.PRESETS[name].data["tokenizer"]
    ids = tok.convert_tokens_to_ids(spec["specials"])
    assert ids == list(range(spec["first_special_id"], spec["first_special_id"] + len(spec["specials"])))
    vocab = cfg.get_text_config().vocab_size
    # Every id the model can see is inside its embedding (InternVL's <video> placeholder is the one above).
    beyond = [t for t, i in tok.get_vocab().items() if i >= vocab]
    assert beyond == (["<video>"] if name == "internvl3-8b" else [])
    # InstructBLIP's processor names the token only (it registers `<image>` itself, as with the checkpoint's).
    image_token = getattr(processor.image_token, "content", processor.image_token)
    assert getattr(processor, "image_token_id", image_id) == tok.convert_tokens_to_ids(image_token) == image_id
    if name == "instructblip-vicuna-7b":  # bert-base-uncased's layout and InstructBLIP's [DEC] at 30522
        q = processor.qformer_tokenizer
        assert q.convert_tokens_to_ids(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]) == \
            [0, 100, 101, 102, 103, 30522]
        assert len(q) == cfg.qformer_config.vocab_size == 30523
        assert q("A dog sitting next to a red bus", add_special_tokens=False)["input_ids"] and tok.bos_token == "</s>"
    # Ordinary English is tokenised by the stand-in BPE (no byte soup, no filler piece).
    words = tok("a dog sitting next to a red bus", add_special_tokens=False)["input_ids"]
    assert len(words) == 8 and max(words) < 32_000


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_on_meta_through_the_model_layer(name):
    family, total, billions, mapping, image_id, positions, image_positions = EXPECTED[name]
    needs_adapter(presets.PRESETS[name].model_type)
    adapter = meta_adapter(name)
    assert adapter.family == family
    params = list(adapter.model.parameters())
    assert all(p.device.type == "meta" for p in params)  # nothing was allocated
    n_total = sum(p.numel() for p in params)
    assert n_total == total and round(n_total / 1e9, 2) == billions
    published = presets.PRESETS[name].data.get("published_params")
    if published:
        assert abs(n_total - published) <= 0.01 * published
    select_trainable(adapter, ModelConfig(name_or_path=f"preset:{name}"))
    assert sum(p.numel() for p in params if p.requires_grad) == mapping
    assert adapter.image_token_id == image_id

    inputs = adapter.image_inputs(Image.new("RGB", (640, 480), (128, 128, 128)))
    assert inputs.num_image_tokens == positions
    assert inputs.expansion.count(image_id) == image_positions
    # A realistic sample (a 100-word caption, the EFUF prompt) through the preset's chat template.
    sample = Sample(image=Image.new("RGB", (640, 480)), prompt=EFUF_CAPTION_PROMPT, context="",
                    target=CAPTION_100_WORDS, kind="sent", score=0.0, image_id="x")
    t = tokenize_sample(sample, adapter, max_length=10_000)
    assert 100 <= t.num_target_tokens - 1 <= 150  # the stand-in BPE: ~1.1-1.4 tokens a word
    assert int((t.input_ids == image_id).sum()) == image_positions


def test_overrides_map_to_each_family():
    qwen = presets.hf_config("preset:qwen2.5-vl-7b-reduced")
    assert (qwen.vision_config.depth, qwen.vision_config.hidden_size, qwen.vision_config.num_heads) == (2, 64, 2)
    assert qwen.vision_config.out_hidden_size == qwen.text_config.hidden_size == 64
    assert qwen.vision_config.fullatt_block_indexes == []  # the published 7/15/23/31 do not exist at depth 2
    assert sum(qwen.text_config.rope_parameters["mrope_section"]) == 64 // 4 // 2  # half the 16-wide head
    assert qwen.text_config.vocab_size == 152064 and qwen.vision_config.patch_size == 14
    deeper = presets.hf_config("preset:qwen2.5-vl-7b,text_layers=3,vision_layers=9")
    assert deeper.text_config.num_hidden_layers == 3 and deeper.vision_config.fullatt_block_indexes == [7]
    assert deeper.text_config.rope_parameters["mrope_section"] == [16, 24, 24]
    for name in ("llava-onevision-7b", "idefics3-8b", "internvl3-8b"):
        cfg = presets.hf_config(f"preset:{name},text_layers=3,vision_layers=1,vision_hidden=64,vision_heads=2")
        assert cfg.get_text_config().num_hidden_layers == 3
        assert (cfg.vision_config.num_hidden_layers, cfg.vision_config.hidden_size) == (1, 64)
    with pytest.raises(presets.PresetError, match="not a multiple of 3 key/value heads"):
        presets.hf_config("preset:internvl3-8b,text_kv_heads=3")
    with pytest.raises(presets.PresetError, match="vision hidden size 100 is not a multiple of its 16 heads"):
        presets.hf_config("preset:idefics3-8b,vision_hidden=100")


def test_reduced_preset_trains_a_forward():
    needs_adapter("qwen2_5_vl")
    adapter = load_mllm(ModelConfig(name_or_path="preset:qwen2.5-vl-7b-reduced"))
    image = Image.new("RGB", (56, 56), (90, 120, 150))  # min_pixels: 2x2 merged tokens
    text = adapter.render(adapter.conversation("Describe.", "A dog."), add_generation_prompt=False)
    ids = adapter.tokenizer(text, add_special_tokens=False)["input_ids"]
    e = adapter.expand_image(text, ids, image, "Describe.")
    assert e.length == 4
    batch = {"input_ids": torch.tensor([e.ids]), "attention_mask": torch.ones(1, len(e.ids), dtype=torch.long),
             **e.tensors}
    out = adapter.model(**adapter.forward_inputs(batch), logits_to_keep=1, output_hidden_states=True)
    assert out.hidden_states[-1].shape == (1, len(e.ids), 64)
    assert out.logits.shape == (1, 1, 152064)


@pytest.mark.parametrize("name", ["instructblip-vicuna-7b", "paligemma2-10b-448"])
def test_reduced_qformer_and_gemma2_presets_run_a_forward(name):
    """The reduced aliases of the two presets without a chat template: one forward with real tensors through the
    family's own expansion (InstructBLIP: 32 query positions before BOS, the Q-Former reading the prompt;
    PaliGemma 2: 1,024 image positions, the prefix-LM token types)."""
    needs_adapter(presets.PRESETS[name].model_type)
    adapter = load_mllm(ModelConfig(name_or_path=f"preset:{name}-reduced", attn_implementation=ATTN.get(name, "sdpa")))
    image = Image.new("RGB", (64, 48), (90, 120, 150))
    text = adapter.render(adapter.conversation("Describe.", "A dog."), add_generation_prompt=False)
    ids = adapter.tokenizer(text, add_special_tokens=adapter.add_special_tokens(text))["input_ids"]
    e = adapter.expand_image(text, ids, image, "Describe.")
    image_positions = EXPECTED[name][5]
    assert e.length == image_positions and e.ids.count(adapter.image_token_id) == image_positions
    batch = {"input_ids": torch.tensor([e.ids]), "attention_mask": torch.ones(1, len(e.ids), dtype=torch.long),
             **e.tensors}
    response = len(e.ids) - len(adapter.tokenizer("A dog.", add_special_tokens=False)["input_ids"])
    for key, values in adapter.token_tensors(e.ids, response).items():
        batch[key] = torch.tensor([values])
    out = adapter.model(**adapter.forward_inputs(batch))
    vocab = adapter.model.config.get_text_config().vocab_size
    assert out.logits.shape == (1, len(e.ids), vocab) and torch.isfinite(out.logits).all()
    if name == "instructblip-vicuna-7b":
        assert adapter.model.config.qformer_config.num_hidden_layers == 2
        assert adapter.model.config.qformer_config.encoder_hidden_size == 64  # follows the reduced vision width


def test_paligemma2_preset_needs_eager_attention():
    """The documented way to build PaliGemma 2: model.attn_implementation=eager (and model.lm_head_chunks=0 to
    train); the default sdpa is refused before anything is built, naming the fix."""
    from sare_ds.models.paligemma import UnsupportedAttentionError

    with pytest.raises(UnsupportedAttentionError, match="attn_implementation=eager"):
        load_mllm(ModelConfig(name_or_path="preset:paligemma2-10b-448"), device="meta")
    text = presets.hf_config("preset:paligemma2-10b-448").text_config
    assert (text.head_dim, text.query_pre_attn_scalar, text.final_logit_softcapping) == (256, 256, 30.0)
    reduced = presets.hf_config("preset:paligemma2-10b-448-reduced")
    assert reduced.text_config.head_dim == 16 and reduced.vision_config.projection_dim == 64


def test_qformer_overrides_only_where_there_is_a_qformer():
    with pytest.raises(presets.PresetError, match="Q-Former"):
        presets.hf_config("preset:qwen2.5-vl-7b,qformer_layers=2")
    cfg = presets.hf_config("preset:instructblip-vicuna-7b,qformer_layers=4,vision_hidden=64,vision_heads=2")
    assert (cfg.qformer_config.num_hidden_layers, cfg.qformer_config.encoder_hidden_size) == (4, 64)
