"""Qwen2-VL / Qwen2.5-VL adapters on tiny random checkpoints of each (built offline, loaded through
load_mllm exactly as a real checkpoint), and on the published 7B/3B configs at their true shapes
(meta device: shapes only)."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from sare_ds.config import MethodConfig, ModelConfig
from sare_ds.data.samples import KINDS, BadSampleError, Caption, Span
from sare_ds.data.synthetic import generate_captions
from sare_ds.data.tokenize import collate_captions, tokenize_caption
from sare_ds.models import load_mllm, resolve_adapter, select_trainable
from sare_ds.models.adapter import UnknownModelLayoutError
from sare_ds.models.qwen2_vl import ImageGeometryMismatchError, Qwen2_5_VLAdapter, Qwen2VLAdapter

PROMPT = "Describe the image."
FAMILIES = {"qwen2_vl": Qwen2VLAdapter, "qwen2_5_vl": Qwen2_5_VLAdapter}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    return {fam: cls.build_tiny(tmp_path_factory.mktemp(f"tiny-{fam}"), seed=0) for fam, cls in FAMILIES.items()}


@pytest.fixture(scope="module", params=list(FAMILIES))
def qwen(request, tiny_dirs):
    torch.manual_seed(0)
    adapter = load_mllm(ModelConfig(name_or_path=str(tiny_dirs[request.param])))
    adapter.model.eval()
    return adapter


def image(w, h, colour=(200, 40, 40)):
    img = Image.new("RGB", (w, h), (245, 245, 245))
    img.paste(colour, (w // 4, h // 4, max(w // 4 + 1, w // 2), max(h // 4 + 1, h // 2)))
    return img


def caption_with(img, text="The image shows a dog, a cat. There is also a car nearby.", sent=True):
    i = text.index("car")
    return Caption(image=img, prompt=PROMPT, caption=text, sent=sent, sent_score=30.0, sent_min_score=20.0,
                   spans=[Span(text.index("dog"), text.index("dog") + 3, "pos", "dog", 35.0),
                          Span(i, i + 3, "neg", "car", 15.0)], image_id=f"{img.size[0]}x{img.size[1]}")


# ------------------------------------------------------------------------------ loading and layout

def test_tiny_checkpoint_loads_through_auto_with_qwen_token_layout(qwen, tiny_dirs):
    cls = FAMILIES[qwen.family]
    assert type(qwen) is cls and qwen.model.config.model_type == qwen.family
    assert type(qwen.model).__name__ == cls._model_class().__name__
    tok = qwen.tokenizer
    # Qwen2's tokenizer adds no BOS; chat EOS is <|im_end|>, padding <|endoftext|>.
    assert tok.bos_token is None and tok("a")["input_ids"] == tok("a", add_special_tokens=False)["input_ids"]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert qwen.placeholder_text == "<|image_pad|>" == tok.convert_ids_to_tokens(qwen.model.config.image_token_id)
    gen = qwen.model.generation_config
    assert gen.pad_token_id == tok.pad_token_id and tok.eos_token_id in gen.eos_token_id
    # The same weights every build.
    again = FAMILIES[qwen.family].build_tiny(tiny_dirs[qwen.family].parent / f"again-{qwen.family}", seed=0)
    other = load_mllm(ModelConfig(name_or_path=str(again)))
    for (n, p), (m, q) in zip(qwen.model.named_parameters(), other.model.named_parameters()):
        assert n == m and torch.equal(p, q), n


def test_chat_template_is_chatml_with_default_system_turn(qwen):
    text = qwen.render(qwen.conversation(PROMPT, "A dog."), add_generation_prompt=False)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>Describe the image.<|im_end|>\n"
                    "<|im_start|>assistant\nA dog.<|im_end|>\n")
    prompt = qwen.render(qwen.conversation(PROMPT), add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n") and not prompt.startswith("<s>")


# ------------------------------------------------------------------------------ image expansion

# (width, height) -> image positions: sides rounded to multiples of 8 px (4-px patches merged 2 x 2),
# pixel count within [16^2, 48^2]; positions = (h / 8) * (w / 8). Small images are scaled up, large
# ones down, aspect ratio kept (dynamic resolution, no tiles).
SIZES = {(32, 32): 16, (48, 24): 18, (20, 60): 16, (200, 150): 30, (7, 7): 4, (64, 16): 16}


@pytest.mark.parametrize("size", list(SIZES))
def test_expansion_equals_the_processors_own_for_every_image_size(qwen, size):
    img = image(*size)
    item = tokenize_caption(caption_with(img), qwen, 512)[0]
    messages = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": PROMPT}]},
                {"role": "assistant", "content": [{"type": "text", "text": caption_with(img).caption}]}]
    truth = qwen.processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
    ours = item.input_ids.tolist()
    full = truth["input_ids"][0].tolist()
    # sare_ds stops after the response's EOS (<|im_end|>); the template then closes the turn with "\n".
    assert ours == full[:len(ours)]
    assert full[len(ours):] == qwen.tokenizer("\n", add_special_tokens=False)["input_ids"]
    grid = truth["image_grid_thw"]
    n = SIZES[size]
    assert ours.count(qwen.image_token_id) == n == int(grid.prod()) // 4
    # One contiguous run, framed by <|vision_start|> ... <|vision_end|>.
    start = ours.index(qwen.image_token_id)
    assert ours[start - 1] == qwen.model.config.vision_start_token_id
    assert ours[start + n] == qwen.model.config.vision_end_token_id
    # The image tensors are the processor's, per image: flat patches and a [1, 3] grid.
    assert torch.equal(item.image["image_grid_thw"], grid)
    assert torch.equal(item.image["pixel_values"], truth["pixel_values"])
    assert set(item.image) == {"pixel_values", "image_grid_thw"}
    assert item.image["pixel_values"].shape == (int(grid.prod()), 3 * 2 * 4 * 4)
    assert qwen.image_inputs(img).num_image_tokens == n


def test_forward_inputs_rebuild_mm_token_type_ids_as_the_processor_gives_them(qwen):
    caps = [caption_with(image(*s)) for s in ((32, 32), (48, 24), (7, 7))]
    items = [tokenize_caption(c, qwen, 512)[0] for c in caps]
    batch = collate_captions(items, qwen.tokenizer.pad_token_id, KINDS, trim=False)
    inputs = qwen.forward_inputs(batch)
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids"}
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 8], [1, 6, 12], [1, 4, 4]]
    for row, (c, it) in enumerate(zip(caps, items)):
        text = qwen.render(qwen.conversation(PROMPT, c.caption), add_generation_prompt=False)
        text = text[:text.rindex(c.caption) + len(c.caption)]
        out = qwen.processor(images=c.image, text=text, return_tensors="pt")
        n = out["input_ids"].shape[1]
        assert torch.equal(inputs["mm_token_type_ids"][row, :n], out["mm_token_type_ids"][0])
        assert not inputs["mm_token_type_ids"][row, n:].any()  # padding is text (and masked)


def test_right_padded_rows_give_the_logits_of_each_row_alone(qwen):
    """Packed batches are right-padded rows of different lengths (here: images of different sizes, so
    different image position counts and 3-D rope grids); each row must be what it is alone."""
    caps = [caption_with(image(*s), text=t) for s, t in (
        ((32, 32), "The image shows a dog, a cat. There is also a car nearby."),
        ((64, 16), "The image shows a dog. There is also a car nearby."),
        ((7, 7), "The image shows a dog, a cat, a bird. There is also a car nearby."))]
    items = [tokenize_caption(c, qwen, 512)[0] for c in caps]
    assert len({len(i.input_ids) for i in items}) == 3
    batch = collate_captions(items, qwen.tokenizer.pad_token_id, KINDS, trim=False)
    assert not batch["attention_mask"].all()  # some rows are padded on the right
    with torch.no_grad():
        together = qwen.model(**qwen.forward_inputs(batch)).logits
        for row, it in enumerate(items):
            alone = qwen.model(**qwen.forward_inputs(collate_captions([it], qwen.tokenizer.pad_token_id, KINDS,
                                                                     trim=False))).logits[0]
            n = len(it.input_ids)
            torch.testing.assert_close(together[row, :n], alone, rtol=1e-5, atol=1e-5)


def test_forward_returns_final_hidden_states_and_honours_logits_to_keep(qwen):
    items = [tokenize_caption(c, qwen, 512)[0] for c in generate_captions(2, 32, PROMPT, seed=1)]
    batch = collate_captions(items, qwen.tokenizer.pad_token_id, KINDS)
    with torch.no_grad():
        full = qwen.model(**qwen.forward_inputs(batch), output_hidden_states=True)
        kept = qwen.model(**qwen.forward_inputs(batch), logits_to_keep=batch["keep"][:0], output_hidden_states=True)
    assert kept.logits.shape[1] == 0
    # The training step runs the head itself on hidden_states[-1] (the normed last hidden state).
    head = qwen.model.get_output_embeddings()
    torch.testing.assert_close(head(kept.hidden_states[-1][:, batch["keep"]]), full.logits[:, batch["keep"]])


def test_published_key_layout_loads_every_weight(qwen, tiny_dirs, tmp_path):
    """The Qwen checkpoints on the hub keep the pre-v4.52 names (`visual.*`, `model.layers.*`,
    `model.embed_tokens`); loading renames them, so the merger is `model.visual.merger.*` either way."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = tiny_dirs[qwen.family]
    shutil.copytree(src, tmp_path / "published")
    state = load_file(str(src / "model.safetensors"))
    legacy = {}
    for k, v in state.items():
        if k.startswith("model.visual."):
            k = k[len("model."):]
        elif k.startswith("model.language_model."):
            k = "model." + k[len("model.language_model."):]
        legacy[k] = v
    assert "visual.merger.mlp.0.weight" in legacy and "model.layers.0.self_attn.q_proj.weight" in legacy
    save_file(legacy, str(tmp_path / "published" / "model.safetensors"), metadata={"format": "pt"})
    loaded = load_mllm(ModelConfig(name_or_path=str(tmp_path / "published")))
    assert not any(loaded.loading.values())  # nothing missing, mis-shaped or unused
    ref = dict(qwen.model.named_parameters())
    for n, p in loaded.model.named_parameters():
        assert torch.equal(p, ref[n]), n


