"""The model-family adapter: what sare_ds needs to know about one MLLM family.

An adapter names the multimodal mapping layers (the paper's trainable set), builds the
conversation for the model's chat template, expands the image placeholder exactly as the model's
own processor does (checked), and loads model + processor through transformers. The families and
what each was tested with: docs/models.md. Adding a family means one small subclass registered
with `@register_adapter` (sare_ds/models/qwen2_vl.py is a compact example).
"""
from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

_REGISTRY: dict[str, type["MLLMAdapter"]] = {}
PRESET_INIT_SEED = 0  # presets are randomly initialised from a fixed seed: the same weights every build


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


def message_text(message: dict) -> str:
    """The text of one chat message (string content, or the text items of a multimodal content list)."""
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(item.get("text", "") for item in content if item.get("type") == "text")


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


class ExpansionMismatchError(ValueError):
    """The model's own processor turns a conversation into other tokens than sare_ds does."""


@dataclass
class ImageInputs:
    """Model inputs of one image, and the LLM positions its placeholder expands to."""

    tensors: dict[str, torch.Tensor]  # e.g. pixel_values [1, 3, H, W]; image_sizes, image_grid_thw, ...
    num_image_tokens: int  # positions the placeholder becomes (markers such as <global-img> included)
    expansion: list[int] | None = None
    """The token ids the placeholder becomes (None: `num_image_tokens` copies of the image token)."""


@dataclass
class Expanded:
    """A tokenised conversation with its image placeholder expanded by the family's own rule."""

    ids: list[int]  # the whole sequence
    start: int  # index of the image's first position
    length: int  # positions the image took (replacing the one placeholder)
    tensors: dict[str, torch.Tensor]  # image tensors of the forward (one image: leading dim 1)


