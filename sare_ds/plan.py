"""Memory and cost plan of an FT / EFUF / SARE run, from the model's shapes alone (no weights).

    python launch/plan.py --model preset:llava-1.5-7b --gpus 8 --gpu-mem 80     # the CLI (docs/memory_plan.md)

    from sare_ds.plan import summarize, StepShape, plan_run, step_flops, uniform_lengths
    model = summarize(ModelConfig(name_or_path="preset:llava-1.5-7b", dtype="bfloat16"))  # meta build, < 1 s
    plan = plan_run(model, StepShape(method="sare", seq_len=1024), gpus=8, gpu_mem_gib=80)
    flops = step_flops(model, "sare", uniform_lengths({"pos": 1, "neg": 1, "sent": 1}, 1024),
                       gradient_checkpointing=True)

Everything here is arithmetic on a `ModelSummary`: parameter counts by group (vision tower,
projector, LLM) and the trainable set, read off the model built on the meta device through the
same `load_mllm` / `select_trainable` as training, plus the layer shapes. The formulas, each a
small function below:

- per-rank state memory under ZeRO-2 / ZeRO-3 / plain training (`state_memory`), read against the
  DeepSpeed JSON (bucket sizes, live-parameter limits, offload);
- activation memory of one forward + backward pass (`pass_activations`): the tensors autograd saves
  in a Llama/Mistral decoder layer with SDPA attention when the LLM is frozen (gradients flow to
  the layer inputs only, so a frozen Linear keeps no input), the checkpointed layer inputs with
  gradient checkpointing, the projector, the fp32 log-softmax of the loss (vocab x seq), and the
  transient peak of the pass (the loss backward or a recomputed layer); validated against measured
  autograd-saved bytes and CPU allocator peaks of small models (`measure_pass`, tests/test_plan.py);
- FLOPs of one optimizer step (`step_flops`): model FLOPs (what the algorithm needs) and hardware
  FLOPs (plus the recompute forward of gradient checkpointing and a backward through the frozen
  vision tower if the graph enters it).

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
# The sample groups each method forwards and backwards per micro-batch, in the order the step runs them
# (sare_ds/train/step.py): SARE's neg batch twice (at theta and at theta + eps*), then pos + sent.
METHOD_PASSES = {
    "ft": (("capability", ("pos", "sent")),),
    "efuf": (("efuf", ("pos", "neg", "sent")),),
    "sare": (("neg_at_theta", ("neg",)), ("neg_at_eps", ("neg",)), ("capability", ("pos", "sent"))),
}
# Default sequence lengths when no recipe gives data.max_length (the recipes' values).
DEFAULT_SEQ_LEN = {"llava": 1024, "llava_next": 3200}
DEFAULT_IMAGE_SIZE = (640, 480)  # a COCO-like image: 5 AnyRes tiles, 2,340 image tokens on LLaVA-NeXT

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
    tokens: int                # positions per tile, CLS included (577 for CLIP-L/14 at 336 px)
    feature_layer: int         # the hidden state the projector reads (-2: the last layer's output is unused)
    layer_linear_params: int   # weights of the Linear layers of ONE encoder layer
    patch_embed_params: int

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
    lora_targets: tuple = ()           # module suffixes with LoRA (trainable=mapping+lora)
    lora_rank: int = 0
    lora_dtype_bytes: int = 0          # peft keeps the adapters in fp32 on a bf16 model
    vision_backward_with_gc: bool = False   # the backward enters the frozen vision tower once checkpointing is on
    vision_backward_without_gc: bool = False
    persistent_params: int = 0         # ZeRO-3 persistent parameters (numel <= threshold), kept whole on every rank
    param_numels: tuple = ()           # every parameter's numel (persistence under other thresholds)
    largest_module_params: int = 0     # the largest leaf module (ZeRO-3 gathers a module's parameters at once)
    llm_layer_numels: tuple = ()       # the parameter numels of ONE decoder layer
    note: str = ""

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


def _group(name: str, mapping_patterns) -> str:
    if any(re.search(p, name) for p in mapping_patterns):
        return "projector"
    if "vision_tower" in name:
        return "vision"
    if "language_model" in name or "lm_head" in name:
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


def _find(model, suffix: str):
    for name, module in model.named_modules():
        if name.endswith(suffix):
            return module
    return None


def _linear_numel(module) -> int:
    import torch

    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


def _shapes(model, config) -> tuple[LLMShape, VisionShape, tuple]:
    import torch

    tc, vc = config.text_config, config.vision_config
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    llm = _find(model, "language_model")
    vision = _find(model, "vision_tower")
    projector = _find(model, "multi_modal_projector")
    lm_head = _find(model, "lm_head")
    decoder_layers = [m for n, m in llm.named_modules() if re.search(r"layers\.\d+$", n)]
    encoder_layers = [m for n, m in vision.named_modules() if re.search(r"layers\.\d+$", n)]
    conv = next((m for m in vision.modules() if isinstance(m, torch.nn.Conv2d)), None)
    lm_head_w = lm_head.weight if hasattr(lm_head, "weight") else lm_head.base_layer.weight
    llm_shape = LLMShape(tc.hidden_size, tc.intermediate_size, tc.num_hidden_layers, tc.num_attention_heads,
                         getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads, head_dim,
                         tc.vocab_size, _linear_numel(decoder_layers[0]), lm_head_w.numel())
    feature_layer = config.vision_feature_layer
    if not isinstance(feature_layer, int):
        feature_layer = max(feature_layer)  # several layers concatenated: the deepest decides the backward
    tokens = (vc.image_size // vc.patch_size) ** 2 + 1
    vision_shape = VisionShape(vc.hidden_size, vc.intermediate_size, vc.num_hidden_layers, vc.num_attention_heads,
                               tokens, feature_layer, _linear_numel(encoder_layers[0]),
                               conv.weight.numel() if conv is not None else 0)
    linears = tuple(m.weight.numel() for m in projector.modules() if isinstance(m, torch.nn.Linear))
    return llm_shape, vision_shape, linears


def _image_counts(adapter, image_size: tuple[int, int]) -> tuple[int, int]:
    """(LLM positions, vision-tower tiles) of one image, from the model's own processor."""
    vc = adapter.model.config.vision_config
    per_tile = (vc.image_size // vc.patch_size) ** 2
    if adapter.processor is None:
        return per_tile, 1
    from PIL import Image

    inputs = adapter.image_inputs(Image.new("RGB", tuple(image_size), (128, 128, 128)))
    pixels = inputs.tensors["pixel_values"]
    tiles = pixels.shape[1] if pixels.dim() == 5 else 1
    return int(inputs.num_image_tokens), int(tiles)


def _vision_graph_requires_grad(vision_tower, config, dtype) -> bool:
    """Does the vision tower's output require grad (so the backward enters it)? One forward of one
    tile, on the meta device for a meta model (no memory, ~0.2 s for CLIP-L)."""
    import torch

    vc = config.vision_config
    device = next(vision_tower.parameters()).device
    pixels = torch.zeros(1, getattr(vc, "num_channels", 3), vc.image_size, vc.image_size, device=device, dtype=dtype)
    layer = config.vision_feature_layer if isinstance(config.vision_feature_layer, int) else -1
    try:
        with torch.enable_grad():
            out = vision_tower(pixel_values=pixels, output_hidden_states=True)
        return bool(out.hidden_states[layer].requires_grad)
    except Exception:  # noqa: BLE001 - a tower that cannot run here: decide from its parameters
        return any(p.requires_grad for p in vision_tower.parameters())


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
    checkpointing off: it is switched on here, once, to see what it does to the graph)."""
    from sare_ds.models import DTYPES

    model = adapter.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    config = base.config
    params, trainable = count_parameters(model, adapter.mapping_patterns)
    llm, vision, projector_linears = _shapes(model, config)
    size = tuple(image_size or DEFAULT_IMAGE_SIZE)
    image_tokens, tiles = image_counts or _image_counts(adapter, size)
    vision_tower = _find(model, "vision_tower")
    torch_dtype = DTYPES[dtype]
    without_gc = _vision_graph_requires_grad(vision_tower, config, torch_dtype)
    # Gradient checkpointing as training switches it on (sare_ds.models.enable_gradient_checkpointing):
    # whatever it does to the graph (e.g. transformers' input-require-grads hooks) is seen here.
    was_on = _set_checkpointing(base, True)
    with_gc = _vision_graph_requires_grad(vision_tower, config, torch_dtype)
    _set_checkpointing(base, was_on)
    numels = tuple(p.numel() for p in model.parameters())
    lora_bytes = next((p.element_size() for n, p in model.named_parameters() if "lora_A" in n), 0)
    llm_module = _find(model, "language_model")
    first_layer = next(m for n, m in llm_module.named_modules() if re.search(r"layers\.\d+$", n))
    layer_numels = tuple(p.numel() for p in first_layer.parameters())
    leaves = [sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()]
    name = source or adapter.source
    return ModelSummary(
        source=name, family=adapter.family, dtype=dtype, params=params, trainable=trainable,
        trainable_rule=trainable_rule, llm=llm, vision=vision, projector_linears=projector_linears,
        image_tokens=image_tokens, image_tiles=tiles, image_size=size,
        lora_targets=tuple(lora_targets), lora_rank=lora_rank, lora_dtype_bytes=lora_bytes,
        vision_backward_with_gc=with_gc, vision_backward_without_gc=without_gc,
        persistent_params=sum(n for n in numels if n <= persistence_threshold), param_numels=numels,
        largest_module_params=max(leaves), llm_layer_numels=layer_numels, note=_preset_note(name))


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


# ------------------------------------------------------------------------------------- the step

@dataclass(frozen=True)
class StepShape:
    """How one optimizer step is composed (the recipe's data.* / optim.* / method.name)."""

    method: str = "sare"
    seq_len: int = 1024                 # data.max_length: every sample assumed this long (the worst case)
    per_step: Mapping = field(default_factory=lambda: {"pos": 1, "neg": 1, "sent": 1})  # per micro-batch
    grad_accum_steps: int = 1
    gradient_checkpointing: bool = True
    optimizer: str = "adamw"

    def counts(self) -> dict[str, int]:
        """Samples of each kind in one micro-batch; FT never draws neg samples (data/steps.py)."""
        return {k: (0 if self.method == "ft" and k == "neg" else int(self.per_step.get(k, 0))) for k in KINDS}

    def passes(self) -> list[tuple[str, int]]:
        """(pass name, samples in its batch) of one micro-batch, in execution order."""
        counts = self.counts()
        out = []
        for name, kinds in METHOD_PASSES[self.method]:
            n = sum(counts[k] for k in kinds)
            if n:
                out.append((name, n))
        return out


def uniform_lengths(per_step: Mapping[str, int], seq_len: float, grad_accum_steps: int = 1,
                    method: str | None = None) -> dict[str, list[float]]:
    """Sequence lengths by kind of one step's samples on one rank, all `seq_len` long."""
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


def projector_saved_bytes(model: ModelSummary, images: int, dtype_bytes: int, vision_backward: bool) -> int:
    """The projector's Linear inputs (its weights train) and its activation's input, per vision tile.

    The first Linear keeps the selected vision hidden state (a view of the tower's [tiles, 577, vh]
    output); the GELU keeps its input and the second Linear its input (s*h per image feature each).
    With a backward through the tower that hidden state is already kept as a checkpointed input.
    """
    v, h, s = model.vision, model.llm.hidden, dtype_bytes
    tiles = images * model.image_tiles
    features = v.tokens - 1
    if tiles > 1:
        # [tiles, 577, vh][:, 1:] is not contiguous: the Linear's matmul keeps a contiguous copy.
        first = tiles * s * features * v.hidden
    else:
        first = 0 if vision_backward else s * v.tokens * v.hidden
    return first + tiles * 2 * s * features * h


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


def logits_saved_bytes(llm: LLMShape, batch: int, seq: int) -> int:
    """The loss's fp32 log-softmax over the vocabulary, [B, T-1, V] (+ int64 targets, fp32 mask)."""
    return batch * (seq - 1) * (4 * llm.vocab + 8 + 4)


def pass_activations(model: ModelSummary, batch: int, seq: int, *, gradient_checkpointing: bool,
                     masked: bool | None = None, dtype_bytes: int | None = None) -> dict:
    """Activation memory of one forward + backward over `batch` samples padded to `seq` tokens.

    Returns bytes: `saved` (what autograd keeps when the forward ends), `peak` (the most the pass
    holds at once beyond the static memory) and `phase` (where that peak is), with the parts.

    Peak phases considered:
      loss backward   everything saved + the loss's gradient [B, T-1, V] in fp32 and the log-softmax
                      gradient (8 bytes per vocab entry beyond the saved 4);
      layer backward  (checkpointing) the checkpointed inputs + one recomputed layer's saved set + its
                      transient MLP gradients (3 [B, T, i] tensors: into down_proj, into the gate's
                      activation, into up_proj) + the incoming [B, T, h] gradient + the bool [B, 1, T, T]
                      mask the checkpoints hold; the final norm's saved input is freed by then;
      vision forward  the tower's hidden states (all layers' outputs are returned) before the LLM runs.
    `masked`: the batch carries an attention mask (padding); default: batch > 1.
    """
    s = dtype_bytes or model.dtype_bytes
    llm, v = model.llm, model.vision
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
        "logits": logits_saved_bytes(llm, batch, seq),
    }
    saved = sum(parts.values())
    held = rotary_bytes(llm, seq, s) if gradient_checkpointing else 0  # cos/sin, held by the checkpoints
    loss_phase = saved + held + batch * (seq - 1) * 8 * llm.vocab
    phases = {"loss backward": loss_phase}
    if gradient_checkpointing:
        # The checkpoints hold the layers' arguments, the bool [B, 1, T, T] mask of a padded batch too.
        mask_alive = (batch * seq * seq if masked else 0) + rotary_bytes(llm, seq, s)
        final_norm = batch * seq * (4 * llm.hidden + 4)
        phases["layer backward"] = (saved - parts["logits"] - final_norm + layer + mask_alive
                                    + s * batch * seq * (3 * llm.intermediate + llm.hidden))
    tiles = batch * model.image_tiles
    phases["vision forward"] = tiles * s * v.tokens * ((v.layers + 1) * v.hidden + 3 * v.intermediate)
    phase = max(phases, key=phases.get)
    return {"saved": saved, "peak": phases[phase], "phase": phase, "parts": parts, "phases": phases,
            "per_layer": layer}