# ------------------------------------------------------------------------------ refusals

def test_processor_with_other_patch_geometry_is_refused(qwen):
    import copy

    processor = copy.deepcopy(qwen.processor)
    processor.image_processor.merge_size = 1
    with pytest.raises(ImageGeometryMismatchError, match=r"merge_size = 1 but vision_config.spatial_merge_size = 2"
                       r"(.|\n)*Fix: use the checkpoint's own preprocessor_config.json"):
        type(qwen)(qwen.model, processor, "tiny")


def test_too_elongated_image_is_a_bad_sample_naming_the_rule(qwen):
    with pytest.raises(BadSampleError, match=r"820 x 4 px has an aspect ratio of 205:1(.|\n)*Fix: crop or pad") as e:
        tokenize_caption(caption_with(image(820, 4)), qwen, 512)
    assert e.value.reason == "image aspect ratio beyond 200:1"


def test_batch_cut_inside_its_image_is_refused_before_the_forward(qwen):
    item = tokenize_caption(caption_with(image(32, 32)), qwen, 512)[0]
    batch = collate_captions([item], qwen.tokenizer.pad_token_id, KINDS)
    start = item.input_ids.tolist().index(qwen.image_token_id)
    for key in ("input_ids", "attention_mask"):
        batch[key] = batch[key][:, :start + 5]
    with pytest.raises(ValueError, match=r"5 image positions(.|\n)*gives 16(.|\n)*Fix: keep each image whole"):
        qwen.forward_inputs(batch)


