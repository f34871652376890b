"""Where a run's DeepSpeed knowledge lives: one backend interface, two implementations.

    backend = backend_for(cfg, info)          # PlainBackend (no distributed.ds_config) or DeepSpeedBackend
    adapter = backend.load_model(cfg.model)   # ZeRO-3: from_pretrained partitions while the backend lives
    rt = backend.build(cfg, adapter.model, params, total_steps)      # optimizer, scheduler, engine, space
    backend.save_checkpoint(rt, run_dir, step, record)               # sare_ds.train.checkpoint
    state = backend.trainable_state(rt)       # the trained parameters by name, full tensors (every rank)
    backend.export_hf(rt, adapter, out_dir)   # the full model in Hugging Face format (LoRA merged)

For evaluation (sare_ds.eval.weights), `inference_backend(dtype, zero3)` gives the same interface's
inference side: `load_model`, `load_state` (a run's tensors into the model, into the ZeRO-3
partitions while gathered) and `build_inference` (eval mode, on the device; ZeRO-3 adds DeepSpeed's gathering
hooks; sare_ds.eval.weights freezes the parameters first). The parameter spaces the step drives are sare_ds.train.params (plain) and
sare_ds.train.zero_params (ZeRO-2/3); the step (sare_ds.train.step) knows nothing of the backend.
"""
from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch

from sare_ds.dist import DistInfo
from sare_ds.train import checkpoint as ckpt
from sare_ds.train.params import ParameterSpace, PlainParameterSpace

log = logging.getLogger("sare_ds.train")


# --------------------------------------------------------------------- optimizer, schedule

def build_optimizer(params: list[torch.nn.Parameter], optim_cfg) -> torch.optim.Optimizer:
    if optim_cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas),
                                 eps=optim_cfg.adam_eps, weight_decay=optim_cfg.weight_decay)
    return torch.optim.SGD(params, lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay)


def lr_multiplier(optim_cfg, total_steps: int):
    """Linear warm-up, then constant or cosine decay to 0 (a function of the step index)."""
    warm = optim_cfg.warmup_steps

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if optim_cfg.schedule == "cosine":
            progress = (step - warm) / max(1, total_steps - warm)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


# ------------------------------------------------------------------------------ runtimes

@dataclass
class Runtime:
    """What the loop drives: the forward callable, where the parameters live, the device."""

    model: torch.nn.Module  # the module, or the DeepSpeed engine wrapping it
    space: ParameterSpace
    device: torch.device
    dist: DistInfo
    engine: object | None = None
    stage: int = 0


def build_plain(cfg, model, params, total_steps: int) -> Runtime:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    optimizer = build_optimizer(params, cfg.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg.optim, total_steps))
    space = PlainParameterSpace(params, optimizer, scheduler, cfg.optim.clip_grad_norm)
    return Runtime(model, space, device, DistInfo(0, 1, 0, device))


def build_deepspeed(cfg, model, params, ds_config: dict, info: DistInfo, total_steps: int) -> Runtime:
    import deepspeed

    from sare_ds.train.ds_config import zero_stage
    from sare_ds.train.zero_params import zero_parameter_space

    client_optimizer = None if "optimizer" in ds_config else build_optimizer(params, cfg.optim)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=params, optimizer=client_optimizer, config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier(cfg.optim, total_steps)),
    )
    stage = zero_stage(ds_config)
    space = zero_parameter_space(engine, stage, cfg.distributed.zero3_shared_forward)
    return Runtime(engine, space, engine.device, info, engine, stage)


def parameter_shape(p: torch.nn.Parameter) -> tuple[int, ...]:
    """A parameter's full shape (a ZeRO-3 partitioned parameter keeps its own in ds_shape)."""
    return tuple(getattr(p, "ds_shape", p.shape))


# ------------------------------------------------------------------------------ backends

