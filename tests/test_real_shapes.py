"""Real models at their true shapes: presets on the meta device, recipes, loading checks, launch conventions.

The expected parameter counts are computed by hand from the published configurations (not read
back from the model), so a wrong preset value or a wrong trainable rule shows up as a mismatch.
"""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from sare_ds.config import EFUF_CAPTION_PROMPT, ConfigError, ModelConfig, load_config
from sare_ds.data.samples import BadSampleError, Sample
from sare_ds.data.tokenize import fixed_sample_tokens, tokenize_sample
from sare_ds.models import (
    UnknownModelLayoutError, WeightsMismatchError, load_mllm, presets, select_trainable,
)

ROOT = Path(__file__).resolve().parents[1]

# Hand-computed: projector = (1024*h + h) + (h*h + h); LoRA r=8 on q_proj and v_proj of every LLM
# layer = layers * 8 * ((h + h) + (h + kv_dim)); lm_head = h * 32064.
def projector(h: int) -> int:
    return 1024 * h + h + h * h + h


def lora(layers: int, h: int, kv_dim: int, r: int = 8) -> int:
    return layers * r * ((h + h) + (h + kv_dim))


EXPECTED = {
    # name: (adapter family, total params, mapping, mapping+lora, image tokens of a 640x480 image)
    "llava-1.5-7b": ("llava", 7_063_427_072, projector(4096), projector(4096) + lora(32, 4096, 4096), 576),
    "sharegpt4v-7b": ("llava", 7_063_427_072, projector(4096), projector(4096) + lora(32, 4096, 4096), 576),
    "llava-1.5-13b": ("llava", 13_351_494_656, projector(5120), projector(5120) + lora(40, 5120, 5120), 576),
    "llava-next-mistral-7b": ("llava_next", None, projector(4096) + 4096,
                              projector(4096) + 4096 + lora(32, 4096, 1024), 2340),
}
CAPTION_100_WORDS = (
    "The image shows a busy city street with a red bus driving past a row of tall buildings. Several people are "
    "walking on the sidewalk, some carrying umbrellas and shopping bags. A man in a blue jacket is riding a bicycle "
    "near the curb, while a woman holds the hand of a small child. In the background there are traffic lights, a "
    "clock tower and a few parked cars. The sky is cloudy, suggesting it might rain soon. A dog on a leash sits next "
    "to a bench, and a street vendor sells hot food from a small red cart.")


def test_published_counts_by_hand():
    assert projector(4096) == 20_979_712 and projector(5120) == 31_467_520


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_on_meta_through_the_model_layer(name):
    family, total, mapping, with_lora, image_tokens = EXPECTED[name]
    spec = f"preset:{name}"

    def counts(**kw):
        adapter = load_mllm(ModelConfig(name_or_path=spec, **kw), device="meta")
        select_trainable(adapter, ModelConfig(name_or_path=spec, **kw))
        params = list(adapter.model.parameters())
        assert all(p.device.type == "meta" for p in params)  # nothing was allocated
        return adapter, sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)

    adapter, n_total, n_mapping = counts()
    assert adapter.family == family
    if total is not None:
        assert n_total == total
    assert n_mapping == mapping
    assert counts(trainable="mapping+lora")[2] == with_lora
    assert counts(trainable="regex", trainable_regex=r"^lm_head\.")[2] == adapter.model.config.text_config.hidden_size * 32064

    assert adapter.image_inputs(Image.new("RGB", (640, 480))).num_image_tokens == image_tokens
    # A realistic sample (a 100-word caption, the EFUF prompt) through the real chat template.
    assert len(CAPTION_100_WORDS.split()) == 100
    sample = Sample(image=Image.new("RGB", (640, 480)), prompt=EFUF_CAPTION_PROMPT, context="",
                    target=CAPTION_100_WORDS, kind="sent", score=0.0, image_id="x")
    t = tokenize_sample(sample, adapter, max_length=10_000)
    caption_tokens = t.num_target_tokens - 1  # the sent sample's EOS is labelled too
    assert 110 <= caption_tokens <= 150, caption_tokens  # Llama's tokenizer: ~1.2-1.4 tokens a word
    assert int((t.input_ids == adapter.image_token_id).sum()) == image_tokens
    recipe = {"llava": "llava15_7b_sare.yaml", "llava_next": "llava_next_mistral7b_sare.yaml"}[family]
    max_length = load_config(ROOT / "launch/configs" / recipe).data.max_length
    assert len(t.input_ids) < max_length


