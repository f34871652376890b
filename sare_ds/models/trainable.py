"""Which parameters train: the mapping layers (default), plus LoRA on the LLM, or a regex.

Everything else is frozen (`requires_grad=False`), so the optimizer, the gradient norm of
SARE's eps* and the saved weights all see exactly the same set.
"""
from __future__ import annotations

import re


class NoTrainableParametersError(ValueError):
    """The trainable-set rule matched no parameter."""


def _sample_names(model, k: int = 8) -> str:
    names = [n for n, _ in model.named_parameters()]
    step = max(1, len(names) // k)
    return ", ".join(names[::step][:k])


def select_trainable(adapter, model_cfg) -> list[str]:
    """Freeze all but the chosen set (wrapping the LLM with LoRA if asked); return its names."""
    mode = model_cfg.trainable
    if mode == "mapping+lora":
        from peft import LoraConfig, get_peft_model

        # Restrict LoRA to modules inside the language model: the vision tower also has
        # q_proj/v_proj and must stay frozen.
        suffixes = "|".join(re.escape(s) for s in model_cfg.lora_target_modules)
        target = rf".*{adapter.language_model_pattern}.*\.({suffixes})$"
        lora = LoraConfig(r=model_cfg.lora_r, lora_alpha=model_cfg.lora_alpha,
                          lora_dropout=model_cfg.lora_dropout, target_modules=target)
        adapter.model = get_peft_model(adapter.model, lora)
        # peft re-installs transformers' input-require-grad hooks when checkpointing is on; with
        # non-reentrant checkpointing they only make the backward run through the frozen vision tower.
        base = adapter.model.get_base_model()
        if getattr(base, "is_gradient_checkpointing", False) and hasattr(base, "disable_input_require_grads"):
            base.disable_input_require_grads()
        # hf/ exports LoRA merged into Linear weights (sare_ds.train.trainer.merge_lora_state); other
        # LoRA layer kinds (embeddings, convolutions) would not merge by that rule.
        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.tuners_utils import BaseTunerLayer

        odd = sorted({type(m).__name__ for _, m in adapter.model.named_modules()
                      if isinstance(m, BaseTunerLayer) and not isinstance(m, LoraLinear)})
        if odd:
            raise NoTrainableParametersError(
                f"model.lora_target_modules = {model_cfg.lora_target_modules}: LoRA lands on {', '.join(odd)} "
                "layers, but sare_ds merges LoRA into Linear weights only (the hf/ export). Fix: target the "
                "language model's linear projections (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)")

    model = adapter.model
    if mode in ("mapping", "mapping+lora"):
        patterns = [re.compile(p) for p in adapter.mapping_patterns]
        rule = f"mapping layers of {adapter.family} ({', '.join(adapter.mapping_patterns)})"
        keep = lambda n: any(p.search(n) for p in patterns)  # noqa: E731
    else:
        pattern = re.compile(model_cfg.trainable_regex)
        rule = f"model.trainable_regex = {model_cfg.trainable_regex!r}"
        keep = pattern.search

    names = []
    for name, p in model.named_parameters():
        train = bool(keep(name)) or (mode == "mapping+lora" and "lora_" in name)
        p.requires_grad_(train)
        if train:
            names.append(name)
    if not names:
        raise NoTrainableParametersError(
            f"{adapter.source}: no parameter matches the {rule}. Parameter names look like: "
            f"{_sample_names(model)}. Fix: set model.trainable=regex with a model.trainable_regex that "
            "matches the layers to train, or model.family to the right adapter."
        )
    return names
