"""The memory and cost plan (sare_ds/plan.py, launch/plan.py) against the models and measurements.

    DS_ACCELERATOR=cpu .venv/bin/python -m pytest tests/test_plan.py -q

- Parameter counts equal the meta-device models' own counts, exactly (7B, 13B, NeXT-Mistral-7B).
- The activation formulas against MEASURED values of small models on the CPU, with the trainable
  set frozen as training has it: autograd's saved tensors when the forward ends (deduplicated by
  storage, parameters excluded) and the CPU allocator's peak over forward + backward (torch.profiler
  allocation events), with and without gradient checkpointing, one sample and a padded pair.
  Tolerances: saved 1 %, peak 2 %. Saved bytes are exact sums of storages and the formula names
  every per-token tensor (measured: equal to < 0.01 %); 1 % leaves room for a library version that
  saves a few more scalars, while a missing per-token term (one [T, hidden] tensor per layer is 6.7 %
  of the deeper model's total) still fails. Peaks also depend on the order in which transients are
  freed inside the loss and layer backwards (measured: within 0.6 %); allocation events are exact
  byte counts, so there is no allocator rounding on the CPU.
  Models: the reduced LLaVA-1.5 preset (real 32,064 vocabulary: the loss's fp32 log-softmax
  dominates, as for the 7B with checkpointing), a deeper/wider variant with a 512-token vocabulary
  (the decoder layers dominate; with checkpointing the recomputed-layer phase is the peak), the
  reduced LLaVA-NeXT (5 AnyRes tiles, grouped-query attention) and LoRA on q/v (fp32 adapters).
- The step's composition (which pass peaks), ZeRO state memory, FLOPs relations, the CLI and the table.
"""
from __future__ import annotations

import json

import pytest
import torch

import sare_ds  # noqa: F401  (torchvision guard before transformers)
from sare_ds import plan
from sare_ds.config import ModelConfig

REDUCED = "preset:llava-1.5-7b-reduced"
LAYERS = ("preset:llava-1.5-7b,text_layers=8,text_hidden=256,text_intermediate=688,text_heads=8,text_kv_heads=2,"
          "vision_layers=3,vision_hidden=128,vision_intermediate=512,vision_heads=4")
NEXT_REDUCED = ("preset:llava-next-mistral-7b,text_layers=2,vision_layers=2,text_hidden=64,text_intermediate=128,"
                "text_heads=4,text_kv_heads=2,vision_hidden=64,vision_intermediate=128,vision_heads=2")
TOLERANCE = {"saved": 0.01, "peak": 0.02}


def _cfg(name: str, **kw) -> ModelConfig:
    return ModelConfig(name_or_path=name, dtype="bfloat16", **kw)


@pytest.fixture(scope="module")
def meta7b():
    return plan.summarize(_cfg("preset:llava-1.5-7b"))


# -- parameter counts ----------------------------------------------------------------------------
@pytest.mark.parametrize("name,total,projector,trainable", [
    ("preset:llava-1.5-7b", 7_063_427_072, 20_979_712, 20_979_712),
    ("preset:llava-1.5-13b", 13_351_494_656, 31_467_520, 31_467_520),
    ("preset:llava-next-mistral-7b", None, None, 20_983_808),
])
def test_parameter_counts_equal_the_meta_models(name, total, projector, trainable):
    from sare_ds.models import load_mllm, select_trainable

    cfg = _cfg(name)
    summary = plan.summarize(cfg)
    adapter = load_mllm(cfg, device="meta")
    select_trainable(adapter, cfg)
    model = adapter.model
    assert summary.params["total"] == sum(p.numel() for p in model.parameters())
    assert summary.trainable["total"] == sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable
    assert summary.params["vision"] == sum(p.numel() for p in model.model.vision_tower.parameters())
    assert summary.params["llm"] == (sum(p.numel() for p in model.model.language_model.parameters())
                                     + model.lm_head.weight.numel())
    assert summary.params["other"] == 0
    if total is not None:
        assert (summary.params["total"], summary.params["projector"]) == (total, projector)


def test_fewer_layers_without_a_build_equal_the_built_model(meta7b):
    built = plan.summarize(_cfg("preset:llava-1.5-7b,text_layers=5"))
    derived = meta7b.with_llm_layers(5)
    assert (derived.params, derived.trainable, derived.llm) == (built.params, built.trainable, built.llm)
    assert derived.persistent_params == built.persistent_params
    assert sorted(derived.param_numels) == sorted(built.param_numels)


