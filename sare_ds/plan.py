"""Memory and cost plan of an FT / EFUF / SARE run, from the model's shapes alone (no weights).

    python launch/plan.py --model preset:llava-1.5-7b --gpus 8 --gpu-mem 80     # the CLI (docs/memory_plan.md)

    from sare_ds.plan import summarize, StepShape, plan_run, plan_flops, step_flops, uniform_lengths
    model = summarize(ModelConfig(name_or_path="preset:llava-1.5-7b", dtype="bfloat16"))  # meta build, < 1 s
    step = StepShape(method="sare", seq_len=1024, captions_per_step=2, packing=True)
    plan = plan_run(model, step, gpus=8, gpu_mem_gib=80)
    flops = plan_flops(model, step, schedule="shared")          # one process, ZeRO-3; "separate": ZeRO-2
    flops = step_flops(model, "sare", uniform_lengths({"pos": 1, "neg": 1, "sent": 1}, 1024),
                       gradient_checkpointing=True)              # from per-kind sample lengths

Everything here is arithmetic on a `ModelSummary`: parameter counts by group (vision tower,
projector, LLM) and the trainable set, read off the model built on the meta device through the
same `load_mllm` / `select_trainable` as training, plus the layer shapes and the prompt's tokens.
The formulas, each a small function below:

- the step (`StepShape`, `step_passes`): data.captions_per_step captions per micro-batch, packed
  (one sequence per caption carrying all of its spans) or not (one sequence per span, cut after
  it), or per-kind samples; the passes of each method as sare_ds/train/step.py runs them (SARE:
  three passes under ZeRO-2 and ZeRO-3 with optimizer offload; one forward at theta with two
  backwards + the perturbed pass in one process and under ZeRO-3), each a batch of rows padded to
  the longest, with K labelled positions (the union over the batch: the LM head runs on those only);
- per-rank state memory under ZeRO-2 / ZeRO-3 / plain training (`state_memory`), read against the
  DeepSpeed JSON (bucket sizes, live-parameter limits, offload, hpZ);
- activation memory of one pass (`pass_activations`): the tensors autograd saves in a
  Llama/Mistral decoder layer with SDPA attention when the LLM is frozen (gradients flow to the
  layer inputs only, so a frozen Linear keeps no input), the checkpointed layer inputs with
  gradient checkpointing, the projector, the loss's fp32 log-softmax over the K labelled positions
  (`logits_saved_bytes`; before logits_to_keep it was every position: `full_logits_saved_bytes`).
  The loss term is the one-piece head (model.lm_head_chunks=0), an upper bound of the default
  chunked head, which holds the logits of K / chunks positions at a time (docs/performance.md);
  and the transient peak of the pass (the loss's backward, the final norm's, the top layer's, the
  forward's end), with the graph retained through two backwards for SARE's shared forward;
  validated against measured autograd-saved bytes and CPU allocator peaks of small models through
  the training loss path (`measure_pass`, tests/test_plan.py);
- FLOPs of one optimizer step (`plan_flops` for a StepShape, `step_flops` from per-kind sample
  lengths): model FLOPs (what the rows need) and hardware FLOPs (plus padding, the recompute
  forward of gradient checkpointing per backward and a backward through the frozen vision tower if
  the graph enters it).

Conventions: memory in bytes (GiB = 2**30 for display); FLOPs count a multiply-add as 2; attention
FLOPs count the full T x T score matrix (the PaLM / Megatron MFU convention, no causal halving).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

GiB = 2 ** 30
KINDS = ("pos", "neg", "sent")
# Default sequence lengths when no recipe gives data.max_length (the recipes' values); other families:
# `default_seq_len`, the image and prompt positions of the default image + CAPTION_ROOM, rounded up.
DEFAULT_SEQ_LEN = {"llava": 1024, "llava_next": 3200}
CAPTION_ROOM = 400       # response tokens a caption may take (LLaVA-1.5's 1024 = 576 + 40 + ~400)
SEQ_LEN_MULTIPLE = 512
DEFAULT_IMAGE_SIZE = (640, 480)  # a COCO-like image: 5 AnyRes tiles, 2,340 image tokens on LLaVA-NeXT
# BOS + chat template + EFUF's caption prompt, in tokens, before the image positions are added
# (`fixed_sample_tokens`: 40 for LLaVA-1.5 and LLaVA-NeXT-Mistral); used when the model has no tokenizer.
PROMPT_TEXT_TOKENS = 40
SCHEDULES = ("separate", "shared")

# What is not in torch's allocator count: the CUDA context, cuBLAS/cuDNN workspaces and loaded kernels
# (~0.5-1 GiB on an H100 with CUDA 12/13), NCCL's communication buffers (a few hundred MiB per GPU
# at 8 ranks), and fragmentation (reserved - allocated; training loops with varying lengths see 5-10 %).
CUDA_CONTEXT_GIB = 1.0
NCCL_GIB = 0.5
FRAGMENTATION = 0.10

# DeepSpeed 0.19 defaults for the ZeRO keys the plan reads (deepspeed/runtime/zero/config.py).
ZERO_DEFAULTS = {"reduce_bucket_size": 5e8, "contiguous_gradients": True, "stage3_max_live_parameters": 1e9,
                 "stage3_prefetch_bucket_size": 5e7, "stage3_param_persistence_threshold": 1e5}
# Preference among configs that fit: ZeRO-2 gathers nothing (weights replicated), ZeRO-3 all-gathers
# every layer in each of a SARE step's passes, offload adds PCIe traffic and a CPU optimizer step.
CONFIG_PREFERENCE = ("zero2_bf16.json", "zero3_bf16.json", "zero3_offload_bf16.json")
TABLE_MODELS = (
    ("LLaVA-1.5-7B", "preset:llava-1.5-7b", 1024),
    ("LLaVA-1.5-13B", "preset:llava-1.5-13b", 1024),
    ("34B-class (Yi-34B-like LLM)",
     "preset:llava-1.5-13b,text_layers=60,text_hidden=7168,text_intermediate=20480,text_heads=56,text_kv_heads=8",
     1024),
    ("LLaVA-NeXT-Mistral-7B", "preset:llava-next-mistral-7b", 3200),
    # Other families (their recipes' data.max_length: `default_seq_len` of a 640 x 480 image).
    ("Qwen2.5-VL-7B", "preset:qwen2.5-vl-7b", 1024),
    ("LLaVA-OneVision-7B", "preset:llava-onevision-7b", 3584),
    ("Idefics3-8B", "preset:idefics3-8b", 3072),
    ("InternVL3-8B", "preset:internvl3-8b", 4096),
    ("PaliGemma2-10B-448", "preset:paligemma2-10b-448", 1536),
)
TABLE_GPUS = (1, 8, 16)
TABLE_MEMORY_GIB = (40, 80)


class PlanError(ValueError):
    """A plan input broke a rule; the message names the input, the rule and the fix."""


# ------------------------------------------------------------------------------------ the model

@dataclass(frozen=True)
class LLMShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    layer_linear_params: int   # weights of the Linear layers of ONE decoder layer (q, k, v, o, MLP; LoRA too)
    lm_head_params: int


@dataclass(frozen=True)
class VisionShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    tokens: int                # positions per tile, CLS included (577 for CLIP-L/14 at 336 px; Qwen: the grid's patches)
    feature_layer: int         # the hidden state the projector reads (-2: the last layer's output is unused)
    layer_linear_params: int   # weights of the Linear layers of ONE encoder layer
    patch_embed_params: int
    cls_tokens: int = 1        # class-token positions of a tile (CLIP, InternViT: 1; SigLIP, Qwen's ViT: 0)

    @property
    def features(self) -> int:
        """Patch positions of a tile (what the projector reads, before any pixel shuffle / merge)."""
        return self.tokens - self.cls_tokens

    @property
    def layers_used(self) -> int:
        """Layers whose output reaches the projector (a backward through the tower stops below the rest)."""
        return self.layers + 1 + self.feature_layer if self.feature_layer < 0 else self.feature_layer


@dataclass(frozen=True)
class ModelSummary:
    """What the plan needs of a model: parameter counts, shapes, the trainable set; no tensors."""

    source: str
    family: str
    dtype: str
    params: dict                       # vision / projector / llm / other / total
    trainable: dict                    # the same groups, trainable parameters only
    trainable_rule: str                # model.trainable (+ regex)
    llm: LLMShape
    vision: VisionShape
    projector_linears: tuple           # weight numels of the projector's Linear layers, in forward order
    image_tokens: int                  # LLM positions of one image
    image_tiles: int                   # vision-tower forwards of one image (AnyRes tiles + base image)
    image_size: tuple                  # (width, height) the image counts were taken at
    projector_inputs: tuple = ()       # their in_features (() : LLaVA's MLP, vision hidden then LLM hidden)
    projector_norms: tuple = ()        # (width, RMSNorm) of the projector's norms (InternVL, Qwen's merger)
    lora_targets: tuple = ()           # module suffixes with LoRA (trainable=mapping+lora)
    lora_rank: int = 0
    lora_dtype_bytes: int = 0          # peft keeps the adapters in fp32 on a bf16 model
    vision_backward_with_gc: bool = False   # the backward enters the frozen vision tower once checkpointing is on
    vision_backward_without_gc: bool = False
    persistent_params: int = 0         # ZeRO-3 persistent parameters (numel <= threshold), kept whole on every rank
    param_numels: tuple = ()           # every parameter's numel (persistence under other thresholds)
    largest_module_params: int = 0     # the largest leaf module (ZeRO-3 gathers a module's parameters at once)
    llm_layer_numels: tuple = ()       # the parameter numels of ONE decoder layer
    prompt_tokens: int = PROMPT_TEXT_TOKENS  # BOS + chat template + the caption prompt (before the image expands)
    note: str = ""

    @property
    def prefix_tokens(self) -> int:
        """Positions of a sequence before its caption: the image's and the prompt's."""
        return self.image_tokens + self.prompt_tokens

    @property
    def dtype_bytes(self) -> int:
        return {"float32": 4, "bfloat16": 2, "float16": 2}[self.dtype]

    @property
    def total_params(self) -> int:
        return self.params["total"]

    @property
    def trainable_params(self) -> int:
        return self.trainable["total"]

    def vision_backward(self, gradient_checkpointing: bool) -> bool:
        return self.vision_backward_with_gc if gradient_checkpointing else self.vision_backward_without_gc

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def with_llm_layers(self, layers: int, persistence_threshold: float = 1e5) -> "ModelSummary":
        """The same model with `layers` decoder layers (what `preset:...,text_layers=K` builds), without a
        build: decoder layers are identical, so counts change by whole layers."""
        import collections

        if not 1 <= layers:
            raise PlanError(f"text_layers={layers}: must be >= 1")
        d = self.llm.layers - layers
        per_layer = sum(self.llm_layer_numels)
        params, trainable = dict(self.params), dict(self.trainable)
        params["llm"] -= d * per_layer
        params["total"] -= d * per_layer
        trainable_per_layer = trainable["llm"] // self.llm.layers  # LoRA lives in the decoder layers only
        trainable["llm"] -= d * trainable_per_layer
        trainable["total"] -= d * trainable_per_layer
        numels = collections.Counter(self.param_numels)
        change = collections.Counter({n: c * abs(d) for n, c in collections.Counter(self.llm_layer_numels).items()})
        numels = numels - change if d > 0 else numels + change
        flat = tuple(numels.elements())
        return dataclasses.replace(
            self, source=f"{self.source},text_layers={layers}", params=params, trainable=trainable,
            llm=dataclasses.replace(self.llm, layers=layers), param_numels=flat,
            persistent_params=sum(n for n in flat if n <= persistence_threshold))


# Where each family keeps its parts (module name suffixes, looked up in this order):
# LLaVA / OneVision / InternVL `vision_tower`, Qwen2-VL / Qwen2.5-VL `visual` (its `merger` inside it is
# the mapping), Idefics3 / SmolVLM `vision_model`; the LLM `language_model` (Idefics3: `text_model`);
# the mapping `multi_modal_projector`, Qwen's `merger`, Idefics3's `connector`.
VISION_MODULES = ("vision_tower", "visual", "vision_model")
LLM_MODULES = ("language_model", "text_model")
PROJECTOR_MODULES = ("multi_modal_projector", "merger", "connector")


def _is_vision(name: str) -> bool:
    return any(re.search(rf"(^|\.){m}(\.|$)", name) for m in VISION_MODULES)


def _is_llm(name: str) -> bool:
    return any(re.search(rf"(^|\.){m}(\.|$)", name) for m in LLM_MODULES)


def _group(name: str, mapping_patterns) -> str:
    if any(re.search(p, name) for p in mapping_patterns):
        return "projector"
    if _is_vision(name):
        return "vision"
    if _is_llm(name) or "lm_head" in name:
        return "llm"
    return "other"


def count_parameters(model, mapping_patterns) -> tuple[dict, dict]:
    """(all, trainable) parameter counts by group: vision tower, projector (the mapping layers), LLM
    (decoder, embeddings and lm_head), other. LoRA weights inside the LLM count as LLM."""
    groups = ("vision", "projector", "llm", "other")
    total = dict.fromkeys(groups, 0)
    trainable = dict.fromkeys(groups, 0)
    for name, p in model.named_parameters():
        g = _group(name, mapping_patterns)
        total[g] += p.numel()
        if p.requires_grad:
            trainable[g] += p.numel()
    total["total"] = sum(total[g] for g in groups)
    trainable["total"] = sum(trainable[g] for g in groups)
    return total, trainable


def _find(model, suffix: str | Sequence[str]):
    """The first module whose name ends with `suffix` (a sequence: the first suffix that any module has)."""
    for one in ((suffix,) if isinstance(suffix, str) else suffix):
        for name, module in model.named_modules():
            if name == one or name.endswith("." + one):
                return module
    return None


def _pair(x) -> tuple[int, int]:
    """(height, width) of a config's image_size / patch_size: an int, or a list (InternVL)."""
    return (int(x[0]), int(x[1])) if isinstance(x, (list, tuple)) else (int(x), int(x))


