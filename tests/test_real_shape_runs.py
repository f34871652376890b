"""Training at a real model's token structure on CPU, gradient checkpointing, and the LoRA export.

The model is `preset:llava-1.5-7b-reduced`: LLaVA-1.5-7B's 336 px / patch 14 images (576 image
tokens a sample), vocabulary 32,064 and chat template, with 2 vision and 2 text layers of small
width. It is trained with the 7B recipe's settings (gradient checkpointing, max_length 1024,
1 + 1 + 1 samples a micro-batch) under ZeRO-3 on 2 CPU ranks through `deepspeed launch/train.py`
and through DeepSpeed's multi-node launcher (`--hostfile`, Open MPI), and both are compared with
the single-process reference (2 micro-batches a step == 2 ranks x 1).
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from sare_ds.config import load_config
from test_zero import BIN, ROOT, STEPS, Z3, assert_same_run, check, env, free_port, launch, metrics

RECIPE = str(ROOT / "launch/configs/llava15_7b_sare.yaml")
REDUCED = "preset:llava-1.5-7b-reduced"


def recipe_args(run_dir, *extra) -> list[str]:
    return ["--config", RECIPE, f"model.name_or_path={REDUCED}", "model.dtype=float32", "data.source=synthetic",
            "data.num_images=16", "data.num_workers=0", f"optim.max_steps={STEPS}", "optim.lr=1e-3",
            "logging.log_every=1", "logging.progress_bar=false", "output.export_hf=false", "output.save_every=0",
            f"output.run_dir={run_dir}", *extra]


def train_here(args: list[str]) -> Path:
    from sare_ds.train.trainer import train

    cfg = load_config(args[1], args[2:])
    return train(cfg)


@pytest.fixture(scope="module")
def reduced_reference(tmp_path_factory) -> Path:
    """One process, the recipe's settings (checkpointing on), 2 micro-batches a step."""
    run_dir = tmp_path_factory.mktemp("reduced-ref")
    return train_here(recipe_args(run_dir, "optim.grad_accum_steps=2", "distributed.ds_config="))