class Backend(ABC):
    """Build, checkpoint, gather and export one run's model; the same calls on every rank."""

    name = "backend"
    stage = 0
    checkpoints = False  # whether save/load_checkpoint are available (DeepSpeed only)

    def before_model_load(self) -> None:
        """Call right before the model is loaded: ZeRO-3 loads it partitioned while the backend lives."""

    def load_model(self, model_cfg):
        """The model's adapter (sare_ds.models.load_mllm), loaded under this backend (ZeRO-3: partitioned
        over the ranks; keep the backend alive while the model is used)."""
        from sare_ds.models import load_mllm

        self.before_model_load()
        return load_mllm(model_cfg)

    @abstractmethod
    def build(self, cfg, model, params: list[torch.nn.Parameter], total_steps: int) -> Runtime:
        """Optimizer, LR schedule, engine (DeepSpeed) and the ParameterSpace the step drives."""

    def save_checkpoint(self, rt: Runtime, run_dir: Path, step: int, record: dict) -> Path:
        """Every rank: write and commit checkpoint `step` (sare_ds.train.checkpoint)."""
        raise ckpt.CheckpointError(f"the {self.name} backend writes no checkpoints (they need distributed.ds_config)")

    def load_checkpoint(self, rt: Runtime, run_dir: Path, tag: str, manifest: dict) -> int:
        """Every rank: load a found and verified checkpoint into `rt`; returns its step."""
        raise ckpt.CheckpointError(f"the {self.name} backend loads no checkpoints (they need distributed.ds_config)")

    @staticmethod
    def module(rt: Runtime) -> torch.nn.Module:
        return rt.engine.module if rt.engine is not None else rt.model

    def trainable_state(self, rt: Runtime) -> dict[str, torch.Tensor]:
        """Trained parameters by name, gathered to full tensors on CPU (every rank calls this)."""
        named = [(n, p) for n, p in self.module(rt).named_parameters() if p.requires_grad]
        return {n: p.detach().to("cpu").contiguous() for n, p in named}

    def full_state(self, rt: Runtime) -> dict[str, torch.Tensor]:
        """The model's whole state dict (complete on rank 0; every rank calls this)."""
        return {k: v.detach().cpu() for k, v in self.module(rt).state_dict().items()}

    def export_hf(self, rt: Runtime, adapter, out_dir: Path) -> None:
        """Full model in Hugging Face format (config, weights, processor), loadable without sare_ds."""
        state = self.full_state(rt)
        if rt.dist.is_main:
            module = self.module(rt)
            if hasattr(module, "peft_config"):
                # LoRA run: merge W + (alpha / r) B A into the base weights, so hf/ is a plain checkpoint of
                # the trained model (trained projector included) that transformers loads alone.
                state = merge_lora_state(state, module.peft_config)
                module = module.get_base_model()
                log.info("LoRA run: hf/ holds the merged model (LoRA folded into the base weights)")
            module.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
            adapter.processor.save_pretrained(out_dir)

    # -------------------------------------------------------------- inference (evaluation)

    def load_state(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Copy a run's tensors (by name, full shapes) into `model`."""
        model.load_state_dict(state, strict=False)

    def build_inference(self, model: torch.nn.Module, device: str | torch.device = "cpu") -> torch.nn.Module:
        """The model ready for evaluation forwards: eval mode, on `device` (the caller freezes it)."""
        model.to(device).eval()
        return model


class PlainBackend(Backend):
    """One process, ordinary tensors (PlainParameterSpace); no checkpoints."""

    name = "plain"

    def build(self, cfg, model, params, total_steps: int) -> Runtime:
        return build_plain(cfg, model, params, total_steps)


class DeepSpeedBackend(Backend):
    """DeepSpeed ZeRO-2/3 on any number of ranks (Zero{2,3}ParameterSpace), checkpoints committed atomically."""

    name = "deepspeed"
    checkpoints = True

    def __init__(self, ds_config: dict, info: DistInfo | None = None):
        from sare_ds.train.ds_config import zero_stage

        self.ds_config, self.info = ds_config, info
        self.stage = zero_stage(ds_config)
        self._hf_ds_config = None

    @classmethod
    def from_config(cls, cfg, info: DistInfo) -> "DeepSpeedBackend":
        """The run's DeepSpeed JSON filled from / checked against the config tree (sare_ds.train.ds_config)."""
        from sare_ds.train.ds_config import build_ds_config

        return cls(build_ds_config(cfg, info.world_size, torch.cuda.is_available()), info)

    def before_model_load(self) -> None:
        if self.stage == 3 and self._hf_ds_config is None:
            # While this object lives, from_pretrained builds the model under zero.Init: each rank
            # materialises only its partition (13B+ models never exist whole on one rank).
            from transformers.integrations.deepspeed import HfDeepSpeedConfig

            self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)

    def build(self, cfg, model, params, total_steps: int) -> Runtime:
        return build_deepspeed(cfg, model, params, self.ds_config, self.info, total_steps)

    def save_checkpoint(self, rt: Runtime, run_dir: Path, step: int, record: dict) -> Path:
        return ckpt.save_checkpoint(rt.engine, run_dir, step, record)

    def load_checkpoint(self, rt: Runtime, run_dir: Path, tag: str, manifest: dict) -> int:
        return ckpt.load_checkpoint(rt.engine, run_dir, tag, manifest)

    def trainable_state(self, rt: Runtime) -> dict[str, torch.Tensor]:
        if self.stage != 3:
            return super().trainable_state(rt)
        import deepspeed

        named = [(n, p) for n, p in self.module(rt).named_parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            return {n: p.detach().to("cpu").clone().contiguous() for n, p in named}

    def full_state(self, rt: Runtime) -> dict[str, torch.Tensor]:
        if self.stage != 3:
            return super().full_state(rt)
        # Gathers the partitions layer by layer onto rank 0 (needs
        # stage3_gather_16bit_weights_on_model_save, which build_ds_config keeps in our JSONs).
        return rt.engine._zero3_consolidated_16bit_state_dict()

    def load_state(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        if self.stage != 3:
            return super().load_state(model, state)
        import deepspeed

        named = dict(model.named_parameters())
        # Gather the trained parameters, write them on rank 0, re-partition on exit.
        with deepspeed.zero.GatheredParameters([named[k] for k in state], modifier_rank=0):
            with torch.no_grad():
                for k, v in state.items():
                    named[k].copy_(v)

    def build_inference(self, model: torch.nn.Module, device: str | torch.device = "cpu") -> torch.nn.Module:
        import deepspeed

        engine, *_ = deepspeed.initialize(model=model, config=self.ds_config)
        module = engine.module  # its forward now gathers the partitions layer by layer
        module.eval()
        return module


def backend_for(cfg, info: DistInfo) -> Backend:
    """DeepSpeedBackend when `distributed.ds_config` names a DeepSpeed JSON, PlainBackend otherwise."""
    return DeepSpeedBackend.from_config(cfg, info) if cfg.distributed.ds_config else PlainBackend()


def zero3_inference_config(dtype: str) -> dict:
    """A minimal DeepSpeed config for ZeRO-3 inference (no optimizer)."""
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
            "bf16": {"enabled": dtype == "bfloat16"}, "fp16": {"enabled": dtype == "float16"},
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 1e5},
            "steps_per_print": 1_000_000}