# ------------------------------------------------------------------------------ real checkpoints

_TEXT_7B = dict(bos_token_id=151643, eos_token_id=151645, vision_start_token_id=151652, vision_end_token_id=151653,
                vision_token_id=151654, image_token_id=151655, video_token_id=151656, hidden_act="silu",
                hidden_size=3584, intermediate_size=18944, max_window_layers=28, num_attention_heads=28,
                num_hidden_layers=28, num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=1000000.0,
                sliding_window=32768, use_sliding_window=False, tie_word_embeddings=False, torch_dtype="bfloat16",
                rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, vocab_size=152064)
_VISION_25 = dict(depth=32, hidden_act="silu", hidden_size=1280, intermediate_size=3420, num_heads=16, in_chans=3,
                  out_hidden_size=3584, patch_size=14, spatial_merge_size=2, spatial_patch_size=14, window_size=112,
                  fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, temporal_patch_size=2)
# The published config.json of each checkpoint (the fields that set shapes and token ids).
REAL = {
    "Qwen/Qwen2-VL-7B-Instruct": dict(
        _TEXT_7B, architectures=["Qwen2VLForConditionalGeneration"], model_type="qwen2_vl",
        max_position_embeddings=32768,
        vision_config=dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, in_chans=3, hidden_size=3584,
                           patch_size=14, spatial_merge_size=2, spatial_patch_size=14, temporal_patch_size=2)),
    "Qwen/Qwen2.5-VL-7B-Instruct": dict(
        _TEXT_7B, architectures=["Qwen2_5_VLForConditionalGeneration"], model_type="qwen2_5_vl",
        max_position_embeddings=128000, vision_config=_VISION_25),
    "Qwen/Qwen2.5-VL-3B-Instruct": dict(
        _TEXT_7B, architectures=["Qwen2_5_VLForConditionalGeneration"], model_type="qwen2_5_vl",
        max_position_embeddings=128000, hidden_size=2048, intermediate_size=11008, num_attention_heads=16,
        num_hidden_layers=36, num_key_value_heads=2, max_window_layers=70, tie_word_embeddings=True,
        vocab_size=151936, vision_config=dict(_VISION_25, out_hidden_size=2048)),
}
# Merger: norm over the vision width (LayerNorm with bias in Qwen2-VL, RMSNorm in Qwen2.5-VL), Linear(4 x 1280,
# 4 x 1280) and Linear(4 x 1280, LLM width), both with bias.
MERGER_PARAMS = {"Qwen/Qwen2-VL-7B-Instruct": 2 * 1280 + 5120 * 5121 + 5121 * 3584,
                 "Qwen/Qwen2.5-VL-7B-Instruct": 1280 + 5120 * 5121 + 5121 * 3584,
                 "Qwen/Qwen2.5-VL-3B-Instruct": 1280 + 5120 * 5121 + 5121 * 2048}