def step_activations(model: ModelSummary, step: StepShape, *, gradient_checkpointing: bool | None = None) -> dict:
    """Peak activation memory of an optimizer step: the passes run one after the other and each
    backward frees its activations, so the step's peak is the largest single pass."""
    gc = step.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
    passes = []
    for name, n in step.passes():
        a = pass_activations(model, n, step.seq_len, gradient_checkpointing=gc)
        passes.append({"pass": name, "samples": n, **a})
    worst = max(passes, key=lambda p: p["peak"])
    return {"passes": passes, "peak": worst["peak"], "peak_pass": worst["pass"], "gradient_checkpointing": gc}


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

        stage = int(z.get("stage", 0))
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
            cpu_only=cpu_only, grad_accum_dtype=ds.get("data_types", {}).get("grad_accum_dtype"))


PLAIN = ZeroSettings(name="plain (no DeepSpeed)", stage=0, dtype="bfloat16")


def state_memory(model: ModelSummary, zero: ZeroSettings, world: int, optimizer: str = "adamw") -> dict:
    """Per-rank bytes of everything that lives through the step (not the activations).

    weights       model dtype: replicated (ZeRO-2, plain) or a 1/world partition + the persistent
                  parameters whole (ZeRO-3)
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
                  one fp32 flat buffer of all trainable elements to assemble theta + eps*; plain
                  none (theta is kept in the dead gradient buffer). Transient: it exists between
                  the passes, when the activations are freed.
    """
    s = 4 if zero.dtype == "float32" else model.dtype_bytes
    acc = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2}.get(zero.grad_accum_dtype or "", s)
    total, trainable = model.total_params, model.trainable_params
    part = math.ceil(trainable / world)
    states = 2 if optimizer == "adamw" else 0
    out = {"weights": 0.0, "gathered": 0.0, "master_and_optimizer": 0.0, "gradients": 0.0, "buckets": 0.0,
           "sare_extra": 0.0, "cpu_optimizer": 0.0}
    if zero.stage == 0:
        out["weights"] = total * s
        out["gradients"] = trainable * s
        out["master_and_optimizer"] = states * trainable * s
        return out
    if zero.stage == 3:
        persistent = sum(n for n in model.param_numels if n <= zero.persistence_threshold) \
            if model.param_numels else model.persistent_params
        out["weights"] = math.ceil(total / world) * s + persistent * s
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


