"""PaliGemma: the processor-built sequence (image, BOS, prompt, newline | response, EOS), token_type_ids and the
prefix-LM mask they give the forward, generation through the processor, refusals, resolution, mapping layers
and LoRA targets. The whole path (ZeRO-3, export, CHAIR/POPE, probe) is in tests/test_families.py."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import sare_ds  # noqa: F401  (torchvision guard before transformers)
from sare_ds.config import ModelConfig
from sare_ds.data.samples import KINDS, Caption, Sample, Span
from sare_ds.data.synthetic import caption_corpus, generate_captions
from sare_ds.data.tokenize import collate_captions, tokenize_caption, tokenize_sample
from sare_ds.models import load_mllm, resolve_adapter, select_trainable
from sare_ds.models.adapter import ExpansionMismatchError
from sare_ds.models.paligemma import PaliGemmaAdapter
from sare_ds.models.tiny import DEFAULT_CORPUS

PROMPT = "Describe the image."


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return PaliGemmaAdapter.build_tiny(tmp_path_factory.mktemp("tiny-paligemma"),
                                       corpus=DEFAULT_CORPUS + caption_corpus())


@pytest.fixture(scope="module")
def adapter(tiny_dir):
    return load_mllm(ModelConfig(name_or_path=str(tiny_dir)))


def caption(image, sent: bool = False) -> Caption:
    text = "There is a red square next to a dog. A blue circle is on the left."
    a, b = text.index("a red square"), text.index("A blue circle")
    return Caption(image, PROMPT, text, [Span(a, a + len("a red square"), "pos", "square", 33.0),
                                         Span(b, b + len("A blue circle"), "neg", "circle", 14.0)],
                   sent=sent, image_id="pg-1")


def reference(adapter, image, prompt: str, suffix: str) -> dict:
    """What PaliGemma fine-tuning feeds the model: the processor with the response as `suffix`."""
    return adapter.processor(images=image, text="<image>" + prompt, suffix=suffix, return_tensors="pt")


def test_loads_through_auto_and_renders_the_processor_layout(adapter):
    assert type(adapter) is PaliGemmaAdapter and adapter.processor.chat_template is None
    bos = adapter.tokenizer.bos_token
    assert adapter.render(adapter.conversation("Hi there", "A dog."), add_generation_prompt=False) == \
        f"<image>{bos}Hi there\nA dog."
    # Generation: the processor's own `text` (it inserts BOS after the image and appends the newline).
    assert adapter.render(adapter.conversation("Hi there"), add_generation_prompt=True) == "<image>Hi there"
    assert adapter.add_special_tokens("<image>Hi there") is False
    assert adapter.tokenizer("a b", add_special_tokens=True)["input_ids"][0] != adapter.tokenizer.bos_token_id


@pytest.mark.parametrize("size", [(32, 32), (64, 40), (20, 90), (224, 224)])
@pytest.mark.parametrize("sent", [False, True])
def test_packed_sequence_equals_the_processor_with_suffix(adapter, size, sent):
    image = Image.new("RGB", size, (200, 40, 40))
    cap = caption(image, sent)
    item = tokenize_caption(cap, adapter, 4096)[0]
    ref = reference(adapter, image, PROMPT, cap.caption)
    ref_ids, ref_types = ref["input_ids"][0].tolist(), ref["token_type_ids"][0].tolist()
    ours, types = item.input_ids.tolist(), item.token_tensors["token_type_ids"].tolist()
    # The processor ends the suffix with EOS; sare_ds appends it only for a `sent` caption.
    assert ours == (ref_ids if sent else ref_ids[:-1])
    assert types == (ref_types if sent else ref_types[:-1])
    # Every image is resized to the checkpoint's square: (32/8)^2 = 16 positions, before BOS.
    assert ours[:16] == [adapter.image_token_id] * 16 and ours[16] == adapter.tokenizer.bos_token_id
    assert ours.count(adapter.image_token_id) == 16
    assert set(item.image) == {"pixel_values"} and torch.equal(item.image["pixel_values"], ref["pixel_values"])
    # Labels only inside the suffix (type 1), where the spans are.
    labelled = (item.labels != -100).nonzero().flatten().tolist()
    assert labelled and all(types[t] == 1 for t in labelled)
    assert types.index(1) == len(ref_ids) - len(adapter.tokenizer(cap.caption + adapter.tokenizer.eos_token,
                                                                  add_special_tokens=False)["input_ids"])


def test_per_sample_sequence_equals_the_processor_with_the_cut_suffix(adapter):
    image = Image.new("RGB", (48, 32), (10, 200, 40))
    for kind, context, target in [("pos", "There is ", "a dog"), ("sent", "", "A dog and a cat.")]:
        s = Sample(image, PROMPT, context, target, kind, score=30.0, image_id="pg-2")
        item = tokenize_sample(s, adapter, 512)
        ref = reference(adapter, image, PROMPT, context + target)
        n = len(item.input_ids)
        want = ref["input_ids"][0].tolist()
        assert item.input_ids.tolist() == (want if kind == "sent" else want[:-1])
        assert item.token_tensors["token_type_ids"].tolist() == ref["token_type_ids"][0].tolist()[:n]


def test_the_forward_gets_the_prefix_lm_mask(adapter):
    """token_type_ids reach the forward: the prefix (image + prompt) attends bidirectionally, the suffix causally."""
    cap = caption(Image.new("RGB", (32, 32), (0, 90, 200)))
    batch = collate_captions(tokenize_caption(cap, adapter, 4096), adapter.tokenizer.pad_token_id, KINDS, trim=False)
    inputs = adapter.forward_inputs(batch)
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values", "token_type_ids"}
    types = inputs["token_type_ids"][0]
    first_suffix = int(types.tolist().index(1))
    model = adapter.model.eval()

    def hidden(ids, with_types=True):
        kw = {**inputs, "input_ids": ids}
        if not with_types:
            kw.pop("token_type_ids")
        with torch.no_grad():
            return model(**kw, output_hidden_states=True).hidden_states[-1][0]

    base = hidden(inputs["input_ids"])
    last_prompt = inputs["input_ids"].clone()
    last_prompt[0, first_suffix - 2] = 40  # a prompt token (before the newline)
    changed = hidden(last_prompt)
    assert not torch.allclose(changed[0], base[0])  # the first image position sees a later prompt token
    later = inputs["input_ids"].clone()
    later[0, first_suffix + 3] = 40  # a response token
    changed = hidden(later)
    assert torch.allclose(changed[:first_suffix + 3], base[:first_suffix + 3], atol=1e-6)  # causal after it
    # Without token_type_ids the forward is another function (no prefix-LM mask): they must reach it.
    assert not torch.allclose(hidden(inputs["input_ids"], with_types=False), base, atol=1e-4)


def test_padded_batch_equals_single_rows_and_the_chunked_head(adapter):
    """Collation pads token_type_ids with 0 (masked by attention_mask): each row's logits are its own; the
    chunked head (hidden_states[-1] through the tied output embeddings) equals the model's logits."""
    caps = generate_captions(3, 32, PROMPT, seed=5)
    items = [tokenize_caption(c, adapter, 4096)[0] for c in caps]
    assert len({len(it.input_ids) for it in items}) > 1
    batch = collate_captions(items, adapter.tokenizer.pad_token_id, KINDS)
    model = adapter.model.eval()
    with torch.no_grad():
        out = model(**adapter.forward_inputs(batch), logits_to_keep=batch["keep"][:0], output_hidden_states=True)
        logits = model(**adapter.forward_inputs(batch), logits_to_keep=batch["keep"]).logits
        head = model.get_output_embeddings()(out.hidden_states[-1][:, batch["keep"]])
        assert torch.allclose(head, logits, atol=1e-5)
        whole = collate_captions(items, adapter.tokenizer.pad_token_id, KINDS, trim=False)
        assert whole["token_type_ids"][whole["attention_mask"] == 0].eq(0).all()  # padding: type 0, masked
        both = model(**adapter.forward_inputs(whole)).logits
        for i, it in enumerate(items):
            one = collate_captions([it], adapter.tokenizer.pad_token_id, KINDS, trim=False)
            n = len(it.input_ids)
            assert torch.allclose(model(**adapter.forward_inputs(one)).logits[0], both[i, :n], atol=1e-5)


