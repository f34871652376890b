"""Idefics3 / SmolVLM: the image expansion (tiled and not), what the forward gets, batching of images with
different tile counts, refusals, family resolution, mapping layers and LoRA targets, on tiny random models."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

import sare_ds  # noqa: F401  (torchvision guard before transformers)
from sare_ds.config import ModelConfig
from sare_ds.data.samples import KINDS, Caption, Span
from sare_ds.data.tokenize import collate_captions, tokenize_caption
from sare_ds.models import UnknownModelLayoutError, load_mllm, resolve_adapter, select_trainable
from sare_ds.models.idefics3 import (
    FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN, IMAGE_TOKEN, Idefics3Adapter, Idefics3LayoutError, SmolVLMAdapter,
)

FAMILIES = {"idefics3": Idefics3Adapter, "smolvlm": SmolVLMAdapter}
SEQ = 4  # positions per 32-px tile in the tiny models: (32 // 8)**2 / 2**2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family -> the adapter of its tiny checkpoint, loaded through load_mllm as a real one."""
    out = {}
    for name, cls in FAMILIES.items():
        path = cls.build_tiny(tmp_path_factory.mktemp(f"tiny-{name}"), seed=0)
        out[name] = load_mllm(ModelConfig(name_or_path=str(path)))
    return out


@pytest.fixture(params=sorted(FAMILIES))
def adapter(request, tiny):
    return tiny[request.param]


def caption(image, text="There is a red square next to a dog.") -> Caption:
    a = text.index("a red square")
    return Caption(image, "Describe the image.", text, [Span(a, a + len("a red square"), "pos", "square", 30.0)],
                   image_id="idefics3-test")


def expected_expansion(tok, rows: int, cols: int, seq: int = SEQ) -> list[int]:
    """The documented rule, written out token by token (markers as single tokens, as in the tiny models)."""
    fake, img, glob = (tok.convert_tokens_to_ids(t) for t in (FAKE_IMAGE_TOKEN, IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN))
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    out: list[int] = []
    for r in range(1, rows + 1):
        for c in range(1, cols + 1):
            out += [fake, tok.convert_tokens_to_ids(f"<row_{r}_col_{c}>")] + [img] * seq
        out += newline
    if rows:
        out += newline
    return out + [fake, glob] + [img] * seq + [fake]


def with_processor(adapter, **kwargs):
    """The same model with another tiny processor of its family (e.g. tiling off)."""
    cls = type(adapter)
    return cls(adapter.model, cls.tiny_processor(adapter.tokenizer, **kwargs), adapter.source)


# -- expansion ---------------------------------------------------------------------------------------------

# (image size (w, h), processor settings, tile rows x cols): the tiny processor upscales the longest edge to
# 64 px (or 96) and cuts 32-px tiles; tiling off squares the image to one 32-px tile.
CASES = [
    ((32, 32), {}, (2, 2)),
    ((64, 40), {}, (2, 2)),
    ((64, 16), {}, (1, 2)),
    ((16, 64), {}, (2, 1)),
    ((100, 30), {}, (1, 2)),
    ((50, 50), {"longest_edge": 96}, (3, 3)),
    ((96, 48), {"longest_edge": 96}, (2, 3)),
    ((32, 32), {"do_image_splitting": False}, (0, 0)),
    ((100, 30), {"do_image_splitting": False}, (0, 0)),
]


