"""The memory and cost plan (sare_ds/plan.py, launch/plan.py) against the models and measurements.

    DS_ACCELERATOR=cpu .venv/bin/python -m pytest tests/test_plan.py -q

- Parameter counts equal the meta-device models' own counts, exactly (7B, 13B, NeXT-Mistral-7B).
- The activation formulas against MEASURED values of small models on the CPU, through the training
  loss path (collate_captions, model(..., logits_to_keep=keep), span_sums), with the trainable set
  frozen as training has it: autograd's saved tensors when the forward ends (deduplicated by
  storage, parameters excluded) and the CPU allocator's peak over forward + backward(s)
  (torch.profiler allocation events), with and without gradient checkpointing, one row and padded
  pairs, one backward and SARE's shared forward (two backwards through a retained graph).
  Tolerances: saved 1 %, peak 2 %. Saved bytes are exact sums of storages and the formula names
  every per-token tensor (measured: equal to the byte in every case; the loss's part is asserted
  exactly); 1 % leaves room for a library version that saves a few more scalars, while a missing
  per-token term (one [T, hidden] tensor per layer is 6.7 % of the deeper model's total) still fails.
  Peaks also depend on the order in which transients are freed inside the backwards (measured:
  within 0.41 %, and -1.49 % for the reduced NeXT's padded pair without checkpointing, whose peak
  is the forward's end); allocation events are exact byte counts, so there is no allocator
  rounding on the CPU.
  Models: the reduced LLaVA-1.5 preset (real 32,064 vocabulary: the loss's fp32 log-softmax over
  the labelled positions still dominates it), a deeper/wider variant with a 512-token vocabulary
  (the decoder layers dominate: the final norm's, the top layer's and, with checkpointing, the
  recomputed layer's backward are the peaks), the reduced LLaVA-NeXT (5 AnyRes tiles,
  grouped-query attention) and LoRA on q/v (fp32 adapters).
- The loss term by hand (labelled positions only; before: every position), the step's passes per
  method, schedule and packing, which pass peaks, ZeRO and plain state memory, packed vs unpacked
  FLOPs against a hand count, step_from_config, the CLI and the table.
"""
from __future__ import annotations

import dataclasses
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


# Each case: model, tokens after the image per row, labelled tokens per row (None: all of them), checkpointing,
# backwards (2: SARE's shared forward at theta, the graph retained through the first backward).
CASES = [
    ("reduced", [24], None, False, 1), ("reduced", [24, 4], [23, 3], True, 1),
    ("reduced", [24, 14], [20, 10], False, 2),
    ("layers", [60], [30], False, 1), ("layers", [60, 40], [30, 20], False, 1), ("layers", [60], [30], True, 1),
    ("layers", [60, 40], [30, 20], True, 1), ("layers", [60, 40], [30, 20], False, 2),
    ("layers", [60, 40], [30, 20], True, 2),
    ("next", [10], None, False, 1), ("next", [10, 4], [8, 3], False, 1), ("next", [10, 4], [8, 3], True, 1),
    ("lora", [24, 14], [20, 10], False, 1), ("lora", [24, 14], [20, 10], True, 2),
]


@pytest.mark.parametrize("key,extra_tokens,labelled,checkpointing,backwards", CASES)
def test_activation_formula_matches_measured(small_models, key, extra_tokens, labelled, checkpointing, backwards):
    adapter, summary = small_models(key)
    lengths = [summary.image_tokens + e for e in extra_tokens]
    measured = plan.measure_pass(adapter, lengths, labelled=labelled, gradient_checkpointing=checkpointing,
                                 backwards=backwards)
    if labelled is not None:  # K: the union over the batch of the rows' labelled tokens (each at its row's end)
        assert measured["labelled"] == len(set().union(*(range(n - k, n) for n, k in zip(lengths, labelled))))
    formula = plan.pass_activations(summary, len(lengths), max(lengths), labelled=measured["labelled"],
                                    gradient_checkpointing=checkpointing, backwards=backwards)
    # The loss's part is exact: what span_sums and the LM head's gather keep.
    assert measured["saved_by_part"]["logits"] == formula["parts"]["logits"]
    for what in ("saved", "peak"):
        rel = formula[what] / measured[what] - 1
        assert abs(rel) <= TOLERANCE[what], (
            f"{key} {lengths} checkpointing={checkpointing} backwards={backwards}: {what} formula "
            f"{formula[what] / 2**20:.3f} MiB vs measured {measured[what] / 2**20:.3f} MiB ({100 * rel:+.2f} %, "
            f"formula phase {formula['phase']}, measured at {measured['peak_at']}); parts: formula "
            f"{ {k: round(v / 2**20, 3) for k, v in formula['parts'].items()} }, measured "
            f"{ {k: round(v / 2**20, 3) for k, v in measured['saved_by_part'].items()} }")
    if key == "layers" and checkpointing:
        assert formula["phase"] == "layer backward"  # the recomputed layer's phase is what was checked
    if key == "layers" and not checkpointing:
        # the final norm's backward (one backward) / the top layer's norm with the graph retained (two)
        assert formula["phase"] == ("final norm backward" if backwards == 1 else "layer norm backward")


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