def test_preset_overrides_and_errors():
    cfg = presets.hf_config("preset:llava-1.5-7b,text_layers=3,vision_layers=1")
    assert cfg.text_config.num_hidden_layers == 3 and cfg.vision_config.num_hidden_layers == 1
    assert cfg.text_config.hidden_size == 4096 and cfg.text_config.vocab_size == 32064
    with pytest.raises(presets.PresetError, match="unknown preset `llava-9b`.*known: .*llava-1.5-7b"):
        presets.hf_config("preset:llava-9b")
    with pytest.raises(presets.PresetError, match="override `depth=3`.*text_layers"):
        presets.hf_config("preset:llava-1.5-7b,depth=3")
    with pytest.raises(presets.PresetError, match="not a multiple of its 32 heads"):
        presets.hf_config("preset:llava-1.5-7b,text_hidden=100")


def test_reduced_preset_keeps_the_token_structure():
    adapter = load_mllm(ModelConfig(name_or_path="preset:llava-1.5-7b-reduced"))
    cfg = adapter.model.config
    assert (cfg.vision_config.image_size, cfg.vision_config.patch_size, cfg.text_config.vocab_size) == (336, 14, 32064)
    assert cfg.text_config.num_hidden_layers == 2 and cfg.vision_config.num_hidden_layers == 2
    assert adapter.tokenizer.convert_tokens_to_ids("<image>") == 32000
    assert adapter.tokenizer.chat_template == presets.LLAVA15_TEMPLATE
    text = adapter.render(adapter.conversation("Describe.", "A dog."), add_generation_prompt=False)
    assert text == "USER: <image>\nDescribe. ASSISTANT: A dog. "
    # Random weights from a fixed seed: two builds are the same model.
    again = load_mllm(ModelConfig(name_or_path="preset:llava-1.5-7b-reduced"))
    for (n, a), (_, b) in zip(adapter.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), n


# ----------------------------------------------------------------------------- recipes

@pytest.mark.parametrize("recipe, preset, most_image_tokens", [
    ("llava15_7b_sare.yaml", "llava-1.5-7b", 576), ("llava15_13b_sare.yaml", "llava-1.5-13b", 576),
    # AnyRes: a square image of 480 px or more takes the 2x2 grid of 672 px tiles: 576 + 4 x 576 + 48 newlines.
    ("llava_next_mistral7b_sare.yaml", "llava-next-mistral-7b", 576 + 4 * 576 + 48),
])
def test_recipes_fit_their_samples(recipe, preset, most_image_tokens):
    from sare_ds.train.trainer import check_max_length

    cfg = load_config(ROOT / "launch/configs" / recipe, [f"model.name_or_path=preset:{preset}"])
    assert cfg.model.gradient_checkpointing and cfg.model.dtype == "bfloat16"
    adapter = load_mllm(cfg.model, device="meta")
    assert adapter.image_inputs(Image.new("RGB", (1000, 1000))).num_image_tokens == most_image_tokens
    fixed = check_max_length(cfg, adapter)  # no error
    assert fixed["image_max"] == most_image_tokens
    assert fixed["text"] + fixed["image_max"] + 150 <= cfg.data.max_length
    cfg.data.max_length = 512
    with pytest.raises(ConfigError, match=r"data.max_length = 512 is invalid: .* at least \d+ tokens .*"
                                          r"image tokens .*Fix: data.max_length=\d+"):
        check_max_length(cfg, adapter)


def test_max_length_refused_before_any_weight_is_loaded(tiny_model_dir, tmp_path, monkeypatch):
    from sare_ds.models.llava import LlavaAdapter
    from sare_ds.train.trainer import train

    def never(*a, **k):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(LlavaAdapter, "load", classmethod(never))
    cfg = load_config(ROOT / "launch/configs/tiny_random.yaml", [
        f"model.name_or_path={tiny_model_dir}", "data.source=synthetic", "data.max_length=8",
        f"output.run_dir={tmp_path}", "logging.progress_bar=false"])
    with pytest.raises(ConfigError, match=r"data.max_length = 8 is invalid: .*16 image tokens"):
        train(cfg)


def test_no_usable_sample_names_the_skip_reasons(tmp_path):
    from sare_ds.train.trainer import train

    # Room for the image and prompt (so the start-up check passes) but not for the captions.
    adapter = load_mllm(ModelConfig(name_or_path="preset:llava-1.5-7b-reduced"), device="meta")
    fixed = fixed_sample_tokens(adapter, EFUF_CAPTION_PROMPT)
    cfg = load_config(ROOT / "launch/configs/tiny_random.yaml", [
        "model.name_or_path=preset:llava-1.5-7b-reduced", "data.source=synthetic", "data.num_images=4",
        f"data.max_length={fixed['text'] + fixed['image_max'] + 2}", f"output.run_dir={tmp_path}",
        "logging.progress_bar=false"])
    with pytest.raises(BadSampleError, match=r"no usable caption .* by reason: \d+ x longer than "
                                             r"data.max_length = \d+"):
        train(cfg)