def unpersisted_zero3(tmp_path: Path) -> str:
    """zero3_cpu_fp32.json with no persistent parameters: every weight is partitioned, as a 7B
    model's are (their tensors are far above the 1e5-element threshold), so each forward, and each
    recompute of a checkpointed layer, gathers them."""
    ds = json.loads((ROOT / "ds_configs/zero3_cpu_fp32.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path / "zero3_no_persistence.json"
    path.write_text(json.dumps(ds))
    return str(path)


@pytest.fixture(scope="module")
def reduced_zero3(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("reduced-z3")
    launch("deepspeed", recipe_args(run_dir, "--deepspeed", unpersisted_zero3(run_dir.parent)))
    return run_dir


def test_reduced_7b_recipe_zero3_two_ranks_matches_single_process(reduced_reference, reduced_zero3):
    cfg = load_config(reduced_zero3 / "config.yaml")
    assert cfg.model.gradient_checkpointing and cfg.data.max_length == 1024
    data = json.loads((reduced_zero3 / "data.json").read_text())
    assert data["fixed_sample_tokens"]["image_max"] == 576 and data["world_size"] == 2
    assert_same_run(reduced_reference, reduced_zero3)
    row = metrics(reduced_zero3)[0]
    assert row["perf/tokens_per_s"] > 0 and row["perf/peak_mem_gb"] > 0


def test_hostfile_launcher_openmpi_equals_deepspeed_launcher(reduced_zero3, tmp_path):
    if shutil.which("mpirun") is None:
        pytest.fail("mpirun missing: launch/setup_env.sh installs openmpi-bin")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    # --no_ssh_check + --force_multi: the multi-node path on one host without an ssh server.
    cmd = [str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh_check", "--force_multi",
           "--launcher", "openmpi", "--launcher_args", "--allow-run-as-root --oversubscribe",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(ROOT / "launch/train.py"),
           *recipe_args(tmp_path / "run", "--deepspeed", unpersisted_zero3(tmp_path))]
    check(subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600))
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["world_size"] == 2
    assert_same_run(reduced_zero3, tmp_path / "run", rtol=1e-6)


def test_gradient_checkpointing_zero3_partitioned_equals_plain_backward(reduced_zero3, tmp_path):
    """ZeRO-3, 2 ranks, every weight partitioned: SARE with checkpointing == without, fp32, to 1e-6."""
    # The run in its own folder: tmp_path holds the DeepSpeed JSON, and a run directory belongs to one run.
    launch("deepspeed", recipe_args(tmp_path / "run", "model.gradient_checkpointing=false", "--deepspeed",
                                    unpersisted_zero3(tmp_path)))
    assert_same_run(reduced_zero3, tmp_path / "run", rtol=1e-6)


def test_gradient_checkpointing_equals_plain_backward_one_process(reduced_reference, tmp_path):
    """The SARE step (three passes) with checkpointing == without, fp32, to 1e-6."""
    plain = train_here(recipe_args(tmp_path, "optim.grad_accum_steps=2", "model.gradient_checkpointing=false",
                                   "distributed.ds_config="))
    assert load_config(reduced_reference / "config.yaml").model.gradient_checkpointing
    assert_same_run(reduced_reference, plain, rtol=1e-6)
    a, b = metrics(reduced_reference)[-1], metrics(plain)[-1]
    for k in ("sam/grad_norm_neg", "sam/sharpness_gap", "train/grad_norm"):
        assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9), k


# ----------------------------------------------------------------------------- LoRA export

def _logits_of_hf_export(hf_dir: Path, batch: dict) -> torch.Tensor:
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    assert not any("lora" in n for n, _ in model.named_parameters())  # a plain checkpoint
    with torch.no_grad():
        return model(**batch).logits


def _logits_of_trained_model(run_dir: Path, batch: dict) -> torch.Tensor:
    from sare_ds.eval.weights import load_method_model

    adapter = load_method_model(run_dir)  # base + LoRA layout + trained tensors, the run's own model
    assert hasattr(adapter.model, "peft_config")
    with torch.no_grad():
        return adapter.model(**batch).logits


def _probe_batch(model_dir) -> dict:
    from PIL import Image

    from sare_ds.config import ModelConfig
    from sare_ds.models import load_mllm

    adapter = load_mllm(ModelConfig(name_or_path=str(model_dir)))
    text = adapter.render(adapter.conversation("Describe the image."), add_generation_prompt=True) + " a dog"
    out = adapter.processor(images=Image.new("RGB", (32, 32), (200, 30, 30)), text=text, return_tensors="pt")
    return dict(out)


def lora_args(model_dir, run_dir, *extra) -> list[str]:
    return ["--config", str(ROOT / "launch/configs/tiny_random.yaml"), f"model.name_or_path={model_dir}",
            "model.trainable=mapping+lora", "model.lora_r=4", "optim.lr=1e-2", f"output.run_dir={run_dir}",
            "optim.max_steps=3", "data.source=synthetic", "data.num_images=16", "logging.progress_bar=false",
            "output.export_hf=true", *extra]


def _assert_export_reproduces(run_dir: Path, model_dir) -> None:
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration

    # The LoRA delta itself is in the export (not only the trained projector): every adapted q_proj
    # / v_proj weight of hf/ differs from the base checkpoint's.
    base_sd = LlavaForConditionalGeneration.from_pretrained(model_dir).state_dict()
    hf_sd = LlavaForConditionalGeneration.from_pretrained(run_dir / "hf").state_dict()
    adapted = [k for k in hf_sd if "language_model" in k and k.endswith(("q_proj.weight", "v_proj.weight"))]
    assert adapted and all(not torch.equal(hf_sd[k], base_sd[k]) for k in adapted)
    trained = load_file(str(run_dir / "trainable.safetensors"))
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in trained.items())
    batch = _probe_batch(model_dir)
    got, want = _logits_of_hf_export(run_dir / "hf", batch), _logits_of_trained_model(run_dir, batch)
    base = _logits_of_hf_export(model_dir, batch)
    assert (want - base).abs().max() > 1e-3  # training moved the model, so equality below means something
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (got - want).abs().max()


def test_lora_export_is_the_trained_model_one_process(tiny_model_dir, tmp_path):
    run_dir = train_here(lora_args(tiny_model_dir, tmp_path))
    _assert_export_reproduces(run_dir, tiny_model_dir)


def test_lora_export_is_the_trained_model_zero3(tiny_model_dir, tmp_path):
    launch("torchrun", lora_args(tiny_model_dir, tmp_path, Z3))
    _assert_export_reproduces(tmp_path, tiny_model_dir)