def first_logits(adapter, images, prompts) -> torch.Tensor:
    """[2, B, V]: the logits of the first two generated tokens, through the processor as generate.py calls it."""
    from sare_ds.models.generate import _left_padding

    rendered = [adapter.render(adapter.conversation(p), add_generation_prompt=True) for p in prompts]
    with _left_padding(adapter.tokenizer):
        inputs = adapter.processor(images=images, text=rendered, padding=True, return_tensors="pt",
                                   add_special_tokens=adapter.add_special_tokens(rendered[0]))
    model = adapter.model.eval()
    out = model.generate(**inputs, max_new_tokens=2, do_sample=False, output_logits=True, return_dict_in_generate=True,
                         pad_token_id=adapter.tokenizer.pad_token_id)
    return torch.stack(out.logits[:2])


def test_generation_goes_through_the_processor_and_is_batch_invariant(adapter):
    from sare_ds.models.generate import generate_responses

    images = [Image.new("RGB", (32, 32), (200, 40, 40)), Image.new("RGB", (40, 30), (40, 40, 200))]
    prompts = [PROMPT, "Is there a dog in the image?"]
    rendered = [adapter.render(adapter.conversation(p), add_generation_prompt=True) for p in prompts]
    inputs = adapter.processor(images=images, text=rendered, padding=True, return_tensors="pt",
                               add_special_tokens=adapter.add_special_tokens(rendered[0]))
    for row, p in enumerate(prompts):  # each row: image x 16, BOS, prompt, newline (the processor's layout)
        ids = [t for t, m in zip(inputs["input_ids"][row].tolist(), inputs["attention_mask"][row].tolist()) if m]
        text_ids = adapter.tokenizer(p + "\n", add_special_tokens=False)["input_ids"]
        assert ids == [adapter.image_token_id] * 16 + [adapter.tokenizer.bos_token_id] + text_ids
    texts = generate_responses(adapter, images, prompts, max_new_tokens=4, batch_size=2)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    # Left-padded batch == each prompt alone: the first two generated positions' logits (greedy text of a random
    # tiny model could flip on a near-tie, the logits cannot).
    assert torch.allclose(first_logits(adapter, images, prompts),
                          torch.cat([first_logits(adapter, [im], [p]) for im, p in zip(images, prompts)], 1), atol=1e-4)