def rank_peak(model: ModelSummary, step: StepShape, zero: ZeroSettings, world: int,
              activations: dict | None = None) -> dict:
    """Peak allocated bytes per rank (what torch.cuda.max_memory_allocated would say) and the total
    the GPU must have (+ fragmentation margin, CUDA context, NCCL)."""
    state = state_memory(model, zero, world, step.optimizer)
    acts = activations or step_activations(model, step)
    static = static_bytes(state)
    # SARE's perturb/restore buffers exist between passes, when no activation is alive.
    extra = state["sare_extra"] if step.method == "sare" else 0.0
    allocated = static + max(acts["peak"], extra)
    needed = allocated * (1 + FRAGMENTATION) + overhead_bytes(world)
    return {"state": state, "static": static, "activations": acts["peak"], "peak_pass": acts["peak_pass"],
            "allocated": allocated, "needed": needed}


# ------------------------------------------------------------------------------------- FLOPs

def _sample_flops(model: ModelSummary, seq: float, images: float, *, gradient_checkpointing: bool,
                  vision_backward: bool) -> dict:
    """FLOPs of one sample's forward and backward (frozen LLM and tower, trainable projector/LoRA)."""
    llm, v = model.llm, model.vision
    tiles = images * model.image_tiles
    lora = _lora_params_per_layer(model)
    base_layer_linear = llm.layer_linear_params - lora
    attention_fwd = 4 * seq * seq * llm.heads * llm.head_dim * llm.layers          # QK^T and PV, full T x T
    layers_fwd = 2 * seq * llm.layer_linear_params * llm.layers + attention_fwd
    head_fwd = 2 * seq * llm.lm_head_params
    vision_layer_fwd = 2 * v.tokens * v.layer_linear_params + 4 * v.tokens * v.tokens * v.hidden
    vision_fwd = tiles * (v.layers * vision_layer_fwd + 2 * (v.tokens - 1) * v.patch_embed_params)
    features = tiles * (v.tokens - 1)
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