def _vision_field(vc, *names, default=None):
    """The vision config's value under the first of `names` it has (Qwen's ViT: depth / num_heads)."""
    for n in names:
        value = getattr(vc, n, None)
        if value is not None:
            return value
    return default


def _class_tokens(vision_module) -> int:
    """Positions a tile adds to its patches: 1 with a class token (CLIP's class_embedding, InternViT's
    cls_token), 0 without (SigLIP, Idefics3's SigLIP, Qwen's ViT)."""
    return int(any(re.search(r"(^|\.)(class_embedding|cls_token)$", n) for n, _ in vision_module.named_parameters()))


def _feature_layer(config) -> int:
    layer = getattr(config, "vision_feature_layer", None)
    if layer is None:
        return -1  # Qwen-VL, Idefics3: the tower's last layer
    return layer if isinstance(layer, int) else max(layer)  # several concatenated: the deepest decides


def _linear_numel(module) -> int:
    import torch

    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


def _shapes(model, config, tile_positions: int | None = None) -> tuple:
    """(LLM shape, vision shape, projector Linear numels, their in_features, projector norms). `tile_positions`:
    the tower's patch positions of one tile when its config has no image_size (Qwen's ViT takes the
    processor's grid: `_image_counts`)."""
    import torch

    tc, vc = config.text_config, config.vision_config
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    llm = _find(model, LLM_MODULES)
    vision = _find(model, VISION_MODULES)
    projector = _find(model, PROJECTOR_MODULES)
    lm_head = _find(model, "lm_head")
    decoder_layers = [m for n, m in llm.named_modules() if re.search(r"layers\.\d+$", n)]
    encoder_layers = [m for n, m in vision.named_modules() if re.search(r"(layers|layer|blocks)\.\d+$", n)]
    conv = next((m for m in vision.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))), None)
    lm_head_w = lm_head.weight if hasattr(lm_head, "weight") else lm_head.base_layer.weight
    llm_shape = LLMShape(tc.hidden_size, tc.intermediate_size, tc.num_hidden_layers, tc.num_attention_heads,
                         getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads, head_dim,
                         tc.vocab_size, _linear_numel(decoder_layers[0]), lm_head_w.numel())
    cls = _class_tokens(vision)
    if getattr(vc, "image_size", None) is not None:
        (ih, iw), (ph, pw) = _pair(vc.image_size), _pair(vc.patch_size)
        patches = (ih // ph) * (iw // pw)
    elif tile_positions is not None:
        patches = tile_positions
    else:
        raise PlanError(f"{type(vc).__name__} has no image_size: the tower's positions come from the processor's "
                        "grid, and this model has no processor (pass image_counts with the tile positions)")
    vision_shape = VisionShape(
        vc.hidden_size, vc.intermediate_size, _vision_field(vc, "num_hidden_layers", "depth"),
        _vision_field(vc, "num_attention_heads", "num_heads"), patches + cls, _feature_layer(config),
        _linear_numel(encoder_layers[0]), conv.weight.numel() if conv is not None else 0, cls)
    proj = [m for m in projector.modules() if isinstance(m, torch.nn.Linear)]
    return (llm_shape, vision_shape, tuple(m.weight.numel() for m in proj), tuple(m.in_features for m in proj),
            _projector_norms(projector))


def _projector_norms(projector) -> tuple:
    """(width, is an RMSNorm) of the normalisations before the projector's first Linear (InternVL's
    LayerNorm, Qwen's RMSNorm ln_q), in forward order."""
    out = []
    for m in projector.modules():
        kind = type(m).__name__
        if "Norm" in kind and getattr(m, "weight", None) is not None and m.weight.dim() == 1:
            out.append((int(m.weight.shape[0]), "RMS" in kind))
    return tuple(out)


def _image_counts(adapter, image_size: tuple[int, int]) -> tuple[int, int, int | None]:
    """(LLM positions, vision-tower tiles, tower positions of one tile or None: the config's) of one image,
    from the model's own processor. Tiles: LLaVA-NeXT / OneVision / Idefics3 pixel_values
    [1, tiles, 3, H, W], InternVL [tiles, 3, H, W], LLaVA [1, 3, H, W]; Qwen's flat patches
    [grid_t * grid_h * grid_w, C * t * p * p] are one tile of the grid's positions."""
    vc = adapter.model.config.vision_config
    if adapter.processor is None:
        if getattr(vc, "image_size", None) is None:
            raise PlanError(f"{adapter.source}: no processor and no vision image_size; the image positions are "
                            "unknown (pass image_counts)")
        (ih, iw), (ph, pw) = _pair(vc.image_size), _pair(vc.patch_size)
        return (ih // ph) * (iw // pw), 1, None
    from PIL import Image

    inputs = adapter.image_inputs(Image.new("RGB", tuple(image_size), (128, 128, 128)))
    t = inputs.tensors
    pixels = t["pixel_values"]
    if "image_grid_thw" in t:
        return int(inputs.num_image_tokens), 1, int(t["image_grid_thw"][0].prod())
    tiles = pixels.shape[1] if pixels.dim() == 5 else pixels.shape[0] if pixels.dim() == 4 else 1
    return int(inputs.num_image_tokens), int(tiles), None


def _vision_graph_requires_grad(vision_tower, config, dtype, mapping=frozenset()) -> bool:
    """Does the vision tower's output require grad (so the backward enters it)? One forward of one
    tile, on the meta device for a meta model (no memory, ~0.2 s for CLIP-L). A tower that cannot run
    this way (Qwen's ViT takes flat patches and a grid) is decided from its parameters outside the
    mapping layers (`mapping`: their ids; Qwen's merger is trainable but runs after every block)."""
    import torch

    vc = config.vision_config
    try:
        device = next(vision_tower.parameters()).device
        h, w = _pair(vc.image_size)
        pixels = torch.zeros(1, getattr(vc, "num_channels", 3), h, w, device=device, dtype=dtype)
        layer = config.vision_feature_layer if isinstance(getattr(config, "vision_feature_layer", None), int) else -1
        with torch.enable_grad():
            out = vision_tower(pixel_values=pixels, output_hidden_states=True)
        return bool(out.hidden_states[layer].requires_grad)
    except Exception:  # noqa: BLE001 - a tower that cannot run here: decide from its parameters
        return any(p.requires_grad for p in vision_tower.parameters() if id(p) not in mapping)


def summarize(model_cfg, image_size: tuple[int, int] | None = None, persistence_threshold: float = 1e5) -> ModelSummary:
    """Build `model_cfg`'s model on the meta device (no memory), choose its trainable set as training
    does, and return its summary. `image_size` (width, height) matters for LLaVA-NeXT only."""
    import sare_ds  # noqa: F401  (the torchvision guard, before transformers)
    from sare_ds.models import load_mllm, select_trainable

    cfg = copy.deepcopy(model_cfg)
    cfg.gradient_checkpointing = False
    adapter = load_mllm(cfg, device="meta")
    select_trainable(adapter, cfg)
    lora = cfg.trainable == "mapping+lora"
    rule = cfg.trainable + (f" ({cfg.trainable_regex})" if cfg.trainable == "regex" else "")
    return summarize_adapter(adapter, dtype=cfg.dtype, trainable_rule=rule,
                             lora_targets=tuple(cfg.lora_target_modules) if lora else (),
                             lora_rank=cfg.lora_r if lora else 0, image_size=image_size,
                             persistence_threshold=persistence_threshold, source=cfg.name_or_path)


def summarize_adapter(adapter, *, dtype: str, trainable_rule: str = "mapping", lora_targets: Sequence[str] = (),
                      lora_rank: int = 0, image_size: tuple[int, int] | None = None,
                      persistence_threshold: float = 1e5, source: str | None = None,
                      image_counts: tuple[int, int] | None = None) -> ModelSummary:
    """The summary of an adapter whose trainable set is chosen (meta or real weights; gradient
    checkpointing off: it is switched on here, once, to see what it does to the graph). `image_counts`:
    (LLM positions, tiles[, tower positions of a tile]) of one image instead of the processor's."""
    from sare_ds.models import DTYPES

    model = adapter.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    config = base.config
    params, trainable = count_parameters(model, adapter.mapping_patterns)
    size = tuple(image_size or DEFAULT_IMAGE_SIZE)
    counts = tuple(image_counts or _image_counts(adapter, size))
    image_tokens, tiles = counts[:2]
    tile_positions = counts[2] if len(counts) > 2 else None
    llm, vision, projector_linears, projector_inputs, projector_norms = _shapes(model, config, tile_positions)
    vision_tower = _find(model, VISION_MODULES)
    torch_dtype = DTYPES[dtype]
    patterns = frozenset(id(p) for n, p in model.named_parameters()
                         if any(re.search(pat, n) for pat in adapter.mapping_patterns))
    without_gc = _vision_graph_requires_grad(vision_tower, config, torch_dtype, patterns)
    # Gradient checkpointing as training switches it on (sare_ds.models.enable_gradient_checkpointing):
    # whatever it does to the graph (e.g. transformers' input-require-grads hooks) is seen here.
    was_on = _set_checkpointing(base, True)
    with_gc = _vision_graph_requires_grad(vision_tower, config, torch_dtype, patterns)
    _set_checkpointing(base, was_on)
    numels = tuple(p.numel() for p in model.parameters())
    lora_bytes = next((p.element_size() for n, p in model.named_parameters() if "lora_A" in n), 0)
    llm_module = _find(model, LLM_MODULES)
    first_layer = next(m for n, m in llm_module.named_modules() if re.search(r"layers\.\d+$", n))
    layer_numels = tuple(p.numel() for p in first_layer.parameters())
    leaves = [sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()]
    name = source or adapter.source
    prompt_tokens = _prompt_tokens(adapter)
    return ModelSummary(
        source=name, family=adapter.family, dtype=dtype, params=params, trainable=trainable,
        trainable_rule=trainable_rule, llm=llm, vision=vision, projector_linears=projector_linears,
        projector_inputs=projector_inputs, projector_norms=projector_norms,
        image_tokens=image_tokens, image_tiles=tiles, image_size=size,
        lora_targets=tuple(lora_targets), lora_rank=lora_rank, lora_dtype_bytes=lora_bytes,
        vision_backward_with_gc=with_gc, vision_backward_without_gc=without_gc,
        persistent_params=sum(n for n in numels if n <= persistence_threshold), param_numels=numels,
        largest_module_params=max(leaves), llm_layer_numels=layer_numels, prompt_tokens=prompt_tokens,
        note=_preset_note(name))


def _prompt_tokens(adapter, prompt: str | None = None) -> int:
    """Tokens of BOS + chat template + EFUF's caption prompt before the image expands (as
    `fixed_sample_tokens` counts them, without its image probes); PROMPT_TEXT_TOKENS without a tokenizer."""
    from sare_ds.config import EFUF_CAPTION_PROMPT
    from sare_ds.data.tokenize import needs_bos

    try:
        text = adapter.render(adapter.conversation(prompt or EFUF_CAPTION_PROMPT), add_generation_prompt=True)
        ids = adapter.tokenizer(text, add_special_tokens=False)["input_ids"]
        return len(ids) - ids.count(adapter.image_token_id) + int(needs_bos(adapter.tokenizer, ids))
    except Exception:  # noqa: BLE001 - no tokenizer or template (a test model): the LLaVA count
        return PROMPT_TEXT_TOKENS


def _checkpointing_on(model) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def _set_checkpointing(model, on: bool) -> bool:
    """Switch gradient checkpointing as training does (sare_ds.models.enable_gradient_checkpointing)
    or off again (with transformers' input-require-grads hooks); returns the previous state."""
    from sare_ds.models import enable_gradient_checkpointing

    was = _checkpointing_on(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renames these methods
        if on and not was:
            enable_gradient_checkpointing(model)
        elif was and not on:
            model.gradient_checkpointing_disable()
            if hasattr(model, "disable_input_require_grads"):
                model.disable_input_require_grads()
    return was


def _preset_note(name: str) -> str:
    from sare_ds.models import presets

    if not presets.is_preset(str(name)):
        return ""
    preset, overrides = presets.parse(name)
    return f"{preset.note}; shapes of {preset.source}" + (f", overridden: {overrides}" if overrides else "")


def default_seq_len(model: ModelSummary) -> int:
    """data.max_length when neither a recipe nor --seq-len gives one: the recipes' value for LLaVA-1.5
    (1024) and LLaVA-NeXT (3200); for the other families the image + prompt positions of the default
    image (`prefix_tokens`) + CAPTION_ROOM caption tokens, rounded up to a multiple of SEQ_LEN_MULTIPLE
    (Qwen2.5-VL 1024, LLaVA-OneVision 3584, Idefics3 3072, InternVL 4096 at 640 x 480)."""
    if model.family in DEFAULT_SEQ_LEN:
        return DEFAULT_SEQ_LEN[model.family]
    return -(-(model.prefix_tokens + CAPTION_ROOM) // SEQ_LEN_MULTIPLE) * SEQ_LEN_MULTIPLE


# ------------------------------------------------------------------------------------- the step



@dataclass(frozen=True)
class StepShape:
    """How one optimizer step is composed (the recipe's data.* / optim.* / method.name).

    Caption data (`data_format="captions"`, the curation's caption records): a micro-batch holds
    `captions_per_step` captions. Every caption is modelled alike (the worst case of a real mix):
    `caption_tokens` tokens of response (None: as many as `seq_len` = data.max_length leaves after the
    image and the prompt, the longest a sequence can be), `pos_spans` grounded and `neg_spans`
    hallucinated sub-sentences of `span_tokens` tokens each, and, with `sent`, a sent response (its
    labels cover the whole caption + EOS). Where the spans end, as a fraction of the caption: the
    j-th of n pos spans at j/n (the last at the caption's end), the j-th of n neg spans at
    `neg_end` x j/n, so the passes over neg spans only, cut after the last neg token, forward the
    image + prompt + `neg_end` of the caption. `packing` (data.packing): one sequence per caption
    carrying all of its spans' losses; false: one sequence per span, cut after it, and one per sent
    response.

    Per-kind shards (`data_format="per_kind"`, the format before caption records): `per_step` pos /
    neg / sent samples per micro-batch, each its own sequence (a pos / neg sample is the layout's last
    span of its kind, cut after it; a sent sample is the whole caption + EOS); `packing` is moot.
    """

    method: str = "sare"
    seq_len: int = 1024                 # data.max_length: no sequence is longer
    captions_per_step: int = 4          # data.captions_per_step
    packing: bool = True                # data.packing
    caption_tokens: int | None = None   # response tokens of a caption (None: fill seq_len)
    pos_spans: int = 4                  # 4 + 1 spans: a 100-word caption has 5-6 object sub-sentences
    neg_spans: int = 1
    sent: bool = True
    span_tokens: int = 12
    neg_end: float = 0.5
    data_format: str = "captions"       # captions | per_kind
    per_step: Mapping = field(default_factory=lambda: {"pos": 1, "neg": 1, "sent": 1})  # per_kind only
    grad_accum_steps: int = 1
    gradient_checkpointing: bool = True
    optimizer: str = "adamw"

    def counts(self) -> dict[str, int]:
        """Per-kind samples in one micro-batch (per-kind shards); FT never draws neg samples."""
        return {k: (0 if self.method == "ft" and k == "neg" else int(self.per_step.get(k, 0))) for k in KINDS}

    def check(self, prefix: int, strict: bool = True) -> None:
        """Refuse inputs that break a rule; `strict`: also a seq_len with no room for a caption (the
        CLI's; a measured mean length below it, as the GPU check passes, is planned as 1 caption token)."""
        if self.data_format not in ("captions", "per_kind"):
            raise PlanError(f"data_format={self.data_format!r}: captions or per_kind")
        if self.captions_per_step < 1:
            raise PlanError(f"captions_per_step={self.captions_per_step}: must be >= 1 (data.captions_per_step)")
        if not 0.0 < self.neg_end <= 1.0:
            raise PlanError(f"neg_end={self.neg_end}: the fraction of the caption before the last neg token ends, "
                            "in (0, 1]")
        if self.pos_spans < 0 or self.neg_spans < 0 or self.span_tokens < 1:
            raise PlanError(f"spans {self.pos_spans},{self.neg_spans} of {self.span_tokens} tokens: counts must be "
                            ">= 0 and spans >= 1 token")
        if strict and self.seq_len <= prefix + 1:
            raise PlanError(f"sequence length {self.seq_len} leaves no caption after the {prefix} positions of image "
                            "and prompt; fix: raise data.max_length / --seq-len")
        if self.caption_tokens is not None and not 1 <= self.caption_tokens:
            raise PlanError(f"caption_tokens={self.caption_tokens}: must be >= 1")

    def caption_length(self, prefix: int) -> int:
        """Response tokens of a caption, within seq_len (room for EOS when it is a sent response)."""
        room = self.seq_len - prefix - (1 if self.sent else 0)
        return max(1, min(room, self.caption_tokens if self.caption_tokens is not None else room))


@dataclass(frozen=True)
class Row:
    """One sequence of a pass's batch: its tokens and its labelled tokens (intervals of positions)."""

    tokens: int
    labelled: tuple  # ((first, end), ...) positions whose token carries loss, end exclusive

    @property
    def labelled_tokens(self) -> int:
        return _union_length(self.labelled)


@dataclass(frozen=True)
class PassShape:
    """One forward of a step's micro-batch: its rows (right-padded to the longest) and its backwards."""

    name: str
    kinds: tuple
    rows: tuple
    backwards: int = 1   # 2: SARE's shared forward at theta (the graph retained through the first backward)

    @property
    def batch(self) -> int:
        return len(self.rows)

    @property
    def seq(self) -> int:
        return max(r.tokens for r in self.rows)

    @property
    def labelled(self) -> int:
        """K: the positions whose logits are computed, the union over the batch of the labelled ones
        (`collate_captions` keeps position t - 1 when any row labels token t)."""
        return _union_length(tuple(iv for r in self.rows for iv in r.labelled))


def _union_length(intervals) -> int:
    total, reach = 0, None
    for lo, hi in sorted(intervals):
        if reach is None or lo > reach:
            total += hi - lo
            reach = hi
        elif hi > reach:
            total += hi - reach
            reach = hi
    return total


def caption_layout(step: StepShape, prefix: int) -> dict:
    """Where a caption's spans lie, in sequence positions (prefix = image + prompt positions before the
    caption): {"pos": [(first, end), ...], "neg": [...], "sent": [(first, end)] or []} (end exclusive;
    the sent interval includes EOS)."""
    c = step.caption_length(prefix)

    def spans(n: int, reach: float) -> list[tuple[int, int]]:
        out = []
        for j in range(1, n + 1):
            end = max(1, min(c, round(c * reach * j / n)))
            out.append((prefix + max(0, end - step.span_tokens), prefix + end))
        return out

    return {"pos": spans(step.pos_spans, 1.0), "neg": spans(step.neg_spans, step.neg_end),
            "sent": [(prefix, prefix + c + 1)] if step.sent else []}


def pass_rows(step: StepShape, prefix: int, kinds: Sequence[str]) -> tuple:
    """The rows of one micro-batch's pass over `kinds` (what `collate_captions` builds: sequences with
    weight on these kinds, each cut after its last weighted token)."""
    layout = caption_layout(step, prefix)
    if step.data_format == "per_kind":
        counts = step.counts()
        rows = []
        for k in kinds:
            pieces = layout[k][-1:]  # the layout's last span of the kind: the longest cut
            if not pieces and k in ("pos", "neg"):  # no span of the kind in the layout: one of span_tokens
                pieces = [(prefix, prefix + min(step.span_tokens, step.caption_length(prefix)))]
            if k == "sent" and not pieces:
                c = step.caption_length(prefix)
                pieces = [(prefix, prefix + c + 1)]
            rows += [Row(pieces[0][1], (pieces[0],))] * counts[k]
        return tuple(rows)
    if step.packing:
        pieces = tuple(iv for k in kinds for iv in layout[k])
        if not pieces:
            return ()
        return (Row(max(hi for _, hi in pieces), pieces),) * step.captions_per_step
    per_caption = tuple(Row(hi, ((lo, hi),)) for k in kinds for lo, hi in layout[k])
    return per_caption * step.captions_per_step


def method_passes(method: str, schedule: str = "separate") -> list[tuple[str, tuple, int]]:
    """(pass name, kinds, backwards) of one micro-batch, in the order sare_ds/train/step.py runs them.

    FT / EFUF: one forward + backward over their kinds. SARE (sare_ds/methods.py: capability at theta,
    neg at theta + eps*):
      separate (ZeRO-2, ZeRO-3 + offload)      neg at theta, neg at theta + eps*, capability at theta
      shared (one process, ZeRO-3)             one forward at theta over all kinds whose graph serves
                                                two backwards (capability into the gradient with
                                                retain_graph, then the direction into its buffer),
                                                then neg at theta + eps*
    """
    from sare_ds.methods import get_method

    if schedule not in SCHEDULES:
        raise PlanError(f"schedule {schedule!r}: separate (ZeRO-2, ZeRO-3 + offload) or shared (one process, ZeRO-3)")
    try:
        m = get_method(method)
    except ValueError:
        raise PlanError(f"method {method!r}: unknown; use ft, efuf or sare") from None
    if not m.sharpness_aware:
        return [(m.name, m.kinds, 1)]
    sharp = tuple(k for k in KINDS if k in m.sharp)
    at_theta = tuple(k for k in KINDS if k in m.at_theta)
    name = "_".join(sharp)
    if schedule == "shared":
        return [("theta", m.kinds, 2), (f"{name}_at_eps", sharp, 1)]
    return [(f"{name}_at_theta", sharp, 1), (f"{name}_at_eps", sharp, 1), ("capability", at_theta, 1)]


def step_passes(model: "ModelSummary", step: StepShape, schedule: str = "separate") -> list[PassShape]:
    """The passes of one micro-batch of `step` on `model` (passes with no rows are left out)."""
    prefix = model.prefix_tokens
    step.check(prefix, strict=False)
    out = []
    for name, kinds, backwards in method_passes(step.method, schedule):
        rows = pass_rows(step, prefix, kinds)
        if rows:
            out.append(PassShape(name, tuple(kinds), rows, backwards))
    return out


def uniform_lengths(per_step: Mapping[str, int], seq_len: float, grad_accum_steps: int = 1,
                    method: str | None = None) -> dict[str, list[float]]:
    """Sequence lengths by kind of one step's samples on one rank, all `seq_len` long (per-kind samples)."""
    out = {}
    for k in KINDS:
        n = 0 if (method == "ft" and k == "neg") else int(per_step.get(k, 0))
        out[k] = [float(seq_len)] * (n * grad_accum_steps)
    return out


# ---------------------------------------------------------------------------------- activations

def decoder_layer_saved_bytes(llm: LLMShape, batch: int, seq: int, dtype_bytes: int, *, masked: bool,
                              lora_targets: Sequence[str] = (), lora_rank: int = 0, lora_dtype_bytes: int = 0) -> int:
    """Bytes autograd keeps for ONE Llama/Mistral decoder layer (SDPA attention), frozen weights.

    With frozen weights a Linear needs only its weight for the input gradient, so it keeps no
    activation. What remains, per token:
      2 RMSNorms      the fp32 input (4h, the upcast copy) + the fp32 rsqrt (4)    each
      rotary + SDPA   q (s*h), k and v (s*kv_heads*head_dim each; the full s*h when a mask forces
                      transformers to repeat the kv heads), the output (s*h), the fp32 log-sum-exp
                      (4*heads); cos/sin are shared by all layers (counted once, `shared_saved_bytes`)
      SwiGLU MLP      gate (s*i), silu(gate) (s*i), up (s*i)
    and per layer, with an attention mask (a padded batch): SDPA's float bias [B, 1, T, T] (s*B*T^2).
    LoRA (trainable=mapping+lora) adds what lora_A and lora_B keep: their inputs. peft casts the
    input to the adapters' dtype; fp32 adapters on a bf16 model (peft's default) get a copy per target
    (4 * (in + r) per token); adapters in the model dtype share the input of a group (q/k/v read the
    same normed hidden state, gate/up too) and add s * r per target.
    """
    h, i, s = llm.hidden, llm.intermediate, dtype_bytes
    kv = llm.heads * llm.head_dim if (masked and llm.kv_heads != llm.heads) else llm.kv_heads * llm.head_dim
    per_token = 2 * (4 * h + 4) + s * (2 * llm.heads * llm.head_dim + 2 * kv) + 4 * llm.heads + 3 * s * i
    if lora_targets:
        groups = {"q_proj": ("qkv", h), "k_proj": ("qkv", h), "v_proj": ("qkv", h), "o_proj": ("o", h),
                  "gate_proj": ("gu", h), "up_proj": ("gu", h), "down_proj": ("down", i)}
        targets = [t for t in lora_targets if t in groups]
        lb = lora_dtype_bytes or s
        if lb != s:  # a cast copy of the input per target
            per_token += sum(lb * (groups[t][1] + lora_rank) for t in targets)
        else:
            per_token += sum(s * dim for _, dim in {groups[t] for t in targets}) + s * lora_rank * len(targets)
    mask = s * batch * seq * seq if masked else 0
    return batch * seq * per_token + mask


def shared_saved_bytes(llm: LLMShape, batch: int, seq: int, dtype_bytes: int, rotary: bool = True) -> int:
    """Kept once per pass, not per layer: the final RMSNorm's fp32 input and rsqrt, the image-position
    mask of the embedding merge (1 byte a token), and rotary cos/sin ([1, T, head_dim] each; saved by
    the first layer's attention, or only held by the checkpoints under checkpointing)."""
    return batch * seq * (4 * llm.hidden + 4 + 1) + (rotary_bytes(llm, seq, dtype_bytes) if rotary else 0)


def rotary_bytes(llm: LLMShape, seq: int, dtype_bytes: int) -> int:
    return 2 * dtype_bytes * seq * llm.head_dim


def projector_merge(model: ModelSummary) -> int:
    """Patches per row of the projector's first Linear: 1 (LLaVA, OneVision), 4 after a 2 x 2 pixel
    shuffle or patch merge (Idefics3's connector, InternVL's projector, Qwen's merger)."""
    ins = model.projector_inputs
    return max(1, ins[0] // model.vision.hidden) if ins else 1


def projector_rows(model: ModelSummary) -> int:
    """Rows the projector's Linears run on, per tile."""
    return model.vision.features // projector_merge(model)


def projector_saved_bytes(model: ModelSummary, images: int, dtype_bytes: int, vision_backward: bool) -> int:
    """The projector's Linear inputs (its weights train) and its activations' inputs, per vision tile.

    The first Linear keeps its input: with one tile and a class token, the selected vision hidden state
    (a view of the tower's [1, 577, vh] output; with a backward through the tower that hidden state is
    already kept as a checkpointed input); with several tiles ([tiles, 577, vh][:, 1:] is not contiguous),
    or after a pixel shuffle / patch merge (a reshaped copy), a contiguous copy, rows x in_features.
    Each later Linear keeps its input and the activation before it its own (s * in_features per row each).
    A norm before the first Linear adds its own: InternVL's LayerNorm its input + mean and rstd (in the
    input's dtype, as measured on the CPU); Qwen's RMSNorm ln_q only the normalised input of its trainable
    weight's product (its input needs no gradient, so the fp32 upcast keeps nothing).
    """
    v, s = model.vision, dtype_bytes
    tiles = images * model.image_tiles
    ins = model.projector_inputs or (v.hidden, model.llm.hidden)
    merge = projector_merge(model)
    rows = v.features // merge
    if merge == 1 and tiles == 1 and (v.cls_tokens or vision_backward):
        first = 0 if vision_backward else s * v.tokens * v.hidden
    else:
        first = tiles * s * rows * ins[0]
    rest = tiles * 2 * s * rows * sum(ins[1:])
    norms = 0
    for width, rms in model.projector_norms:
        n = tiles * v.features * v.hidden // width
        norms += n * (s * width if rms else s * width + 2 * s)
    return first + rest + norms


def vision_saved_bytes(model: ModelSummary, images: int, dtype_bytes: int, *, vision_backward: bool,
                       gradient_checkpointing: bool) -> int:
    """What the frozen vision tower keeps for a backward: nothing unless the graph enters it.

    With checkpointing (transformers' hooks make the patch embedding's output require grad) each
    encoder layer keeps its input, plus the pre- and post-LayerNorm inputs. Without checkpointing,
    per layer and token: 2 LayerNorm inputs (s*vh) and statistics (8), q/k/v/out (4*s*vh), the fp32
    log-sum-exp (4*heads), quick_gelu's input and sigmoid (2*s*vi).
    """
    if not vision_backward:
        return 0
    v, s = model.vision, dtype_bytes
    tiles = images * model.image_tiles
    if gradient_checkpointing:
        per_tile = (v.layers + 2) * s * v.tokens * v.hidden
    else:
        per_layer_token = 2 * (s * v.hidden + 8) + 4 * s * v.hidden + 4 * v.heads + 2 * s * v.intermediate
        per_tile = v.layers * v.tokens * per_layer_token + s * v.tokens * v.hidden
    return tiles * per_tile


def logits_saved_bytes(llm: LLMShape, batch: int, labelled: int, kinds: int = len(KINDS)) -> int:
    """What the loss keeps, over the K = `labelled` kept positions only (sare_ds/train/losses.py
    `span_sums` on `model(..., logits_to_keep=keep)`): the fp32 log-softmax [B, K, V] (4V per
    position), the int64 targets (8), the fp32 token weights of every kind (4 x kinds, what the
    weighted sum keeps for the NLL's gradient); once: the int64 kept indices of the LM head's gather
    (8K) and cross-entropy's scalar total weight."""
    return batch * labelled * (4 * llm.vocab + 8 + 4 * kinds) + 8 * labelled + 4


def full_logits_saved_bytes(llm: LLMShape, batch: int, seq: int) -> int:
    """The loss as it was before `logits_to_keep` (per_sample_nll, kept for evaluation): the fp32
    log-softmax over the vocabulary at every position, [B, T-1, V] (+ int64 targets, fp32 mask)."""
    return batch * (seq - 1) * (4 * llm.vocab + 8 + 4)


def loss_peak_bytes(llm: LLMShape, batch: int, labelled: int) -> int:
    """The loss path's own peak (its backward): what it keeps + the fp32 gradients of the log-softmax's
    output and input, [B, K, V] each (8V per kept position)."""
    return logits_saved_bytes(llm, batch, labelled) + batch * labelled * 8 * llm.vocab


def full_loss_peak_bytes(llm: LLMShape, batch: int, seq: int) -> int:
    """The same over every position (the path before `logits_to_keep`): 12V + 12 bytes per position."""
    return full_logits_saved_bytes(llm, batch, seq) + batch * (seq - 1) * 8 * llm.vocab


def pass_activations(model: ModelSummary, batch: int, seq: int, *, labelled: int | None = None,
                     gradient_checkpointing: bool, backwards: int = 1, masked: bool | None = None,
                     dtype_bytes: int | None = None) -> dict:
    """Activation memory of one forward + backward(s) over `batch` sequences padded to `seq` tokens,
    whose loss reads `labelled` kept positions (K, the union over the batch; default seq - 1, every
    position).

    Returns bytes: `saved` (what autograd keeps when the forward ends), `peak` (the most the pass
    holds at once beyond the static memory) and `phase` (where that peak is), with the parts.

    `backwards`: 2 for SARE's shared forward at theta: the first backward runs with retain_graph, so
    nothing saved is freed until the second one (which starts from the same graph: the same peak).

    Peak phases considered (measured where each peaks: tests/test_plan.py, docs/memory_plan.md):
      loss backward        everything saved + the fp32 gradients of the log-softmax's output and
                           input, [B, K, V] each (8V per kept position);
      final norm backward  (one backward) the final RMSNorm's fp32 temporaries, 20h - 4 bytes a token,
                           the loss's saved tensors freed;
      layer backward       the top decoder layer's backward: with checkpointing, the checkpointed inputs
                           + one recomputed layer's saved set; without, the saved set; + its transient
                           gradients (the three [B, T, i] MLP gradients and the incoming [B, T, h] one);
                           the loss's saved tensors and the final norm's input are freed by then unless
                           the graph is retained (two backwards);
      layer norm backward  (two backwards, no checkpointing) the top layer's post-attention RMSNorm with
                           nothing freed: its fp32 temporaries + the residual gradient, (20 + s) h a token;
      forward end          the final RMSNorm's forward (see below);
      vision forward       the tower's hidden states (all layers' outputs are returned) before the LLM runs.
    Under checkpointing the checkpoints also hold rotary cos/sin and a padded batch's bool
    [B, 1, T, T] mask through the backward.
    `masked`: the batch carries an attention mask (padding); default: batch > 1.
    """
    if backwards not in (1, 2):
        raise PlanError(f"backwards={backwards}: 1, or 2 (SARE's shared forward)")
    s = dtype_bytes or model.dtype_bytes
    llm, v = model.llm, model.vision
    labelled = seq - 1 if labelled is None else labelled
    masked = batch > 1 if masked is None else masked
    vision_backward = model.vision_backward(gradient_checkpointing)
    layer = decoder_layer_saved_bytes(llm, batch, seq, s, masked=masked, lora_targets=model.lora_targets,
                                      lora_rank=model.lora_rank, lora_dtype_bytes=model.lora_dtype_bytes)
    parts = {
        "llm_layers": llm.layers * (batch * seq * s * llm.hidden if gradient_checkpointing else layer),
        "llm_shared": shared_saved_bytes(llm, batch, seq, s, rotary=not gradient_checkpointing),
        "projector": projector_saved_bytes(model, batch, s, vision_backward),
        "vision": vision_saved_bytes(model, batch, s, vision_backward=vision_backward,
                                     gradient_checkpointing=gradient_checkpointing),
        "logits": logits_saved_bytes(llm, batch, labelled),
    }
    saved = sum(parts.values())
    h, bt = llm.hidden, batch * seq
    # The checkpoints hold the layers' arguments besides their inputs: rotary cos/sin and, in a padded
    # batch, the bool [B, 1, T, T] mask.
    held = (rotary_bytes(llm, seq, s) + (batch * seq * seq if masked else 0)) if gradient_checkpointing else 0
    phases = {"loss backward": saved + held + batch * labelled * 8 * llm.vocab}
    mlp_grads = bt * s * (3 * llm.intermediate + h)  # into down_proj, the gate's activation, up_proj; + [B, T, h]
    if backwards == 1:
        # The final RMSNorm's backward: its fp32 temporaries (5 [B, T, h] fp32 tensors, measured), the loss's
        # saved tensors freed by then (and the norm's rsqrt, 4 bytes a token).
        phases["final norm backward"] = saved - parts["logits"] + held + bt * (20 * h - 4)
        below = saved - parts["logits"] - bt * (4 * h + 4) + held  # the final norm's saved input freed too
    else:
        below = saved + held  # the graph is retained: nothing saved is freed in the first backward
    if gradient_checkpointing:
        phases["layer backward"] = below + layer + mlp_grads  # + the top layer recomputed
    else:
        phases["layer backward"] = below + mlp_grads
        if backwards == 2:
            # The top layer's post-attention RMSNorm backward with its MLP's saved tensors still alive: the
            # norm's fp32 temporaries (20h a token) + the residual stream's gradient (s h).
            phases["layer norm backward"] = saved + bt * (20 + s) * h
    tiles = batch * model.image_tiles
    # The forward's end (the final RMSNorm): besides what is saved, the last layer's output and the
    # merged input embeddings ([B, T, h] each), the norm's fp32 normalised copy and its bf16 cast and
    # output (4h + 2 s h a token), the bool [B, 1, T, T] mask of a padded batch, the image features
    # (projector output and its merged copy, 2 s h per image position) and two vision hidden states
    # per tile (the selected layer and the last). Below the loss's and the layers' backward for real
    # widths; it can peak in small models with a short loss.
    phases["forward end"] = (saved - parts["logits"] + (batch * seq * seq if masked else 0)
                             + bt * (4 + 4 * s) * h + 2 * batch * model.image_tokens * s * h
                             + 2 * tiles * v.tokens * v.hidden * s)
    phases["vision forward"] = tiles * s * v.tokens * ((v.layers + 1) * v.hidden + 3 * v.intermediate)
    phase = max(phases, key=phases.get)
    return {"saved": saved, "peak": phases[phase], "phase": phase, "parts": parts, "phases": phases,
            "per_layer": layer, "batch": batch, "seq": seq, "labelled": labelled, "backwards": backwards,
            "loss_peak": loss_peak_bytes(llm, batch, labelled),
            "loss_peak_full_logits": full_loss_peak_bytes(llm, batch, seq)}


def step_activations(model: ModelSummary, step: StepShape, *, schedule: str = "separate",
                     gradient_checkpointing: bool | None = None) -> dict:
    """Peak activation memory of an optimizer step: the passes run one after the other and each
    backward frees its activations, so the step's peak is the largest single pass (the shared forward
    at theta keeps its graph through two backwards: counted in that pass)."""
    gc = step.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
    passes = []
    for ps in step_passes(model, step, schedule):
        a = pass_activations(model, ps.batch, ps.seq, labelled=ps.labelled, gradient_checkpointing=gc,
                             backwards=ps.backwards)
        passes.append({"pass": ps.name, "kinds": list(ps.kinds), "samples": ps.batch, "rows": ps.batch,
                       "tokens": [r.tokens for r in ps.rows], **a})
    if not passes:
        raise PlanError(f"the {step.method} step forwards nothing: no span of the kinds it trains "
                        f"(pos_spans={step.pos_spans}, neg_spans={step.neg_spans}, sent={step.sent})")
    worst = max(passes, key=lambda p: p["peak"])
    return {"passes": passes, "peak": worst["peak"], "peak_pass": worst["pass"], "gradient_checkpointing": gc,
            "schedule": schedule}


# ------------------------------------------------------------------------------- state memory

@dataclass(frozen=True)
class ZeroSettings:
    """The parts of a DeepSpeed JSON that size memory (DeepSpeed's defaults where absent)."""

    name: str
    stage: int                      # 0: no DeepSpeed (plain training)
    dtype: str                      # float32 / bfloat16 (what the config is for)
    offload_optimizer: bool = False
    reduce_bucket_size: float = 5e8
    contiguous_gradients: bool = True
    overlap_comm: bool = False
    max_live_parameters: float = 1e9
    prefetch_bucket_size: float = 5e7
    persistence_threshold: float = 1e5
    cpu_only: bool = False
    grad_accum_dtype: str | None = None
    hpz_partition_size: int = 1     # ZeRO++ hpZ: a secondary weight partition over this many ranks (a node)
    shared_forward: bool = True     # distributed.zero3_shared_forward (ZeRO-3 without offload only)

    @classmethod
    def from_json(cls, path: str | Path, dtype: str = "bfloat16") -> "ZeroSettings":
        path = Path(path)
        try:
            ds = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise PlanError(f"--ds-config {path}: cannot read it as JSON ({e}); pass a file from ds_configs/") from e
        z = ds.get("zero_optimization", {})

        def num(key, default):
            value = z.get(key, default)
            return float(default if value == "auto" else value)

        stage = z.get("stage", 0)
        if not isinstance(stage, int) or isinstance(stage, bool):
            raise PlanError(f"--ds-config {path}: zero_optimization.stage = {stage!r} is a {type(stage).__name__}; it "
                            "must be an integer. Fix: write \"stage\": 3 (or 2) without quotes")
        if stage not in (2, 3):
            raise PlanError(f"--ds-config {path}: zero_optimization.stage = {stage}; sare_ds runs ZeRO-2 or ZeRO-3 "
                            "(train/ds_config.py). Fix: pass a ds_configs/zero2_* or zero3_* file")
        cpu_only = "cpu" in path.stem and "offload" not in path.stem
        return cls(
            name=path.name, stage=stage, dtype="float32" if "fp32" in path.stem else dtype,
            offload_optimizer=z.get("offload_optimizer", {}).get("device", "none") == "cpu",
            reduce_bucket_size=num("reduce_bucket_size", ZERO_DEFAULTS["reduce_bucket_size"]),
            contiguous_gradients=bool(z.get("contiguous_gradients", ZERO_DEFAULTS["contiguous_gradients"])),
            overlap_comm=bool(z.get("overlap_comm", stage == 3)),
            max_live_parameters=num("stage3_max_live_parameters", ZERO_DEFAULTS["stage3_max_live_parameters"]),
            prefetch_bucket_size=num("stage3_prefetch_bucket_size", ZERO_DEFAULTS["stage3_prefetch_bucket_size"]),
            persistence_threshold=num("stage3_param_persistence_threshold",
                                      ZERO_DEFAULTS["stage3_param_persistence_threshold"]),
            cpu_only=cpu_only, grad_accum_dtype=ds.get("data_types", {}).get("grad_accum_dtype"),
            hpz_partition_size=int(z.get("zero_hpz_partition_size", 1)))


PLAIN = ZeroSettings(name="plain (no DeepSpeed)", stage=0, dtype="bfloat16")


def state_memory(model: ModelSummary, zero: ZeroSettings, world: int, optimizer: str = "adamw",
                 method: str = "sare") -> dict:
    """Per-rank bytes of everything that lives through the step (not the activations).

    weights       model dtype: replicated (ZeRO-2, plain) or a 1/world partition + the persistent
                  parameters whole (ZeRO-3), + with ZeRO++ hpZ (zero_hpz_partition_size) the secondary
                  partition, 1/min(hpz size, world) of the weights
    gathered      ZeRO-3 only: the weights gathered for the layers in flight, at most
                  stage3_max_live_parameters (+ one whole module), in the model dtype; a copy even
                  at world size 1 (DeepSpeed gathers into new buffers)
    master+optim  fp32 master (ZeRO keeps one even for fp32 weights) + AdamW's 2 fp32 states, of the
                  trainable set, partitioned over the ranks (CPU under offload); plain: states in the
                  weights' dtype, no master
    gradients     the accumulated partition (DeepSpeed 0.19 accumulates in the model dtype unless
                  data_types.grad_accum_dtype says otherwise) + the fp32 copy the optimizer steps on
    buckets       reduction buffers of reduce_bucket_size elements in the gradient dtype: one
                  (ZeRO-3), two with overlap_comm (ZeRO-2); allocated whatever the trainable size
    sare_extra    SARE's own buffers (sare_ds/train/zero_params.py): ZeRO-3 none (perturb writes the
                  low-precision partition, restore copies the fp32 master back; under offload the
                  CPU master and gradient partitions are copied to the GPU for the kernels); ZeRO-2
                  one fp32 flat buffer of all trainable elements to assemble theta + eps*.
                  Transient: it exists between the passes, when the activations are freed.
    sare_direction  a sharpness-aware method in the shared schedule only (schedule_of). Plain training
                  (one process, PlainParameterSpace): ONE buffer of the trainable size in the weights'
                  dtype, the ascent direction from the shared forward's second backward, then theta
                  from perturb to restore, so alive through the perturbed pass's activations (counted
                  as static). ZeRO-3 (Zero3ParameterSpace, shared forward): one buffer shaped like the
                  rank's gradient partition (trainable / world elements, the accumulation dtype),
                  allocated once and kept.
    """
    s = 4 if zero.dtype == "float32" else model.dtype_bytes
    acc = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2}.get(zero.grad_accum_dtype or "", s)
    total, trainable = model.total_params, model.trainable_params
    part = math.ceil(trainable / world)
    states = 2 if optimizer == "adamw" else 0
    out = {"weights": 0.0, "gathered": 0.0, "master_and_optimizer": 0.0, "gradients": 0.0, "buckets": 0.0,
           "sare_extra": 0.0, "sare_direction": 0.0, "cpu_optimizer": 0.0}
    if zero.stage == 0:
        from sare_ds.methods import get_method

        out["weights"] = total * s
        out["gradients"] = trainable * s
        out["master_and_optimizer"] = states * trainable * s
        if get_method(method).sharpness_aware:
            out["sare_direction"] = trainable * s
        return out
    if zero.stage == 3:
        from sare_ds.methods import get_method

        if schedule_of(zero) == "shared" and get_method(method).sharpness_aware:
            out["sare_direction"] = part * acc
        persistent = sum(n for n in model.param_numels if n <= zero.persistence_threshold) \
            if model.param_numels else model.persistent_params
        out["weights"] = math.ceil(total / world) * s + persistent * s
        hpz = min(zero.hpz_partition_size, world)
        if hpz > 1:  # ZeRO++ hpZ: + the secondary partition (1/hpz of the weights), gathered inside a node
            out["weights"] += math.ceil(total / hpz) * s
        live = min(float(total), zero.max_live_parameters + model.largest_module_params)
        out["gathered"] = live * s
        out["buckets"] = zero.reduce_bucket_size * s if zero.contiguous_gradients else 0.0
    else:
        out["weights"] = total * s
        buffers = (2 if zero.overlap_comm else 1) if zero.contiguous_gradients else 0
        out["buckets"] = buffers * zero.reduce_bucket_size * acc
        out["sare_extra"] = trainable * 4
    master_optim = part * 4 * (1 + states)
    if zero.offload_optimizer:
        # Master, AdamW states and the gradient partitions live on the CPU (pinned).
        out["cpu_optimizer"] = master_optim + part * (acc + 4)
        if zero.stage == 3:
            out["sare_extra"] = part * 8  # CPU master + gradient partitions copied to the GPU for perturb/restore
    else:
        out["master_and_optimizer"] = master_optim
        out["gradients"] = part * (acc + 4)
    return out


def static_bytes(state: Mapping[str, float]) -> float:
    """What stays on the GPU through the step (SARE's transient buffers excluded)."""
    return sum(v for k, v in state.items() if k not in ("sare_extra", "cpu_optimizer"))


def overhead_bytes(world: int) -> float:
    """Memory outside torch's allocator: the CUDA context (+ NCCL buffers with more than one rank)."""
    return (CUDA_CONTEXT_GIB + (NCCL_GIB if world > 1 else 0.0)) * GiB


def schedule_of(zero: ZeroSettings) -> str:
    """SARE's schedule under a config (sare_ds/train/step.py): a plain process and ZeRO-3 (without
    optimizer offload, distributed.zero3_shared_forward on) have a direction buffer and share one
    forward at theta; ZeRO-2 and ZeRO-3 with offload run three separate passes."""
    shared = zero.stage == 0 or (zero.stage == 3 and zero.shared_forward and not zero.offload_optimizer)
    return "shared" if shared else "separate"


def rank_peak(model: ModelSummary, step: StepShape, zero: ZeroSettings, world: int,
              activations: dict | None = None) -> dict:
    """Peak allocated bytes per rank (what torch.cuda.max_memory_allocated would say) and the total
    the GPU must have (+ fragmentation margin, CUDA context, NCCL). `activations`: `step_activations`
    of the step under this config's schedule (computed when absent or of the other schedule)."""
    state = state_memory(model, zero, world, step.optimizer, step.method)
    schedule = schedule_of(zero)
    acts = activations if activations and activations.get("schedule", "separate") == schedule else \
        step_activations(model, step, schedule=schedule)
    static = static_bytes(state)
    # SARE's perturb/restore buffers exist between passes, when no activation is alive.
    extra = state["sare_extra"] if step.method == "sare" else 0.0
    allocated = static + max(acts["peak"], extra)
    needed = allocated * (1 + FRAGMENTATION) + overhead_bytes(world)
    return {"state": state, "static": static, "activations": acts["peak"], "peak_pass": acts["peak_pass"],
            "schedule": schedule, "allocated": allocated, "needed": needed}


# ------------------------------------------------------------------------------------- FLOPs

def _sample_flops(model: ModelSummary, seq: float, images: float, *, gradient_checkpointing: bool,
                  vision_backward: bool, head_tokens: float | None = None) -> dict:
    """FLOPs of one sequence's forward and ONE backward (frozen LLM and tower, trainable projector/LoRA);
    the LM head runs on `head_tokens` positions (the kept ones; default: every position)."""
    llm, v = model.llm, model.vision
    head_tokens = seq if head_tokens is None else head_tokens
    tiles = images * model.image_tiles
    lora = _lora_params_per_layer(model)
    base_layer_linear = llm.layer_linear_params - lora
    attention_fwd = 4 * seq * seq * llm.heads * llm.head_dim * llm.layers          # QK^T and PV, full T x T
    layers_fwd = 2 * seq * llm.layer_linear_params * llm.layers + attention_fwd
    head_fwd = 2 * head_tokens * llm.lm_head_params
    vision_layer_fwd = 2 * v.tokens * v.layer_linear_params + 4 * v.tokens * v.tokens * v.hidden
    vision_fwd = tiles * (v.layers * vision_layer_fwd + 2 * v.features * v.patch_embed_params)
    features = tiles * projector_rows(model)  # rows of the projector's Linears (after a pixel shuffle / merge)
    proj = model.projector_linears
    projector_fwd = 2 * features * sum(proj)
    forward = layers_fwd + head_fwd + vision_fwd + projector_fwd
    # Backward. Frozen Linear: the input gradient only (as many FLOPs as its forward). Trainable
    # Linear (LoRA): input and weight gradients (2x). Attention: dQ, dK, dV = 2x its forward matmuls.
    # The projector's first Linear needs no input gradient (nothing trainable upstream).
    layers_bwd = (2 * seq * (base_layer_linear + 2 * lora) * llm.layers) + 2 * attention_fwd
    head_bwd = head_fwd
    projector_bwd = 2 * features * (2 * sum(proj) - proj[0]) if proj else 0
    backward = layers_bwd + head_bwd + projector_bwd
    recompute = (layers_fwd if gradient_checkpointing else 0)
    vision_extra = 0.0
    if vision_backward:
        # Input gradients through the tower's used layers (Linear 1x, attention 2x its forward), and
        # with checkpointing their recompute; the layers above vision_feature_layer get no gradient.
        linear = 2 * v.tokens * v.layer_linear_params
        attention = 4 * v.tokens * v.tokens * v.hidden
        vision_extra = tiles * v.layers_used * (linear + 2 * attention)
        if gradient_checkpointing:
            vision_extra += tiles * v.layers_used * vision_layer_fwd
    return {"forward": forward, "backward": backward, "recompute": recompute, "vision_backward": vision_extra}


def _lora_params_per_layer(model: ModelSummary) -> int:
    if not model.lora_targets:
        return 0
    h, i, r = model.llm.hidden, model.llm.intermediate, model.lora_rank
    kv = model.llm.kv_heads * model.llm.head_dim
    dims = {"q_proj": (h, model.llm.heads * model.llm.head_dim), "k_proj": (h, kv), "v_proj": (h, kv),
            "o_proj": (model.llm.heads * model.llm.head_dim, h), "gate_proj": (h, i), "up_proj": (h, i),
            "down_proj": (i, h)}
    return sum(r * (dims[t][0] + dims[t][1]) for t in model.lora_targets if t in dims)


def pass_flops(model: ModelSummary, ps: PassShape, *, gradient_checkpointing: bool) -> dict:
    """FLOPs of one pass of one micro-batch: one forward of its rows and `ps.backwards` backwards.

    model     each row at its own length, the LM head on its own labelled positions: the work the
              rows need
    hardware  what runs: every row at the padded length, the LM head on the batch's K kept positions,
              + one recompute forward of the decoder per backward (gradient checkpointing), + a
              backward through the frozen vision tower per backward if the graph enters it
    """
    vision_backward = model.vision_backward(gradient_checkpointing)
    b = ps.backwards

    def one(tokens, head):
        return _sample_flops(model, float(tokens), 1.0, gradient_checkpointing=gradient_checkpointing,
                             vision_backward=vision_backward, head_tokens=float(head))

    model_flops = 0.0
    for r in ps.rows:
        f = one(r.tokens, r.labelled_tokens)
        model_flops += f["forward"] + b * f["backward"]
    f = one(ps.seq, ps.labelled)
    hardware = ps.batch * (f["forward"] + b * (f["backward"] + f["recompute"] + f["vision_backward"]))
    return {"pass": ps.name, "rows": ps.batch, "seq": ps.seq, "labelled": ps.labelled, "backwards": b,
            "tokens": sum(r.tokens for r in ps.rows), "model": model_flops, "hardware": hardware}


def plan_flops(model: ModelSummary, step: StepShape, schedule: str = "separate") -> dict:
    """FLOPs of one optimizer step on one rank: the passes of every micro-batch (`step_passes`).

    Returns {"model", "hardware", "tokens" (forwarded per step), "passes"}. MFU = model / (step time x
    peak FLOP/s). Packed vs unpacked differ in the tokens forwarded: a packed caption forwards its
    image and prompt once for all of its spans, unpacked once per span (and per sent response).
    """
    passes = [pass_flops(model, ps, gradient_checkpointing=step.gradient_checkpointing)
              for ps in step_passes(model, step, schedule)]
    n = step.grad_accum_steps
    return {"model": n * sum(p["model"] for p in passes), "hardware": n * sum(p["hardware"] for p in passes),
            "tokens": n * sum(p["tokens"] for p in passes), "passes": passes, "schedule": schedule}


def step_flops(model, method: str, lengths_by_kind: Mapping[str, Sequence[float]],
               images_by_kind: Mapping[str, float] | None = None, gradient_checkpointing: bool = False,
               schedule: str = "separate") -> dict:
    """FLOPs of one optimizer step on one rank, from per-kind sample lengths (the per-kind format, and
    what the GPU check knows of a run: its mean tokens per sample). `plan_flops` is the caption model.

    model            a ModelSummary (`summarize(model_cfg)`), or an MLLMAdapter whose trainable set is chosen
    method           ft | efuf | sare
    lengths_by_kind  kind -> the sequence lengths (image positions included) of the step's samples of that
                     kind on this rank, over all micro-batches; `uniform_lengths` builds them
    images_by_kind   kind -> images per sample (default 1)
    schedule         SARE's: separate (ZeRO-2: neg at theta, neg at theta + eps*, capability) or shared
                     (one process, ZeRO-3: one forward at theta with two backwards, then neg at theta + eps*)
    Per step: FT forwards and backwards the pos + sent samples; EFUF all three kinds once; SARE the
    neg samples twice and pos + sent once (separate), or all once with two backwards and neg once
    more (shared). The LM head is counted at every position (the lengths say nothing of labels).

    Returns {"model": model FLOPs (forward + the backward the update needs), "hardware": + the
    recompute forward of gradient checkpointing + a backward through the frozen vision tower if the
    graph enters it, "passes": per-pass detail}. MFU = model / (step time x peak FLOP/s).
    """
    passes_of_method = method_passes(method, schedule)
    if not isinstance(model, ModelSummary):
        dtype = {4: "float32", 2: "bfloat16"}[next(model.model.parameters()).element_size()]
        model = summarize_adapter(model, dtype=dtype)
    images_by_kind = images_by_kind or {}
    vision_backward = model.vision_backward(gradient_checkpointing)
    total_model = total_hw = 0.0
    passes = []
    for name, kinds, backwards in passes_of_method:
        f = {"forward": 0.0, "backward": 0.0, "recompute": 0.0, "vision_backward": 0.0}
        for kind in kinds:
            for seq in lengths_by_kind.get(kind, ()):
                one = _sample_flops(model, float(seq), float(images_by_kind.get(kind, 1)),
                                    gradient_checkpointing=gradient_checkpointing, vision_backward=vision_backward)
                for k in f:
                    f[k] += one[k] * (1 if k == "forward" else backwards)
        m = f["forward"] + f["backward"]
        hw = m + f["recompute"] + f["vision_backward"]
        passes.append({"pass": name, **f, "model": m, "hardware": hw})
        total_model += m
        total_hw += hw
    return {"model": total_model, "hardware": total_hw, "passes": passes}


# -------------------------------------------------------------------------------------- the plan

def ds_config_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "ds_configs"


def gpu_configs(directory: Path | None = None) -> list[ZeroSettings]:
    """The GPU configs of ds_configs/ (the CPU fp32 ones are for gloo ranks and tests)."""
    out = []
    for path in sorted((directory or ds_config_dir()).glob("*.json")):
        z = ZeroSettings.from_json(path)
        if not z.cpu_only:
            out.append(z)
    return out


def cpu_configs(directory: Path | None = None) -> list[str]:
    """The CPU-rank configs of ds_configs/ (not planned for GPUs)."""
    return [p.name for p in sorted((directory or ds_config_dir()).glob("*.json"))
            if ZeroSettings.from_json(p).cpu_only]


def recommend(fits: Mapping[str, bool]) -> str | None:
    """The preferred config among those that fit (CONFIG_PREFERENCE), else any that fits, else None."""
    for name in CONFIG_PREFERENCE:
        if fits.get(name):
            return name
    return next((n for n, ok in fits.items() if ok), None)


def caption_row(model: ModelSummary, step: StepShape) -> Row:
    """One caption as one packed sequence (every span of it, and its sent response): the unit of a
    packed micro-batch."""
    layout = caption_layout(step, model.prefix_tokens)
    pieces = tuple(iv for k in KINDS for iv in layout[k])
    return Row(max(hi for _, hi in pieces) if pieces else model.prefix_tokens + 1, pieces)


def flops_table(model: ModelSummary, step: StepShape) -> dict:
    """FT / EFUF / SARE (ZeRO's separate passes, and the one-process shared forward) FLOPs per step:
    packed and unpacked for caption data, per-kind samples otherwise."""
    variants = ({"per_kind": step} if step.data_format == "per_kind" else
                {"packed": dataclasses.replace(step, packing=True),
                 "unpacked": dataclasses.replace(step, packing=False)})
    out = {}
    for label, st in variants.items():
        out[label] = {
            "ft": plan_flops(model, dataclasses.replace(st, method="ft")),
            "efuf": plan_flops(model, dataclasses.replace(st, method="efuf")),
            "sare": plan_flops(model, dataclasses.replace(st, method="sare"), "separate"),
            "sare_shared": plan_flops(model, dataclasses.replace(st, method="sare"), "shared"),
        }
    return out


def plan_run(model: ModelSummary, step: StepShape, gpus: int, gpu_mem_gib: float,
             configs: Sequence[ZeroSettings] | None = None, recipe_ds_config: str = "") -> dict:
    """Everything the CLI prints, as one dict (JSON-able)."""
    if gpus < 1:
        raise PlanError(f"--gpus {gpus}: must be >= 1")
    step.check(model.prefix_tokens)
    configs_given = configs
    configs = list(configs) if configs is not None else gpu_configs()
    acts = {sch: step_activations(model, step, schedule=sch) for sch in SCHEDULES}
    acts_other = step_activations(model, step, gradient_checkpointing=not step.gradient_checkpointing)
    unit = caption_row(model, step)
    per_caption = {gc: pass_activations(model, 1, unit.tokens, labelled=unit.labelled_tokens, gradient_checkpointing=gc)
                   for gc in (False, True)}
    rows = {}
    for z in configs:
        r = rank_peak(model, step, z, gpus, acts[schedule_of(z)])
        r["fits"] = r["needed"] <= gpu_mem_gib * GiB
        rows[z.name] = r
    plain = None
    if gpus == 1:
        plain = rank_peak(model, step, dataclasses.replace(PLAIN, dtype=model.dtype), 1, acts["shared"])
        plain["fits"] = plain["needed"] <= gpu_mem_gib * GiB
    return {
        "model": {"source": model.source, "family": model.family, "dtype": model.dtype, "note": model.note,
                  "params": model.params, "trainable": model.trainable, "trainable_rule": model.trainable_rule,
                  "image_tokens": model.image_tokens, "image_tiles": model.image_tiles,
                  "prompt_tokens": model.prompt_tokens, "vocab": model.llm.vocab,
                  "vision_backward": model.vision_backward(step.gradient_checkpointing)},
        "step": dataclasses.asdict(step) | {"per_step": dict(step.per_step),
                                            "caption_tokens": step.caption_length(model.prefix_tokens),
                                            "passes": {sch: [(p["pass"], p["rows"], p["seq"], p["labelled"])
                                                             for p in acts[sch]["passes"]] for sch in SCHEDULES}},
        "gpus": gpus, "gpu_mem_gib": gpu_mem_gib,
        "activations_per_caption": {("checkpointing" if gc else "no_checkpointing"): a
                                    for gc, a in per_caption.items()},
        "activations": acts["separate"], "activations_shared": acts["shared"],
        "activations_other_checkpointing": acts_other,
        "configs": rows, "recommended": recommend({n: r["fits"] for n, r in rows.items()}),
        "plain": plain,
        "recipe_ds_config": Path(recipe_ds_config).name if recipe_ds_config else "",
        "cpu_configs": cpu_configs() if configs_given is None else [],
        "flops": flops_table(model, step),
        "assumptions": {"cuda_context_gib": CUDA_CONTEXT_GIB, "nccl_gib": NCCL_GIB if gpus > 1 else 0.0,
                        "fragmentation": FRAGMENTATION},
    }


# -------------------------------------------------------------------------------------- printing

def gib(x: float) -> str:
    return f"{x / GiB:.2f}"


def mib(x: float) -> str:
    return f"{x / 2 ** 20:.1f}"


def _tflop(x: float) -> str:
    return f"{x / 1e12:.1f}"


def describe_step(st: Mapping, m: Mapping) -> str:
    """One line (wrapped) of what a micro-batch holds."""
    gc = "on" if st["gradient_checkpointing"] else "off"
    if st["data_format"] == "per_kind":
        per = st["per_step"]
        return (f"{st['method'].upper()}, per-kind samples: {per.get('pos', 0)} pos + {per.get('neg', 0)} neg + "
                f"{per.get('sent', 0)} sent per micro-batch x {st['grad_accum_steps']} micro-batch(es), each its own "
                f"sequence (max_length {st['seq_len']}); gradient checkpointing {gc}")
    return (f"{st['method'].upper()}, {'packed' if st['packing'] else 'unpacked (one sequence per span)'}: "
            f"{st['captions_per_step']} caption(s) per micro-batch x {st['grad_accum_steps']} micro-batch(es); "
            f"a caption: {m['image_tokens']} image + {m['prompt_tokens']} prompt positions + {st['caption_tokens']} "
            f"caption tokens{' + EOS (a sent response)' if st['sent'] else ''}, {st['pos_spans']} pos + "
            f"{st['neg_spans']} neg spans of {st['span_tokens']} tokens, the last neg token at "
            f"{100 * st['neg_end']:g} % of the caption; max_length {st['seq_len']}; gradient checkpointing {gc}")


def _wrap(text: str, indent: str, width: int = 110) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width, initial_indent=indent, subsequent_indent=" " * (len(indent) + 2))


def _pass_lines(acts: dict, vocab: int) -> list[str]:
    lines = [f"  {'pass':<14}{'rows x tokens':>15}{'labelled':>10}{'backwards':>11}   "
             f"{'loss peak MiB (all positions)':>30}   activation peak GiB"]
    for ps in acts["passes"]:
        lines.append(f"  {ps['pass']:<14}{str(ps['rows']) + ' x ' + str(ps['seq']):>15}{ps['labelled']:>10}"
                     f"{ps['backwards']:>11}   {mib(ps['loss_peak']):>19} ({mib(ps['loss_peak_full_logits']):>8})"
                     f"   {gib(ps['peak']):>9} ({ps['phase']})")
    return lines


def format_plan(plan: dict) -> str:
    m, st = plan["model"], plan["step"]
    p, t = m["params"], m["trainable"]
    lines = [
        f"Memory and cost plan: {m['source']} ({m['dtype']}), {plan['gpus']} GPU(s) of {plan['gpu_mem_gib']:g} GiB",
        *([f"  model      {m['note']}"] if m["note"] else []),
        f"  parameters {p['total']:,} = vision tower {p['vision']:,} + projector {p['projector']:,} + "
        f"LLM {p['llm']:,}" + (f" + other {p['other']:,}" if p["other"] else ""),
        f"  trainable  {t['total']:,} ({m['trainable_rule']}: projector {t['projector']:,}"
        + (f", LLM {t['llm']:,}" if t["llm"] else "") + (f", vision {t['vision']:,}" if t["vision"] else "") + ")",
        *_wrap(describe_step(st, m), "  step       "),
        "",
    ]
    a0, a1 = plan["activations_per_caption"]["no_checkpointing"], plan["activations_per_caption"]["checkpointing"]
    lines += [
        f"One caption as one sequence ({a0['seq']} tokens, {a0['labelled']} labelled)   no checkpointing   "
        "checkpointing" + ("   (a sent sample of the per-kind format)" if st["data_format"] == "per_kind" else ""),
        f"  kept for the backward (GiB)                    {gib(a0['saved']):>16}   {gib(a1['saved']):>13}",
        f"  peak of its pass (GiB)                         {gib(a0['peak']):>16}   {gib(a1['peak']):>13}",
        f"  the loss: fp32 logits of the labelled positions, peak {mib(a0['loss_peak'])} MiB "
        f"(over all {a0['seq'] - 1} positions, as before logits_to_keep: {mib(a0['loss_peak_full_logits'])} MiB)",
        "",
    ]
    acts = plan["activations"]
    gc = "on" if acts["gradient_checkpointing"] else "off"
    lines.append(f"Passes of one micro-batch, separate passes (ZeRO-2, ZeRO-3 + offload; one after the other, each "
                 f"backward frees its activations), checkpointing {gc}:")
    lines += _pass_lines(acts, m["vocab"])
    lines.append(f"  -> the step's activation peak is the {acts['peak_pass']} pass: {gib(acts['peak'])} GiB")
    other = plan["activations_other_checkpointing"]
    lines.append(f"     (checkpointing {'on' if other['gradient_checkpointing'] else 'off'}: {gib(other['peak'])} GiB, "
                 f"{other['peak_pass']} pass)")
    shared = plan["activations_shared"]
    if len(shared["passes"]) != len(acts["passes"]) or st["method"] == "sare":
        lines.append("Shared forward (one process, ZeRO-3: one forward at theta whose graph serves two backwards):")
        lines += _pass_lines(shared, m["vocab"])
        lines.append(f"  -> peak: the {shared['peak_pass']} pass, {gib(shared['peak'])} GiB")
    if m["vision_backward"]:
        lines.append("  note: the backward enters the frozen vision tower (its output requires grad once gradient "
                     "checkpointing is on); counted above and in the hardware FLOPs")
    lines.append("")
    names = list(plan["configs"])
    lines.append("Per rank (GiB)                " + "".join(f"{n.replace('.json', ''):>22}" for n in names))
    rows = [("weights", "weights"), ("gathered weights (ZeRO-3)", "gathered"),
            ("fp32 master + AdamW", "master_and_optimizer"), ("gradients", "gradients"),
            ("DeepSpeed buckets", "buckets"), ("SARE direction buffer", "sare_direction"),
            ("SARE buffers (between passes)", "sare_extra")]
    for label, key in rows:
        lines.append(f"  {label:<28}" + "".join(f"{gib(plan['configs'][n]['state'][key]):>22}" for n in names))
    cpu = [plan["configs"][n]["state"]["cpu_optimizer"] for n in names]
    if any(cpu):
        lines.append(f"  {'(on the CPU: master + AdamW)':<28}" + "".join(f"{gib(c):>22}" for c in cpu))
    lines.append(f"  {'activations (peak pass)':<28}" + "".join(f"{gib(plan['configs'][n]['activations']):>22}"
                                                              for n in names))
    lines.append(f"  {'peak allocated':<28}" + "".join(f"{gib(plan['configs'][n]['allocated']):>22}" for n in names))
    lines.append(f"  {'needed (+10%, context, NCCL)':<28}" + "".join(f"{gib(plan['configs'][n]['needed']):>22}"
                                                                   for n in names))
    lines.append(f"  {'fits in ' + format(plan['gpu_mem_gib'], 'g') + ' GiB':<28}" +
                 "".join(f"{'yes' if plan['configs'][n]['fits'] else 'NO':>22}" for n in names))
    rec = plan["recommended"]
    none_fits = "none fits: more GPUs, a shorter data.max_length, fewer data.captions_per_step or a larger GPU"
    lines.append(f"  recommended: {'ds_configs/' + rec if rec else none_fits}")
    if plan.get("cpu_configs"):
        lines.append(f"  (not planned: {', '.join(plan['cpu_configs'])}, for CPU ranks)")
    chosen = plan.get("recipe_ds_config")
    if chosen:
        row = plan["configs"].get(chosen)
        verdict = ("not a GPU config here" if row is None else "fits" if row["fits"] else "does NOT fit")
        lines.append(f"  the recipe's distributed.ds_config: {chosen} ({verdict})")
    plain = plan.get("plain")
    if plain:
        lines.append(f"  one process without DeepSpeed (plain AdamW, states in {m['dtype']}, SARE's direction buffer "
                     f"{gib(plain['state']['sare_direction'])}): allocated {gib(plain['allocated'])}, needed "
                     f"{gib(plain['needed'])} GiB")
    lines.append("")
    flops = plan["flops"]
    labels = list(flops)
    lines.append("FLOPs per optimizer step per rank (TFLOP)" + "".join(f"{lab:>24}" for lab in labels))
    lines.append(f"{'':<41}" + "".join(f"{'model':>12}{'hardware':>12}" for _ in labels))
    names = (("ft", "FT"), ("efuf", "EFUF"), ("sare", "SARE, separate passes (ZeRO-2)"),
             ("sare_shared", "SARE, shared forward (ZeRO-3)"))
    for key, label in names:
        lines.append(f"  {label:<39}" + "".join(f"{_tflop(flops[lab][key]['model']):>12}"
                                                f"{_tflop(flops[lab][key]['hardware']):>12}" for lab in labels))
    lines.append(f"  {'tokens forwarded (SARE, separate)':<39}" + "".join(f"{flops[lab]['sare']['tokens']:>12,}{'':>12}"
                                                                     for lab in labels))
    for lab in labels:
        e = flops[lab]["efuf"]["model"]
        if e:
            lines.append(f"  {lab}: SARE / EFUF = {flops[lab]['sare']['model'] / e:.2f}x (separate passes), "
                         f"{flops[lab]['sare_shared']['model'] / e:.2f}x (shared forward), model FLOPs")
    if "unpacked" in flops:
        ratios = ", ".join(f"{label.split(',')[0] if key != 'sare_shared' else 'SARE shared forward'} "
                           f"{flops['unpacked'][key]['model'] / flops['packed'][key]['model']:.2f}x"
                           for key, label in names if flops["packed"][key]["model"])
        lines.append(f"  unpacked / packed (model FLOPs): {ratios}")
    return "\n".join(line.rstrip() for line in lines)


def table(rows_of_models: Sequence[tuple[str, ModelSummary, StepShape]], gpus: Sequence[int] = TABLE_GPUS,
          memory: Sequence[float] = TABLE_MEMORY_GIB,
          configs: Sequence[ZeroSettings] | None = None) -> tuple[str, list[dict]]:
    """THE TABLE of docs/memory_plan.md: per model x GPUs x GPU memory the recommended ds_config and the
    GiB a GPU needs with it; then what each config needs per rank (independent of the GPU's size); then
    each model's peak pass and its loss term (labelled positions vs every position, as before)."""
    configs = list(configs) if configs is not None else gpu_configs()
    head = "| model | tokens | " + " | ".join(f"{n} x {g:g} GiB" for g in memory for n in gpus) + " |"
    lines = [head, "|" + "---|" * (2 + len(gpus) * len(memory))]
    needed_lines = ["| model | ds_config | " + " | ".join(f"{n} GPU{'s' if n > 1 else ''}" for n in gpus) + " |",
                    "|" + "---|" * (2 + len(gpus))]
    pass_lines = ["| model | peak pass (separate passes) | rows x tokens | labelled K | loss peak, labelled (MiB) | "
                  "loss peak, all positions as before (MiB) | activation peak (GiB) |",
                  "|---|---|---|---|---|---|---|"]
    records = []
    for label, model, step in rows_of_models:
        acts = step_activations(model, step)
        rows = {n: {z.name: rank_peak(model, step, z, n, acts) for z in configs} for n in gpus}
        cells = []
        for g in memory:
            for n in gpus:
                fits = {k: r["needed"] <= g * GiB for k, r in rows[n].items()}
                rec = recommend(fits)
                if rec:
                    cells.append(f"{rec.replace('.json', '')} ({rows[n][rec]['needed'] / GiB:.0f})")
                else:
                    best = min(rows[n], key=lambda k: rows[n][k]["needed"])
                    cells.append(f"does not fit ({best.replace('.json', '')}: {rows[n][best]['needed'] / GiB:.0f})")
                records.append({"model": label, "source": model.source, "seq_len": step.seq_len, "gpus": n,
                                "gpu_mem_gib": g, "recommended": rec, "captions_per_step": step.captions_per_step,
                                "packing": step.packing,
                                "needed_gib": {k: r["needed"] / GiB for k, r in rows[n].items()}})
        lines.append(f"| {label} ({model.total_params / 1e9:.1f}B) | {step.seq_len} | " + " | ".join(cells) + " |")
        for z in configs:
            needed_lines.append(f"| {label} | {z.name.replace('.json', '')} | "
                                + " | ".join(f"{rows[n][z.name]['needed'] / GiB:.1f}" for n in gpus) + " |")
        worst = next(p for p in acts["passes"] if p["pass"] == acts["peak_pass"])
        pass_lines.append(f"| {label} | {worst['pass']} ({worst['phase']}) | {worst['rows']} x {worst['seq']} | "
                          f"{worst['labelled']} | {mib(worst['loss_peak'])} | {mib(worst['loss_peak_full_logits'])} | "
                          f"{gib(worst['peak'])} |")
    text = ("\n".join(lines) + "\n\nGiB a GPU needs per rank, by config:\n\n" + "\n".join(needed_lines)
            + "\n\nThe peak pass and its loss term (fp32 logits and their gradients):\n\n" + "\n".join(pass_lines))
    return text, records


# ------------------------------------------------------------------------ measuring (validation)

def measure_batch(adapter, lengths: Sequence[int], labelled: Sequence[int] | None = None, seed: int = 0):
    """A collated batch of the training loss path (`collate_captions`) with random tokens: one
    TokenizedCaption per entry of `lengths` (image placeholder expanded after BOS), its last
    `labelled[b]` tokens weighted (default: every token after the image), the weight spread over the
    three kinds (pos, neg, sent), so every kind's sum and both of SARE's shared-forward backwards
    see every labelled token. Returns (batch, the image's LLM positions)."""
    import torch
    from PIL import Image

    from sare_ds.data.tokenize import TokenizedCaption, collate_captions

    model = adapter.model
    image = adapter.image_inputs(Image.new("RGB", DEFAULT_IMAGE_SIZE, (90, 140, 200)))
    n_image = image.num_image_tokens
    expansion = torch.tensor(image.expansion if image.expansion is not None else [adapter.image_token_id] * n_image)
    labelled = list(labelled) if labelled is not None else [n - 1 - n_image for n in lengths]
    gen = torch.Generator().manual_seed(seed)
    vocab = model.get_output_embeddings().weight.shape[0]
    items = []
    for n, k in zip(lengths, labelled):
        if not 1 <= k <= n - 1 - n_image:
            raise PlanError(f"labelled={k}: a {n}-token sequence has {n - 1 - n_image} tokens after BOS and the image")
        ids = torch.randint(3, min(1000, vocab), (n,), generator=gen)
        ids[ids == adapter.image_token_id] = 3
        ids[1:1 + n_image] = expansion  # the family's expansion (markers such as <global-img> included)
        weights = torch.zeros(len(KINDS), n)
        weights[:, n - k:] = torch.rand(len(KINDS), k, generator=gen) + 0.1
        labels = torch.full((n,), -100, dtype=torch.long)
        labels[n - k:] = ids[n - k:]
        extra = {k: torch.tensor(v) for k, v in adapter.token_tensors(ids.tolist(), n - k).items()}
        items.append(TokenizedCaption(ids, labels, weights, torch.ones(len(KINDS)), image.tensors,
                                      token_tensors=extra))
    pad = getattr(model.config, "pad_token_id", None) or 0
    return collate_captions(items, pad, KINDS), n_image


BACKWARD_MARK = "sare_ds.plan::backward"


def measure_pass(adapter, lengths: Sequence[int], *, labelled: Sequence[int] | None = None,
                 gradient_checkpointing: bool = False, backwards: int = 1, seed: int = 0) -> dict:
    """Run ONE forward + backward of a batch on the CPU with real tensors, through the training loss
    path (sare_ds/train/step.py: `collate_captions`, `model(..., logits_to_keep=keep)`, `span_sums`),
    and measure it.

    `adapter`: a small model (built with real weights, its trainable set chosen, training mode).
    `lengths`: each sequence's length (the batch pads to the longest with an attention mask);
    `labelled`: each sequence's labelled tokens, at its end (`measure_batch`).
    `backwards`: 1, or 2 for SARE's shared forward at theta: the capability backward (pos + sent)
    with retain_graph, then the direction backward (neg) through the same graph.
    Returns bytes: `saved` (autograd's saved tensors when the forward ends, deduplicated by storage,
    parameters excluded), `saved_by_part` (llm_layers / llm_shared / projector / vision / logits,
    attributed by the module that saved them; `logits`: the LM head's gather and the loss), and `peak`
    (the CPU allocator's peak during forward + backward(s) above what was allocated before, from
    torch.profiler's allocation events); `labelled`: K, the kept positions (the union over the batch).
    """
    import gc
    import weakref

    import torch
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile, record_function

    from sare_ds.train.losses import span_sums

    if backwards not in (1, 2):
        raise PlanError(f"backwards={backwards}: 1 (one loss) or 2 (SARE's shared forward)")
    model = adapter.model
    batch, n_image = measure_batch(adapter, lengths, labelled, seed)
    dtype = next(model.parameters()).dtype
    inputs = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in adapter.forward_inputs(batch).items()}
    keep, targets, weights = batch["keep"], batch["targets"], batch["weights"]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    stack = ["logits"]  # outside every module: the LM head's gather, the loss (its fp32 log-softmax)
    hooks = []
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: the names of the model
    for name, module in base.named_modules():
        part = ("projector" if any(re.search(p, name + ".") for p in adapter.mapping_patterns)
                else "vision" if _is_vision(name)
                else "llm_layers" if re.search(r"layers\.\d+", name) and _is_llm(name)
                else "llm_shared" if _is_llm(name) or name.endswith("model") else None)
        if part is None:
            continue
        hooks.append(module.register_forward_pre_hook(lambda m, a, part=part: stack.append(part)))
        hooks.append(module.register_forward_hook(lambda m, a, o: stack.pop() and None))
    saved: dict[int, tuple[int, list]] = {}  # storage address -> (bytes, [(weak ref, part that saved it)])

    def pack(t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and storage.nbytes():
            # Weak references: a node that is dropped before the forward ends (e.g. the input saver of a
            # checkpointed layer that nothing differentiates) frees what it saved; only the living count,
            # under the part of a living saver. An address whose tensors all died may be reused by a new
            # storage: it starts afresh.
            entry = saved.get(ptr)
            if entry is None or not any(r() is not None for r, _ in entry[1]):
                entry = saved[ptr] = (storage.nbytes(), [])
            entry[1].append((weakref.ref(t), stack[-1]))
        return t

    was_on = _set_checkpointing(base, gradient_checkpointing)
    model.train()
    # One thread: parallel kernels' per-thread scratch buffers stay out of the peak, the measurement
    # repeats exactly, and a busy machine does not slow an oversubscribed OpenMP pool ten-fold.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                logits = model(**inputs, logits_to_keep=keep).logits
                sums = span_sums(logits, targets, weights)
            del logits
            gc.collect()
            alive = {}
            for ptr, (n, refs) in saved.items():
                living = [part for r, part in refs if r() is not None]
                if living:
                    alive[ptr] = (n, living[-1])  # the latest saver keeps it
            saved_bytes = sum(n for n, _ in alive.values())
            with record_function(BACKWARD_MARK):
                if backwards == 1:
                    sums.sum().backward()
                else:
                    (sums[0] + sums[2]).backward(retain_graph=True)   # capability: pos + sent, into .grad
                    trainable = [p for p in model.parameters() if p.requires_grad]
                    torch.autograd.grad(-sums[1], trainable, allow_unused=True)  # the ascent direction
    finally:
        torch.set_num_threads(threads)
        for h in hooks:
            h.remove()
        _set_checkpointing(base, was_on)
    model.zero_grad(set_to_none=True)
    events = []

    marks = []

    def walk(nodes, path):
        for node in nodes:
            if node.tag == _EventType.Allocation:
                events.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.total_allocated,
                               path))
                continue
            if node.name == BACKWARD_MARK:
                marks.append(node.start_time_ns)
            walk(node.children, path + (node.name,))

    walk(prof.profiler.kineto_results.experimental_event_tree(), ())
    events.sort(key=lambda e: e[0])
    base = events[0][2] - events[0][1] if events else 0
    start = min(marks) if marks else float("inf")
    top = max(events, key=lambda e: e[2]) if events else (0, 0, base, ())
    forward = max((e[2] for e in events if e[0] < start), default=base) - base
    # Where the peak is: the innermost backward node, else the operator (in the forward, or outside a node).
    where = next((n.split(": ")[-1] for n in reversed(top[3]) if "Backward" in n),
                 next((n for n in reversed(top[3]) if n.startswith("aten::")), ""))
    if top[0] < start:
        where = f"forward ({where})"
    by_part: dict[str, int] = {}
    for n, part in alive.values():
        by_part[part] = by_part.get(part, 0) + n
    return {"saved": saved_bytes, "saved_by_part": by_part, "peak": top[2] - base, "peak_at": where,
            "peak_forward": forward,
            "batch": len(lengths), "seq": max(lengths), "labelled": int(keep.numel()), "image_tokens": n_image}


# ------------------------------------------------------------------------------ recipes, CLI help

RECIPES = {  # table row -> the recipe that describes its run (written by the recipes' owner)
    "preset:llava-1.5-7b": "launch/configs/llava15_7b_sare.yaml",
    "preset:llava-1.5-13b": "launch/configs/llava15_13b_sare.yaml",
    "preset:llava-next-mistral-7b": "launch/configs/llava_next_mistral7b_sare.yaml",
    "preset:qwen2.5-vl-7b": "launch/configs/qwen25vl_7b_sare.yaml",
    "preset:llava-onevision-7b": "launch/configs/onevision_7b_sare.yaml",
    "preset:idefics3-8b": "launch/configs/idefics3_8b_sare.yaml",
    "preset:internvl3-8b": "launch/configs/internvl3_8b_sare.yaml",
    "preset:paligemma2-10b-448": "launch/configs/paligemma2_10b_sare.yaml",
}


def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def preset_for_hub_id(name: str) -> str | None:
    """`preset:<name>` whose shapes reproduce hub id `name` (e.g. llava-hf/llava-1.5-7b-hf), if any."""
    from sare_ds.models import presets

    for preset in presets.PRESETS.values():
        if preset.source == name:
            return presets.PREFIX + preset.name
    return None


def load_recipe(path: str | Path, overrides: Sequence[str] = ()):
    """(TrainConfig, the recipe's raw YAML) of a training recipe, read as training would, except that
    its ds_config need not exist relative to the working directory (the plan compares them all)."""
    import yaml

    from sare_ds.config import load_config

    path = Path(path)
    if not path.is_file():
        raise PlanError(f"--config {path}: no such file; pass a training recipe (launch/configs/*.yaml)")
    raw = yaml.safe_load(path.read_text()) or {}
    cfg = load_config(path, ["distributed.ds_config=", *overrides])
    cfg.distributed.ds_config = str((raw.get("distributed") or {}).get("ds_config", ""))
    return cfg, raw


def step_from_config(cfg, raw: Mapping | None = None, data_format: str = "captions") -> StepShape:
    """The StepShape of a training config: data.captions_per_step, data.packing, data.max_length,
    optim.grad_accum_steps, method.name, model.gradient_checkpointing, optim.optimizer; with
    `data_format="per_kind"` (shards of the format before caption records) data.*_per_step instead."""
    d = cfg.data
    return StepShape(method=cfg.method.name, seq_len=d.max_length,
                     captions_per_step=int(d.captions_per_step), packing=bool(d.packing),
                     data_format=data_format,
                     per_step={"pos": d.pos_per_step, "neg": d.neg_per_step, "sent": d.sent_per_step},
                     grad_accum_steps=cfg.optim.grad_accum_steps,
                     gradient_checkpointing=bool(cfg.model.gradient_checkpointing), optimizer=cfg.optim.optimizer)


def table_rows(models: Sequence[tuple[str, str, int]] = TABLE_MODELS, root: Path | None = None):
    """(label, ModelSummary, StepShape, where the settings came from) for each row of THE TABLE.

    A row takes its recipe's settings when the recipe states them (data.max_length and
    model.gradient_checkpointing written in the YAML; data.captions_per_step and data.packing from
    the recipe or the config's defaults); otherwise the documented ones: SARE, 4 packed captions per
    micro-batch, 1 micro-batch, checkpointing on, the row's length.
    """
    from sare_ds.config import ModelConfig

    root = root or repo_root()
    out = []
    for label, source, seq in models:
        recipe = root / RECIPES.get(source.split(",")[0], RECIPES["preset:llava-1.5-13b"])
        step, origin = StepShape(method="sare", seq_len=seq), "defaults (recipe absent or silent)"
        model_cfg = ModelConfig(name_or_path=source, dtype="bfloat16", trainable="mapping")
        if recipe.is_file():
            cfg, raw = load_recipe(recipe)
            stated = ("max_length" in (raw.get("data") or {}) and
                      "gradient_checkpointing" in (raw.get("model") or {}))
            if stated:
                step = step_from_config(cfg)
                if "," in source:  # a width/depth override of another preset: keep its documented length
                    step = dataclasses.replace(step, seq_len=seq)
                origin = str(recipe.relative_to(root))
                model_cfg = dataclasses.replace(cfg.model, name_or_path=source)
        out.append((label, summarize(model_cfg), step, origin))
    return out