@pytest.mark.parametrize("size,settings,grid", CASES, ids=[f"{s[0]}x{s[1]}-{g[0]}x{g[1]}" for s, _, g in CASES])
def test_expansion_equals_the_processors_own(adapter, size, settings, grid):
    a = with_processor(adapter, **settings) if settings else adapter
    image = Image.new("RGB", size, (30, 160, 90))
    cap = caption(image)
    item = tokenize_caption(cap, a, 4096)[0]
    ours = item.input_ids.tolist()
    messages = a.conversation(cap.prompt, cap.caption)
    messages[0]["content"][0] = {"type": "image", "image": image}
    ref = a.processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
    truth = ref["input_ids"][0].tolist()
    # sare_ds cuts after the response: the processor's sequence goes on with "<end_of_utterance>\n".
    assert truth[:len(ours)] == ours
    assert a.tokenizer.convert_ids_to_tokens(truth[len(ours):])[0] == "<end_of_utterance>"
    # BOS once, rendered by the template.
    assert ours[0] == a.tokenizer.bos_token_id and ours.count(a.tokenizer.bos_token_id) == 1
    # The placeholder became exactly the documented sequence, between "User:" and the prompt.
    rows, cols = grid
    expansion = expected_expansion(a.tokenizer, rows, cols)
    start = ours.index(a.tokenizer.convert_tokens_to_ids(FAKE_IMAGE_TOKEN))
    assert ours[start:start + len(expansion)] == expansion
    assert a.tokenizer.decode(ours[start + len(expansion):]).startswith("Describe the image.")
    # What the forward gets for this image: every tile (and the global image) as a 32-px image, all real pixels.
    tiles = rows * cols + 1
    assert item.image["pixel_values"].shape == (1, tiles, 3, 32, 32)
    assert item.image["pixel_attention_mask"].shape == (1, tiles, 32, 32)
    assert bool(item.image["pixel_attention_mask"].all())
    for key, value in item.image.items():
        assert torch.equal(value, ref[key]), key
    assert int((item.input_ids == a.image_token_id).sum()) == tiles * SEQ


def test_image_inputs_counts_every_position(adapter):
    info = adapter.image_inputs(Image.new("RGB", (40, 40)))
    assert info.expansion == expected_expansion(adapter.tokenizer, 2, 2)
    assert info.num_image_tokens == 4 * (2 + SEQ) + 2 + 1 + (3 + SEQ) == 34  # tiles, row ends, "\\n", global
    untiled = with_processor(adapter, do_image_splitting=False).image_inputs(Image.new("RGB", (40, 40)))
    assert untiled.num_image_tokens == 3 + SEQ and untiled.tensors["pixel_values"].shape == (1, 1, 3, 32, 32)


def test_markers_as_plain_text_align_too():
    """SmolVLM-Instruct's tokenizer has no <global-img>/<row_r_col_c> tokens: the processor's text for them is
    split into pieces, and sare_ds takes the processor's sequence as is."""
    tok = Idefics3Adapter.tiny_tokenizer(markers_as_tokens=False)
    assert tok.convert_tokens_to_ids(GLOBAL_IMAGE_TOKEN) in (None, tok.unk_token_id)
    model = Idefics3Adapter.tiny_model(tok, seed=0)
    a = Idefics3Adapter(model, Idefics3Adapter.tiny_processor(tok), "plain-markers")
    item = tokenize_caption(caption(Image.new("RGB", (64, 16), (10, 10, 200))), a, 4096)[0]
    ids = item.input_ids.tolist()
    text = tok.decode(ids)
    assert "<row_1_col_2>" in text and GLOBAL_IMAGE_TOKEN in text
    assert len(tok(GLOBAL_IMAGE_TOKEN, add_special_tokens=False)["input_ids"]) > 1
    assert ids.count(a.image_token_id) == 3 * SEQ
    batch = collate_captions([item], tok.pad_token_id, KINDS)
    out = a.model(**a.forward_inputs(batch), logits_to_keep=batch["keep"])
    assert out.logits.shape == (1, len(batch["keep"]), len(tok))


# -- the forward -------------------------------------------------------------------------------------------