def step_flops(model, method: str, lengths_by_kind: Mapping[str, Sequence[float]],
               images_by_kind: Mapping[str, float] | None = None, gradient_checkpointing: bool = False) -> dict:
    """FLOPs of one optimizer step on one rank.

    model            a ModelSummary (`summarize(model_cfg)`), or an MLLMAdapter whose trainable set is chosen
    method           ft | efuf | sare
    lengths_by_kind  kind -> the sequence lengths (image positions included) of the step's samples of that
                     kind on this rank, over all micro-batches; `uniform_lengths` builds them
    images_by_kind   kind -> images per sample (default 1)
    Per step: FT forwards and backwards the pos + sent samples; EFUF all three kinds once; SARE the
    neg samples twice (at theta and theta + eps*) and pos + sent once.

    Returns {"model": model FLOPs (forward + the backward the update needs), "hardware": + the
    recompute forward of gradient checkpointing + a backward through the frozen vision tower if the
    graph enters it, "passes": per-pass detail}. MFU = model / (step time x peak FLOP/s).
    """
    if method not in METHOD_PASSES:
        raise PlanError(f"method {method!r}: unknown; use ft, efuf or sare")
    if not isinstance(model, ModelSummary):
        dtype = {4: "float32", 2: "bfloat16"}[next(model.model.parameters()).element_size()]
        model = summarize_adapter(model, dtype=dtype)
    images_by_kind = images_by_kind or {}
    vision_backward = model.vision_backward(gradient_checkpointing)
    total_model = total_hw = 0.0
    passes = []
    for name, kinds in METHOD_PASSES[method]:
        f = {"forward": 0.0, "backward": 0.0, "recompute": 0.0, "vision_backward": 0.0}
        for kind in kinds:
            if method == "ft" and kind == "neg":
                continue
            for seq in lengths_by_kind.get(kind, ()):
                one = _sample_flops(model, float(seq), float(images_by_kind.get(kind, 1)),
                                    gradient_checkpointing=gradient_checkpointing, vision_backward=vision_backward)
                for k in f:
                    f[k] += one[k]
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


