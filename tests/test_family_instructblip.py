"""InstructBLIP (decoder-only LLM): the image's query tokens before BOS, the Q-Former's own tokenisation of the
PROMPT only, refusal of the FlanT5 (encoder-decoder) variants, resolution, mapping layers, LoRA targets, real
shapes. The whole path (ZeRO-3, export, CHAIR/POPE, probe) is in tests/test_families.py."""
from __future__ import annotations

import json
import types

import pytest
import torch
from PIL import Image

import sare_ds  # noqa: F401  (torchvision guard before transformers)
from sare_ds.config import ModelConfig
from sare_ds.data.samples import KINDS, Caption, Sample, Span
from sare_ds.data.synthetic import caption_corpus
from sare_ds.data.tokenize import collate_captions, fixed_sample_tokens, tokenize_caption, tokenize_sample
from sare_ds.models import load_mllm, resolve_adapter, select_trainable
from sare_ds.models.adapter import ExpansionMismatchError
from sare_ds.models.instructblip import EncoderDecoderLanguageModelError, InstructBlipAdapter
from sare_ds.models.tiny import DEFAULT_CORPUS

PROMPT = "Describe the image."
N_QUERY = 8  # the tiny model's num_query_tokens (32 in the published checkpoints)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return InstructBlipAdapter.build_tiny(tmp_path_factory.mktemp("tiny-instructblip"),
                                          corpus=DEFAULT_CORPUS + caption_corpus())


@pytest.fixture(scope="module")
def adapter(tiny_dir):
    return load_mllm(ModelConfig(name_or_path=str(tiny_dir)))


def caption(image, prompt: str = PROMPT, sent: bool = False) -> Caption:
    text = "There is a red square next to a dog. A blue circle is on the left."
    a, b = text.index("a red square"), text.index("A blue circle")
    return Caption(image, prompt, text, [Span(a, a + len("a red square"), "pos", "square", 33.0),
                                         Span(b, b + len("A blue circle"), "neg", "circle", 14.0)],
                   sent=sent, image_id="ib-1")


def test_loads_through_auto_and_renders(adapter):
    assert type(adapter) is InstructBlipAdapter and adapter.processor.num_query_tokens == N_QUERY
    assert adapter.render(adapter.conversation("Hi there", "A dog."), add_generation_prompt=False) == \
        "<image>Hi there A dog."
    # Generation: the bare prompt, the processor's `text` (it puts the query tokens in front itself).
    assert adapter.render(adapter.conversation("Hi there"), add_generation_prompt=True) == "Hi there"


@pytest.mark.parametrize("size", [(32, 32), (64, 40), (20, 90), (224, 224)])
@pytest.mark.parametrize("sent", [False, True])
def test_sequence_equals_the_processors_with_the_query_tokens_before_bos(adapter, size, sent):
    image = Image.new("RGB", size, (200, 40, 40))
    cap = caption(image, sent=sent)
    item = tokenize_caption(cap, adapter, 4096)[0]
    ref = adapter.processor(images=image, text=f"{PROMPT} {cap.caption}", return_tensors="pt")
    ref_ids = ref["input_ids"][0].tolist()
    ours = item.input_ids.tolist()
    eos = [adapter.tokenizer.eos_token_id] if sent else []
    assert ours == ref_ids + eos
    assert ours[:N_QUERY] == [adapter.image_token_id] * N_QUERY and ours[N_QUERY] == adapter.tokenizer.bos_token_id
    assert ours.count(adapter.image_token_id) == N_QUERY  # whatever the image size
    assert torch.equal(item.image["pixel_values"], ref["pixel_values"])
    assert tuple(item.image["pixel_values"].shape) == (1, 3, 32, 32)
    # The labels are the spans' tokens: they decode to the span texts.
    labelled = [t for t, l in zip(ours, item.labels.tolist()) if l != -100]
    decoded = adapter.tokenizer.decode(labelled)
    assert "a red square" in decoded and "A blue circle" in decoded


def test_the_qformer_reads_the_prompt_only(adapter):
    image = Image.new("RGB", (32, 32), (0, 200, 0))
    item = tokenize_caption(caption(image), adapter, 4096)[0]
    qtok = adapter.processor.qformer_tokenizer
    want = qtok(PROMPT, return_tensors="pt")
    assert item.image["qformer_input_ids"].tolist() == want["input_ids"].tolist()
    assert item.image["qformer_attention_mask"].tolist() == want["attention_mask"].tolist()
    # The same as generation gives the Q-Former (processor on the prompt), and never the response's words.
    gen = adapter.processor(images=image, text=adapter.render(adapter.conversation(PROMPT), True), return_tensors="pt")
    assert torch.equal(gen["qformer_input_ids"], item.image["qformer_input_ids"])
    assert qtok.convert_tokens_to_ids("square") not in item.image["qformer_input_ids"][0].tolist()
    # Per-sample (tokenize_sample) too.
    s = Sample(image, PROMPT, "There is ", "a red square", "pos", score=30.0, image_id="ib-2")
    assert torch.equal(tokenize_sample(s, adapter, 512).image["qformer_input_ids"], want["input_ids"])
    # BERT-style WordPiece: [CLS] ... [SEP], lower-cased, ## continuations.
    ids = want["input_ids"][0].tolist()
    assert ids[0] == qtok.cls_token_id and ids[-1] == qtok.sep_token_id
    assert qtok("DOG")["input_ids"] == qtok("dog")["input_ids"]
    assert qtok.bos_token == "[DEC]"