def test_batch_of_different_tile_counts_equals_each_alone(adapter):
    """The collate zero-pads the tile dimension; the model drops all-zero tiles, so each row of a batch gets
    exactly the logits it gets alone."""
    items = [tokenize_caption(caption(Image.new("RGB", size, colour), text), adapter, 4096)[0]
             for size, colour, text in [((64, 16), (200, 30, 30), "There is a red square next to a dog."),
                                        ((40, 40), (20, 20, 220), "There is a red square and a long blue bus.")]]
    pad = adapter.tokenizer.pad_token_id
    batch = collate_captions(items, pad, KINDS, trim=False)
    inputs = adapter.forward_inputs(batch)
    assert sorted(inputs) == ["attention_mask", "input_ids", "pixel_attention_mask", "pixel_values"]
    assert inputs["pixel_values"].shape == (2, 5, 3, 32, 32)
    assert inputs["pixel_attention_mask"].shape == (2, 5, 32, 32)
    assert not inputs["pixel_values"][0, 3:].any() and not inputs["pixel_attention_mask"][0, 3:].any()
    model = adapter.model.eval()
    with torch.no_grad():
        together = model(**inputs, output_hidden_states=True)
        for row, it in enumerate(items):
            alone_batch = collate_captions([it], pad, KINDS, trim=False)
            alone = model(**adapter.forward_inputs(alone_batch), output_hidden_states=True)
            n = len(it.input_ids)
            torch.testing.assert_close(together.logits[row, :n], alone.logits[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(together.hidden_states[-1][row, :n], alone.hidden_states[-1][0],
                                       atol=1e-5, rtol=1e-5)


def test_forward_takes_logits_to_keep_and_returns_hidden_states(adapter):
    item = tokenize_caption(caption(Image.new("RGB", (32, 32), (90, 90, 90))), adapter, 4096)[0]
    batch = collate_captions([item], adapter.tokenizer.pad_token_id, KINDS)
    keep = batch["keep"]
    out = adapter.model(**adapter.forward_inputs(batch), logits_to_keep=keep, output_hidden_states=True)
    hidden = out.hidden_states[-1]
    assert hidden.shape[:2] == batch["input_ids"].shape
    head = adapter.model.get_output_embeddings()
    torch.testing.assert_close(out.logits[0], head(hidden[0, keep]), atol=1e-5, rtol=1e-5)


def test_batched_generation_equals_each_alone(adapter):
    """Left-padded prompts whose images have 3 and 5 tiles: each row generates what it generates alone."""
    images = [Image.new("RGB", (64, 16), (200, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 200))]
    text = adapter.render(adapter.conversation("Describe the image."), add_generation_prompt=True)
    assert text.endswith("<end_of_utterance>\nAssistant:")
    tok = adapter.tokenizer
    side, tok.padding_side = tok.padding_side, "left"
    try:
        def run(imgs):
            inputs = adapter.processor(images=adapter.generation_images(imgs), text=[text] * len(imgs), padding=True,
                                       return_tensors="pt", add_special_tokens=adapter.add_special_tokens(text))
            out = adapter.model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
            return out[:, inputs["input_ids"].shape[1]:].tolist()

        together = run(images)
        assert together == [run([im])[0] for im in images]
    finally:
        tok.padding_side = side


def test_generate_responses_batches_images_of_different_tile_counts(adapter):
    from sare_ds.models.generate import generate_responses

    images = [Image.new("RGB", (64, 16), (200, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 200))]
    texts = generate_responses(adapter, images, "Describe the image.", max_new_tokens=3, batch_size=2)
    assert texts == [generate_responses(adapter, [im], "Describe the image.", max_new_tokens=3)[0] for im in images]


# -- refusals ----------------------------------------------------------------------------------------------

def test_wrong_image_seq_len_is_refused(adapter):
    with pytest.raises(Idefics3LayoutError, match=r"image_seq_len = 9 .*connector gives 4 per tile.*Fix: set "
                                                  r"image_seq_len in processor_config.json to 4"):
        with_processor(adapter, image_seq_len=9)


def test_tile_size_other_than_the_vision_towers_is_refused(adapter):
    with pytest.raises(Idefics3LayoutError, match=r"longest_edge = 48 px but the vision tower takes image_size = 32"
                                                  r".*Fix: set max_image_size"):
        with_processor(adapter, tile=48, longest_edge=96)


def test_image_token_id_other_than_the_tokenizers_is_refused(adapter):
    cfg = adapter.model.config
    right = cfg.image_token_id
    cfg.image_token_id = right + 1
    try:
        with pytest.raises(Idefics3LayoutError, match=rf"<image> is id {right} but the model's "
                                                      rf"config.image_token_id is {right + 1}.*Fix"):
            type(adapter)(adapter.model, adapter.processor, "mismatched")
    finally:
        cfg.image_token_id = right


# -- resolution, parameters --------------------------------------------------------------------------------

@pytest.mark.parametrize("checkpoint,model_type,cls", [
    ("HuggingFaceM4/Idefics3-8B-Llama3", "idefics3", Idefics3Adapter),
    ("HuggingFaceTB/SmolVLM-Instruct", "idefics3", Idefics3Adapter),
    ("HuggingFaceTB/SmolVLM2-2.2B-Instruct", "smolvlm", SmolVLMAdapter),
])
def test_family_auto_resolves_each_checkpoint(tmp_path, checkpoint, model_type, cls):
    (tmp_path / "config.json").write_text(f'{{"model_type": "{model_type}", "_name_or_path": "{checkpoint}"}}')
    assert resolve_adapter(ModelConfig(name_or_path=str(tmp_path))) is cls
    assert resolve_adapter(ModelConfig(name_or_path=str(tmp_path), family=cls.family)) is cls
    other = "smolvlm" if cls is Idefics3Adapter else "idefics3"
    with pytest.raises(UnknownModelLayoutError, match=f"model.family = '{other}' does not match"):
        resolve_adapter(ModelConfig(name_or_path=str(tmp_path), family=other))


def test_idefics3_8b_trainable_count_on_the_meta_device(tmp_path):
    """Idefics3-8B-Llama3's published shapes: SigLIP 1152 wide (364 px, patch 14), scale_factor 2, Llama-3-8B
    (hidden 4096): the connector is one 4608 x 4096 linear, 169 positions per tile."""
    from transformers import Idefics3Config

    Idefics3Config(
        vision_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                           image_size=364, patch_size=14),
        text_config=dict(model_type="llama", vocab_size=128259, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         rope_theta=500000.0),
        scale_factor=2, image_token_id=128257).save_pretrained(tmp_path)
    a = load_mllm(ModelConfig(name_or_path=str(tmp_path)), device="meta")
    assert isinstance(a, Idefics3Adapter)
    params = dict(a.model.named_parameters())
    assert a.mapping_parameter_names() == ["model.connector.modality_projection.proj.weight"]
    assert params["model.connector.modality_projection.proj.weight"].shape == (4096, 4608)
    assert a.model_image_seq_len() == 169
    assert 8.4e9 < sum(p.numel() for p in params.values()) < 8.5e9


def test_mapping_layers_are_the_connector(adapter):
    names = select_trainable(adapter, ModelConfig())
    assert names == ["model.connector.modality_projection.proj.weight"]
    assert [n for n, p in adapter.model.named_parameters() if p.requires_grad] == names


def test_lora_lands_in_the_text_model_only(tiny):
    for name in FAMILIES:
        a = load_mllm(ModelConfig(name_or_path=str(tiny[name].source)))
        names = select_trainable(a, ModelConfig(trainable="mapping+lora", lora_r=2,
                                                lora_target_modules=["q_proj", "v_proj", "fc1"]))
        lora = [n for n in names if "lora_" in n]
        assert lora and all(".text_model.layers." in n for n in lora), name
        # Two layers x q_proj/v_proj x A/B; the vision tower's q_proj/v_proj (and its fc1) get none.
        assert len(lora) == 2 * 2 * 2
        assert "base_model.model.model.connector.modality_projection.proj.weight" in names
        assert not any("vision_model" in n for n in names)


def test_tiny_build_is_deterministic(tiny):
    tok = Idefics3Adapter.tiny_tokenizer()
    again = Idefics3Adapter.tiny_model(tok, seed=0).state_dict()
    for key, value in tiny["idefics3"].model.state_dict().items():
        assert torch.equal(value, again[key]), key