def plan_run(model: ModelSummary, step: StepShape, gpus: int, gpu_mem_gib: float,
             configs: Sequence[ZeroSettings] | None = None, recipe_ds_config: str = "") -> dict:
    """Everything the CLI prints, as one dict (JSON-able)."""
    if gpus < 1:
        raise PlanError(f"--gpus {gpus}: must be >= 1")
    if step.seq_len <= model.image_tokens:
        raise PlanError(f"sequence length {step.seq_len} <= the {model.image_tokens} image positions of one image; "
                        "fix: raise data.max_length / --seq-len")
    configs_given = configs
    configs = list(configs) if configs is not None else gpu_configs()
    acts = step_activations(model, step)
    acts_other = step_activations(model, step, gradient_checkpointing=not step.gradient_checkpointing)
    per_sample = {gc: pass_activations(model, 1, step.seq_len, gradient_checkpointing=gc) for gc in (False, True)}
    rows = {}
    for z in configs:
        r = rank_peak(model, step, z, gpus, acts)
        r["fits"] = r["needed"] <= gpu_mem_gib * GiB
        rows[z.name] = r
    lengths = uniform_lengths(step.per_step, step.seq_len, step.grad_accum_steps)
    flops = {m: step_flops(model, m, lengths, gradient_checkpointing=step.gradient_checkpointing)
             for m in ("ft", "efuf", "sare")}
    return {
        "model": {"source": model.source, "family": model.family, "dtype": model.dtype, "note": model.note,
                  "params": model.params, "trainable": model.trainable, "trainable_rule": model.trainable_rule,
                  "image_tokens": model.image_tokens, "image_tiles": model.image_tiles,
                  "vision_backward": model.vision_backward(step.gradient_checkpointing)},
        "step": dataclasses.asdict(step) | {"per_step": dict(step.per_step), "passes": step.passes()},
        "gpus": gpus, "gpu_mem_gib": gpu_mem_gib,
        "activations_per_sample": {("checkpointing" if gc else "no_checkpointing"): a for gc, a in per_sample.items()},
        "activations": acts, "activations_other_checkpointing": acts_other,
        "configs": rows, "recommended": recommend({n: r["fits"] for n, r in rows.items()}),
        "recipe_ds_config": Path(recipe_ds_config).name if recipe_ds_config else "",
        "cpu_configs": cpu_configs() if configs_given is None else [],
        "flops": flops,
        "assumptions": {"cuda_context_gib": CUDA_CONTEXT_GIB, "nccl_gib": NCCL_GIB if gpus > 1 else 0.0,
                        "fragmentation": FRAGMENTATION},
    }