# -- the loss term, by hand ------------------------------------------------------------------------
def test_logits_term_is_the_labelled_positions_only(meta7b):
    v = meta7b.llm.vocab
    assert v == 32_064
    # A 700-token LLaVA-1.5 sent caption: 576 image + 40 prompt positions + 83 caption tokens + EOS, so
    # 84 labelled tokens. Kept per labelled position: the fp32 log-softmax (4 x 32,064), the int64 target
    # (8), the fp32 weights of the 3 kinds (12); once: the int64 kept index (8 x 84) and a scalar (4).
    assert plan.logits_saved_bytes(meta7b.llm, 1, 84) == 84 * (128_256 + 8 + 12) + 672 + 4 == 10_775_860
    # Its peak adds the two fp32 gradients of the log-softmax (8 x 32,064 per position).
    assert plan.loss_peak_bytes(meta7b.llm, 1, 84) == 10_775_860 + 84 * 256_512 == 32_322_868
    # Before: every one of the 699 positions, 12 x 32,064 + 12 bytes each (~269 MB, 256.5 MiB).
    assert plan.full_loss_peak_bytes(meta7b.llm, 1, 700) == 699 * 384_780 == 268_961_220
    # In a pass: B x K, and K is the union over the batch (collate_captions keeps a position any row labels).
    step = plan.StepShape(method="efuf", seq_len=1024)
    (only,) = plan.step_passes(meta7b, step)
    assert meta7b.prefix_tokens == 616 and (only.batch, only.seq, only.labelled) == (4, 1024, 408)
    a = plan.pass_activations(meta7b, only.batch, only.seq, labelled=only.labelled, gradient_checkpointing=True)
    assert a["parts"]["logits"] == 4 * 408 * (128_256 + 20) + 8 * 408 + 4
    assert a["loss_peak"] == a["parts"]["logits"] + 4 * 408 * 256_512
    # Unpacked, the sent row labels the whole caption, so every one of the 24 rows (4 captions x 4 pos + 1 neg
    # spans + the sent response) keeps 408 positions.
    (unpacked,) = plan.step_passes(meta7b, dataclasses.replace(step, packing=False))
    assert (unpacked.batch, unpacked.labelled) == (24, 408)


# -- the step, the state, FLOPs -------------------------------------------------------------------
def test_step_passes_follow_the_training_step(meta7b):
    step = plan.StepShape(method="sare", seq_len=1024)  # 4 packed captions, 4 pos + 1 neg spans, sent
    sep = plan.step_passes(meta7b, step, "separate")
    assert [(p.name, p.batch, p.seq, p.labelled, p.backwards) for p in sep] == [
        ("neg_at_theta", 4, 820, 12, 1), ("neg_at_eps", 4, 820, 12, 1), ("capability", 4, 1024, 408, 1)]
    shared = plan.step_passes(meta7b, step, "shared")
    assert [(p.name, p.batch, p.seq, p.labelled, p.backwards) for p in shared] == [
        ("theta", 4, 1024, 408, 2), ("neg_at_eps", 4, 820, 12, 1)]
    # Unpacked: one row per span (cut after it) and per sent response, padded to the longest.
    unpacked = plan.step_passes(meta7b, dataclasses.replace(step, packing=False), "separate")
    assert [r.tokens for r in unpacked[2].rows[:5]] == [718, 820, 921, 1023, 1024] and unpacked[2].batch == 20
    assert unpacked[0].batch == 4 and unpacked[0].seq == 820
    # Per-kind shards: each sample its own sequence.
    per_kind = plan.step_passes(meta7b, dataclasses.replace(step, data_format="per_kind"), "separate")
    assert [(p.name, p.batch) for p in per_kind] == [("neg_at_theta", 1), ("neg_at_eps", 1), ("capability", 2)]
    for method, names in (("ft", ["ft"]), ("efuf", ["efuf"])):
        assert [p.name for p in plan.step_passes(meta7b, dataclasses.replace(step, method=method))] == names
    with pytest.raises(plan.PlanError, match="captions_per_step"):
        plan.step_passes(meta7b, dataclasses.replace(step, captions_per_step=0))
    with pytest.raises(plan.PlanError, match="neg_end"):
        plan.step_passes(meta7b, dataclasses.replace(step, neg_end=0.0))


