"""Convert an original-layout LLaVA-1.5 checkpoint into the llava-hf layout.

The original layout is the one haotian-liu/LLaVA writes (liuhaotian/llava-v1.5-7b, -13b) and
ShareGPT4V-7B shares (Lin-Chen/ShareGPT4V-7B): a Llama `config.json` with `mm_*` fields
(model_type `llava`, `llava_llama` or `share4v`), Llama weights under `model.*` and `lm_head`,
the projector as `model.mm_projector.{0,2}`, a SentencePiece `tokenizer.model`, and usually no
CLIP weights (the tower is named by `mm_vision_tower` and loaded separately). The output is
what `transformers.LlavaForConditionalGeneration.from_pretrained` and
`sare_ds.models.load_mllm(model.name_or_path=OUT)` load, in the file layout of
llava-hf/llava-1.5-7b-hf: `<image>` (id 32000) and `<pad>` (32001) added, embedding and
lm_head rows padded to a multiple of 64, a fast tokenizer with LLaVA-1.5's chat template, and
CLIP's 336 px processing with LLaVA's pad-to-square.

    python -m sare_ds.models.convert SRC OUT --vision-tower CLIP_DIR [--dtype float16]
    python -m sare_ds.models.convert SRC OUT --vision-tower CLIP_DIR --check   # validate, write nothing

Nothing from a checkpoint is executed: configs are read as JSON (no `auto_map`, no remote
code), `.bin` files only with `torch.load(weights_only=True)`. Every source tensor is mapped or
dropped for a stated reason; the reasons are written to `OUT/sare_convert.json`.
See docs/convert.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
VOCAB_MULTIPLE = 64  # llava-hf pads embedding rows to a multiple of 64 (32002 -> 32064)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
INCOMPLETE_MARKER = ".sare_convert_incomplete"
RECORD_NAME = "sare_convert.json"


class ConversionError(ValueError):
    """The input cannot be converted; the message names the input, the rule and the fix."""


# -- reading checkpoints without running their code ------------------------------------------

def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConversionError(f"{what} {path}: cannot read it as JSON ({e}). Fix: point at a complete checkpoint "
                              "directory.") from e


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A pickled state dict, read with weights_only=True: plain tensors only, no code runs."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # pre-zipfile format
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(
            f"{path}: torch.load(weights_only=True) refused this file ({first}). Rule: sare_ds only reads "
            "plain tensor pickles and never runs code from a checkpoint. Fix: obtain the .safetensors release "
            "of the checkpoint, or convert the file to safetensors on a machine you trust with its code.") from e
    except (RuntimeError, EOFError) as e:
        raise ConversionError(f"{path}: not a readable torch file ({e}). Fix: download it again (a truncated "
                              "download looks like this).") from e
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise ConversionError(f"{path}: expected a flat state dict (name -> tensor), got {type(state).__name__} "
                              "with other contents. Fix: save model.state_dict() itself, not a training checkpoint.")
    return state


@dataclass
class WeightFiles:
    """The weight files of one checkpoint directory and where each tensor lives; tensors are
    read one at a time (safetensors lazily, .bin memory-mapped) so a 13B model never sits in RAM."""

    directory: Path
    fmt: str  # "safetensors" or "bin"
    files: list[Path]
    where: dict[str, Path] = field(default_factory=dict)
    bin_states: dict[Path, dict] = field(default_factory=dict, repr=False)  # .bin file -> its (mmap'd) state dict

    def shape(self, name: str) -> tuple[int, ...]:
        if self.fmt == "bin":
            return tuple(self.bin_states[self.where[name]][name].shape)
        from safetensors import safe_open

        with safe_open(str(self.where[name]), framework="pt") as f:
            return tuple(f.get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        if self.fmt == "bin":
            return str(self.bin_states[self.where[name]][name].dtype).replace("torch.", "")
        from safetensors import safe_open

        with safe_open(str(self.where[name]), framework="pt") as f:
            return {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}.get(f.get_slice(name).get_dtype(), "other")

    def get(self, name: str) -> torch.Tensor:
        if self.fmt == "bin":
            return self.bin_states[self.where[name]][name]
        from safetensors import safe_open

        with safe_open(str(self.where[name]), framework="pt") as f:
            return f.get_tensor(name)


def find_weights(directory: Path, what: str) -> WeightFiles:
    """The checkpoint's weight files, safetensors preferred over .bin (read safely either way)."""
    candidates = [
        ("safetensors", "model.safetensors.index.json", "model.safetensors", "*.safetensors"),
        ("bin", "pytorch_model.bin.index.json", "pytorch_model.bin", "pytorch_model*.bin"),
    ]
    for fmt, index_name, single, pattern in candidates:
        if (directory / index_name).is_file():
            index = _read_json(directory / index_name, f"{what}: weight index")
            files = sorted({directory / f for f in index.get("weight_map", {}).values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise ConversionError(f"{what}: {index_name} lists files that are not there: {', '.join(missing)}. "
                                      "Fix: finish the download (all shards) and rerun.")
        elif (directory / single).is_file():
            files = [directory / single]
        else:
            files = sorted(directory.glob(pattern))
        if not files:
            continue
        weights = WeightFiles(directory, fmt, files)
        for path in files:
            if fmt == "bin":
                weights.bin_states[path] = _load_bin(path)
                names = list(weights.bin_states[path])
            else:
                from safetensors import safe_open

                with safe_open(str(path), framework="pt") as f:
                    names = list(f.keys())
            for name in names:
                if name in weights.where:
                    raise ConversionError(f"{what}: tensor {name} is in both {weights.where[name].name} and "
                                          f"{path.name}. Fix: remove the stale shard.")
                weights.where[name] = path
        return weights
    raise ConversionError(f"{what} {directory}: no weights found (looked for model.safetensors[.index.json], "
                          "*.safetensors, pytorch_model.bin[.index.json], pytorch_model*.bin). Fix: point at the "
                          "checkpoint directory itself.")


# -- the original config -> llava-hf configs ------------------------------------------------

ORIGINAL_MODEL_TYPES = ("llava", "llava_llama", "share4v")
# Llama fields carried into text_config as they are.
LLAMA_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range",
                "rms_norm_eps", "rope_theta", "rope_scaling", "attention_bias", "attention_dropout", "mlp_bias",
                "head_dim", "pretraining_tp", "bos_token_id", "eos_token_id")
# LLaVA fields this converter reads (validated below).
LLAVA_FIELDS = ("vocab_size", "tie_word_embeddings", "mm_vision_tower", "mm_hidden_size", "mm_projector_type",
                "mm_vision_select_layer", "mm_vision_select_feature", "image_aspect_ratio", "mm_use_im_start_end",
                "mm_use_im_patch_token", "mm_patch_merge_type", "tokenizer_model_max_length", "s2")
# Bookkeeping of the original training code with no effect on the converted model's function.
IGNORED_FIELDS = ("architectures", "model_type", "_name_or_path", "torch_dtype", "dtype", "transformers_version",
                  "use_cache", "pad_token_id", "max_length", "freeze_mm_mlp_adapter", "tune_mm_mlp_adapter",
                  "use_mm_proj", "tokenizer_padding_side", "mm_projector_lr", "mm_vision_tower_lr",
                  "unfreeze_mm_vision_tower", "freeze_mm_vision_resampler", "tune_mm_vision_resampler",
                  "mm_resampler_type", "image_grid_pinpoints")


def read_original_config(src: Path) -> dict:
    """SRC's config.json, checked to be a LLaVA-1.5-architecture original layout."""
    if not src.is_dir():
        raise ConversionError(f"SRC {src}: not a local directory. Rule: the converter reads a downloaded "
                              "original-layout checkpoint (this machine cannot fetch hub ids). Fix: download it "
                              "(e.g. liuhaotian/llava-v1.5-7b) on a machine with network and pass its directory.")
    if (src / "adapter_config.json").is_file():
        raise ConversionError(f"SRC {src}: a LoRA checkpoint (adapter_config.json). Rule: the converter takes full "
                              "weights. Fix: merge the LoRA into its base with LLaVA's scripts/merge_lora_weights.py "
                              "first, then convert the merged directory.")
    cfg = _read_json(src / "config.json", "SRC config")
    bad = []

    def need(cond: bool, msg: str) -> None:
        if not cond:
            bad.append(msg)

    if "text_config" in cfg or "vision_config" in cfg:
        raise ConversionError(f"SRC {src}: config.json already has text_config/vision_config (model_type "
                              f"{cfg.get('model_type')!r}): it is in the transformers layout. Fix: load it directly "
                              "(model.name_or_path=SRC); there is nothing to convert.")
    need(cfg.get("model_type") in ORIGINAL_MODEL_TYPES and "mm_projector_type" in cfg,
         f"model_type {cfg.get('model_type')!r} with mm_projector_type {cfg.get('mm_projector_type')!r}: expected "
         f"one of {ORIGINAL_MODEL_TYPES} (LLaVA-1.5 / ShareGPT4V on Llama) with mm_* fields")
    need(cfg.get("mm_projector_type") == "mlp2x_gelu",
         f"mm_projector_type {cfg.get('mm_projector_type')!r}: only 'mlp2x_gelu' (LLaVA-1.5's projector) maps onto "
         "LlavaMultiModalProjector")
    need(cfg.get("mm_vision_select_feature", "patch") in ("patch", "cls_patch"),
         f"mm_vision_select_feature {cfg.get('mm_vision_select_feature')!r}: expected 'patch' or 'cls_patch'")
    need(not cfg.get("mm_use_im_start_end"), "mm_use_im_start_end is true: llava-hf has no image start/end tokens")
    need(not cfg.get("mm_use_im_patch_token"),
         "mm_use_im_patch_token is true: its <im_patch> token would collide with <image> at id vocab_size")
    need(cfg.get("mm_patch_merge_type", "flat") == "flat",
         f"mm_patch_merge_type {cfg.get('mm_patch_merge_type')!r}: only 'flat' (LLaVA-1.5; LLaVA-NeXT is another "
         "layout)")
    need(str(cfg.get("image_aspect_ratio", "square")) in ("pad", "square", "None", ""),
         f"image_aspect_ratio {cfg.get('image_aspect_ratio')!r}: 'anyres' is LLaVA-NeXT, not supported here")
    need(not cfg.get("s2"), "s2 is true: multi-scale S2 features have no llava-hf equivalent")
    need(not cfg.get("tie_word_embeddings", False), "tie_word_embeddings is true: LLaVA-1.5 does not tie lm_head")
    need(isinstance(cfg.get("vocab_size"), int), "vocab_size is missing")
    if bad:
        raise ConversionError(f"SRC {src / 'config.json'}: not a convertible original LLaVA-1.5 layout: "
                              + "; ".join(bad) + ". Fix: convert a LLaVA-1.5-architecture checkpoint (CLIP tower, "
                              "mlp2x_gelu projector, Llama LLM), or extend sare_ds/models/convert.py for this variant.")
    if "auto_map" in cfg:
        print("[convert] note: SRC config names remote code (auto_map); it is ignored, nothing from SRC is run",
              file=sys.stderr)
    return cfg


def vision_config_from_dir(tower: Path) -> dict:
    """A CLIP vision config from a CLIPVisionModel or CLIPModel checkpoint directory."""
    cfg = _read_json(tower / "config.json", "--vision-tower config")
    if cfg.get("model_type") == "clip":
        cfg = dict(cfg.get("vision_config") or {})
        cfg["model_type"] = "clip_vision_model"
    if cfg.get("model_type") != "clip_vision_model":
        raise ConversionError(f"--vision-tower {tower}: config.json has model_type {cfg.get('model_type')!r}. Rule: "
                              "LLaVA-1.5's tower is CLIP (model_type clip or clip_vision_model). Fix: pass the "
                              "directory of the CLIP checkpoint named by SRC's mm_vision_tower.")
    return cfg


def vision_config_from_weights(weights: WeightFiles, prefix: str) -> dict:
    """CLIP vision config read off the tensor shapes. The head count is not in the shapes:
    OpenAI CLIP's rule (64 channels a head: ViT-L/14 has 1024 / 64 = 16) is used."""
    def shape(suffix):
        return weights.shape(prefix + suffix)

    hidden = shape("embeddings.class_embedding")[0]
    channels, patch = shape("embeddings.patch_embedding.weight")[1], shape("embeddings.patch_embedding.weight")[-1]
    side = math.isqrt(shape("embeddings.position_embedding.weight")[0] - 1)
    layers = 1 + max(int(m.group(1)) for n in weights.where
                     if (m := re.match(re.escape(prefix) + r"encoder\.layers\.(\d+)\.", n)))
    return {"model_type": "clip_vision_model", "hidden_size": hidden, "num_attention_heads": hidden // 64,
            "intermediate_size": shape("encoder.layers.0.mlp.fc1.weight")[0], "num_hidden_layers": layers,
            "image_size": side * patch, "patch_size": patch, "num_channels": channels,
            "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}


def build_llava_config(orig: dict, vision: dict, dtype: str):
    """The LlavaConfig of the converted model, and the ids it gives <image> and <pad>."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vocab = orig["vocab_size"]
    image_id, pad_id = vocab, vocab + 1
    padded = VOCAB_MULTIPLE * math.ceil((vocab + 2) / VOCAB_MULTIPLE)
    text_kwargs = {k: orig[k] for k in LLAMA_FIELDS if orig.get(k) is not None}
    text = LlamaConfig(vocab_size=padded, pad_token_id=pad_id, tie_word_embeddings=False, **text_kwargs)
    vision_cfg = CLIPVisionConfig(**{k: v for k, v in vision.items() if k != "model_type"})
    if orig.get("mm_hidden_size", vision_cfg.hidden_size) != vision_cfg.hidden_size:
        raise ConversionError(f"SRC config mm_hidden_size {orig['mm_hidden_size']} != the vision tower's hidden_size "
                              f"{vision_cfg.hidden_size}. Fix: pass the CLIP named by mm_vision_tower "
                              f"({orig.get('mm_vision_tower')!r}) as --vision-tower.")
    strategy = "full" if orig.get("mm_vision_select_feature") == "cls_patch" else "default"
    patches = (vision_cfg.image_size // vision_cfg.patch_size) ** 2
    config = LlavaConfig(
        vision_config=vision_cfg, text_config=text, image_token_index=image_id,
        image_seq_length=patches + (1 if strategy == "full" else 0), projector_hidden_act="gelu",
        vision_feature_select_strategy=strategy, vision_feature_layer=int(orig.get("mm_vision_select_layer", -2)),
        multimodal_projector_bias=True, tie_word_embeddings=False, dtype=dtype,
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    return config, image_id, pad_id


# -- weight names: original -> llava-hf file layout ------------------------------------------

# (pattern, replacement or None to drop, reason). First match wins. Targets are the file names
# of the published llava-hf/llava-1.5-7b-hf, not one version's module names: transformers 5
# maps them onto its modules on load, and older versions use them as they are.
SRC_RULES = [
    (r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$", None, "rotary buffer, recomputed by transformers"),
    (r"^model\.vision_tower\.vision_tower\.vision_model\.embeddings\.position_ids$", None,
     "CLIP position-id buffer, recomputed by transformers"),
    (r"^model\.vision_tower\.vision_tower\.vision_model\.(.+)$", r"vision_tower.vision_model.\1", None),
    (r"^model\.mm_projector\.0\.(weight|bias)$", r"multi_modal_projector.linear_1.\1", None),
    (r"^model\.mm_projector\.2\.(weight|bias)$", r"multi_modal_projector.linear_2.\1", None),
    (r"^model\.(embed_tokens\.weight|norm\.weight|layers\.\d+\..+)$", r"language_model.model.\1", None),
    (r"^lm_head\.weight$", "language_model.lm_head.weight", None),
]
CLIP_RULES = [
    (r"^(vision_model\.)?embeddings\.position_ids$", None, "CLIP position-id buffer, recomputed by transformers"),
    (r"^vision_model\.(.+)$", r"vision_tower.vision_model.\1", None),  # CLIPModel, CLIPVisionModel (4.x files)
    (r"^((embeddings|pre_layrnorm|encoder|post_layernorm)\..+)$", r"vision_tower.vision_model.\1", None),  # 5.x
    (r"^(text_model\..+|text_projection\.weight|visual_projection\.weight|logit_scale)$", None,
     "CLIP text side / projections: not part of LLaVA's vision tower"),
]
SRC_VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."


def _apply_rules(name: str, rules) -> tuple[str | None, str | None, bool]:
    """(target, drop reason, matched)."""
    for pattern, repl, reason in rules:
        if re.match(pattern, name):
            return (re.sub(pattern, repl, name) if repl else None), reason, True
    return None, None, False


def expected_file_tensors(config) -> dict[str, tuple[int, ...]]:
    """Names (llava-hf file layout) and shapes of every tensor the installed transformers builds."""
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    # Runtime prefixes (transformers 5: model.language_model.*, model.vision_tower.* with or
    # without vision_model.; 4.4x: the file names themselves) -> file prefixes.
    prefixes = [("lm_head.", "language_model.lm_head."), ("model.language_model.", "language_model.model."),
                ("model.multi_modal_projector.", "multi_modal_projector."),
                ("model.vision_tower.vision_model.", "vision_tower.vision_model."),
                ("model.vision_tower.", "vision_tower.vision_model."),
                ("language_model.", "language_model."), ("multi_modal_projector.", "multi_modal_projector."),
                ("vision_tower.", "vision_tower.")]
    out = {}
    for name, tensor in model.state_dict().items():
        pre, new = next((p, n) for p, n in prefixes if name.startswith(p))
        out[new + name[len(pre):]] = tuple(tensor.shape)
    return out


@dataclass
class Plan:
    """Where each output tensor comes from, and what was dropped (and why)."""

    sources: dict[str, tuple[WeightFiles, str]] = field(default_factory=dict)  # target -> (files, source name)
    dropped: dict[str, str] = field(default_factory=dict)  # "SRC:name" -> reason
    counts: dict[str, int] = field(default_factory=dict)


def plan_tensors(src_w: WeightFiles, tower_w: WeightFiles | None, expected: dict, vocab: int,
                 drop_patterns: list[str]) -> Plan:
    """Map every source tensor to a target or a stated drop; check names and shapes both ways."""
    plan, unknown, wrong_shape = Plan(), [], []
    inputs = [("SRC", src_w, SRC_RULES)] + ([("--vision-tower", tower_w, CLIP_RULES)] if tower_w else [])
    for label, weights, rules in inputs:
        mapped = 0
        for name in weights.where:
            target, reason, matched = _apply_rules(name, rules)
            if not matched or (target is not None and target not in expected):
                if any(re.search(p, name) for p in drop_patterns):
                    plan.dropped[f"{label}:{name}"] = "--drop-key"
                    continue
                unknown.append(f"{label}:{name}")
                continue
            if target is None:
                plan.dropped[f"{label}:{name}"] = reason
                continue
            if target in plan.sources:
                raise ConversionError(f"{label}: {name} and {plan.sources[target][1]} both map to {target}. Fix: "
                                      "remove the duplicate from the checkpoint.")
            want, have = expected[target], weights.shape(name)
            if target.endswith(("embed_tokens.weight", "lm_head.weight")):
                want = (vocab,) + want[1:]  # the padded rows are added on write
            if want != have:
                wrong_shape.append(f"{label}:{name} {list(have)} (expected {list(want)} for {target})")
            plan.sources[target] = (weights, name)
            mapped += 1
        plan.counts[f"{label} tensors"] = len(weights.where)
        plan.counts[f"{label} mapped"] = mapped
    if unknown:
        raise ConversionError(
            f"{len(unknown)} source tensor(s) have no place in the llava-hf layout: {', '.join(unknown[:20])}"
            f"{' ...' if len(unknown) > 20 else ''}. Rule: every source tensor is mapped or the conversion stops "
            "(nothing is dropped silently). Fix: if they are leftovers you do not need (e.g. LLaVA-NeXT's "
            "image_newline), pass --drop-key REGEX to drop them on purpose (they are listed in sare_convert.json); "
            "otherwise this checkpoint is not LLaVA-1.5's architecture.")
    if wrong_shape:
        raise ConversionError(f"tensor shapes do not match the config: {'; '.join(wrong_shape[:10])}. Fix: check that "
                              "config.json belongs to these weights and --vision-tower is the right CLIP.")
    missing = sorted(set(expected) - set(plan.sources))
    if missing:
        vision_only = all(m.startswith("vision_tower.") for m in missing)
        hint = ("SRC has no vision-tower weights: pass --vision-tower DIR (a local CLIPVisionModel/CLIPModel "
                "checkpoint, the one named by mm_vision_tower)" if vision_only and tower_w is None
                else "the checkpoint is incomplete (finish the download) or not this architecture")
        raise ConversionError(f"{len(missing)} required tensor(s) missing: {', '.join(missing[:12])}"
                              f"{' ...' if len(missing) > 12 else ''}. Fix: {hint}.")
    return plan


# -- tokenizer and processor ------------------------------------------------------------------

def _vocab_and_merges_from_spm(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and BPE merges of a SentencePiece BPE model, read with protobuf (no sentencepiece
    package needed). Merges are ranked by the merged piece's score, SentencePiece's own order."""
    try:
        from transformers.convert_slow_tokenizer import import_protobuf

        proto_module = import_protobuf()
    except ImportError as e:
        raise ConversionError(f"SRC {path}: reading a SentencePiece model needs the protobuf package ({e}). Fix: "
                              "pip install protobuf, or put the tokenizer.json of this tokenizer into SRC.") from e
    proto = proto_module.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as e:  # protobuf's DecodeError
        raise ConversionError(f"SRC {path}: not a SentencePiece model ({e}). Fix: download it again.") from e
    if proto.trainer_spec.model_type != 2:  # 1 unigram, 2 BPE
        raise ConversionError(f"SRC {path}: SentencePiece model_type {proto.trainer_spec.model_type}, expected 2 "
                              "(BPE, Llama's). Fix: this converter handles Llama-tokenizer LLaVA checkpoints only.")
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    normal = {p.piece: (p.score, i) for i, p in enumerate(proto.pieces) if p.type == 1}
    ranked = []
    for piece, (score, i) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, i, left, right))
    return vocab, [(left, right) for *_, left, right in sorted(ranked)]


