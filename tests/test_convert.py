"""Original LLaVA layout -> llava-hf (sare_ds.models.convert).

A tiny llava-hf model is the reference. Its weights are written back in the original layout
(haotian-liu/LLaVA's names, a SentencePiece tokenizer.model, the CLIP tower in a separate
checkpoint or inside SRC), converted, loaded through transformers and through load_mllm, and
its logits on an image + text input must equal the reference's.

    DS_ACCELERATOR=cpu .venv/bin/python -m pytest tests/test_convert.py -q
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from sare_ds.config import ModelConfig
from sare_ds.models import load_mllm
from sare_ds.models.convert import ConversionError, convert, main

WORDS = ["the", "image", "dog", "cat", "frisbee", "describe", "is", "there", "a", "in", "USER", "ASSISTANT"]


def write_spm_model(path) -> int:
    """A Llama-style SentencePiece BPE model (byte fallback, <unk>/<s>/</s> at 0-2, then the 256
    byte pieces) written with protobuf; returns its number of pieces."""
    from transformers.convert_slow_tokenizer import import_protobuf

    proto = import_protobuf().ModelProto()

    def add(piece, score, kind):
        p = proto.pieces.add()
        p.piece, p.score, p.type = piece, score, kind

    add("<unk>", 0.0, 2), add("<s>", 0.0, 3), add("</s>", 0.0, 3)
    for b in range(256):
        add(f"<0x{b:02X}>", 0.0, 6)
    merged = []
    for word in WORDS:  # every prefix of "▁word" is a piece, so each merge has both halves
        for end in range(2, len(word) + 2):
            if ("\u2581" + word)[:end] not in merged:
                merged.append(("\u2581" + word)[:end])
    chars = sorted(set("".join(merged)) | set("abcdefghijklmnopqrstuvwxyz:.?"))
    for rank, piece in enumerate(merged + chars):
        add(piece, -float(rank), 1)
    spec = proto.trainer_spec
    spec.model_type, spec.byte_fallback = 2, True
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = 0, 1, 2, -1
    norm = proto.normalizer_spec
    norm.add_dummy_prefix, norm.remove_extra_whitespaces, norm.escape_whitespaces = True, False, True
    path.write_bytes(proto.SerializeToString())
    return len(proto.pieces)


def original_state(reference, vocab: int, with_vision: bool) -> dict[str, torch.Tensor]:
    """The reference's weights under haotian-liu/LLaVA's names (embedding rows cut to vocab)."""
    out = {}
    for name, t in reference.state_dict().items():
        t = t.clone()
        if name.startswith("model.language_model."):
            new = "model." + name[len("model.language_model."):]
        elif name == "lm_head.weight":
            new = name
        elif name.startswith("model.multi_modal_projector.linear_"):
            layer = {"1": "0", "2": "2"}[name.split("linear_")[1][0]]
            new = f"model.mm_projector.{layer}." + name.rsplit(".", 1)[1]
        elif name.startswith("model.vision_tower."):
            if not with_vision:
                continue
            rest = name[len("model.vision_tower."):].removeprefix("vision_model.")
            new = "model.vision_tower.vision_tower.vision_model." + rest
        else:
            raise AssertionError(name)
        out[new] = t[:vocab] if new in ("model.embed_tokens.weight", "lm_head.weight") else t
    # A buffer that old Llama checkpoints carry: it must be dropped with a reason.
    out["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    return out


def write_original(root, reference, vocab, *, fmt="bin", with_vision=False, model_type="llava_llama", extra=None):
    """An original-layout checkpoint directory (config, tokenizer.model, weights)."""
    from safetensors.torch import save_file

    root.mkdir(parents=True)
    text, vision = reference.config.text_config, reference.config.vision_config
    config = {
        "architectures": ["LlavaLlamaForCausalLM" if model_type != "share4v" else "Share4VLlamaForCausalLM"],
        "model_type": model_type, "vocab_size": vocab, "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size, "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads, "num_key_value_heads": text.num_key_value_heads,
        "hidden_act": "silu", "max_position_embeddings": text.max_position_embeddings,
        "rms_norm_eps": text.rms_norm_eps, "rope_theta": 10000.0, "rope_scaling": None, "initializer_range": 0.02,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "pretraining_tp": 1, "tie_word_embeddings": False,
        "torch_dtype": "float32", "use_cache": True, "transformers_version": "4.31.0",
        "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_hidden_size": vision.hidden_size,
        "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
        "image_aspect_ratio": "pad", "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
        "mm_patch_merge_type": "flat", "tokenizer_model_max_length": 2048, "tune_mm_mlp_adapter": False,
        "freeze_mm_mlp_adapter": False, "use_mm_proj": True,
    }
    (root / "config.json").write_text(json.dumps(config, indent=1))
    assert write_spm_model(root / "tokenizer.model") == vocab
    (root / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "legacy": False, "pad_token": "<unk>", "model_max_length": 2048}))
    state = original_state(reference, vocab, with_vision)
    state.update(extra or {})
    if fmt == "safetensors":
        save_file(state, str(root / "model.safetensors"), metadata={"format": "pt"})
        return root
    names = list(state)  # two shards and an index, like liuhaotian/llava-v1.5-7b
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, part in enumerate(halves):
        fname = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({n: state[n] for n in part}, root / fname)
        weight_map.update({n: fname for n in part})
    (root / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return root


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny llava-hf model (the shapes of sare_ds.models.tiny.make_tiny_llava; vision width 128
    with 2 heads, OpenAI CLIP's 64 channels a head, so the converter's shape inference applies)
    and the size of its original vocabulary. Rows from the vocabulary on (<image>, <pad>, padding)
    hold the mean of the original rows, as the converter writes them."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vocab = write_spm_model(tmp_path_factory.mktemp("spm") / "tokenizer.model")
    vision = CLIPVisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=128)
    text = LlamaConfig(vocab_size=64 * math.ceil((vocab + 2) / 64), hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       bos_token_id=1, eos_token_id=2, pad_token_id=vocab + 1)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=vocab, image_seq_length=16,
                         vision_feature_select_strategy="default", vision_feature_layer=-2)
    torch.manual_seed(3)
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():
        for table in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            table[vocab:] = table[:vocab].mean(dim=0)
    return model.eval(), vocab


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, reference):
    """The reference's tower saved as a CLIPModel checkpoint (openai/clip-vit-large-patch14-336's kind:
    vision and text side), with the processor config such a directory has."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    model, _ = reference
    vision = model.config.vision_config
    text = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    clip = CLIPModel(CLIPConfig(vision_config=vision.to_dict(), text_config=text, projection_dim=32))
    clip.vision_model.load_state_dict(model.model.vision_tower.state_dict())
    out = tmp_path_factory.mktemp("clip")
    clip.save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": vision.image_size},
                       crop_size={"height": vision.image_size, "width": vision.image_size}).save_pretrained(out)
    return out