# -- activations: formula vs measurement ----------------------------------------------------------
def _small_vocab_adapter(name: str):
    """A LLaVA of `name`'s shapes with a 512-token vocabulary, so the decoder layers dominate memory."""
    from sare_ds.models.adapter import ImageInputs
    from sare_ds.models.llava import LlavaAdapter
    from sare_ds.models import presets, select_trainable

    config = presets.hf_config(name)
    config.text_config.vocab_size, config.image_token_id = 512, 500
    config.pad_token_id = config.text_config.pad_token_id = 0
    adapter = LlavaAdapter.from_config(config, None, torch.bfloat16, "small-vocab " + name)
    adapter.image_inputs = lambda image: ImageInputs({"pixel_values": torch.randn(1, 3, 336, 336)}, 576)
    select_trainable(adapter, _cfg(name))
    return adapter, plan.summarize_adapter(adapter, dtype="bfloat16", image_counts=(576, 1))


@pytest.fixture(scope="module")
def small_models():
    from sare_ds.models import load_mllm, select_trainable

    built = {}

    def get(key):
        if key not in built:
            if key == "layers":
                built[key] = _small_vocab_adapter(LAYERS)
            else:
                name, kw = {"reduced": (REDUCED, {}), "next": (NEXT_REDUCED, {}),
                            "lora": (REDUCED, {"trainable": "mapping+lora"})}[key]
                cfg = _cfg(name, **kw)
                adapter = load_mllm(cfg)
                select_trainable(adapter, cfg)
                built[key] = (adapter, plan.summarize(cfg))
        return built[key]
    return get


@pytest.mark.parametrize("key,extra_tokens,checkpointing", [
    ("reduced", [24], False), ("reduced", [24, 4], True),
    ("layers", [60], False), ("layers", [60, 40], False), ("layers", [60], True), ("layers", [60, 40], True),
    ("next", [10], False),
    ("lora", [24, 14], False),
])
def test_activation_formula_matches_measured(small_models, key, extra_tokens, checkpointing):
    adapter, summary = small_models(key)
    lengths = [summary.image_tokens + e for e in extra_tokens]
    measured = plan.measure_pass(adapter, lengths, gradient_checkpointing=checkpointing)
    formula = plan.pass_activations(summary, len(lengths), max(lengths), gradient_checkpointing=checkpointing)
    for what in ("saved", "peak"):
        rel = formula[what] / measured[what] - 1
        assert abs(rel) <= TOLERANCE[what], (
            f"{key} {lengths} checkpointing={checkpointing}: {what} formula {formula[what] / 2**20:.3f} MiB vs "
            f"measured {measured[what] / 2**20:.3f} MiB ({100 * rel:+.2f} %); parts: formula "
            f"{ {k: round(v / 2**20, 3) for k, v in formula['parts'].items()} }, measured "
            f"{ {k: round(v / 2**20, 3) for k, v in measured['saved_by_part'].items()} }")
    if key == "layers" and checkpointing:
        assert formula["phase"] == "layer backward"  # the recomputed layer's phase is what was checked


def test_vision_backward_flag_matches_the_real_graph(small_models):
    """The summary says whether the backward enters the frozen tower; a real backward must agree."""
    adapter, summary = small_models("reduced")
    embeddings = adapter.model.model.vision_tower.embeddings
    for checkpointing in (False, True):
        calls = []  # the patch embeddings' output gets a gradient iff the backward went through the tower

        def watch(module, args, out):
            if out.requires_grad:
                out.register_hook(lambda grad: calls.append(1))

        hook = embeddings.register_forward_hook(watch)
        try:
            measured = plan.measure_pass(adapter, [summary.image_tokens + 8], gradient_checkpointing=checkpointing)
        finally:
            hook.remove()
        assert bool(calls) == summary.vision_backward(checkpointing), (checkpointing, calls)
        assert ("vision" in measured["saved_by_part"]) == summary.vision_backward(checkpointing)


# -- the step, the state, FLOPs -------------------------------------------------------------------
def test_sare_peaks_in_its_capability_pass_and_efuf_above_it(meta7b):
    sare = plan.step_activations(meta7b, plan.StepShape(method="sare", seq_len=1024))
    efuf = plan.step_activations(meta7b, plan.StepShape(method="efuf", seq_len=1024))
    ft = plan.step_activations(meta7b, plan.StepShape(method="ft", seq_len=1024))
    assert [p["pass"] for p in sare["passes"]] == ["neg_at_theta", "neg_at_eps", "capability"]
    assert sare["peak_pass"] == "capability" and [p["samples"] for p in sare["passes"]] == [1, 1, 2]
    assert efuf["passes"][0]["samples"] == 3 and efuf["peak"] > sare["peak"]
    assert ft["peak"] == pytest.approx(sare["peak"])  # FT forwards the same pos + sent batch
    no_gc = plan.step_activations(meta7b, plan.StepShape(method="sare", seq_len=1024, gradient_checkpointing=False))
    assert no_gc["peak"] > 4 * sare["peak"]