def inference_backend(dtype: str, zero3: bool) -> Backend:
    """The backend evaluation loads a model through: ZeRO-3 partitions over the ranks, or one process."""
    return DeepSpeedBackend(zero3_inference_config(dtype)) if zero3 else PlainBackend()


# ------------------------------------------------------------------------- weights out

def merge_lora_state(state: dict[str, torch.Tensor], peft_config: dict) -> dict[str, torch.Tensor]:
    """A PEFT model's state dict -> its base model's, with every LoRA pair folded into its weight.

    W' = W + scale * B @ A (scale = lora_alpha / r, or / sqrt(r) with rsLoRA), computed in fp32 and
    cast to W's dtype; names lose PEFT's `base_model.model.` prefix and `.base_layer` infix.
    """
    if list(peft_config) != ["default"]:
        raise ValueError(f"LoRA export supports one adapter named 'default', found {list(peft_config)}")
    lcfg = peft_config["default"]
    if getattr(lcfg, "use_dora", False) or getattr(lcfg, "fan_in_fan_out", False):
        raise ValueError("LoRA export: DoRA and fan_in_fan_out adapters do not merge as W + scale * B @ A; "
                         "sare_ds builds neither (model.lora_*), so this PEFT model was configured elsewhere")
    scale = lcfg.lora_alpha / (math.sqrt(lcfg.r) if getattr(lcfg, "use_rslora", False) else lcfg.r)
    prefix = "base_model.model."
    out: dict[str, torch.Tensor] = {}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        name = key[len(prefix):] if key.startswith(prefix) else key
        for part in ("lora_A", "lora_B"):
            marker = f".{part}.default.weight"
            if name.endswith(marker):
                pairs.setdefault(name[: -len(marker)], {})[part] = value
                break
        else:
            out[name.replace(".base_layer.", ".")] = value
    stray = [k for k in out if "lora_" in k]
    if stray:  # e.g. an embedding's lora_embedding_A/B: not a Linear pair, would be left unmerged
        raise ValueError(f"LoRA export: {len(stray)} LoRA tensors are not Linear A/B pairs ({', '.join(stray[:4])}); "
                         "they cannot be merged by W + scale * B @ A")
    for module_name, ab in pairs.items():
        weight_key = f"{module_name}.weight"
        if set(ab) != {"lora_A", "lora_B"} or weight_key not in out:
            raise ValueError(f"LoRA export: {module_name} has {sorted(ab)} and base weight "
                             f"{'present' if weight_key in out else 'missing'}; the state dict is incomplete")
        w = out[weight_key]
        delta = ab["lora_B"].float() @ ab["lora_A"].float()
        out[weight_key] = (w.float() + scale * delta).to(w.dtype)
    return out


def backend_of(rt: Runtime) -> Backend:
    """The backend a built Runtime gathers and exports through (for callers that hold only the Runtime;
    its build and model loading are done, so the DeepSpeed one carries only the ZeRO stage)."""
    if rt.engine is None:
        return PlainBackend()
    return DeepSpeedBackend({"zero_optimization": {"stage": rt.stage}}, rt.dist)
