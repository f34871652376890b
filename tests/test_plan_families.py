"""The memory plan (sare_ds/plan.py) on the other families' 7B-class presets: Qwen2.5-VL, LLaVA-OneVision,
Idefics3, InternVL3 and PaliGemma 2, built on the meta device (no memory), and its activation formula against a
measured forward + backward of their reduced presets through the training loss path."""
from __future__ import annotations

import functools

import pytest
from PIL import Image

import sare_ds  # noqa: F401  (before transformers)
from sare_ds import plan
from sare_ds.config import ModelConfig
from sare_ds.models import adapter as adapter_module
from sare_ds.models import load_mllm, presets, select_trainable

# preset: (all parameters, trainable = the adapter's mapping layers, LLM positions of a 640x480 image,
#          vision-tower tiles of it, the plan's default data.max_length = the recipe's, hub id of the recipe)
EXPECTED = {
    "qwen2.5-vl-7b": (8_292_166_656, 44_574_464, 391, 1, 1024, "Qwen/Qwen2.5-VL-7B-Instruct"),
    "llava-onevision-7b": (8_030_807_584, 16_984_576, 2929, 5, 3584, "llava-hf/llava-onevision-qwen2-7b-ov-hf"),
    "idefics3-8b": (8_462_086_384, 18_874_368, 2330, 13, 3072, "HuggingFaceM4/Idefics3-8B-Llama3"),
    "internvl3-8b": (7_944_373_760, 27_540_480, 3330, 13, 4096, "OpenGVLab/InternVL3-8B-hf"),
    # every image resized to 448 px: 1,024 SigLIP tokens (no CLS); built with attn_implementation=eager.
    "paligemma2-10b-448": (9_663_523_568, 4_132_352, 1024, 1, 1536, "google/paligemma2-10b-pt-448"),
}
ATTN = {"paligemma2-10b-448": "eager"}  # Gemma-2: the adapter refuses sdpa


def needs_adapter(name: str):
    model_type = presets.PRESETS[name].model_type
    assert model_type in adapter_module._REGISTRY, f"no adapter registered for {model_type}"


@functools.lru_cache(maxsize=None)
def meta(name: str):
    """(adapter, summary) of a preset on the meta device, its trainable set chosen as training does."""
    cfg = ModelConfig(name_or_path=f"preset:{name}", dtype="bfloat16", trainable="mapping",
                      attn_implementation=ATTN.get(name, "sdpa"))
    adapter = load_mllm(cfg, device="meta")
    select_trainable(adapter, cfg)
    return adapter, plan.summarize_adapter(adapter, dtype="bfloat16", source=cfg.name_or_path)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_plans_on_meta(name):
    total, trainable, positions, tiles, seq_len, _ = EXPECTED[name]
    needs_adapter(name)
    adapter, s = meta(name)
    params = dict(adapter.model.named_parameters())
    assert all(p.device.type == "meta" for p in params.values())
    # Counts: the groups partition the model, the trainable set is the adapter's mapping layers.
    assert s.total_params == total == sum(p.numel() for p in params.values())
    assert s.params["vision"] + s.params["projector"] + s.params["llm"] + s.params["other"] == s.total_params
    assert s.params["other"] == 0 and min(s.params["vision"], s.params["projector"], s.params["llm"]) > 0
    mapping = sum(params[n].numel() for n in adapter.mapping_parameter_names())
    assert s.trainable_params == trainable == mapping == s.trainable["projector"] == s.params["projector"]
    # Image positions: the processor's own count for the default image.
    inputs = adapter.image_inputs(Image.new("RGB", plan.DEFAULT_IMAGE_SIZE, (128, 128, 128)))
    assert s.image_tokens == positions == inputs.num_image_tokens
    assert s.image_tiles == tiles
    assert not s.vision_backward(True) and not s.vision_backward(False)  # the frozen tower gets no backward
    assert plan.default_seq_len(s) == seq_len
    # The plan at the default step: 8 x 80 GiB, every GPU config fits, ZeRO-3 below ZeRO-2 per rank.
    p = plan.plan_run(s, plan.StepShape(seq_len=seq_len), gpus=8, gpu_mem_gib=80)
    needed = {k: r["needed"] / plan.GiB for k, r in p["configs"].items()}
    assert all(r["fits"] for r in p["configs"].values()), needed
    assert 8 < needed["zero3_bf16.json"] < needed["zero2_bf16.json"] < 40, needed
    assert p["step"]["caption_tokens"] == seq_len - s.prefix_tokens - 1


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_loads_and_names_the_preset(name):
    *_, seq_len, hub = EXPECTED[name]
    recipe = plan.repo_root() / plan.RECIPES[f"preset:{name}"]
    cfg, raw = plan.load_recipe(recipe)
    assert cfg.model.name_or_path == hub and plan.preset_for_hub_id(hub) == f"preset:{name}"
    assert cfg.data.max_length == seq_len and raw["distributed"]["ds_config"] == "ds_configs/zero3_bf16.json"
    assert any(row[1] == f"preset:{name}" for row in plan.TABLE_MODELS)


def test_cli_plans_a_recipe_of_another_family(capsys):
    import importlib.util

    needs_adapter("qwen2.5-vl-7b")
    spec = importlib.util.spec_from_file_location("launch_plan", plan.repo_root() / "launch" / "plan.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    recipe = str(plan.repo_root() / "launch" / "configs" / "qwen25vl_7b_sare.yaml")
    assert cli.main(["--config", recipe, "--gpus", "8", "--gpu-mem", "80"]) == 0
    out = capsys.readouterr().out
    assert "planned with preset:qwen2.5-vl-7b" in out and "391 image" in out and "max_length 1024" in out
    assert "the recipe's distributed.ds_config: zero3_bf16.json (fits)" in out


# One pass each, through the training loss path, on the reduced presets (2 + 2 layers, width 64, the real
# image processing and vocabulary): OneVision (5 AnyRes tiles, no class token, an MLP projector) and
# Qwen2.5-VL (flat patches, the merger's RMSNorm + 2 x 2 merge).
@pytest.mark.parametrize("name,extra,labelled,checkpointing,backwards", [
    ("llava-onevision-7b", [24, 4], [23, 3], True, 1),
    ("qwen2.5-vl-7b", [24, 14], [20, 10], False, 2),
])
def test_activation_formula_matches_measured(name, extra, labelled, checkpointing, backwards):
    needs_adapter(name)
    cfg = ModelConfig(name_or_path=f"preset:{name}-reduced", dtype="bfloat16", gradient_checkpointing=False)
    adapter = load_mllm(cfg)
    select_trainable(adapter, cfg)
    s = plan.summarize_adapter(adapter, dtype="bfloat16")
    lengths = [s.image_tokens + e for e in extra]
    measured = plan.measure_pass(adapter, lengths, labelled=labelled, gradient_checkpointing=checkpointing,
                                 backwards=backwards)
    formula = plan.pass_activations(s, len(lengths), max(lengths), labelled=measured["labelled"],
                                    gradient_checkpointing=checkpointing, backwards=backwards)
    assert measured["saved_by_part"]["logits"] == formula["parts"]["logits"]
    assert measured["saved_by_part"]["projector"] == formula["parts"]["projector"]
    for what, tolerance in (("saved", 0.01), ("peak", 0.02)):
        rel = formula[what] / measured[what] - 1
        assert abs(rel) <= tolerance, (what, rel, formula["parts"], measured["saved_by_part"], measured["peak_at"])
