"""InternVL (native transformers `-hf` layout): image expansion with dynamic tiling, forward inputs,
mapping layers, LoRA targets, family resolution and refusals, on a tiny random checkpoint built here;
real-checkpoint shapes on the meta device."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from sare_ds.config import ModelConfig
from sare_ds.data.samples import KINDS, Caption, Span
from sare_ds.data.tokenize import collate_captions, tokenize_caption

PROMPT = "Describe the image."
CAPTION = "The image shows a dog, a cat and a car."
# (width, height) -> tiles of the tiny checkpoint (32-px tiles, at most 6, + a thumbnail when > 1):
# the grid whose aspect ratio is closest to the image's; on a tie the larger grid while the image's
# area exceeds half of the grid's.
TILES = {(32, 32): 1, (64, 32): 3, (32, 64): 3, (64, 64): 5, (100, 30): 4, (200, 50): 5}
SEQ = 16  # image_seq_length of the tiny checkpoint: (32 / 4 / 2)^2


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from sare_ds.models.internvl import InternVLAdapter

    return InternVLAdapter.build_tiny(tmp_path_factory.mktemp("tiny-internvl"))


def load(path, **kw):
    from sare_ds.models import load_mllm

    return load_mllm(ModelConfig(name_or_path=str(path), **kw))


@pytest.fixture(scope="module")
def adapter(tiny_dir):
    return load(tiny_dir)


def image(size, seed=0):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


def caption(size, seed=0, text=CAPTION):
    start = text.index("dog")
    return Caption(image(size, seed), PROMPT, text, [Span(start, start + 3, "neg", "dog", 15.0)], sent=True,
                   sent_score=35.0, sent_min_score=35.0, image_id=f"img-{size[0]}x{size[1]}")


def test_tiny_checkpoint_loads_through_auto_with_the_real_layout(tiny_dir, adapter):
    from transformers import InternVLForConditionalGeneration

    from sare_ds.models.internvl import InternVLAdapter

    assert type(adapter) is InternVLAdapter and isinstance(adapter.model, InternVLForConditionalGeneration)
    tok = adapter.tokenizer
    # <IMG_CONTEXT> is what the template renders, what the processor expands and what the model fills.
    assert adapter.placeholder_token_id == adapter.image_token_id == tok.context_image_token_id
    assert adapter.placeholder_text == "<IMG_CONTEXT>"
    from sare_ds.data.tokenize import adds_bos

    assert not adds_bos(tok) and tok.bos_token is None and tok.eos_token == "<|im_end|>"  # Qwen2 ChatML: no BOS
    text = adapter.render(adapter.conversation(PROMPT), add_generation_prompt=True)
    assert text == "<|im_start|>user\n<IMG_CONTEXT>\nDescribe the image.<|im_end|>\n<|im_start|>assistant\n"
    assert json.loads((tiny_dir / "config.json").read_text())["model_type"] == "internvl"


@pytest.mark.parametrize("size", list(TILES))
def test_expansion_equals_the_processor_for_tiled_images(adapter, size):
    item = tokenize_caption(caption(size), adapter, 1024)[0]
    ids = item.input_ids.tolist()
    messages = adapter.conversation(PROMPT, CAPTION)
    messages[0]["content"][0]["image"] = item_image = caption(size).image
    truth = adapter.processor.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    truth = truth[0] if isinstance(truth[0], list) else truth
    # sare_ds's sequence is the processor's, cut after the caption, + EOS (sent span).
    assert ids[:-1] == truth[:len(ids) - 1] and ids[-1] == adapter.tokenizer.eos_token_id
    tok = adapter.tokenizer
    tiles = TILES[size]
    start = ids.index(tok.start_image_token_id)
    expected = [tok.start_image_token_id] + [adapter.image_token_id] * (SEQ * tiles) + [tok.end_image_token_id]
    assert ids[start:start + len(expected)] == expected
    assert ids.count(adapter.image_token_id) == SEQ * tiles
    assert item.image["pixel_values"].shape == (tiles, 3, 32, 32)
    assert set(item.image) == {"pixel_values"}
    assert adapter.image_inputs(item_image).num_image_tokens == len(expected)
    # Labels only on the caption span and EOS, never on the image or the prompt.
    labelled = (item.labels != -100).nonzero().flatten().tolist()
    assert labelled and min(labelled) > start + len(expected)


def test_batch_of_different_tile_counts_forwards_as_each_alone(adapter):
    sizes = [(32, 32), (64, 64), (100, 30)]
    items = [tokenize_caption(caption(s, seed=i), adapter, 1024)[0] for i, s in enumerate(sizes)]
    batch = collate_captions(items, adapter.tokenizer.pad_token_id, KINDS, trim=False)
    inputs = adapter.forward_inputs(batch)
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values"}
    # Tiles of all images flat along dim 0, in row order: the processor's own batched layout.
    assert inputs["pixel_values"].shape[0] == sum(TILES[s] for s in sizes)
    model = adapter.model.eval()
    with torch.no_grad():
        out = model(**inputs, logits_to_keep=batch["keep"], output_hidden_states=True)
        assert out.logits.shape[:2] == (3, len(batch["keep"]))
        for i, it in enumerate(items):
            alone = collate_captions([it], adapter.tokenizer.pad_token_id, KINDS, trim=False)
            ref = model(**adapter.forward_inputs(alone), output_hidden_states=True).hidden_states[-1][0]
            n = len(it.input_ids)
            torch.testing.assert_close(out.hidden_states[-1][i, :n], ref[:n], atol=1e-5, rtol=1e-5)


def test_batched_generation_equals_one_by_one(adapter):
    from sare_ds.models.generate import generate_responses

    images = [image((32, 32), 1), image((64, 32), 2), image((64, 64), 3)]
    batched = generate_responses(adapter, images, PROMPT, max_new_tokens=4, batch_size=3)
    single = [generate_responses(adapter, [im], PROMPT, max_new_tokens=4)[0] for im in images]
    assert batched == single and len(batched) == 3


def test_mapping_layers_and_lora_targets(tiny_dir):
    from sare_ds.models import select_trainable

    a = load(tiny_dir)
    layers = ("layer_norm", "linear_1", "linear_2")
    assert sorted(a.mapping_parameter_names()) == sorted(
        f"model.multi_modal_projector.{m}.{p}" for m in layers for p in ("weight", "bias"))
    cfg = ModelConfig(name_or_path=str(tiny_dir), trainable="mapping+lora",
                      lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    names = select_trainable(a, cfg)
    lora = [n for n in names if "lora_" in n]
    # The InternViT tower has q_proj/k_proj/v_proj too: LoRA must stay inside the LLM.
    assert lora and all(".language_model." in n for n in lora)
    assert not any("vision_tower" in n for n in names)
    assert {n.split(".layers.")[1].split(".")[0] for n in lora} == {"0", "1"}
    assert sum("multi_modal_projector" in n for n in names) == 6


def _write_config(path, text_type: str, image_token_id: int, model_type: str = "internvl"):
    path.mkdir(parents=True)
    raw = {"model_type": model_type, "architectures": ["InternVLForConditionalGeneration"],
           "image_token_id": image_token_id, "downsample_ratio": 0.5, "image_seq_length": 256,
           "text_config": {"model_type": text_type}, "vision_config": {"model_type": "internvl_vision"}}
    (path / "config.json").write_text(json.dumps(raw))
    return path


@pytest.mark.parametrize("name,text_type,image_token_id", [
    ("InternVL3-8B-hf", "qwen2", 151667), ("InternVL3-1B-hf", "qwen2", 151667),
    ("InternVL2_5-8B-MPO-hf", "llama", 92546)])
def test_family_auto_resolves_the_hf_checkpoints(tmp_path, name, text_type, image_token_id):
    from sare_ds.models import resolve_adapter
    from sare_ds.models.internvl import InternVLAdapter

    path = _write_config(tmp_path / name, text_type, image_token_id)
    assert resolve_adapter(ModelConfig(name_or_path=str(path))) is InternVLAdapter
    assert resolve_adapter(ModelConfig(name_or_path=str(path), family="internvl")) is InternVLAdapter


def test_original_remote_code_layout_and_wrong_family_are_refused(tmp_path):
    from sare_ds.models import UnknownModelLayoutError, resolve_adapter

    original = _write_config(tmp_path / "InternVL3-8B", "qwen2", 151667, model_type="internvl_chat")
    with pytest.raises(UnknownModelLayoutError, match=r"internvl_chat.*Fix"):
        resolve_adapter(ModelConfig(name_or_path=str(original)))
    hf = _write_config(tmp_path / "InternVL3-8B-hf", "qwen2", 151667)
    with pytest.raises(UnknownModelLayoutError, match=r"model.family = 'llava'.*internvl.*Fix"):
        resolve_adapter(ModelConfig(name_or_path=str(hf), family="llava"))


def test_template_rendering_another_placeholder_is_refused(tiny_dir):
    from sare_ds.models.internvl import ChatTemplateImageError

    a = load(tiny_dir)
    # The first `-hf` template revisions rendered '<image>\n'; this processor expands only <IMG_CONTEXT>.
    a.processor.chat_template = a.processor.chat_template.replace("<IMG_CONTEXT>", "<image>")
    with pytest.raises(ChatTemplateImageError, match=r"without the processor's image token '<IMG_CONTEXT>'.*Fix"):
        tokenize_caption(caption((32, 32)), a, 1024)
    # A text-only conversation renders no image and is fine.
    assert a.render([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], True).endswith("assistant\n")


def test_tokenizer_and_config_image_token_mismatch_is_refused(tiny_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    raw = json.loads((bad / "config.json").read_text())
    raw["image_token_id"] = raw["image_token_id"] - 1  # </img>'s id
    (bad / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"context_image_token '<IMG_CONTEXT>'.*image_token_id.*Fix"):
        load(bad)


def test_real_checkpoint_shapes_on_meta(adapter):
    """Trainable counts and image positions of the published configs (shapes only, no weights)."""
    from PIL import Image
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLProcessor,
        InternVLVisionConfig,
        LlamaConfig,
        Qwen2Config,
    )

    from sare_ds.models.internvl import InternVLAdapter

    vision = InternVLVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=448, patch_size=14)
    qwen7b = Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=151674)
    internlm7b = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, vocab_size=92553)
    for text, image_token_id, want in ((qwen7b, 151667, 27_540_480), (internlm7b, 92546, 33_570_816)):
        cfg = InternVLConfig(vision_config=vision, text_config=text, image_token_id=image_token_id)
        a = InternVLAdapter.from_config(cfg, None, torch.bfloat16, "meta", device="meta")
        params = dict(a.model.named_parameters())
        assert sum(params[n].numel() for n in a.mapping_parameter_names()) == want
        # 1024-d InternViT features, pixel-shuffled 2x2 -> 4096, into the LLM's width.
        assert params["model.multi_modal_projector.linear_1.weight"].shape == (text.hidden_size, 4096)
    # The real processor settings (448-px tiles, 256 positions a tile, at most 12 tiles + thumbnail).
    # (The count does not depend on the vocabulary: the tiny tokenizer has the same special tokens.)
    proc = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size={"height": 448, "width": 448}, max_patches=12),
        tokenizer=adapter.tokenizer, video_processor=adapter.processor.video_processor, image_seq_length=256)
    for (w, h), positions in {(448, 448): 258, (640, 480): 13 * 256 + 2, (640, 640): 5 * 256 + 2}.items():
        out = proc(images=Image.new("RGB", (w, h)), text="<IMG_CONTEXT>", return_tensors="pt")
        assert out["input_ids"].shape[1] == positions