# -------------------------------------------------------------------------------------- printing

def gib(x: float) -> str:
    return f"{x / GiB:.2f}"


def _tflop(x: float) -> str:
    return f"{x / 1e12:.1f}"


def format_plan(plan: dict) -> str:
    m, st = plan["model"], plan["step"]
    p, t = m["params"], m["trainable"]
    per = st["per_step"]
    lines = [
        f"Memory and cost plan: {m['source']} ({m['dtype']}), {plan['gpus']} GPU(s) of {plan['gpu_mem_gib']:g} GiB",
        *([f"  model      {m['note']}"] if m["note"] else []),
        f"  parameters {p['total']:,} = vision tower {p['vision']:,} + projector {p['projector']:,} + "
        f"LLM {p['llm']:,}" + (f" + other {p['other']:,}" if p["other"] else ""),
        f"  trainable  {t['total']:,} ({m['trainable_rule']}: projector {t['projector']:,}"
        + (f", LLM {t['llm']:,}" if t["llm"] else "") + (f", vision {t['vision']:,}" if t["vision"] else "") + ")",
        f"  step       {st['method'].upper()}: {per.get('pos', 0)} pos + {per.get('neg', 0)} neg + "
        f"{per.get('sent', 0)} "
        f"sent per micro-batch x {st['grad_accum_steps']} micro-batch(es); every sample {st['seq_len']} tokens "
        f"({m['image_tokens']} image positions, {m['image_tiles']} vision tile(s) per image); gradient checkpointing "
        f"{'on' if st['gradient_checkpointing'] else 'off'}",
        "",
        "Activations (GiB)                        no checkpointing   checkpointing",
    ]
    a0, a1 = plan["activations_per_sample"]["no_checkpointing"], plan["activations_per_sample"]["checkpointing"]
    lines.append(f"  one sample: kept for the backward     {gib(a0['saved']):>16}   {gib(a1['saved']):>13}")
    lines.append(f"  one sample: peak of its pass          {gib(a0['peak']):>16}   {gib(a1['peak']):>13}")
    lines.append(f"    of which the loss's log-softmax     {gib(a0['parts']['logits']):>16}   "
                 f"{gib(a1['parts']['logits']):>13}")
    acts = plan["activations"]
    lines.append("")
    lines.append(f"Passes of one micro-batch (one after the other; each backward frees its activations), "
                 f"checkpointing {'on' if acts['gradient_checkpointing'] else 'off'}:")
    for ps in acts["passes"]:
        lines.append(f"  {ps['pass']:<14} {ps['samples']} sample(s)  peak {gib(ps['peak'])} GiB ({ps['phase']})")
    lines.append(f"  -> the step's activation peak is the {acts['peak_pass']} pass: {gib(acts['peak'])} GiB")
    other = plan["activations_other_checkpointing"]
    lines.append(f"     (checkpointing {'on' if other['gradient_checkpointing'] else 'off'}: {gib(other['peak'])} GiB, "
                 f"{other['peak_pass']} pass)")
    if m["vision_backward"]:
        lines.append("  note: the backward enters the frozen vision tower (its output requires grad once gradient "
                     "checkpointing is on); counted above and in the hardware FLOPs")
    lines.append("")
    names = list(plan["configs"])
    lines.append("Per rank (GiB)                " + "".join(f"{n.replace('.json', ''):>22}" for n in names))
    rows = [("weights", "weights"), ("gathered weights (ZeRO-3)", "gathered"),
            ("fp32 master + AdamW", "master_and_optimizer"), ("gradients", "gradients"),
            ("DeepSpeed buckets", "buckets"), ("SARE buffers (between passes)", "sare_extra")]
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
    none_fits = "none fits: more GPUs, a shorter data.max_length or a larger GPU"
    lines.append(f"  recommended: {'ds_configs/' + rec if rec else none_fits}")
    if plan.get("cpu_configs"):
        lines.append(f"  (not planned: {', '.join(plan['cpu_configs'])}, for CPU ranks)")
    chosen = plan.get("recipe_ds_config")
    if chosen:
        row = plan["configs"].get(chosen)
        verdict = ("not a GPU config here" if row is None else "fits" if row["fits"] else "does NOT fit")
        lines.append(f"  the recipe's distributed.ds_config: {chosen} ({verdict})")
    lines.append("")
    lines.append("FLOPs per optimizer step per rank (TFLOP)   model   hardware")
    for name in ("ft", "efuf", "sare"):
        f = plan["flops"][name]
        lines.append(f"  {name.upper():<42}{_tflop(f['model']):>6}   {_tflop(f['hardware']):>8}")
    e, s = plan["flops"]["efuf"]["model"], plan["flops"]["sare"]["model"]
    if e:
        lines.append(f"  SARE / EFUF = {s / e:.2f}x (model FLOPs)")
    return "\n".join(lines)