def assert_same_logits(out_dir, reference, through_load_mllm: bool):
    """Converted model == reference on an image + text prompt, loaded by transformers (no
    missing or unexpected tensors) and, if asked, through sare_ds.models.load_mllm."""
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    ref, vocab = reference
    model, info = LlavaForConditionalGeneration.from_pretrained(out_dir, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    models = [model.eval()]
    processor = AutoProcessor.from_pretrained(out_dir)
    if through_load_mllm:
        adapter = load_mllm(ModelConfig(name_or_path=str(out_dir)))
        assert adapter.family == "llava" and adapter.image_token_id == vocab
        assert adapter.tokenizer.is_fast and adapter.image_inputs(Image.new("RGB", (40, 24))).num_image_tokens == 16
        models.append(adapter.model.eval())
        processor = adapter.processor
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "is there a dog?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "USER: <image>\nis there a dog? ASSISTANT:"
    pixels = torch.Generator().manual_seed(0)
    image = Image.fromarray((torch.rand(24, 40, 3, generator=pixels) * 255).to(torch.uint8).numpy())
    inputs = processor(images=image, text=text, return_tensors="pt")
    assert int((inputs["input_ids"] == vocab).sum()) == 16 and inputs["input_ids"][0, 0] == 1
    with torch.no_grad():
        want = ref(**inputs).logits
        for m in models:
            torch.testing.assert_close(m(**inputs).logits, want, rtol=0, atol=1e-6)


def test_bin_checkpoint_with_separate_clip_tower(tmp_path, reference, clip_dir):
    ref, vocab = reference
    src = write_original(tmp_path / "llava-v1.5-tiny", ref, vocab, fmt="bin")
    out = tmp_path / "hf"
    record = convert(src, out, vision_tower=clip_dir, dtype="float32")
    assert not (tmp_path / "hf.tmp").exists()
    assert_same_logits(out, reference, through_load_mllm=True)

    saved = json.loads((out / "sare_convert.json").read_text())
    assert saved["tensors"] == record["tensors"] and saved["source"]["format"] == "bin"
    assert saved["tensors"]["SRC tensors"] == saved["tensors"]["SRC mapped"] + 1  # + the rotary buffer
    assert saved["dropped"]["SRC:model.layers.0.self_attn.rotary_emb.inv_freq"].startswith("rotary buffer")
    text_side = [k for k, why in saved["dropped"].items() if "text side" in why]
    assert any("text_model." in k for k in text_side) and "--vision-tower:logit_scale" in text_side
    assert saved["vocab"] == {"original": vocab, "image_token_id": vocab, "pad_token_id": vocab + 1,
                              "padded_to": 64 * math.ceil((vocab + 2) / 64), "new_rows": "mean of the original rows"}
    assert saved["image_processor"]["pad_to_square"] is True


def test_safetensors_checkpoint_with_its_own_tower(tmp_path, reference):
    """ShareGPT4V-like: model_type share4v, the tower inside SRC, its config read off the shapes."""
    from safetensors import safe_open

    ref, vocab = reference
    src = write_original(tmp_path / "share4v", ref, vocab, fmt="safetensors", with_vision=True,
                         model_type="share4v")
    checked = convert(src, tmp_path / "never", dtype="float32", check_only=True)
    assert not (tmp_path / "never").exists() and "inferred" in checked["vision_tower"]["source"]
    out = tmp_path / "hf"
    convert(src, out, dtype="float32", max_shard_gb=0.0005)  # ~500 kB shards: an index and several files
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert_same_logits(out, reference, through_load_mllm=False)
    # The file names are llava-hf/llava-1.5-7b-hf's, and --dtype is honoured.
    convert(src, out, dtype="bfloat16", overwrite=True)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("multi_modal_projector.linear_1.weight").dtype == torch.bfloat16
    assert {"language_model.lm_head.weight", "language_model.model.embed_tokens.weight",
            "vision_tower.vision_model.embeddings.class_embedding"} <= names


def test_clip_vision_model_directory_as_tower(tmp_path, reference):
    """A CLIPVisionModel checkpoint as saved by the installed transformers (5.x: no vision_model. prefix)."""
    from transformers import CLIPVisionModel

    ref, vocab = reference
    tower = CLIPVisionModel(ref.config.vision_config)
    tower.load_state_dict(ref.model.vision_tower.state_dict())
    tower.save_pretrained(tmp_path / "clip-vision")
    src = write_original(tmp_path / "src", ref, vocab, fmt="safetensors")
    record = convert(src, tmp_path / "hf", vision_tower=tmp_path / "clip-vision", dtype="float32")
    assert record["tensors"]["--vision-tower mapped"] == len(tower.state_dict())
    assert_same_logits(tmp_path / "hf", reference, through_load_mllm=False)


@pytest.mark.parametrize("size,params", [("7b", 7_063_427_072), ("13b", 13_351_494_656)])
def test_real_llava15_configs_give_llava_hf_shapes(size, params):
    """liuhaotian/llava-v1.5-{7b,13b}'s config values, on the meta device: the parameter counts of
    llava-hf/llava-1.5-{7b,13b}-hf, and CLIP-L/14-336's config read back off its tensor shapes."""
    from sare_ds.models.convert import (
        SRC_VISION_PREFIX, WeightFiles, build_llava_config, expected_file_tensors, vision_config_from_weights)

    width, ffn, layers = {"7b": (4096, 11008, 32), "13b": (5120, 13824, 40)}[size]
    orig = {"vocab_size": 32000, "hidden_size": width, "intermediate_size": ffn, "num_hidden_layers": layers,
            "num_attention_heads": width // 128, "num_key_value_heads": width // 128, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "mm_hidden_size": 1024, "mm_vision_select_layer": -2, "image_aspect_ratio": "pad"}
    clip_l = {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
              "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14}
    config, image_id, pad_id = build_llava_config(orig, clip_l, "float16")
    assert (image_id, pad_id, config.text_config.vocab_size, config.image_seq_length) == (32000, 32001, 32064, 576)
    shapes = expected_file_tensors(config)
    assert sum(math.prod(s) for s in shapes.values()) == params
    assert shapes["language_model.lm_head.weight"] == (32064, width)
    assert shapes["multi_modal_projector.linear_1.weight"] == (width, 1024)
    assert "vision_tower.vision_model.encoder.layers.23.mlp.fc2.bias" in shapes

    with torch.device("meta"):
        tower = {SRC_VISION_PREFIX + n[len("vision_tower.vision_model."):]: torch.empty(s)
                 for n, s in shapes.items() if n.startswith("vision_tower.")}
    weights = WeightFiles(Path("src"), "bin", [Path("src/w.bin")], where=dict.fromkeys(tower, Path("src/w.bin")),
                          bin_states={Path("src/w.bin"): tower})
    inferred = vision_config_from_weights(weights, SRC_VISION_PREFIX)
    assert {k: inferred[k] for k in clip_l} == clip_l


def test_missing_vision_tower_is_an_error_naming_the_fix(tmp_path, reference, capsys):
    ref, vocab = reference
    src = write_original(tmp_path / "src", ref, vocab, fmt="safetensors")
    with pytest.raises(ConversionError, match=r"SRC .*no vision-tower weights.*mm_vision_tower.*--vision-tower DIR"):
        convert(src, tmp_path / "out")
    with pytest.raises(ConversionError, match=r"--vision-tower openai/clip-vit-large-patch14-336: not a local dir"):
        convert(src, tmp_path / "out", vision_tower="openai/clip-vit-large-patch14-336")
    assert main([str(src), str(tmp_path / "out")]) == 2
    assert "error: SRC" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_unknown_tensor_stops_the_conversion_unless_dropped_on_purpose(tmp_path, reference, clip_dir):
    ref, vocab = reference
    extra = {"model.image_newline": torch.zeros(ref.config.text_config.hidden_size)}
    src = write_original(tmp_path / "src", ref, vocab, fmt="safetensors", extra=extra)
    with pytest.raises(ConversionError, match=r"SRC:model\.image_newline.*--drop-key"):
        convert(src, tmp_path / "out", vision_tower=clip_dir)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()
    record = convert(src, tmp_path / "out", vision_tower=clip_dir, drop_keys=("image_newline$",))
    assert record["dropped"]["SRC:model.image_newline"] == "--drop-key" and record["dtype"] == "float32"


def test_bin_files_are_read_without_running_code(tmp_path, reference, clip_dir):
    ref, vocab = reference
    marker = tmp_path / "code-ran"

    class Payload:  # unpickling this would call open(marker, "w")
        def __reduce__(self):
            return (open, (str(marker), "w"))

    src = write_original(tmp_path / "src", ref, vocab, fmt="bin")
    torch.save({"model.norm.weight": torch.ones(4), "hook": Payload()}, src / "pytorch_model-00002-of-00002.bin")
    with pytest.raises(ConversionError, match=r"pytorch_model-00002-of-00002\.bin: torch\.load\(weights_only=True\) "
                                              r"refused.*never runs code.*safetensors"):
        convert(src, tmp_path / "out", vision_tower=clip_dir)
    assert not marker.exists()


def test_output_is_replaced_only_on_purpose(tmp_path, reference, clip_dir):
    ref, vocab = reference
    src = write_original(tmp_path / "src", ref, vocab, fmt="safetensors")
    out = tmp_path / "out"
    convert(src, out, vision_tower=clip_dir)
    with pytest.raises(ConversionError, match="already exists.*--overwrite"):
        convert(src, out, vision_tower=clip_dir)
    convert(src, out, vision_tower=clip_dir, overwrite=True)
    with pytest.raises(ConversionError, match="not an output of this converter"):
        convert(src, src, vision_tower=clip_dir, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_original_config_outside_llava15_is_refused(tmp_path, reference, clip_dir):
    ref, vocab = reference
    src = write_original(tmp_path / "src", ref, vocab, fmt="safetensors")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "image_aspect_ratio": "anyres",
                                                 "mm_use_im_start_end": True}))
    with pytest.raises(ConversionError,
                       match=r"config\.json: not a convertible.*mm_use_im_start_end is true.*anyres.*Fix"):
        convert(src, tmp_path / "out", vision_tower=clip_dir)


def test_tokenizer_is_fast_with_image_and_pad_tokens(tmp_path, reference, clip_dir):
    from transformers import AutoTokenizer

    ref, vocab = reference
    src = write_original(tmp_path / "src", ref, vocab, fmt="safetensors")
    convert(src, tmp_path / "out", vision_tower=clip_dir)
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok.is_fast and len(tok) == vocab + 2
    assert tok.convert_tokens_to_ids(["<image>", "<pad>"]) == [vocab, vocab + 1] and tok.pad_token == "<pad>"
    enc = tok("USER: <image>\nis there a dog? é", return_offsets_mapping=True)
    assert tok.convert_ids_to_tokens(enc.input_ids) == [
        "<s>", "\u2581USER", ":", "\u2581", "<image>", "<0x0A>", "i", "s", "\u2581there", "\u2581a", "\u2581dog", "?",
        "\u2581", "<0xC3>", "<0xA9>"]
    assert enc.offset_mapping[10] == (24, 28)  # " dog": the piece "▁dog" covers its space
    assert tok.decode(enc.input_ids, skip_special_tokens=True) == "USER: \nis there a dog? é"

    # A SRC that ships tokenizer.json instead of tokenizer.model gives the same tokenizer.
    (src / "tokenizer.model").unlink()
    (src / "tokenizer.json").write_bytes((tmp_path / "out" / "tokenizer.json").read_bytes())
    record = convert(src, tmp_path / "out2", vision_tower=clip_dir)
    again = AutoTokenizer.from_pretrained(tmp_path / "out2")
    assert record["tokenizer"]["built_from"] == "tokenizer.json" and again.get_vocab() == tok.get_vocab()
    assert again("USER: <image>\nis there a dog? é").input_ids == enc.input_ids


def test_tokenizer_matches_sentencepiece(tmp_path):
    """Against the sentencepiece library itself (a test dependency, not a runtime one).
    Texts that start with a space differ, as in every transformers Llama fast tokenizer
    (llava-hf's included): Metaspace adds no dummy prefix there, SentencePiece adds one."""
    import sentencepiece as spm
    from sare_ds.models.convert import build_tokenizer

    write_spm_model(tmp_path / "tokenizer.model")
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    tok, _ = build_tokenizer(tmp_path, {"vocab_size": sp.get_piece_size()})
    for text in ["is there a dog in the image?", "describe  the cat.", "frisbee\nthere é ü 12", "ASSISTANT: a"]:
        assert tok(text, add_special_tokens=False).input_ids == sp.encode(text), text