def test_shard_stream_no_usable_sample_names_the_skip_reasons(adapter, tmp_path):
    """Real shards, a max_length no sample fits: the stream stops naming the reason and its count."""
    from sare_ds.data.stream import NoUsableSampleError, ShardStream
    from test_stream import write_shards

    root = tmp_path / "curated"
    write_shards(root, {"neg": [3], "pos": [3], "sent": [3]})
    fixed = fixed_sample_tokens(adapter, "Describe.")
    too_short = fixed["text"] + fixed["image_max"] + 1  # room for one target token; the targets are longer
    stream = ShardStream(root, adapter, per_step={"pos": 1, "neg": 1, "sent": 1}, seed=0, max_length=too_short)
    with pytest.raises(NoUsableSampleError) as err:
        list(stream)
    text = str(err.value)
    kind = re.search(r"no usable (pos|neg|sent) sample in the shards of rank 0 worker 0", text).group(1)
    assert f"{kind}-000000.tar" in text
    count = int(re.search(rf"(\d+) x longer than data.max_length = {too_short}", text).group(1))
    assert count >= 3  # at least one full pass over that kind's 3 samples was skipped
    assert f"exceed data.max_length = {too_short}; fix: raise data.max_length" in text  # the last one's message


# ----------------------------------------------------------------------------- loading

def test_family_mismatch_refused_before_any_weight(tmp_path, monkeypatch):
    from transformers import GPT2Config

    from sare_ds.models.llava import LlavaAdapter

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)

    def never(*a, **k):
        raise AssertionError("a model was built")

    monkeypatch.setattr(LlavaAdapter, "load", classmethod(never))
    monkeypatch.setattr(LlavaAdapter, "from_config", classmethod(never))
    with pytest.raises(UnknownModelLayoutError, match="model.family = 'llava' does not match.*model_type `gpt2`"):
        load_mllm(ModelConfig(name_or_path=str(tmp_path), family="llava"))


@pytest.mark.parametrize("model_type", ["llava", "llava_llama", "share4v"])
def test_original_llava_layout_points_at_the_converter(tmp_path, model_type):
    # liuhaotian's LLaVA-1.5 configs say model_type "llava" too: the flat mm_* layout gives them away.
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "hidden_size": 4096,
                                                      "mm_vision_tower": "openai/clip-vit-large-patch14-336"}))
    with pytest.raises(UnknownModelLayoutError, match="original LLaVA.*python -m sare_ds.models.convert"):
        load_mllm(ModelConfig(name_or_path=str(tmp_path)))


def _edit_weights(src: Path, dst: Path, edit) -> Path:
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    edit(state)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


# Keys as save_pretrained writes them (the llava-hf checkpoint layout); the error names the model's own.
@pytest.mark.parametrize("key, named", [
    ("multi_modal_projector.linear_1.weight", r"multi_modal_projector\.linear_1\.weight"),
    ("language_model.model.layers.0.mlp.down_proj.weight", r"language_model\.(model\.)?layers\.0\.mlp\.down_proj"),
])
def test_missing_weights_are_an_error_naming_them(tiny_model_dir, tmp_path, key, named):
    bad = _edit_weights(tiny_model_dir, tmp_path / "m", lambda s: s.pop(key))
    with pytest.raises(WeightsMismatchError, match=rf"1 weights of the model are missing .*{named}"):
        load_mllm(ModelConfig(name_or_path=str(bad)))


def test_weights_of_another_shape_are_an_error_naming_them(tiny_model_dir, tmp_path):
    def widen(state):
        w = state["multi_modal_projector.linear_2.weight"]
        state["multi_modal_projector.linear_2.weight"] = torch.zeros(w.shape[0], w.shape[1] + 1)

    bad = _edit_weights(tiny_model_dir, tmp_path / "m", widen)
    with pytest.raises(WeightsMismatchError, match=r"1 have another shape .*multi_modal_projector\.linear_2\.weight"):
        load_mllm(ModelConfig(name_or_path=str(bad)))