def test_step_activations_peak_where_the_step_peaks(meta7b):
    step = plan.StepShape(method="sare", seq_len=1024)
    sep = plan.step_activations(meta7b, step, schedule="separate")
    shared = plan.step_activations(meta7b, step, schedule="shared")
    efuf = plan.step_activations(meta7b, dataclasses.replace(step, method="efuf"))
    assert sep["peak_pass"] == "capability" and shared["peak_pass"] == "theta"
    # The shared forward keeps its graph through two backwards: its top layer's backward runs with the
    # loss's saved tensors and the final norm's input still alive.
    cap = sep["passes"][2]
    theta = shared["passes"][0]
    freed = cap["parts"]["logits"] + 4 * 1024 * (4 * 4096 + 4)
    assert theta["phase"] == cap["phase"] == "layer backward"
    assert theta["peak"] - cap["peak"] == freed
    assert efuf["peak"] == pytest.approx(sep["peak"])  # EFUF forwards the same full captions once
    no_gc = plan.step_activations(meta7b, dataclasses.replace(step, gradient_checkpointing=False))
    assert no_gc["peak"] > 4 * sep["peak"]
    # Unpacked, the capability pass holds 20 rows (4 pos spans + 1 sent per caption) instead of 4.
    unpacked = plan.step_activations(meta7b, dataclasses.replace(step, packing=False))
    assert unpacked["peak"] > 4 * sep["peak"]


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
    # ZeRO-3's shared forward: a direction buffer like the rank's gradient partition (bf16 accumulation);
    # ZeRO-2 and offload run the separate passes, without one.
    assert s3["sare_direction"] == 2 * part and s2["sare_direction"] == so["sare_direction"] == 0
    assert plan.state_memory(meta7b, z3, 8, method="efuf")["sare_direction"] == 0
    separate = plan.state_memory(meta7b, dataclasses.replace(z3, shared_forward=False), 8)
    assert separate["sare_direction"] == 0
    names = [z.name for z in plan.gpu_configs()]
    assert {"zero2_bf16.json", "zero3_bf16.json", "zero3_offload_bf16.json"} <= set(names)
    assert not any("cpu" in n for n in names)
    # One process: weights + gradients + ONE direction buffer of the trainable size (SARE only).
    plain = plan.state_memory(meta7b, plan.PLAIN, 1)
    assert plain["sare_direction"] == plain["gradients"] == 2 * trainable
    assert plan.state_memory(meta7b, plan.PLAIN, 1, method="efuf")["sare_direction"] == 0
    step = plan.StepShape()
    r = plan.rank_peak(meta7b, step, plan.PLAIN, 1)
    assert r["schedule"] == "shared" and r["peak_pass"] == "theta"
    assert r["static"] == pytest.approx(2 * total + 2 * trainable + 4 * trainable + 2 * trainable)
    assert plan.rank_peak(meta7b, step, z3, 8)["schedule"] == "shared"
    assert plan.rank_peak(meta7b, step, z2, 8)["schedule"] == plan.rank_peak(meta7b, step, off, 8)["schedule"] \
        == "separate"


def _linear_only(model):
    """The model's decoder Linear layers alone (no attention, LM head, vision tower or projector): its
    FLOPs are 2 x (Linear weights) a token forward and as much backward, so FLOPs count tokens."""
    llm = dataclasses.replace(model.llm, heads=0, lm_head_params=0)
    vision = dataclasses.replace(model.vision, layers=0, patch_embed_params=0)
    return dataclasses.replace(model, llm=llm, vision=vision, projector_linears=())