@pytest.fixture(scope="module")
def real_dirs(tmp_path_factory):
    out = {}
    for name, cfg in REAL.items():
        d = tmp_path_factory.mktemp(name.split("/")[1])
        (d / "config.json").write_text(json.dumps(cfg))
        out[name] = d
    return out


@pytest.mark.parametrize("name", list(REAL))
def test_auto_picks_the_family_of_each_published_checkpoint_and_counts_its_merger(real_dirs, name):
    d = str(real_dirs[name])
    cls = resolve_adapter(ModelConfig(name_or_path=d))
    assert cls is FAMILIES[REAL[name]["model_type"]]
    # Forcing the other Qwen family is refused (their model_types do not overlap).
    other = next(f for f in FAMILIES if f != cls.family)
    with pytest.raises(UnknownModelLayoutError, match=f"model_type `{cls.family}`"):
        resolve_adapter(ModelConfig(name_or_path=d, family=other))
    adapter = load_mllm(ModelConfig(name_or_path=d, dtype="bfloat16"), device="meta")
    names = adapter.mapping_parameter_names()
    assert names and all(n.startswith("model.visual.merger.") for n in names)
    params = dict(adapter.model.named_parameters())
    assert sum(params[n].numel() for n in names) == MERGER_PARAMS[name]
    assert params["model.visual.merger.mlp.2.weight"].shape == (REAL[name]["hidden_size"], 5120)