def _vocab_and_merges_from_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    model = _read_json(path, "SRC tokenizer")["model"]
    if model.get("type") != "BPE":
        raise ConversionError(f"SRC {path}: tokenizer model type {model.get('type')!r}, expected BPE (Llama's).")
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return dict(model["vocab"]), merges


def build_tokenizer(src: Path, orig: dict):
    """Llama fast tokenizer with <image> and <pad> added; returns (tokenizer, what it was built from)."""
    from transformers import AddedToken, LlamaTokenizer

    from sare_ds.models.presets import LLAVA15_TEMPLATE as LLAVA15_CHAT_TEMPLATE  # llava-hf's own

    if (src / "tokenizer.model").is_file():
        try:
            vocab, merges = _vocab_and_merges_from_spm(src / "tokenizer.model")
            source = "tokenizer.model"
        except ConversionError:
            if not (src / "tokenizer.json").is_file():
                raise
            vocab, merges = _vocab_and_merges_from_json(src / "tokenizer.json")
            source = "tokenizer.json (tokenizer.model unreadable here)"
    elif (src / "tokenizer.json").is_file():
        vocab, merges = _vocab_and_merges_from_json(src / "tokenizer.json")
        source = "tokenizer.json"
    else:
        raise ConversionError(f"SRC {src}: no tokenizer.model or tokenizer.json. Fix: copy the checkpoint's "
                              "tokenizer files (LLaVA-1.5 ships tokenizer.model) into SRC.")
    base = {t: i for t, i in vocab.items() if i < orig["vocab_size"]}
    if len(vocab) != orig["vocab_size"] or len(base) != len(vocab):
        raise ConversionError(f"SRC tokenizer ({source}) has {len(vocab)} pieces but config vocab_size is "
                              f"{orig['vocab_size']}. Fix: use the tokenizer that belongs to these weights.")
    tok_cfg = {}
    if (src / "tokenizer_config.json").is_file():
        tok_cfg = _read_json(src / "tokenizer_config.json", "SRC tokenizer config")
    # legacy=False is llava-hf's setting (and the only one transformers 5 keeps on reload): text
    # right after a special token such as <image> gets no dummy-prefix space.
    tokenizer = LlamaTokenizer(
        vocab=vocab, merges=merges, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        add_bos_token=True, add_eos_token=False, legacy=False, add_prefix_space=True,
        model_max_length=int(orig.get("tokenizer_model_max_length") or tok_cfg.get("model_max_length") or 2048),
    )
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": AddedToken(PAD_TOKEN, special=True, normalized=False)})
    tokenizer.chat_template = LLAVA15_CHAT_TEMPLATE
    got = tokenizer.convert_tokens_to_ids([IMAGE_TOKEN, PAD_TOKEN])
    if got != [orig["vocab_size"], orig["vocab_size"] + 1]:
        raise ConversionError(f"SRC tokenizer: <image>/<pad> got ids {got}, expected {orig['vocab_size']} and "
                              f"{orig['vocab_size'] + 1}: SRC's tokenizer already has added tokens. Fix: remove "
                              "them (LLaVA-1.5's tokenizer has none).")
    return tokenizer, source