def test_a_text_outside_the_layout_or_a_differing_tokenisation_is_an_error(adapter):
    image = Image.new("RGB", (32, 32))
    text = adapter.render(adapter.conversation(PROMPT, "A dog."), add_generation_prompt=False)
    ids = adapter.tokenizer(text, add_special_tokens=False)["input_ids"]
    with pytest.raises(ExpansionMismatchError, match=r"layout.*fix: render"):
        adapter.expand_image(text.replace(adapter.tokenizer.bos_token, ""), ids, image, PROMPT)
    with pytest.raises(ExpansionMismatchError, match="tokenises this conversation differently"):
        adapter.expand_image(text, ids[:-1] + [ids[-1] + 1], image, PROMPT)
    e = adapter.expand_image(text, ids, image, PROMPT)
    assert (e.start, e.length) == (0, 16) and len(e.ids) == len(ids) + 15


def test_image_inputs_and_fixed_tokens(adapter):
    for size in [(32, 32), (640, 480)]:
        inputs = adapter.image_inputs(Image.new("RGB", size))
        assert inputs.num_image_tokens == 16 and inputs.expansion == [adapter.image_token_id] * 16
        assert tuple(inputs.tensors["pixel_values"].shape) == (1, 3, 32, 32)


def test_mapping_layers_and_lora_targets(tiny_dir):
    adapter = load_mllm(ModelConfig(name_or_path=str(tiny_dir)))
    assert adapter.mapping_parameter_names() == ["model.multi_modal_projector.linear.weight",
                                                 "model.multi_modal_projector.linear.bias"]
    cfg = ModelConfig(name_or_path=str(tiny_dir), trainable="mapping+lora")
    names = select_trainable(adapter, cfg)
    lora = [n for n in names if "lora_" in n]
    # SigLIP has q_proj / v_proj too: LoRA lands on the Gemma layers only.
    assert lora and all(".language_model.layers." in n for n in lora)
    assert not any("vision_tower" in n for n in names)
    assert {n for n in names if "lora_" not in n} == {
        "base_model.model.model.multi_modal_projector.linear.weight",
        "base_model.model.model.multi_modal_projector.linear.bias"}


