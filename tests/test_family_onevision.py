"""LLaVA-OneVision: AnyRes-max image expansion, zero-padded tile batches, forward inputs, mapping
layers (projector + image_newline), LoRA targets, family resolution and refusals, on a tiny random
checkpoint built here; real-checkpoint shapes on the meta device."""
from __future__ import annotations

import json

import pytest
import torch

from sare_ds.config import ModelConfig
from sare_ds.data.samples import KINDS, Caption, Span
from sare_ds.data.tokenize import collate_captions, tokenize_caption

PROMPT = "Describe the image."
CAPTION = "The image shows a dog, a cat and a car."
BASE = 16  # features of the whole image resized to one 32-px tile (4 x 4 patches of 8 px, no CLS)
# (width, height) -> (tiles incl. the base one, image positions), worked out by hand from AnyRes-max:
# the best pinpoint grid, its 4 x 4 features a tile unpadded to the image's aspect ratio, downscaled
# when above 9 tiles' worth (anyres_max_9), one image_newline a feature row, then the base tile's.
EXPECTED = {
    (32, 32): (2, 4 * 4 + 4 + BASE),  # 1 x 1 grid
    (64, 32): (3, 4 * 8 + 4 + BASE),  # 1 row x 2 columns
    (32, 64): (3, 8 * 4 + 8 + BASE),  # 2 rows x 1 column
    (64, 64): (5, 8 * 8 + 8 + BASE),  # 2 x 2
    # 6 x 6 grid: 24 x 24 features, sqrt(576 / (9 * 16)) = 2 > 1.1 -> bilinear to 12 x 12
    (192, 192): (37, 12 * 12 + 12 + BASE),
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from sare_ds.models.onevision import LlavaOnevisionAdapter

    return LlavaOnevisionAdapter.build_tiny(tmp_path_factory.mktemp("tiny-onevision"))


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


def caption(size, seed=0):
    start = CAPTION.index("cat")
    return Caption(image(size, seed), PROMPT, CAPTION, [Span(start, start + 3, "pos", "cat", 35.0)], sent=True,
                   sent_score=35.0, sent_min_score=35.0, image_id=f"img-{size[0]}x{size[1]}")


def test_tiny_checkpoint_loads_through_auto_with_the_real_layout(tiny_dir, adapter):
    from transformers import LlavaOnevisionForConditionalGeneration

    from sare_ds.data.tokenize import adds_bos
    from sare_ds.models.onevision import LlavaOnevisionAdapter

    assert type(adapter) is LlavaOnevisionAdapter
    assert isinstance(adapter.model, LlavaOnevisionForConditionalGeneration)
    assert adapter.placeholder_token_id == adapter.image_token_id == adapter.tokenizer.convert_tokens_to_ids("<image>")
    assert not adds_bos(adapter.tokenizer) and adapter.tokenizer.eos_token == "<|im_end|>"
    cfg = adapter.model.config
    assert (cfg.vision_feature_select_strategy, cfg.vision_feature_layer, cfg.vision_aspect_ratio) == (
        "full", -1, "anyres_max_9")
    # Images before the text, each as "<image>\n" (llava-hf's OneVision template), ChatML turns.
    messages = [{"role": "user", "content": [{"type": "text", "text": PROMPT}, {"type": "image"}]}]
    assert adapter.render(messages, add_generation_prompt=True) == (
        "<|im_start|>user\n<image>\nDescribe the image.<|im_end|>\n<|im_start|>assistant\n")
    assert json.loads((tiny_dir / "config.json").read_text())["model_type"] == "llava_onevision"


@pytest.mark.parametrize("size", list(EXPECTED))
def test_expansion_equals_the_processor_for_anyres_images(adapter, size):
    tiles, positions = EXPECTED[size]
    c = caption(size)
    item = tokenize_caption(c, adapter, 1024)[0]
    ids = item.input_ids.tolist()
    messages = adapter.conversation(PROMPT, CAPTION)
    messages[0]["content"][0]["image"] = c.image
    truth = adapter.processor.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    truth = truth[0] if isinstance(truth[0], list) else truth
    assert ids[:-1] == truth[:len(ids) - 1] and ids[-1] == adapter.tokenizer.eos_token_id
    assert ids.count(adapter.image_token_id) == positions
    start = ids.index(adapter.image_token_id)
    assert ids[start:start + positions] == [adapter.image_token_id] * positions  # one contiguous run
    assert adapter.image_inputs(c.image).num_image_tokens == positions
    assert item.image["pixel_values"].shape == (1, tiles, 3, 32, 32)
    assert item.image["image_sizes"].tolist() == [[size[1], size[0]]]  # (height, width)
    assert item.image["batch_num_images"].tolist() == [1]
    labelled = (item.labels != -100).nonzero().flatten().tolist()
    assert labelled and min(labelled) > start + positions


def test_batch_with_different_patch_counts_forwards_as_each_alone(adapter):
    sizes = [(32, 32), (192, 192), (64, 32)]
    items = [tokenize_caption(caption(s, seed=i), adapter, 1024)[0] for i, s in enumerate(sizes)]
    batch = collate_captions(items, adapter.tokenizer.pad_token_id, KINDS, trim=False)
    inputs = adapter.forward_inputs(batch)
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values", "image_sizes", "batch_num_images"}
    pixels = inputs["pixel_values"]
    assert pixels.shape == (3, 37, 3, 32, 32)  # tiles zero-padded to the longest row
    assert pixels[0, 2:].abs().sum() == 0 and pixels[2, 3:].abs().sum() == 0
    assert inputs["image_sizes"].tolist() == [[32, 32], [192, 192], [32, 64]]
    model = adapter.model.eval()
    with torch.no_grad():
        out = model(**inputs, logits_to_keep=batch["keep"], output_hidden_states=True)
        assert out.logits.shape[:2] == (3, len(batch["keep"]))
        for i, it in enumerate(items):
            alone = collate_captions([it], adapter.tokenizer.pad_token_id, KINDS, trim=False)
            assert alone["pixel_values"].shape[1] == EXPECTED[sizes[i]][0]
            ref = model(**adapter.forward_inputs(alone), output_hidden_states=True).hidden_states[-1][0]
            n = len(it.input_ids)
            torch.testing.assert_close(out.hidden_states[-1][i, :n], ref[:n], atol=1e-5, rtol=1e-5)


def test_batched_generation_equals_one_by_one(adapter):
    from sare_ds.models.generate import generate_responses

    images = [image((32, 32), 1), image((64, 64), 2), image((32, 64), 3)]
    batched = generate_responses(adapter, images, PROMPT, max_new_tokens=4, batch_size=3)
    single = [generate_responses(adapter, [im], PROMPT, max_new_tokens=4)[0] for im in images]
    assert batched == single and len(batched) == 3


def test_mapping_layers_and_lora_targets(tiny_dir):
    from sare_ds.models import select_trainable

    a = load(tiny_dir)
    assert sorted(a.mapping_parameter_names()) == ["model.image_newline"] + sorted(
        f"model.multi_modal_projector.linear_{i}.{p}" for i in (1, 2) for p in ("bias", "weight"))
    # image_newline is used by every tiled image: it gets a gradient from the training loss.
    select_trainable(a, ModelConfig(name_or_path=str(tiny_dir)))
    item = tokenize_caption(caption((64, 32)), a, 1024)[0]
    batch = collate_captions([item], a.tokenizer.pad_token_id, KINDS, trim=False)
    logits = a.model(**a.forward_inputs(batch)).logits
    logits[0, -1].logsumexp(-1).backward()
    grads = {n: p.grad for n, p in a.model.named_parameters() if p.requires_grad}
    assert set(grads) == set(a.mapping_parameter_names()) and grads["model.image_newline"].abs().sum() > 0

    b = load(tiny_dir)
    names = select_trainable(b, ModelConfig(name_or_path=str(tiny_dir), trainable="mapping+lora",
                                            lora_target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    lora = [n for n in names if "lora_" in n]
    # SigLIP's attention has q/k/v/out_proj too: LoRA must stay inside the LLM.
    assert lora and all(".language_model." in n for n in lora) and not any("vision_tower" in n for n in names)
    assert sum("multi_modal_projector" in n or "image_newline" in n for n in names) == 5


def _write_config(path, hidden: int, model_type: str = "llava_onevision"):
    path.mkdir(parents=True)
    raw = {"model_type": model_type, "architectures": ["LlavaOnevisionForConditionalGeneration"],
           "image_token_index": 151646, "video_token_index": 151647, "vision_aspect_ratio": "anyres_max_9",
           "vision_feature_select_strategy": "full", "vision_feature_layer": -1,
           "text_config": {"model_type": "qwen2", "hidden_size": hidden},
           "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152}}
    (path / "config.json").write_text(json.dumps(raw))
    return path


@pytest.mark.parametrize("name,hidden", [
    ("llava-onevision-qwen2-7b-ov-hf", 3584), ("llava-onevision-qwen2-0.5b-ov-hf", 896),
    ("llava-onevision-qwen2-7b-si-hf", 3584)])
def test_family_auto_resolves_the_hf_checkpoints(tmp_path, name, hidden):
    from sare_ds.models import resolve_adapter
    from sare_ds.models.onevision import LlavaOnevisionAdapter

    path = _write_config(tmp_path / name, hidden)
    assert resolve_adapter(ModelConfig(name_or_path=str(path))) is LlavaOnevisionAdapter
    assert resolve_adapter(ModelConfig(name_or_path=str(path), family="llava_onevision")) is LlavaOnevisionAdapter


def test_wrong_family_and_template_without_image_are_refused(tmp_path, tiny_dir):
    from sare_ds.models import UnknownModelLayoutError, resolve_adapter
    from sare_ds.models.internvl import ChatTemplateImageError

    path = _write_config(tmp_path / "ov", 3584)
    # LLaVA-NeXT's adapter is the parent class, but not this checkpoint's layout.
    with pytest.raises(UnknownModelLayoutError, match=r"model.family = 'llava_next'.*llava_onevision.*Fix"):
        resolve_adapter(ModelConfig(name_or_path=str(path), family="llava_next"))
    a = load(tiny_dir)
    template = a.processor.chat_template.replace("'<image>\n'", "''")
    assert template != a.processor.chat_template
    a.processor.chat_template = template
    with pytest.raises(ChatTemplateImageError, match=r"without the processor's image token '<image>'.*Fix"):
        tokenize_caption(caption((32, 32)), a, 1024)


def test_real_checkpoint_shapes_on_meta(adapter):
    """Trainable count and image positions of llava-onevision-qwen2-7b-ov-hf (shapes only, no weights)."""
    from PIL import Image
    from transformers import LlavaOnevisionConfig, LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, Qwen2Config

    from sare_ds.models.onevision import LlavaOnevisionAdapter

    text = Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152128)
    cfg = LlavaOnevisionConfig(text_config=text)  # SigLIP-so400m 384/14 and the 384..2304 px pinpoints by default
    a = LlavaOnevisionAdapter.from_config(cfg, None, torch.bfloat16, "meta", device="meta")
    params = dict(a.model.named_parameters())
    # 1152 -> 3584 -> 3584 with biases, + the 3584-d image_newline.
    assert sum(params[n].numel() for n in a.mapping_parameter_names()) == 16_984_576
    assert params["model.multi_modal_projector.linear_1.weight"].shape == (3584, 1152)
    proc = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3),
        tokenizer=adapter.tokenizer, video_processor=adapter.processor.video_processor, num_image_tokens=729,
        vision_feature_select_strategy="full")
    # 384 x 384: 729 base + 27 x 27 tile features + 27 newlines; 640 x 480 (COCO): a 2 x 2 grid (768 px),
    # 54 x 40 unpadded features + 40 newlines + 729.
    for (w, h), positions in {(384, 384): 729 + 729 + 27, (640, 480): 729 + 54 * 40 + 40}.items():
        out = proc(images=Image.new("RGB", (w, h)), text="<image>", return_tensors="pt")
        assert out["input_ids"].shape[1] == positions
