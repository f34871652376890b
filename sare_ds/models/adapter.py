"""The model-family adapter: what sare_ds needs to know about one MLLM family.

An adapter names the multimodal mapping layers (the paper's trainable set), builds the
conversation for the model's chat template, prepares images, and loads model + processor
through transformers. Adding a family (BLIP-2/InstructBLIP Q-Former + projection, the
Qwen2-VL merger, an Idefics connector, a remote-code model such as mPLUG-Owl) means one
small subclass registered with `@register_adapter`.
"""
from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

_REGISTRY: dict[str, type["MLLMAdapter"]] = {}


class UnknownModelLayoutError(ValueError):
    """No adapter knows this checkpoint's layout."""


class WeightsMismatchError(ValueError):
    """A checkpoint lacks weights the model needs, or holds weights of another shape."""


def _listing(keys: list[str], k: int = 8) -> str:
    return ", ".join(keys[:k]) + (f" and {len(keys) - k} more" if len(keys) > k else "")


def check_loading_info(info: dict, source: str, log) -> dict[str, list[str]]:
    """Refuse missing or mis-shaped weights (they would silently be random); report unexpected ones by name."""
    missing = sorted(info.get("missing_keys", []))
    mismatched = sorted(str(m[0]) if isinstance(m, (tuple, list)) else str(m) for m in info.get("mismatched_keys", []))
    unexpected = sorted(info.get("unexpected_keys", []))
    if missing or mismatched:
        raise WeightsMismatchError(
            f"{source}: {len(missing)} weights of the model are missing from the checkpoint ({_listing(missing)}) and "
            f"{len(mismatched)} have another shape ({_listing(mismatched)}); they would be random. Fix: point "
            "model.name_or_path at the complete checkpoint of this architecture (an original-layout LLaVA or "
            "ShareGPT4V checkpoint: convert it with `python -m sare_ds.models.convert`).")
    if unexpected:
        log.warning("%s: %d checkpoint weights are not used by the model and were ignored: %s",
                    source, len(unexpected), _listing(unexpected))
    return {"missing": missing, "mismatched": mismatched, "unexpected": unexpected}


def register_adapter(cls: type["MLLMAdapter"]) -> type["MLLMAdapter"]:
    for model_type in cls.model_types:
        _REGISTRY[model_type] = cls
    _REGISTRY[cls.family] = cls
    return cls


def adapter_class(family_or_model_type: str, source: str) -> type["MLLMAdapter"]:
    try:
        return _REGISTRY[family_or_model_type]
    except KeyError:
        known = sorted(_REGISTRY)
        raise UnknownModelLayoutError(
            f"{source}: no sare_ds adapter for model layout `{family_or_model_type}` (known: {', '.join(known)}). "
            "Fix: pass model.family=<one of those> if the checkpoint is one of them under another name, "
            "or add an adapter module in sare_ds/models/ (subclass MLLMAdapter, list its mapping layers)."
        ) from None


@torch.no_grad()
def seeded_random_init(model: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Random weights that depend only on (seed, parameter name): normalisation weights 1, biases and
    normalisation shifts 0, every other tensor N(0, std^2) from a generator seeded by its name.

    The same in one process and under ZeRO-3 (each parameter is gathered, filled on rank 0 and
    partitioned again), whatever order or context the modules were built in; so a preset trained
    on 2 ranks starts from exactly the weights of the single-process reference. The values are
    drawn by the GPU's generator on a machine with CUDA and by the CPU's otherwise, so they are
    the same across layouts on one kind of machine, not between a GPU and a CPU machine.
    """
    import contextlib
    import hashlib

    # Drawn on one device type whatever device the parameter is on (zero.Init puts them on the GPU,
    # a single process builds on the CPU): the GPU's generator where there is one, else the CPU's.
    draw_on = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    for name, p in model.named_parameters():
        partitioned = hasattr(p, "ds_id")  # ZeRO-3: gather the whole tensor, rank 0 writes it
        if partitioned:
            import deepspeed

            ctx = deepspeed.zero.GatheredParameters([p], modifier_rank=0)
        else:
            ctx = contextlib.nullcontext()
        with ctx:
            if partitioned and rank != 0:
                continue
            module_name, _, leaf = name.rpartition(".")
            is_norm = re.search(r"(norm|ln_|layernorm)", module_name.rpartition(".")[2].lower())
            if is_norm and leaf == "weight":
                p.fill_(1.0)
            elif leaf == "bias":
                p.zero_()
            else:
                digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
                gen = torch.Generator(device=draw_on).manual_seed(int.from_bytes(digest[:8], "little") >> 1)
                p.copy_(torch.randn(p.shape, generator=gen, device=draw_on, dtype=torch.float32) * std)


@dataclass
class ImageInputs:
    """Model inputs of one image, and how many LLM positions its placeholder expands to."""

    tensors: dict[str, torch.Tensor]  # e.g. pixel_values [1, 3, H, W]; image_sizes for LLaVA-NeXT
    num_image_tokens: int


class MLLMAdapter(ABC):
    """Base class. Subclasses set the class variables, implement the abstract methods and may
    override the other hooks."""

    family: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    mapping_patterns: ClassVar[tuple[str, ...]] = ()
    """Regexes (re.search on parameter names) of the multimodal mapping layers."""
    language_model_pattern: ClassVar[str] = r"language_model"
    """Regex of module names inside the LLM (LoRA targets are restricted to it)."""

    def __init__(self, model: torch.nn.Module, processor: Any, source: str, loading: dict | None = None):
        self.model = model
        self.processor = processor
        self.source = source
        self.loading = loading or {}
        """What loading found: missing / mismatched / unexpected weight names (empty when built from a config)."""

    # -- loading -------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def load(cls, name_or_path: str, dtype: torch.dtype, trust_remote_code: bool = False,
             **model_kwargs) -> "MLLMAdapter":
        """Model + processor from a local directory or hub id; every model weight must be found."""

    @classmethod
    @abstractmethod
    def from_config(cls, config, processor, dtype: torch.dtype, source: str, *, device=None,
                    **model_kwargs) -> "MLLMAdapter":
        """A randomly initialised model of `config` (device="meta": shapes only, no memory)."""

    # -- text ----------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    def conversation(self, prompt: str, response: str | None = None) -> list[dict]:
        """Messages in the transformers multimodal chat format: one image, then the prompt."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        if response is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": response}]})
        return messages

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """Chat-template text (the image as its placeholder token, not yet expanded)."""
        return self.processor.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False
        )

    @property
    @abstractmethod
    def image_token_id(self) -> int:
        """Token id of the image placeholder in the rendered prompt."""

    # -- images --------------------------------------------------------------------------
    @abstractmethod
    def image_inputs(self, image) -> ImageInputs:
        """Pixel tensors of one image and how many LLM positions its placeholder becomes."""

    # -- parameters ----------------------------------------------------------------------
    def mapping_parameter_names(self) -> list[str]:
        pats = [re.compile(p) for p in self.mapping_patterns]
        return [n for n, _ in self.model.named_parameters() if any(p.search(n) for p in pats)]

    def forward_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The keyword arguments of the model's forward for a collated batch."""
        keys = ("input_ids", "attention_mask", "pixel_values", "image_sizes")
        return {k: batch[k] for k in keys if k in batch}