def test_packed_and_unpacked_flops_match_a_hand_count(meta7b):
    toy = _linear_only(meta7b)
    per_token = 2 * meta7b.llm.layer_linear_params * meta7b.llm.layers  # forward = backward (frozen)
    step = plan.StepShape(seq_len=1024, gradient_checkpointing=False)
    # Per caption (616 image + prompt positions, 407 caption tokens + EOS): the 4 pos spans end 102, 204,
    # 305 and 407 caption tokens in, the neg span 204 (half the caption); rows cut after them: 718, 820,
    # 921, 1023 (pos) and 820 (neg); the sent response: 1024. Packed: one row of 1024.
    f = {(m, pk, sch): plan.plan_flops(toy, dataclasses.replace(step, method=m, packing=pk), sch)["model"]
         for m in ("ft", "efuf", "sare") for pk in (True, False) for sch in ("separate", "shared")}
    capability = 718 + 820 + 921 + 1023 + 1024          # 4506
    tok = {("ft", True): 1024, ("efuf", True): 1024, ("ft", False): capability, ("efuf", False): capability + 820}
    for (m, pk), n in tok.items():
        assert f[(m, pk, "separate")] == 4 * n * 2 * per_token
    assert f[("efuf", False, "separate")] / f[("efuf", True, "separate")] == pytest.approx(5326 / 1024)
    assert f[("ft", False, "separate")] / f[("ft", True, "separate")] == pytest.approx(4506 / 1024)
    # SARE under ZeRO: neg at theta and at theta + eps* (820 each), capability (1024; unpacked 4506).
    assert f[("sare", True, "separate")] == 4 * (2 * 820 + 1024) * 2 * per_token
    assert f[("sare", False, "separate")] == 4 * (2 * 820 + capability) * 2 * per_token
    assert f[("sare", False, "separate")] / f[("sare", True, "separate")] == pytest.approx(6146 / 2664)
    # One process: one forward of the full caption(s) with two backwards, then neg at theta + eps*.
    assert f[("sare", True, "shared")] == 4 * (3 * 1024 + 2 * 820) * per_token
    assert f[("sare", False, "shared")] == 4 * (3 * 5326 + 2 * 820) * per_token
    # The real model: the LM head on the labelled positions only (forward + input gradient), attention
    # quadratic in the row length (its backward twice its forward), the frozen tower forward only.
    full = plan.plan_flops(meta7b, dataclasses.replace(step, method="efuf"))
    llm = meta7b.llm
    attention = 4 * 1024 ** 2 * llm.heads * llm.head_dim * llm.layers
    head = 2 * 408 * llm.lm_head_params
    vision = full["model"] / 4 - (2 * per_token * 1024 + 3 * attention + 2 * head)  # tower + projector: the rest
    assert 0.3e12 < vision < 0.02 * full["model"] / 4
    packed_sare = plan.plan_flops(meta7b, step)
    assert packed_sare["tokens"] == 4 * (2 * 820 + 1024)


def test_step_flops_of_per_kind_samples(meta7b):
    """step_flops (the GPU check's, from per-kind sample lengths): FT = pos + sent, EFUF all three, SARE
    the neg samples twice (ZeRO) or one forward of all with two backwards + neg again (one process)."""
    lengths = plan.uniform_lengths({"pos": 1, "neg": 1, "sent": 1}, 1024)
    f = {m: plan.step_flops(meta7b, m, lengths, gradient_checkpointing=True) for m in ("ft", "efuf", "sare")}
    one = f["efuf"]["model"] / 3
    assert f["ft"]["model"] == pytest.approx(2 * one)             # pos + sent
    assert f["sare"]["model"] == pytest.approx(4 * one)           # neg twice + pos + sent
    shared = plan.step_flops(meta7b, "sare", lengths, gradient_checkpointing=True, schedule="shared")
    fwd = f["efuf"]["passes"][0]["forward"] / 3
    assert shared["model"] == pytest.approx(3 * fwd + 3 * (one - fwd) * 2 + one)
    no_gc = plan.step_flops(meta7b, "sare", lengths, gradient_checkpointing=False)
    assert no_gc["model"] == pytest.approx(f["sare"]["model"])    # recompute is hardware work only
    assert f["sare"]["hardware"] > no_gc["hardware"] > no_gc["model"] * 0.999
    # Frozen 7B LLM: forward ~2 x 6.7e9 FLOPs a token, the input-gradient backward about as much again.
    per_token = one / 1024
    assert 2 * 2 * 6.5e9 < per_token < 2 * 2 * 7.2e9
    with pytest.raises(plan.PlanError, match="unknown"):
        plan.step_flops(meta7b, "dpo", lengths)