def test_state_memory_by_zero_stage(meta7b):
    z2 = plan.ZeroSettings.from_json(plan.ds_config_dir() / "zero2_bf16.json")
    z3 = plan.ZeroSettings.from_json(plan.ds_config_dir() / "zero3_bf16.json")
    off = plan.ZeroSettings.from_json(plan.ds_config_dir() / "zero3_offload_bf16.json")
    total, trainable = meta7b.total_params, meta7b.trainable_params
    s2, s3, so = (plan.state_memory(meta7b, z, 8) for z in (z2, z3, off))
    assert s2["weights"] == 2 * total and s2["sare_extra"] == 4 * trainable
    assert s2["buckets"] == 2 * 5e8 * 2  # overlap_comm: two bf16 buckets of reduce_bucket_size
    part = -(-trainable // 8)
    assert s3["weights"] == 2 * (-(-total // 8)) + 2 * meta7b.persistent_params
    assert s3["master_and_optimizer"] == 12 * part and s3["sare_extra"] == 0
    assert so["master_and_optimizer"] == 0 and so["cpu_optimizer"] > 0
    assert [z.name for z in plan.gpu_configs()] == ["zero2_bf16.json", "zero3_bf16.json", "zero3_offload_bf16.json"]


def test_step_flops_follow_the_step_composition(meta7b):
    lengths = plan.uniform_lengths({"pos": 1, "neg": 1, "sent": 1}, 1024)
    f = {m: plan.step_flops(meta7b, m, lengths, gradient_checkpointing=True) for m in ("ft", "efuf", "sare")}
    one = f["efuf"]["model"] / 3
    assert f["ft"]["model"] == pytest.approx(2 * one)             # pos + sent
    assert f["sare"]["model"] == pytest.approx(4 * one)           # neg twice + pos + sent
    no_gc = plan.step_flops(meta7b, "sare", lengths, gradient_checkpointing=False)
    assert no_gc["model"] == pytest.approx(f["sare"]["model"])    # recompute is hardware work only
    assert f["sare"]["hardware"] > no_gc["hardware"] > no_gc["model"] * 0.999
    # Frozen 7B LLM: forward ~2 x 6.7e9 FLOPs a token, the input-gradient backward about as much again.
    per_token = one / 1024
    assert 2 * 2 * 6.5e9 < per_token < 2 * 2 * 7.2e9
    with pytest.raises(plan.PlanError, match="unknown"):
        plan.step_flops(meta7b, "dpo", lengths)


# -- the CLI and the table ------------------------------------------------------------------------
def _cli():
    import importlib.util

    spec = importlib.util.spec_from_file_location("launch_plan", plan.repo_root() / "launch" / "plan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_plans_7b_on_8x80_and_writes_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert _cli().main(["--model", "preset:llava-1.5-7b", "--gpus", "8", "--gpu-mem", "80", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "7,063,427,072" in text and "recommended: ds_configs/zero2_bf16.json" in text
    data = json.loads(out.read_text())
    assert data["recommended"] == "zero2_bf16.json" and data["step"]["seq_len"] == 1024
    assert data["activations"]["peak_pass"] == "capability"


def test_cli_refuses_bad_arguments_by_name(capsys):
    cli = _cli()
    for argv, words in ((["--model", "preset:llava-1.5-7b", "--per-step", "1,1"], "--per-step"),
                        (["--model", "preset:llava-1.5-7b", "--gpus", "0"], "--gpus"),
                        (["--gpus", "8"], "name a model"),
                        (["--model", "preset:llava-1.5-7b", "--image-size", "big"], "--image-size")):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2 and words in capsys.readouterr().err
    assert cli.main(["--model", "preset:nope", "--gpus", "1"]) == 2
    assert "unknown preset" in capsys.readouterr().err


def test_table_recommends_per_cell(meta7b):
    step = plan.StepShape(seq_len=1024)
    text, records = plan.table([("7B", meta7b, step)], gpus=(1, 8), memory=(40, 80))
    assert text.splitlines()[0] == "| model | tokens | 1 x 40 GiB | 8 x 40 GiB | 1 x 80 GiB | 8 x 80 GiB |"
    assert len(records) == 4 and all(r["recommended"] == "zero2_bf16.json" for r in records)
    assert "| 7B | zero3_bf16 |" in text
    tiny = plan.table([("7B", meta7b, step)], gpus=(1,), memory=(8,))
    # At one GPU ZeRO-3 still gathers copies: ZeRO-2 is the smallest there.
    assert tiny[1][0]["recommended"] is None and "does not fit (zero2_bf16: 19)" in tiny[0]