def test_the_forward_gets_the_qformer_inputs_and_padding_is_harmless(adapter):
    image = Image.new("RGB", (32, 32), (90, 90, 200))
    items = [tokenize_caption(caption(image, prompt=p), adapter, 4096)[0]
             for p in (PROMPT, "Is there a dog in the image? Please describe the image.")]
    batch = collate_captions(items, adapter.tokenizer.pad_token_id, KINDS, trim=False)
    inputs = adapter.forward_inputs(batch)
    assert set(inputs) == {"input_ids", "attention_mask", "pixel_values", "qformer_input_ids", "qformer_attention_mask"}
    q0 = items[0].image["qformer_input_ids"].shape[1]
    assert inputs["qformer_input_ids"].shape[1] > q0
    assert inputs["qformer_input_ids"][0, q0:].eq(0).all() and inputs["qformer_attention_mask"][0, q0:].eq(0).all()
    model = adapter.model
    model.train()  # the trainer's mode: dropout is off in the adapter's model, so forwards are deterministic
    with torch.no_grad():
        both = model(**inputs).logits
        assert torch.equal(both, model(**inputs).logits)
        for i, it in enumerate(items):
            one = adapter.forward_inputs(collate_captions([it], adapter.tokenizer.pad_token_id, KINDS, trim=False))
            n = len(it.input_ids)
            assert torch.allclose(model(**one).logits[0], both[i, :n], atol=1e-5)
        # The Q-Former does read the prompt: another prompt, other image features.
        f = [model.get_image_features(inputs["pixel_values"][i:i + 1],
                                      qformer_input_ids=inputs["qformer_input_ids"][i:i + 1],
                                      qformer_attention_mask=inputs["qformer_attention_mask"][i:i + 1]).pooler_output
             for i in range(2)]
        assert f[0].shape == (1, N_QUERY, model.config.text_config.hidden_size) and not torch.allclose(f[0], f[1])
    assert model.config.qformer_config.hidden_dropout_prob == 0.1  # the config is left as published


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


def test_generation_and_fixed_tokens(adapter):
    from sare_ds.models.generate import generate_responses

    images = [Image.new("RGB", (32, 32), (200, 40, 40)), Image.new("RGB", (40, 30), (40, 40, 200))]
    prompts = [PROMPT, "Is there a dog in the image?"]
    texts = generate_responses(adapter, images, prompts, max_new_tokens=4, batch_size=2)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    # Left-padded batch == each prompt alone: the first two generated positions' logits (greedy text of a random
    # tiny model could flip on a near-tie, the logits cannot).
    assert torch.allclose(first_logits(adapter, images, prompts),
                          torch.cat([first_logits(adapter, [im], [p]) for im, p in zip(images, prompts)], 1), atol=1e-4)
    fixed = fixed_sample_tokens(adapter, PROMPT)
    assert fixed == {"text": 1 + len(adapter.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]),
                     "image_min": N_QUERY, "image_max": N_QUERY}