def test_step_from_config_reads_the_caption_fields():
    cfg, _ = plan.load_recipe(plan.repo_root() / "launch/configs/llava15_7b_sare.yaml",
                              ["data.captions_per_step=8", "data.packing=false", "optim.grad_accum_steps=2"])
    step = plan.step_from_config(cfg)
    assert (step.captions_per_step, step.packing, step.grad_accum_steps, step.seq_len) == (8, False, 2, 1024)
    assert step.data_format == "captions" and step.method == "sare"
    assert plan.step_from_config(cfg, data_format="per_kind").data_format == "per_kind"


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
    assert "4 caption(s) per micro-batch" in text and "unpacked / packed (model FLOPs)" in text
    data = json.loads(out.read_text())
    assert data["recommended"] == "zero2_bf16.json" and data["step"]["seq_len"] == 1024
    assert data["activations"]["peak_pass"] == "capability" and data["activations_shared"]["peak_pass"] == "theta"
    assert data["step"]["captions_per_step"] == 4 and data["step"]["packing"] is True
    cap = data["activations"]["passes"][-1]
    assert (cap["rows"], cap["seq"], cap["labelled"]) == (4, 1024, 408)
    assert set(data["flops"]) == {"packed", "unpacked"}


def test_cli_caption_flags_change_the_step(tmp_path, capsys):
    out = tmp_path / "plan.json"
    argv = ["--model", "preset:llava-1.5-7b", "--captions-per-step", "2", "--packing", "false", "--spans", "3,2",
            "--neg-end", "0.8", "--caption-tokens", "150", "--json", str(out)]
    assert _cli().main(argv) == 0
    text = capsys.readouterr().out
    assert "unpacked (one sequence per span): 2 caption(s)" in text
    data = json.loads(out.read_text())
    st = data["step"]
    assert (st["captions_per_step"], st["packing"], st["pos_spans"], st["neg_spans"], st["neg_end"],
            st["caption_tokens"]) == (2, False, 3, 2, 0.8, 150)
    # neg rows: 2 captions x 2 spans, the last ending at 0.8 x 150 = 120 caption tokens after 616 positions
    neg = data["activations"]["passes"][0]
    assert (neg["pass"], neg["rows"], neg["seq"]) == ("neg_at_theta", 4, 736)
    # --per-step plans the per-kind format
    assert _cli().main(["--model", "preset:llava-1.5-7b", "--per-step", "1,1,1", "--json", str(out)]) == 0
    assert "per-kind samples: 1 pos + 1 neg + 1 sent" in capsys.readouterr().out
    assert json.loads(out.read_text())["step"]["data_format"] == "per_kind"


def test_cli_refuses_bad_arguments_by_name(capsys):
    cli = _cli()
    for argv, words in ((["--model", "preset:llava-1.5-7b", "--per-step", "1,1"], "--per-step"),
                        (["--model", "preset:llava-1.5-7b", "--gpus", "0"], "--gpus"),
                        (["--gpus", "8"], "name a model"),
                        (["--model", "preset:llava-1.5-7b", "--image-size", "big"], "--image-size"),
                        (["--model", "preset:llava-1.5-7b", "--captions-per-step", "0"], "--captions-per-step"),
                        (["--model", "preset:llava-1.5-7b", "--packing", "yes"], "--packing"),
                        (["--model", "preset:llava-1.5-7b", "--spans", "2"], "--spans"),
                        (["--model", "preset:llava-1.5-7b", "--neg-end", "1.5"], "--neg-end")):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2 and words in capsys.readouterr().err
    assert cli.main(["--model", "preset:nope", "--gpus", "1"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert cli.main(["--model", "preset:llava-1.5-7b", "--seq-len", "600"]) == 2
    assert "no caption after the 616 positions" in capsys.readouterr().err


def test_table_recommends_per_cell(meta7b):
    step = plan.StepShape(seq_len=1024)
    text, records = plan.table([("7B", meta7b, step)], gpus=(1, 8), memory=(40, 80))
    assert text.splitlines()[0] == "| model | tokens | 1 x 40 GiB | 8 x 40 GiB | 1 x 80 GiB | 8 x 80 GiB |"
    assert len(records) == 4 and all(r["recommended"] == "zero2_bf16.json" for r in records)
    assert "| 7B | zero3_bf16 |" in text
    # the peak pass and its loss term: 4 x 408 labelled positions, against 4 x 1023 before
    cap = plan.pass_activations(meta7b, 4, 1024, labelled=408, gradient_checkpointing=True)
    assert (f"| 7B | capability (layer backward) | 4 x 1024 | 408 | {plan.mib(cap['loss_peak'])} | "
            f"{plan.mib(plan.full_loss_peak_bytes(meta7b.llm, 4, 1024))} |") in text
    tiny = plan.table([("7B", meta7b, step)], gpus=(1,), memory=(8,))
    # At one GPU ZeRO-3 still gathers copies: ZeRO-2 is the smallest there.
    assert tiny[1][0]["recommended"] is None and "does not fit (zero2_bf16: 20)" in tiny[0]