@pytest.mark.parametrize("checkpoint, text_type", [("google/paligemma-3b-mix-224", "gemma"),
                                                   ("google/paligemma2-3b-mix-448", "gemma2"),
                                                   ("google/paligemma2-10b-mix-448", "gemma2")])
def test_family_auto_resolves_the_published_checkpoints(tmp_path, checkpoint, text_type):
    d = tmp_path / checkpoint.split("/")[1]
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["PaliGemmaForConditionalGeneration"],
                                               "model_type": "paligemma", "text_config": {"model_type": text_type}}))
    assert resolve_adapter(ModelConfig(name_or_path=str(d))) is PaliGemmaAdapter


def test_real_shapes_on_the_meta_device():
    """paligemma-3b-224 (the config defaults): projector 1152 -> 2048 (+ bias) = 2,361,344 trainable, 256 image
    tokens; paligemma2-10b (Gemma-2 9B, hidden 3584): 4,132,352, 1024 tokens at 448 px."""
    from transformers import PaliGemmaConfig, SiglipVisionConfig

    a = PaliGemmaAdapter.from_config(PaliGemmaConfig(), None, torch.bfloat16, "paligemma-3b", device="meta")
    params = dict(a.model.named_parameters())
    assert sum(params[n].numel() for n in a.mapping_parameter_names()) == 1152 * 2048 + 2048 == 2_361_344
    assert a.model.config.text_config.num_image_tokens == 256
    vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=1, num_attention_heads=16,
                                patch_size=14, image_size=448)
    config = PaliGemmaConfig(vision_config=vision.to_dict(), projection_dim=3584, hidden_size=3584,
                             text_config={"model_type": "gemma2", "hidden_size": 3584, "num_hidden_layers": 1,
                                          "intermediate_size": 14336, "num_attention_heads": 16,
                                          "num_key_value_heads": 8, "head_dim": 256, "vocab_size": 257216})
    a = PaliGemmaAdapter.from_config(config, None, torch.bfloat16, "paligemma2-10b", device="meta")
    params = dict(a.model.named_parameters())
    assert sum(params[n].numel() for n in a.mapping_parameter_names()) == 1152 * 3584 + 3584 == 4_132_352
    assert config.text_config.num_image_tokens == 1024


def test_paligemma2_layout_expands_and_its_softcap_refuses_the_chunked_head(tmp_path):
    from sare_ds.train.step import output_head

    from sare_ds.models.paligemma import UnsupportedAttentionError

    d = PaliGemmaAdapter.build_tiny(tmp_path / "pg2", corpus=DEFAULT_CORPUS + caption_corpus(), gemma2=True)
    for device in (None, "meta"):
        with pytest.raises(UnsupportedAttentionError, match=r"'sdpa' cannot run PaliGemma 2.*Fix: set "
                                                            r"model.attn_implementation=eager.*lm_head_chunks=0"):
            load_mllm(ModelConfig(name_or_path=str(d)), device=device)  # sare_ds's default is sdpa
    adapter = load_mllm(ModelConfig(name_or_path=str(d), attn_implementation="eager"))
    assert adapter.model.config.text_config.model_type == "gemma2"
    image = Image.new("RGB", (50, 30))
    cap = caption(image, sent=True)
    item = tokenize_caption(cap, adapter, 4096)[0]
    ref = reference(adapter, image, PROMPT, cap.caption)
    assert item.input_ids.tolist() == ref["input_ids"][0].tolist()
    assert item.token_tensors["token_type_ids"].tolist() == ref["token_type_ids"][0].tolist()
    with pytest.raises(ValueError, match="lm_head_chunks=0"):
        output_head(adapter.model)