def test_unexpected_weights_are_reported_by_name(tiny_model_dir, tmp_path, caplog):
    bad = _edit_weights(tiny_model_dir, tmp_path / "m", lambda s: s.__setitem__("extra_head.weight", torch.zeros(2)))
    with caplog.at_level(logging.WARNING, logger="sare_ds.models"):
        adapter = load_mllm(ModelConfig(name_or_path=str(bad)))
    assert len(adapter.loading["unexpected"]) == 1 and "extra_head.weight" in adapter.loading["unexpected"][0]
    assert "extra_head.weight" in caplog.text


# ----------------------------------------------------------------------------- launch conventions

def _train_cli():
    sys.path.insert(0, str(ROOT / "launch"))
    try:
        import train as train_cli
    finally:
        sys.path.pop(0)
    return train_cli


@pytest.mark.parametrize("flag", ["--deepspeed", "--deepspeed_config"])
def test_deepspeed_flag_aliases(flag):
    args = _train_cli().parse_args(["--config", "x.yaml", flag, "ds_configs/zero3_bf16.json", "method.rho=0.1"])
    assert args.overrides == ["method.rho=0.1", "distributed.ds_config=ds_configs/zero3_bf16.json"]
    with pytest.raises(SystemExit):
        _train_cli().parse_args([flag, "a.json", "distributed.ds_config=b.json"])


def test_help_lists_sections_and_presets():
    proc = subprocess.run([sys.executable, str(ROOT / "launch/train.py"), "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0
    for needle in ("docs/config.md", "model ", "method ", "distributed ", "--deepspeed FILE", "preset:llava-1.5-13b"):
        assert needle in proc.stdout, needle


def test_config_error_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "launch/train.py"), "--config",
                           str(ROOT / "launch/configs/tiny_random.yaml"), "method.rho=-1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip() and "Warning" not in l and "warn" not in l]
    assert lines == ["launch/train.py: error: method.rho = -1.0 is invalid: the perturbation radius must be >= 0. "
                     "Fix: use 0.05 (paper); 0 reduces SARE to EFUF"], proc.stderr
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- memory options

@pytest.mark.parametrize("trainable", ["mapping", "mapping+lora"])
@pytest.mark.parametrize("checkpointing, forwards_per_layer", [(False, 1), (True, 2)])
def test_gradient_checkpointing_recomputes_in_the_backward(checkpointing, forwards_per_layer, trainable):
    """With checkpointing on, each LLM layer runs again during the backward (activations not kept)."""
    cfg = ModelConfig(name_or_path="preset:llava-1.5-7b-reduced", gradient_checkpointing=checkpointing,
                      trainable=trainable)
    adapter = load_mllm(cfg)
    select_trainable(adapter, cfg)  # LoRA: peft must not bring the vision tower's grad hooks back
    model = adapter.model.train()
    inner = model.get_base_model() if trainable == "mapping+lora" else model
    calls, vision_calls = [], []
    # transformers checkpoints the layer's `forward` (its own hooks stay outside); a submodule's run again.
    # (pre-hook: the recompute stops early once every saved tensor is back, before the MLP returns)
    inner.model.language_model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    inner.model.vision_tower.encoder.layers[0].mlp.register_forward_pre_hook(lambda *_: vision_calls.append(1))
    image = adapter.image_inputs(Image.new("RGB", (64, 64)))
    ids = torch.tensor([[1] + [adapter.image_token_id] * image.num_image_tokens + [5, 6, 7]])
    out = model(input_ids=ids, pixel_values=image.tensors["pixel_values"], labels=ids.clamp(max=31999))
    out.loss.backward()
    assert len(calls) == forwards_per_layer
    # The frozen vision tower is upstream of everything trainable: the backward never enters it.
    assert len(vision_calls) == 1
    assert inner.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_attn_implementation_reaches_the_model(impl):
    adapter = load_mllm(ModelConfig(name_or_path="preset:llava-1.5-7b-reduced", attn_implementation=impl),
                        device="meta")
    assert adapter.model.config.text_config._attn_implementation == impl


def test_flash_attention_without_the_package_is_a_config_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a))
    with pytest.raises(ConfigError, match="flash_attention_2 needs the flash-attn package.*Fix: .*sdpa"):
        load_config(None, ["model.attn_implementation=flash_attention_2"])


def test_lora_on_a_layer_the_export_cannot_merge_is_refused(adapter):
    from sare_ds.models import NoTrainableParametersError

    with pytest.raises(NoTrainableParametersError, match="LoRA lands on Embedding.*Fix: target the"):
        select_trainable(adapter, ModelConfig(trainable="mapping+lora", lora_target_modules=["q_proj", "embed_tokens"]))
