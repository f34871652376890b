"""sare_ds: sharpness-aware robust erasure (SARE) of hallucinations in multimodal LLMs.

Parts (one module per concept):
  config            typed config tree, YAML + overrides, validation, dump
  models/           MLLM adapters (LLaVA family), trainable-set selection, tiny-model factory
  data/             samples, chat-template tokenisation with target-span labels, generated data
  train/            span losses, parameter spaces (where weights/grads live), the step, the loop
"""
from sare_ds import _torchvision_guard

_torchvision_guard.install()

__version__ = "0.1.0"
