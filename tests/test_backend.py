"""sare_ds.train.backend: which backend a config gets, and the plain backend against the model itself.

The DeepSpeed backend is exercised end to end by tests/test_zero.py (training, checkpoints, export,
ZeRO-3 evaluation through sare_ds.eval.weights) and tests/zero_worker.py, against one process.
"""
from __future__ import annotations

import torch

import sare_ds  # noqa: F401  (torchvision guard before transformers)
from sare_ds.config import ModelConfig, load_config
from sare_ds.dist import DistInfo
from sare_ds.models import load_mllm, select_trainable
from sare_ds.train.backend import DeepSpeedBackend, PlainBackend, backend_for, backend_of, inference_backend

ONE = DistInfo(0, 1, 0, torch.device("cpu"))


def test_the_config_chooses_the_backend():
    assert isinstance(backend_for(load_config(None, []), ONE), PlainBackend)
    cfg = load_config(None, ["distributed.ds_config=ds_configs/zero3_cpu_fp32.json"])
    backend = backend_for(cfg, ONE)
    assert isinstance(backend, DeepSpeedBackend) and backend.stage == 3 and backend.checkpoints
    assert isinstance(inference_backend("float32", zero3=False), PlainBackend)
    assert isinstance(inference_backend("float32", zero3=True), DeepSpeedBackend)


def test_plain_backend_builds_and_returns_the_trained_state(tiny_model_dir):
    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", "optim.max_steps=1"])
    backend = PlainBackend()
    adapter = backend.load_model(ModelConfig(name_or_path=str(tiny_model_dir)))
    select_trainable(adapter, cfg.model)
    params = [p for p in adapter.model.parameters() if p.requires_grad]
    rt = backend.build(cfg, adapter.model, params, total_steps=1)
    assert isinstance(backend_of(rt), PlainBackend) and rt.space.params == params
    state = backend.trainable_state(rt)
    named = {n: p for n, p in adapter.model.named_parameters() if p.requires_grad}
    assert state.keys() == named.keys() and all(torch.equal(state[k], named[k].detach()) for k in state)
    # The evaluation side writes a state into a fresh model and sets eval mode.
    other = load_mllm(ModelConfig(name_or_path=str(tiny_model_dir)))
    backend.load_state(other.model, {k: v + 1 for k, v in state.items()})
    model = backend.build_inference(other.model)
    got = dict(model.named_parameters())
    assert all(torch.equal(got[k], state[k] + 1) for k in state) and not model.training