def build_processor(tokenizer, config, orig: dict, tower: Path | None):
    """LlavaProcessor: CLIP preprocessing at the tower's size, with LLaVA-1.5's pad-to-square
    (image_aspect_ratio 'pad': pad with the mean colour, then resize) when SRC asks for it."""
    from transformers import LlavaImageProcessor, LlavaProcessor

    from sare_ds.models.presets import LLAVA15_TEMPLATE as LLAVA15_CHAT_TEMPLATE  # llava-hf's own

    clip = {}
    if tower is not None and (tower / "preprocessor_config.json").is_file():
        clip = _read_json(tower / "preprocessor_config.json", "--vision-tower preprocessor config")
    size = config.vision_config.image_size
    kwargs = {k: clip[k] for k in ("image_mean", "image_std", "resample") if k in clip}
    image_processor = LlavaImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        do_pad=orig.get("image_aspect_ratio") == "pad", **kwargs)
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy, num_additional_image_tokens=1,
        chat_template=LLAVA15_CHAT_TEMPLATE, image_token=IMAGE_TOKEN)


# -- writing ----------------------------------------------------------------------------------

def _output_tensor(plan: Plan, target: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    weights, name = plan.sources[target]
    tensor = weights.get(name)
    if tensor.shape[0] != shape[0]:
        # <image>, <pad> and the rows up to the multiple of 64: the mean of the original rows
        # (the <image> row is never read, its positions get image features). llava-hf drew
        # them near the mean at random; the mean itself keeps the conversion deterministic.
        mean = tensor.float().mean(dim=0, keepdim=True)
        tensor = torch.cat([tensor.float(), mean.expand(shape[0] - tensor.shape[0], -1)])
    return tensor.to(dtype=dtype, copy=True).contiguous()


def write_weights(out: Path, plan: Plan, expected: dict, dtype: torch.dtype, max_shard_bytes: int) -> int:
    """Safetensors shards (model.safetensors, or model-0000i-of-0000N + index); returns the shard count."""
    from safetensors.torch import save_file

    itemsize = torch.empty((), dtype=dtype).element_size()
    shards, current, size = [], [], 0
    for target, shape in expected.items():
        nbytes = math.prod(shape) * itemsize
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(target)
        size += nbytes
    shards.append(current)
    names = (["model.safetensors"] if len(shards) == 1
             else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    umask = os.umask(0)
    os.umask(umask)
    weight_map, total = {}, 0
    for shard, fname in zip(shards, names):
        tensors = {t: _output_tensor(plan, t, expected[t], dtype) for t in shard}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        os.chmod(out / fname, 0o666 & ~umask)  # safetensors writes 0600; a shared model dir should follow umask
        print(f"[convert] {fname}: {len(tensors)} tensors", file=sys.stderr)
        weight_map.update({t: fname for t in shard})
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return len(shards)


def _prepare_tmp(out: Path, overwrite: bool) -> Path:
    if out.exists() and not overwrite:
        raise ConversionError(f"OUT {out}: already exists. Fix: choose a new directory, or pass --overwrite to "
                              "replace an earlier output of this converter.")
    if out.exists() and not (out / RECORD_NAME).is_file():
        raise ConversionError(f"OUT {out}: exists and is not an output of this converter (no {RECORD_NAME}); "
                              "--overwrite only replaces those. Fix: choose a new directory.")
    old = out.with_name(out.name + ".old")  # where _publish parks the output it replaces
    if old.exists() and not (old / RECORD_NAME).is_file():
        raise ConversionError(f"{old}: exists and is not an output of this converter. Fix: move it away.")
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        if not (tmp / INCOMPLETE_MARKER).is_file():
            raise ConversionError(f"{tmp}: exists and is not an unfinished conversion. Fix: move it away.")
        shutil.rmtree(tmp)  # an interrupted earlier run
    tmp.mkdir(parents=True)
    (tmp / INCOMPLETE_MARKER).write_text("written by sare_ds.models.convert; removed when complete\n")
    return tmp


def _publish(tmp: Path, out: Path) -> None:
    """Swap the finished directory into place; OUT is never seen half-written."""
    (tmp / INCOMPLETE_MARKER).unlink()
    if out.exists():
        old = out.with_name(out.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


# -- the conversion ---------------------------------------------------------------------------

def convert(src: str | Path, out: str | Path, *, vision_tower: str | Path | None = None, dtype: str | None = None,
            drop_keys: tuple[str, ...] = (), overwrite: bool = False, check_only: bool = False,
            max_shard_gb: float = 5.0) -> dict:
    """Convert SRC (original layout) into OUT (llava-hf layout); returns the record also written
    to OUT/sare_convert.json. With check_only, validate everything and write nothing."""
    import transformers

    src, out = Path(src).expanduser().resolve(), Path(out).expanduser().resolve()
    orig = read_original_config(src)
    dtype = dtype or (orig.get("torch_dtype") if orig.get("torch_dtype") in DTYPES else "float16")
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}.")
    src_w = find_weights(src, "SRC")
    tower = tower_w = None
    if vision_tower is not None:
        tower = Path(vision_tower).expanduser()
        if not tower.is_dir():
            raise ConversionError(f"--vision-tower {vision_tower}: not a local directory. Rule: the tower is read "
                                  "from disk (this machine cannot fetch hub ids). Fix: download "
                                  f"{orig.get('mm_vision_tower') or 'the CLIP checkpoint'} on a machine with "
                                  "network (huggingface-cli download ID --local-dir DIR) and pass DIR.")
        tower = tower.resolve()
    has_src_vision = any(n.startswith(SRC_VISION_PREFIX) for n in src_w.where)
    if tower is not None:
        vision, vision_source = vision_config_from_dir(tower), f"config from --vision-tower {tower}"
        if not has_src_vision:
            tower_w = find_weights(tower, "--vision-tower")
            vision_source += ", weights from --vision-tower"
        else:
            vision_source += ", weights from SRC (its own tower wins over --vision-tower's)"
    elif has_src_vision:
        vision = vision_config_from_weights(src_w, SRC_VISION_PREFIX)
        vision_source = ("weights from SRC, config inferred from their shapes (heads = hidden / 64, OpenAI CLIP's "
                         "rule; quick_gelu; layer_norm_eps 1e-5); pass --vision-tower DIR to take it from a config")
    else:
        raise ConversionError(
            f"SRC {src}: has no vision-tower weights (no {SRC_VISION_PREFIX}* tensors) and no --vision-tower was "
            f"given. Rule: LLaVA-1.5 checkpoints leave the CLIP tower out and name it in mm_vision_tower "
            f"({orig.get('mm_vision_tower')!r}); the converter needs its weights. Fix: download that checkpoint "
            "on a machine with network and pass its local directory: --vision-tower DIR.")
    config, image_id, pad_id = build_llava_config(orig, vision, dtype)
    expected = expected_file_tensors(config)
    plan = plan_tensors(src_w, tower_w, expected, orig["vocab_size"], list(drop_keys))
    tokenizer, tokenizer_source = build_tokenizer(src, orig)
    processor = build_processor(tokenizer, config, orig, tower)

    unused_config = sorted(set(orig) - set(LLAMA_FIELDS) - set(LLAVA_FIELDS) - set(IGNORED_FIELDS))
    if unused_config:
        print(f"[convert] note: SRC config fields not carried over: {', '.join(unused_config)}", file=sys.stderr)
    if tower is not None and orig.get("mm_vision_tower"):
        want = str(orig["mm_vision_tower"]).rstrip("/").split("/")[-1]
        if want not in str(tower):
            print(f"[convert] note: SRC names its tower {orig['mm_vision_tower']!r}; --vision-tower is {tower}. "
                  "Make sure it is that checkpoint: another CLIP of the same shape converts without error and "
                  "gives a silently worse model (ShareGPT4V has its own tower).", file=sys.stderr)
    record = {
        "converter": "sare_ds.models.convert",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "transformers_version": transformers.__version__,
        "source": {"path": str(src), "model_type": orig.get("model_type"), "format": src_w.fmt,
                   "files": [f.name for f in src_w.files],
                   "dtypes": sorted({src_w.dtype(n) for n in src_w.where})},
        "vision_tower": {"path": str(tower) if tower else None, "named_by_src": orig.get("mm_vision_tower"),
                         "source": vision_source},
        "dtype": dtype,
        "tensors": {**plan.counts, "written": len(expected), "dropped": len(plan.dropped)},
        "dropped": plan.dropped,
        "vocab": {"original": orig["vocab_size"], "image_token_id": image_id, "pad_token_id": pad_id,
                  "padded_to": config.text_config.vocab_size, "new_rows": "mean of the original rows"},
        "tokenizer": {"built_from": tokenizer_source, "class": type(tokenizer).__name__,
                      "legacy": getattr(tokenizer, "legacy", None)},
        "image_processor": {"size": config.vision_config.image_size,
                            "pad_to_square": orig.get("image_aspect_ratio") == "pad"},
        "config_fields_not_carried": unused_config,
    }
    if check_only:
        return record

    from transformers import GenerationConfig

    tmp = _prepare_tmp(out, overwrite)
    try:
        record["tensors"]["shards"] = write_weights(tmp, plan, expected, DTYPES[dtype], int(max_shard_gb * 1e9))
        config.save_pretrained(tmp)
        GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=pad_id).save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / RECORD_NAME).write_text(json.dumps(record, indent=1) + "\n")
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sare_ds.models.convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="original-layout checkpoint directory (config.json with mm_* fields)")
    ap.add_argument("out", help="output directory (written as OUT.tmp, then renamed)")
    ap.add_argument("--vision-tower", help="local CLIP checkpoint directory (CLIPVisionModel or CLIPModel); needed "
                                           "when SRC has no vision weights")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="output dtype (default: SRC's torch_dtype, else float16)")
    ap.add_argument("--drop-key", action="append", default=[], metavar="REGEX",
                    help="drop unmapped source tensors matching REGEX on purpose (repeatable; recorded)")
    ap.add_argument("--overwrite", action="store_true", help="replace OUT if it is an earlier output of this converter")
    ap.add_argument("--check", action="store_true", help="validate SRC (names, shapes, tokenizer) and write nothing")
    ap.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors shard size (default 5)")
    a = ap.parse_args(argv)
    try:
        record = convert(a.src, a.out, vision_tower=a.vision_tower, dtype=a.dtype, drop_keys=tuple(a.drop_key),
                         overwrite=a.overwrite, check_only=a.check, max_shard_gb=a.max_shard_gb)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t, v = record["tensors"], record["vocab"]
    verb = "checked (nothing written)" if a.check else f"wrote {a.out}"
    print(f"{verb}: {t['written']} tensors ({record['dtype']}), {t['dropped']} dropped with reasons; vocab "
          f"{v['original']} -> {v['padded_to']} (<image> {v['image_token_id']}, <pad> {v['pad_token_id']}); "
          f"vision: {record['vision_tower']['source']}; tokenizer from {record['tokenizer']['built_from']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