def table(rows_of_models: Sequence[tuple[str, ModelSummary, StepShape]], gpus: Sequence[int] = TABLE_GPUS,
          memory: Sequence[float] = TABLE_MEMORY_GIB,
          configs: Sequence[ZeroSettings] | None = None) -> tuple[str, list[dict]]:
    """THE TABLE of docs/memory_plan.md: per model x GPUs x GPU memory the recommended ds_config and the
    GiB a GPU needs with it; then what each config needs per rank (independent of the GPU's size)."""
    configs = list(configs) if configs is not None else gpu_configs()
    head = "| model | tokens | " + " | ".join(f"{n} x {g:g} GiB" for g in memory for n in gpus) + " |"
    lines = [head, "|" + "---|" * (2 + len(gpus) * len(memory))]
    needed_lines = ["| model | ds_config | " + " | ".join(f"{n} GPU{'s' if n > 1 else ''}" for n in gpus) + " |",
                    "|" + "---|" * (2 + len(gpus))]
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
                                "gpu_mem_gib": g, "recommended": rec,
                                "needed_gib": {k: r["needed"] / GiB for k, r in rows[n].items()}})
        lines.append(f"| {label} ({model.total_params / 1e9:.1f}B) | {step.seq_len} | " + " | ".join(cells) + " |")
        for z in configs:
            needed_lines.append(f"| {label} | {z.name.replace('.json', '')} | "
                                + " | ".join(f"{rows[n][z.name]['needed'] / GiB:.1f}" for n in gpus) + " |")
    text = "\n".join(lines) + "\n\nGiB a GPU needs per rank, by config:\n\n" + "\n".join(needed_lines)
    return text, records


# ------------------------------------------------------------------------ measuring (validation)