def align_expansion(ours: list[int], truth: list[int], placeholder: int, source: str, decode=None) -> tuple[int, int]:
    """Where the processor's sequence `truth` holds the image: `ours` is sare_ds's tokenisation of the
    same text with ONE placeholder id; `truth` must equal it outside the placeholder, which it replaces
    by any number of positions. Returns (start, length); raises ExpansionMismatchError naming the first
    differing position otherwise."""
    if ours.count(placeholder) != 1:
        raise ExpansionMismatchError(f"{source}: expected one image placeholder (id {placeholder}) in the "
                                     f"tokenised conversation, found {ours.count(placeholder)}. Fix: one image per "
                                     "sample, and no image token in the prompt or caption text")
    pos = ours.index(placeholder)
    suffix = len(ours) - pos - 1
    length = len(truth) - pos - suffix
    ok = length >= 1 and truth[:pos] == ours[:pos] and truth[len(truth) - suffix:] == ours[pos + 1:]
    if not ok:
        where = next((i for i in range(min(pos, len(truth))) if truth[i] != ours[i]), None)
        if where is None:  # the text after the image differs: compare from the end
            back = next((j for j in range(1, min(suffix, len(truth)) + 1) if truth[-j] != ours[-j]), min(suffix, len(truth)))
            where_ours, where_truth = len(ours) - back, len(truth) - back
        else:
            where_ours = where_truth = where

        def show(ids, i):
            piece = ids[max(0, i - 3): i + 4]
            return f"{piece}" + (f" {decode(piece)!r}" if decode else "")

        raise ExpansionMismatchError(
            f"{source}: the model's processor tokenises this conversation differently from sare_ds outside the "
            f"image: sare_ds has {show(ours, where_ours)} at position {where_ours}, the processor "
            f"{show(truth, where_truth)} at {where_truth} ({len(ours)} vs {len(truth)} tokens, the image placeholder "
            f"at {pos}). Training on either would not be the sequence the model sees at inference. Fix: check the "
            "checkpoint's chat template and tokenizer settings (a template that renders BOS while the tokenizer "
            "adds one, a processor that appends text); a family whose processor builds the sequence itself "
            "overrides MLLMAdapter.expand_image.")
    return pos, length


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
    def _model_class(cls):
        """The transformers model class of the family (e.g. LlavaForConditionalGeneration)."""

    @classmethod
    def check_config(cls, config, source: str, model_kwargs: dict) -> None:
        """Refuse a checkpoint config this family cannot train (before any weight is read); raise with the
        input, the rule and the fix. Called by load() and from_config()."""

    @classmethod
    def load(cls, name_or_path: str, dtype: torch.dtype, trust_remote_code: bool = False,
             **model_kwargs) -> "MLLMAdapter":
        """Model + processor from a local directory or hub id; every model weight must be found."""
        import logging

        from transformers import AutoConfig, AutoProcessor

        if cls.check_config.__func__ is not MLLMAdapter.check_config.__func__:
            cls.check_config(AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code),
                             f"model.name_or_path = {name_or_path!r}", model_kwargs)
        model, info = cls._model_class().from_pretrained(
            name_or_path, dtype=dtype, trust_remote_code=trust_remote_code, output_loading_info=True,
            # Mis-shaped weights are reported (and refused by check_loading_info, naming them), not raised
            # as transformers' own multi-line error.
            ignore_mismatched_sizes=True, **model_kwargs)
        loading = check_loading_info(info, f"model.name_or_path = {name_or_path!r}", logging.getLogger("sare_ds.models"))
        processor = AutoProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        return cls(model, processor, name_or_path, loading)

    @classmethod
    def from_config(cls, config, processor, dtype: torch.dtype, source: str, *, device=None,
                    **model_kwargs) -> "MLLMAdapter":
        """A randomly initialised model of `config` (device="meta": shapes only, no memory)."""
        cls.check_config(config, f"model.name_or_path = {source!r}", model_kwargs)
        model_cls = cls._model_class()
        if device is not None and str(device) == "meta":
            with torch.device("meta"):
                model = model_cls._from_config(config, dtype=dtype, **model_kwargs)
        else:
            # Under a live HfDeepSpeedConfig (ZeRO-3) _from_config builds inside zero.Init, so each
            # rank materialises only its partition. Its own random init depends on how the model was
            # built, so the weights are then set from (seed, name) alone: the same in every layout.
            model = model_cls._from_config(config, dtype=dtype, **model_kwargs)
            seeded_random_init(model, PRESET_INIT_SEED)
        # The text config's first: a composite config keeps it there (some, e.g. Idefics3's, answer the
        # top-level name with a deprecated default that is not the checkpoint's pad token).
        pad = getattr(config.get_text_config(), "pad_token_id", None)
        if pad is None:
            pad = getattr(config, "pad_token_id", None)
        model.generation_config.pad_token_id = pad
        return cls(model, processor, source)

    @classmethod
    def build_tiny(cls, out_dir, *, seed: int = 0, corpus: list[str] | None = None):
        """Save a tiny random checkpoint of the family (model, processor, chat template; no download)
        to `out_dir`, loadable by `load_mllm` exactly as a real one; returns the directory."""
        raise NotImplementedError(f"the {cls.family} adapter has no tiny builder. Fix: build a tiny checkpoint of "
                                  "another family (docs/models.md lists them), or add build_tiny to the adapter")

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
    def image_token_id(self) -> int:
        """Token id of the image's positions in the model's input (what the model fills with image features):
        the config's `image_token_id` (older configs: `image_token_index`)."""
        cfg = self.model.config
        value = getattr(cfg, "image_token_id", None)
        return int(value if value is not None else cfg.image_token_index)

    @property
    def placeholder_token_id(self) -> int:
        """Token id of the image placeholder in the rendered conversation, before the processor expands it
        (the image token itself for every family here: InternVL's template renders `<IMG_CONTEXT>`, which its
        processor wraps in `<img>` ... `</img>`; a family whose template renders another token overrides it)."""
        return self.image_token_id

    @property
    def placeholder_text(self) -> str:
        return self.tokenizer.convert_ids_to_tokens(self.placeholder_token_id)

    # -- images --------------------------------------------------------------------------
    processor_text_keys: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask", "token_type_ids",
                                                      "mm_token_type_ids")
    """Outputs of the processor that describe the text (rebuilt by sare_ds), not the image."""

    def processor_outputs(self, text: str, image, prompt: str) -> dict[str, torch.Tensor]:
        """The model's own processor on one rendered conversation and its image (`prompt`: the user's text,
        for families that encode it apart, e.g. InstructBLIP's Q-Former)."""
        return dict(self.processor(images=image, text=text, return_tensors="pt",
                                   add_special_tokens=self.add_special_tokens(text)))

    def add_special_tokens(self, text: str) -> bool:
        """transformers' rule for a rendered conversation: the tokenizer adds its special tokens (BOS)
        unless the chat template rendered BOS already."""
        bos = self.tokenizer.bos_token
        return not (bos and text.startswith(bos))

    def expand_image(self, text: str, ids: list[int], image, prompt: str, where: str = "") -> Expanded:
        """`ids` (sare_ds's tokenisation of `text`, BOS included, one placeholder) with the placeholder
        expanded exactly as the model's own processor expands it, checked: the processor's sequence must
        equal `ids` everywhere else (ExpansionMismatchError otherwise, never a silent difference)."""
        out = self.processor_outputs(text, image, prompt)
        truth = out["input_ids"][0].tolist()
        start, length = align_expansion(ids, truth, self.placeholder_token_id, where or self.source,
                                        self.tokenizer.decode)
        tensors = {k: v for k, v in out.items() if k not in self.processor_text_keys}
        return Expanded(truth, start, length, tensors)

    def image_inputs(self, image) -> ImageInputs:
        """Pixel tensors of one image and the positions its placeholder becomes (the processor's own
        expansion of the bare placeholder)."""
        text = self.placeholder_text
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        from sare_ds.data.tokenize import needs_bos

        if needs_bos(self.tokenizer, ids):
            ids = [self.tokenizer.bos_token_id] + ids
        e = self.expand_image(text, ids, image, "", f"{self.source}: the bare image placeholder")
        expansion = e.ids[e.start:e.start + e.length]
        return ImageInputs(e.tensors, len(expansion), expansion)

    def generation_images(self, images: list) -> list:
        """The `images` argument of the processor for a batch of prompts with one image each (a processor
        that reads a flat list as one prompt's images, e.g. SmolVLM's, gets one list per prompt)."""
        return list(images)

    def token_tensors(self, ids: list[int], response_start: int) -> dict[str, list[int]]:
        """Per-token inputs of the forward besides input_ids (e.g. PaliGemma's token_type_ids), for a
        whole sequence whose response starts at index `response_start`. Padded with 0 when collated."""
        return {}

    # -- parameters ----------------------------------------------------------------------
    def mapping_parameter_names(self) -> list[str]:
        pats = [re.compile(p) for p in self.mapping_patterns]
        return [n for n, _ in self.model.named_parameters() if any(p.search(n) for p in pats)]

    forward_keys: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask", "pixel_values", "image_sizes")
    """Keys of a collated batch the model's forward takes."""

    def forward_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The keyword arguments of the model's forward for a collated batch."""
        return {k: batch[k] for k in self.forward_keys if k in batch}