def test_a_sentencepiece_style_tokenizer_gets_a_placeholder_that_keeps_the_text_tokens(adapter):
    """Llama's tokenizer ("first" Metaspace scheme) adds its word-start marker only at a sequence start, so
    `<image>Describe` would tokenise `Describe` otherwise than the processor does: the adapter writes `<image> `."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import InstructBlipProcessor, LlamaTokenizer

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    raw.train_from_iterator(DEFAULT_CORPUS + caption_corpus(), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    data = json.loads(raw.to_str())["model"]
    llama = LlamaTokenizer(vocab=data["vocab"], merges=[tuple(m) if isinstance(m, list) else tuple(m.split(" "))
                                                         for m in data["merges"]])
    llama.add_bos_token = True  # as Vicuna's
    proc = InstructBlipProcessor(image_processor=adapter.processor.image_processor, tokenizer=llama,
                                 qformer_tokenizer=adapter.processor.qformer_tokenizer, num_query_tokens=4)
    image_id = llama.convert_tokens_to_ids("<image>")
    model = torch.nn.Module()
    model.config = types.SimpleNamespace(image_token_id=image_id)
    a = InstructBlipAdapter(model, proc, "llama-style")
    assert a._placeholder_prefix == "<image> "
    alone = llama("Describe", add_special_tokens=False)["input_ids"]
    assert llama("<image>Describe", add_special_tokens=False)["input_ids"][1:] != alone  # no word-start marker
    assert llama("<image> Describe", add_special_tokens=False)["input_ids"][1:] == alone
    image = Image.new("RGB", (32, 32))
    cap = caption(image)
    item = tokenize_caption(cap, a, 4096)[0]
    ref = proc(images=image, text=f"{PROMPT} {cap.caption}", return_tensors="pt")["input_ids"][0].tolist()
    assert item.input_ids.tolist() == ref and ref[:5] == [image_id] * 4 + [llama.bos_token_id]


def test_a_differing_sequence_is_an_error(adapter):
    image = Image.new("RGB", (32, 32))
    text = adapter.render(adapter.conversation(PROMPT, "A dog."), add_generation_prompt=False)
    ids = [adapter.tokenizer.bos_token_id] + adapter.tokenizer(text, add_special_tokens=False)["input_ids"]
    e = adapter.expand_image(text, ids, image, PROMPT)
    assert (e.start, e.length) == (1, N_QUERY) and len(e.ids) == len(ids) - 1 + N_QUERY
    with pytest.raises(ExpansionMismatchError, match="moved before BOS"):
        adapter.expand_image(text, ids[:-1] + [ids[-1] + 1], image, PROMPT)
    with pytest.raises(ExpansionMismatchError, match="does not start with the image placeholder"):
        adapter.expand_image(text[len("<image>"):], ids, image, PROMPT)


def _t5_config():
    from transformers import InstructBlipConfig, T5Config

    t5 = T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    return InstructBlipConfig(text_config=t5.to_dict(), num_query_tokens=4,
                              vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                             "num_attention_heads": 2, "image_size": 16, "patch_size": 8},
                              qformer_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                              "num_attention_heads": 2, "encoder_hidden_size": 16, "vocab_size": 50})


def test_flan_t5_variants_are_refused_at_load(tmp_path):
    config = _t5_config()
    assert config.use_decoder_only_language_model is False
    d = tmp_path / "instructblip-flan-t5-xl"
    config.save_pretrained(d)  # config only: refused before any weight or processor is read
    assert resolve_adapter(ModelConfig(name_or_path=str(d))) is InstructBlipAdapter
    for device in (None, "meta"):
        with pytest.raises(EncoderDecoderLanguageModelError) as e:
            load_mllm(ModelConfig(name_or_path=str(d)), device=device)
        msg = str(e.value)
        assert str(d) in msg and "encoder-decoder `t5`" in msg and "use_decoder_only_language_model = False" in msg
        assert "Fix: use a decoder-only checkpoint (Salesforce/instructblip-vicuna-7b" in msg


@pytest.mark.parametrize("checkpoint", ["Salesforce/instructblip-vicuna-7b", "Salesforce/instructblip-vicuna-13b"])
def test_family_auto_resolves_the_published_checkpoints(tmp_path, checkpoint):
    d = tmp_path / checkpoint.split("/")[1]
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["InstructBlipForConditionalGeneration"],
                                               "model_type": "instructblip", "text_config": {"model_type": "llama"}}))
    assert resolve_adapter(ModelConfig(name_or_path=str(d))) is InstructBlipAdapter


def test_mapping_layers_and_lora_targets(tiny_dir):
    adapter = load_mllm(ModelConfig(name_or_path=str(tiny_dir)))
    names = adapter.mapping_parameter_names()
    params = dict(adapter.model.named_parameters())
    want = [n for n in params if n.startswith(("qformer.", "language_projection.")) or n == "query_tokens"]
    assert sorted(names) == sorted(want) and "query_tokens" in names
    assert "qformer.embeddings.word_embeddings.weight" in names  # the instruction's embeddings train too
    assert not any(n.startswith(("vision_model.", "language_model.")) for n in names)
    trainable = select_trainable(adapter, ModelConfig(name_or_path=str(tiny_dir), trainable="mapping+lora"))
    lora = [n for n in trainable if "lora_" in n]
    assert lora and all(".language_model.model.layers." in n for n in lora)
    assert len([n for n in trainable if "lora_" not in n]) == len(names)


def test_real_shapes_on_the_meta_device():
    """instructblip-vicuna-7b: Q-Former (BERT-base, 12 layers, cross-attention every 2nd, vocab 30,523 with [DEC])
    185,660,160 + query tokens 32 x 768 + projection 768 -> 4096 (+ bias) = 188,834,560 trainable; 32 image tokens."""
    from transformers import InstructBlipConfig, InstructBlipQFormerConfig, LlamaConfig

    config = InstructBlipConfig(text_config=LlamaConfig(vocab_size=32001, num_hidden_layers=1).to_dict(),
                                qformer_config=InstructBlipQFormerConfig(vocab_size=30523).to_dict())
    a = InstructBlipAdapter.from_config(config, None, torch.float16, "instructblip-vicuna-7b", device="meta")
    params = dict(a.model.named_parameters())
    count = {p: sum(params[n].numel() for n in a.mapping_parameter_names() if n.startswith(p))
             for p in ("qformer.", "query_tokens", "language_projection.")}
    assert count == {"qformer.": 185_660_160, "query_tokens": 32 * 768, "language_projection.": 768 * 4096 + 4096}
    assert sum(count.values()) == 188_834_560 and config.num_query_tokens == 32