def test_real_image_processor_positions_per_image():
    """Published preprocessor_config: 14-px patches merged 2 x 2 (28-px units), 3,136 to 12,845,056 px."""
    from transformers import Qwen2VLImageProcessor

    ip = Qwen2VLImageProcessor(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=3136,
                               max_pixels=12845056)
    tokens = {hw: ip.get_number_of_image_patches(*hw, {}) // 4 for hw in ((336, 336), (480, 640), (640, 640))}
    assert tokens == {(336, 336): 12 * 12, (480, 640): 17 * 23, (640, 640): 23 * 23}


# ------------------------------------------------------------------------------ trainable sets

def test_mapping_layers_are_the_merger_only(qwen):
    names = select_trainable(qwen, ModelConfig(trainable="mapping"))
    expected = ["model.visual.merger.mlp.0.weight", "model.visual.merger.mlp.0.bias",
                "model.visual.merger.mlp.2.weight", "model.visual.merger.mlp.2.bias", "model.visual.merger.ln_q.weight"]
    if qwen.family == "qwen2_vl":
        expected.append("model.visual.merger.ln_q.bias")  # LayerNorm; Qwen2.5-VL's RMSNorm has none
    assert sorted(names) == sorted(expected)
    for p in qwen.model.parameters():
        p.requires_grad_(True)


def test_lora_lands_inside_the_language_model_only(tiny_dirs):
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for fam, d in tiny_dirs.items():
        adapter = load_mllm(ModelConfig(name_or_path=str(d)))
        names = select_trainable(adapter, ModelConfig(trainable="mapping+lora", lora_target_modules=targets))
        lora_modules = {n.rsplit(".lora_", 1)[0] for n in names if "lora_" in n}
        assert lora_modules and all(".model.language_model.layers." in n for n in lora_modules)
        assert {m.rsplit(".", 1)[1] for m in lora_modules} == set(targets)
        assert len(lora_modules) == 2 * len(targets)  # 2 decoder layers
        # Qwen2.5-VL's vision MLPs are also called gate/up/down_proj: they stay without LoRA.
        assert not any("visual" in n and "lora_" in n for n in names)
        assert {n for n in names if "lora_" not in n} == {
            n for n, _ in adapter.model.named_parameters() if ".visual.merger." in n}


# ------------------------------------------------------------------------------ step and generation

def _step_weights(model_dir, captions, packing):
    from sare_ds.train.params import PlainParameterSpace
    from sare_ds.train.step import UnlearningStep

    adapter = load_mllm(ModelConfig(name_or_path=str(model_dir)))
    select_trainable(adapter, ModelConfig())
    params = [p for p in adapter.model.parameters() if p.requires_grad]
    space = PlainParameterSpace(params, torch.optim.SGD(params, lr=0.1), None, 0.0)
    step = UnlearningStep(adapter.model, adapter.forward_inputs, space, MethodConfig(name="sare"),
                          device=torch.device("cpu"), dtype=torch.float32,
                          pad_token_id=adapter.tokenizer.pad_token_id)
    micro = [s for c in captions for s in tokenize_caption(c, adapter, 512, packing=packing)]
    metrics = step([micro])
    return torch.cat([p.detach().flatten() for p in params]), {k: float(v) for k, v in metrics.items()}


@pytest.mark.parametrize("fam", list(FAMILIES))
def test_packed_sare_step_equals_the_per_sample_step(tiny_dirs, fam):
    caps = generate_captions(3, 32, PROMPT, seed=3)
    assert any(s.kind == "neg" for c in caps for s in c.spans) and any(c.sent for c in caps)
    caps[1].image = image(48, 24)  # rows with different image sizes in one batch
    packed, m_packed = _step_weights(tiny_dirs[fam], caps, True)
    single, m_single = _step_weights(tiny_dirs[fam], caps, False)
    assert ((packed.double() - single.double()).norm() / single.double().norm()).item() <= 1e-6
    assert m_packed["loss/neg"] != 0 and m_packed["sam/eps_norm"] > 0
    for k in m_packed:
        if k.startswith(("loss/", "sam/")):
            assert m_packed[k] == pytest.approx(m_single[k], rel=1e-5, abs=1e-6), k


def test_left_padded_batched_generation_equals_one_image_at_a_time(qwen):
    from sare_ds.models.generate import generate_responses

    imgs = [image(32, 32), image(48, 24, (30, 30, 220)), image(7, 7)]
    together = generate_responses(qwen, imgs, PROMPT, max_new_tokens=5, batch_size=3)
    alone = [generate_responses(qwen, [img], PROMPT, max_new_tokens=5, batch_size=1)[0] for img in imgs]
    assert together == alone and all(together)
