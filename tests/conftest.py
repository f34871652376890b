"""Shared fixtures: one tiny random LLaVA checkpoint per test session, built offline and
loaded back through the same path a real checkpoint takes."""
from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

import sare_ds  # noqa: E402,F401  (torchvision guard before transformers)
from sare_ds.config import ModelConfig  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from sare_ds.data.synthetic import caption_corpus
    from sare_ds.models.tiny import DEFAULT_CORPUS, build_tiny_llava

    out = tmp_path_factory.mktemp("tiny-llava")
    return build_tiny_llava(out, corpus=DEFAULT_CORPUS + caption_corpus(), seed=0)


@pytest.fixture()
def adapter(tiny_model_dir):
    from sare_ds.models import load_mllm

    torch.manual_seed(0)
    return load_mllm(ModelConfig(name_or_path=str(tiny_model_dir)))