def measure_pass(adapter, lengths: Sequence[int], *, gradient_checkpointing: bool = False, seed: int = 0) -> dict:
    """Run ONE forward + backward of a batch on the CPU with real tensors and measure it.

    `adapter`: a small model (built with real weights, its trainable set chosen, training mode).
    `lengths`: each sample's length (the batch pads to the longest with an attention mask).
    Returns bytes: `saved` (autograd's saved tensors when the forward ends, deduplicated by storage,
    parameters excluded), `saved_by_part` (llm_layers / llm_shared / projector / vision / logits,
    attributed by the module that saved them), and `peak` (the CPU allocator's peak during forward +
    backward above what was allocated before, from torch.profiler's allocation events).
    """
    import gc
    import weakref

    import torch
    from PIL import Image
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    from sare_ds.train.losses import per_sample_nll

    model = adapter.model
    image = adapter.image_inputs(Image.new("RGB", DEFAULT_IMAGE_SIZE, (90, 140, 200)))
    batch, seq = len(lengths), max(lengths)
    gen = torch.Generator().manual_seed(seed)
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(3, min(1000, vocab), (batch, seq), generator=gen)
    ids[ids == adapter.image_token_id] = 3
    ids[:, 1:1 + image.num_image_tokens] = adapter.image_token_id
    mask = torch.zeros(batch, seq, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, : image.num_image_tokens + 1] = -100
    dtype = next(model.parameters()).dtype
    inputs = {k: torch.cat([v] * batch).to(dtype if v.is_floating_point() else v.dtype)
              for k, v in image.tensors.items()}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    stack = ["logits"]  # outside every module: the loss (its fp32 log-softmax)
    hooks = []
    for name, module in model.named_modules():
        part = ("vision" if "vision_tower" in name else "projector" if "multi_modal_projector" in name
                else "llm_layers" if re.search(r"layers\.\d+", name) and "language_model" in name
                else "llm_shared" if "language_model" in name or name.endswith("model") else None)
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

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    was_on = _set_checkpointing(base, gradient_checkpointing)
    model.train()
    # One thread: parallel kernels' per-thread scratch buffers stay out of the peak, the measurement
    # repeats exactly, and a busy machine does not slow an oversubscribed OpenMP pool ten-fold.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                logits = model(input_ids=ids, attention_mask=mask, **inputs).logits
                loss = per_sample_nll(logits, labels).sum()
            del logits
            gc.collect()
            alive = {}
            for ptr, (n, refs) in saved.items():
                living = [part for r, part in refs if r() is not None]
                if living:
                    alive[ptr] = (n, living[-1])  # the latest saver keeps it
            saved_bytes = sum(n for n, _ in alive.values())
            loss.backward()
    finally:
        torch.set_num_threads(threads)
        for h in hooks:
            h.remove()
        _set_checkpointing(base, was_on)
    model.zero_grad(set_to_none=True)
    events = []

    def walk(nodes):
        for node in nodes:
            if node.tag == _EventType.Allocation:
                events.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.total_allocated))
            walk(node.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    events.sort()
    base = events[0][2] - events[0][1] if events else 0
    peak = max((total for _, _, total in events), default=base) - base
    by_part: dict[str, int] = {}
    for n, part in alive.values():
        by_part[part] = by_part.get(part, 0) + n
    return {"saved": saved_bytes, "saved_by_part": by_part, "peak": peak, "batch": batch, "seq": seq,
            "image_tokens": image.num_image_tokens}


# ------------------------------------------------------------------------------ recipes, CLI help

RECIPES = {  # table row -> the recipe that describes its run (written by the recipes' owner)
    "preset:llava-1.5-7b": "launch/configs/llava15_7b_sare.yaml",
    "preset:llava-1.5-13b": "launch/configs/llava15_13b_sare.yaml",
    "preset:llava-next-mistral-7b": "launch/configs/llava_next_mistral7b_sare.yaml",
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


def step_from_config(cfg, raw: Mapping | None = None) -> StepShape:
    """The StepShape of a training config (data.*_per_step, data.max_length, optim.grad_accum_steps, ...)."""
    d = cfg.data
    return StepShape(method=cfg.method.name, seq_len=d.max_length,
                     per_step={"pos": d.pos_per_step, "neg": d.neg_per_step, "sent": d.sent_per_step},
                     grad_accum_steps=cfg.optim.grad_accum_steps,
                     gradient_checkpointing=bool(cfg.model.gradient_checkpointing), optimizer=cfg.optim.optimizer)


def table_rows(models: Sequence[tuple[str, str, int]] = TABLE_MODELS, root: Path | None = None):
    """(label, ModelSummary, StepShape, where the settings came from) for each row of THE TABLE.

    A row takes its recipe's settings when the recipe states them (data.max_length and
    model.gradient_checkpointing written in the YAML); otherwise the documented ones: SARE,
    1 pos + 1 neg + 1 sent per micro-batch, 1 micro-batch, checkpointing on, the row's length.
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
