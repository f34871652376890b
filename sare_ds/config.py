"""The typed configuration tree of a sare_ds run.

One tree of dataclasses, a docstring under every field (read back by `field_docs` for
`--help`-style listings and as comments in the dumped YAML). Loaded from YAML, then
overridden from the command line with dotted keys (`method.rho=0.1`), then validated: every
error names the field, the rule it broke and what to do. The resolved tree is written to
each run directory as `config.yaml`, so a run can be repeated from its own folder.

    cfg = load_config("my.yaml", ["method.name=efuf", "optim.lr=2e-5"])
    save_config(cfg, run_dir / "config.yaml")
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import re
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

EFUF_CAPTION_PROMPT = (
    "Please describe the image in great detail. Your response should have at least 100 words."
)
from sare_ds.methods import METHODS as _METHOD_TABLE

METHODS = tuple(_METHOD_TABLE)  # defined once, in sare_ds/methods.py
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


class ConfigError(ValueError):
    """A configuration value broke a rule; the message names field, rule and fix."""


@dataclass
class ModelConfig:
    name_or_path: str = "runs/toy/models/captioner"
    """Local directory or hub id of the MLLM (a transformers checkpoint), or `preset:<name>[,key=value...]`: a
    published architecture at its true shape, randomly initialised (`python launch/plan.py --list` names them)."""
    family: str = "auto"
    """Adapter family (`auto` reads `model_type` from the checkpoint's config; else e.g. `llava`)."""
    trust_remote_code: bool = False
    """Allow checkpoints whose config/processor code ships with the weights (transformers' trust_remote_code);
    the model still needs a sare_ds adapter (docs/models.md: mPLUG-Owl and MiniGPT-4 are not supported)."""
    dtype: str = "float32"
    """Parameter dtype of the loaded model: float32, bfloat16 or float16."""
    trainable: str = "mapping"
    """Trainable set: `mapping` (the projector/abstractor), `mapping+lora` (plus LoRA on the LLM) or `regex`."""
    trainable_regex: str = ""
    """With trainable=regex: parameters whose name matches (re.search) are trained, all else frozen."""
    lora_r: int = 8
    """LoRA rank (trainable=mapping+lora)."""
    lora_alpha: int = 16
    """LoRA scaling alpha (trainable=mapping+lora)."""
    lora_dropout: float = 0.0
    """LoRA dropout (trainable=mapping+lora)."""
    lora_target_modules: list = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Module-name suffixes inside the language model that receive LoRA adapters."""
    gradient_checkpointing: bool = False
    """Recompute layer activations in the backward instead of keeping them (on in the real-model recipes:
    the backward through a frozen 7B LLM otherwise keeps ~4.2 MiB of bf16 activations per token, docs/memory_plan.md)."""
    lm_head_chunks: int = 8
    """Training runs the LM head and the NLL on the labelled positions only, in at most this many chunks
    per forward, so the loss path holds one chunk's logits at a time (a whole labelled response included).
    A frozen head (one process, ZeRO-2): chunks of at least 32 positions, the hidden states' gradient
    computed in the forward (nothing recomputed). A ZeRO-3-partitioned head: exactly this many
    checkpointed calls, recomputed in each backward (every rank calls it equally often; ZeRO-3 gathers
    its weight inside the calls). A trainable head under DeepSpeed runs in one piece. 0: the model's
    own head on all labelled positions at once, logits kept for the backward."""
    attn_implementation: str = "sdpa"
    """Attention kernel: `sdpa` (torch's fused attention), `eager`, or `flash_attention_2` (needs flash-attn)."""


@dataclass
class DataConfig:
    source: str = "shards"
    """Where training samples come from: `shards` (curated WebDataset shards, data.shards) or
    `synthetic` (generated scenes with oracle scores, no curation)."""
    shards: str = "runs/toy/curated"
    """Curated shards: a curation output directory, a brace pattern or a comma-separated list (braces
    expand before the list is split, so `{neg,pos}-00000{0..4}.tar` is one pattern)."""
    shuffle_buffer: int = 1000
    """Samples in each kind's shuffle buffer of the shard stream."""
    skip_corrupt: bool = False
    """Skip (and count) corrupt shard members instead of stopping with an error."""
    allow_remote: bool = False
    """Allow `pipe:` commands and remote shard URLs (any URL scheme: http(s), s3, gs, hf, file, ...),
    checked on every name after brace expansion."""
    prompt: str = EFUF_CAPTION_PROMPT
    """Synthetic source: the user prompt of the generated samples (shard samples carry their own)."""
    num_images: int = 48
    """Synthetic source: number of generated images."""
    image_size: int = 32
    """Synthetic source: side of the generated images in pixels."""
    packing: bool = True
    """One forward per caption: every span of a caption (pos, neg, sent) gets its NLL from one forward of the
    whole caption. false: one forward per span, cut after it (EFUF's own code); same losses (docs/architecture.md, "Tokenisation and labels")."""
    captions_per_step: int = 4
    """Captions per micro-batch (caption-record shards and the synthetic source)."""
    pos_per_step: int = 1
    """Per-kind shards (the format before caption records) only: pos samples per micro-batch (EFUF: 1)."""
    neg_per_step: int = 1
    """Per-kind shards only: neg (hallucinated sub-sentence) samples per micro-batch (EFUF: 1)."""
    sent_per_step: int = 1
    """Per-kind shards only: whole-sentence samples per micro-batch (EFUF: 1)."""
    max_length: int = 512
    """Longest tokenised sequence (image tokens included); spans ending beyond it are left out and counted."""
    num_workers: int = 0
    """DataLoader worker processes."""


@dataclass
class MethodConfig:
    name: str = "sare"
    """Training method: `ft` (capability losses only), `efuf` (gradient ascent) or `sare` (targeted SAM)."""
    rho: float = 0.05
    """SARE perturbation radius ||eps*|| (0 reduces SARE to EFUF; 0.15 leaves the valid manifold)."""
    lambda1: float = 0.3
    """Weight of the hallucination (neg) loss (0.1 too weak, 0.4 collapses)."""
    lambda2: float = 0.25
    """Weight of the sentence loss (paper: 0.2-0.3)."""
    score_weighting: bool = False
    """EFUF code's option: weight pos NLL by score and neg NLL by (55 - score)."""
    rho_mode: str = "absolute"
    """SARE's radius: `absolute` (the paper: eps* = rho g / ||g||, ||eps*|| = rho) or `adaptive` (ASAM,
    Kwon et al. 2021: eps* = rho T^2 g / ||T g|| with T = |theta| + adaptive_eta elementwise, so rho is a
    radius relative to the weights' own scale and means the same on a small and a 7B projector)."""
    adaptive_eta: float = 0.01
    """ASAM's eta (rho_mode=adaptive): the radius a weight at zero gets, relative to rho (ASAM's default 0.01)."""
    ascent_every: int = 1
    """SARE computes the ascent direction at theta every k-th step and reuses the last eps* in between
    (LookSAM-style): the perturbed pass runs every step, the neg backward at theta only every k-th. 1: the
    paper (every step). Costs one kept copy of eps* (the trainable set, or this rank's partition under ZeRO)."""


@dataclass
class OptimConfig:
    optimizer: str = "adamw"
    """Optimizer: `adamw` or `sgd` (plain SGD, for checks against textbook SAM)."""
    lr: float = 1e-5
    """Peak learning rate (finite, > 0 and at most optim.max_lr)."""
    max_lr: float = 1.0
    """Largest optim.lr validation accepts: a larger step throws AdamW's weights far off in one update (and
    SGD's by lr x gradient), and the run then refuses non-finite gradients with weights that are finite but
    ruined. Raise it (finite) only for an optimizer whose learning rate is not a step size of that scale."""
    weight_decay: float = 0.05
    """Decoupled weight decay (AdamW) / L2 (SGD)."""
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    epochs: int = 1
    """Passes over the captions (per-kind shards: over the neg samples, the unlearning target; the other kinds cycle)."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: run the epochs)."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step."""
    clip_grad_norm: float = 1.0
    """Clip the composed gradient to this global norm (0 disables clipping; always explicit)."""
    warmup_steps: int = 0
    """Linear warm-up steps before the constant/cosine schedule."""
    schedule: str = "constant"
    """Learning-rate schedule after warm-up: `constant` or `cosine`."""
    kernels: str = "auto"
    """Perturb/restore/norm primitives: auto (fused Triton kernels where Triton runs, else torch),
    triton (error if it cannot run) or torch (foreach reference)."""
    check_finite: bool = True
    """Before each optimizer step check the composed gradient norm is finite (the step's one host sync);
    a non-finite value stops the run with the weights of the last good step. false: checked only at the
    logging interval, when a bad update may already be in the weights (resume from a checkpoint)."""
    seed: int = 0
    """Seed for weights init, data order and perturbation probes."""


@dataclass
class LoggingConfig:
    log_every: int = 1
    """Log scalars every N optimizer steps (the only host synchronisation of the step)."""
    tensorboard: bool = True
    """Write TensorBoard events under <run_dir>/tb."""
    progress_bar: bool = True
    """Show a tqdm progress bar (rank 0)."""


@dataclass
class DistributedConfig:
    ds_config: str = ""
    """DeepSpeed JSON (e.g. ds_configs/zero3_bf16.json); empty: plain single-process training. Batch
    sizes, accumulation, clipping, precision and the optimizer are filled in from this config tree;
    explicit values in the JSON that disagree are an error."""
    backend: str = "auto"
    """torch.distributed backend: auto (nccl on GPUs, gloo on CPU), nccl or gloo."""
    zero3_shared_forward: bool = True
    """ZeRO-3, SARE: one forward at theta serves both the ascent direction and the capability
    gradient (one gather of the model fewer per micro-batch; costs one buffer of the rank's gradient
    partition, trainable / world elements in the accumulation dtype, and the theta pass's graph kept
    through two backwards). false: three separate passes, no buffer (cheaper in compute with
    data.packing=false, docs/distributed.md). Optimizer offload always runs the separate passes."""


@dataclass
class OutputConfig:
    run_dir: str = "runs/toy/runs/sare"
    """Run directory: resolved config, metrics.jsonl, TensorBoard events, weights."""
    overwrite: bool = False
    """A non-empty output.run_dir is refused unless this is true; true first removes every file of the previous
    run there (a folder not written by a run, or holding other files too, is refused). Ignored with output.resume."""
    save_every: int = 0
    """DeepSpeed checkpoint every N optimizer steps (0: only at the end)."""
    save_final: bool = True
    """DeepSpeed runs: write a checkpoint at the end too (resumable, consolidatable; under ZeRO-3 it holds every
    weight partition, frozen ones included: ~14 GB for a 7B model). trainable.safetensors and hf/ are written either way."""
    resume: bool = False
    """Continue from the newest complete checkpoint in <run_dir>/checkpoints (same result as an uninterrupted
    run); refused if the config differs in anything but output.* / logging.*, or the world size differs (docs/runs.md)."""
    export_hf: bool = True
    """At the end, export the full model in Hugging Face format to <run_dir>/hf, loadable by transformers alone
    (LoRA runs: the adapters merged into the base weights)."""


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The MLLM and which of its parameters train."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training samples and how each step is composed."""
    method: MethodConfig = field(default_factory=MethodConfig)
    """FT / EFUF / SARE and their hyper-parameters."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer, schedule, steps."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Scalars, TensorBoard, progress bar."""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """DeepSpeed / ZeRO and process groups."""
    output: OutputConfig = field(default_factory=OutputConfig)
    """Where the run writes."""


# --------------------------------------------------------------------------- field docs

def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of dataclass `cls` (parsed from its source)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


# --------------------------------------------------------------------------- load / merge

def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Coerce a YAML value to the field's type, or raise naming the field."""
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads "1e-5" (no dot) as a string; it is the usual way to write a rate.
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, str):
            return value
    elif typ is list:
        if isinstance(value, (list, tuple)):
            return list(value)
    else:  # nested dataclass handled by caller
        return value
    raise ConfigError(
        f"{where}: expected {typ.__name__}, got {value!r} ({type(value).__name__}); "
        f"write a {typ.__name__} value for it"
    )


def _merge(obj: Any, data: dict, prefix: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of fields, got {data!r}")
    types = _field_types(type(obj))
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in types:
            close = difflib.get_close_matches(key, list(types), n=1)
            hint = f"; did you mean `{prefix}{close[0]}`?" if close else f"; known: {', '.join(types)}"
            raise ConfigError(f"unknown config field `{where}`{hint}")
        typ = types[key]
        if dataclasses.is_dataclass(typ):
            _merge(getattr(obj, key), value, where + ".")
        else:
            setattr(obj, key, _coerce(value, typ, where))


def _override_type(cfg: Any, dotted: str) -> Any:
    obj: Any = type(cfg)
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(obj):
            return None
        obj = _field_types(obj).get(part)
    return obj


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> None:
    """Apply `section.field=value` overrides; values are parsed as YAML scalars/lists."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override `{item}` is not of the form section.field=value (e.g. method.rho=0.1)")
        key, raw = item.split("=", 1)
        # String fields take the text verbatim (a prompt may contain ": "); others parse as YAML.
        value = raw if _override_type(cfg, key.strip()) is str else yaml.safe_load(raw)
        nested: Any = value
        for part in reversed(key.strip().split(".")):
            nested = {part: nested}
        _merge(cfg, nested, "")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults <- YAML file <- overrides, then validated."""
    cfg = TrainConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass an existing YAML file")
        data = yaml.safe_load(path.read_text()) or {}
        try:
            _merge(cfg, data, "")
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    apply_overrides(cfg, overrides or [])
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------- validation

def _require(ok: bool, name: str, value: Any, rule: str, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{name} = {value!r} is invalid: {rule}. Fix: {fix}")


def _require_finite(cfg: TrainConfig) -> None:
    """Every float field (and list of numbers) finite: YAML reads `.inf` and `.nan`, and nan passes no
    comparison, so a `must be > 0` message would otherwise blame the wrong rule."""
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        for f, typ in _field_types(type(sub)).items():
            value = getattr(sub, f)
            values = value if typ is list else [value] if typ is float else []
            bad = [v for v in values if isinstance(v, float) and not math.isfinite(v)]
            if bad:
                default = getattr(type(sub)(), f)
                raise ConfigError(f"{section.name}.{f} = {value!r} is invalid: must be a finite number (not inf or nan). "
                                  f"Fix: use {default!r} (the default)")


def validate(cfg: TrainConfig) -> None:
    m, d, o, mo = cfg.method, cfg.data, cfg.optim, cfg.model
    _require_finite(cfg)
    _require(m.name in METHODS, "method.name", m.name, f"must be one of {METHODS}", "choose ft, efuf or sare")
    _require(m.rho >= 0, "method.rho", m.rho, "the perturbation radius must be >= 0",
             "use 0.05 (paper); 0 reduces SARE to EFUF")
    _require(m.rho_mode in ("absolute", "adaptive"), "method.rho_mode", m.rho_mode,
             "must be `absolute` (the paper) or `adaptive` (ASAM's radius relative to |theta|)", "use absolute")
    _require(m.adaptive_eta > 0, "method.adaptive_eta", m.adaptive_eta, "ASAM's eta must be > 0 (a weight at zero "
             "would get no radius)", "use 0.01 (ASAM)")
    _require(isinstance(m.ascent_every, int) and m.ascent_every >= 1, "method.ascent_every", m.ascent_every,
             "must be an integer >= 1 (the ascent direction is computed every k-th step)", "use 1 (the paper) or e.g. 5")
    _require(m.lambda1 >= 0, "method.lambda1", m.lambda1, "loss weights must be >= 0 (the sign of the neg loss is built in)",
             "use 0.3 (paper)")
    _require(m.lambda2 >= 0, "method.lambda2", m.lambda2, "loss weights must be >= 0", "use 0.25 (the paper uses 0.2-0.3)")
    for name in ("pos_per_step", "neg_per_step", "sent_per_step"):
        _require(getattr(d, name) >= 0, f"data.{name}", getattr(d, name), "must be >= 0", "use 1 (EFUF)")
    _require(d.pos_per_step + d.neg_per_step + d.sent_per_step > 0, "data.*_per_step", 0,
             "a step needs at least one sample", "set data.neg_per_step=1")
    if m.name in ("efuf", "sare"):
        _require(d.neg_per_step > 0, "data.neg_per_step", d.neg_per_step,
                 f"method {m.name} unlearns neg samples, so each step needs some", "set data.neg_per_step >= 1")
    _require(d.captions_per_step > 0, "data.captions_per_step", d.captions_per_step, "a micro-batch needs a caption",
             "use 4")
    _require(d.max_length > 0, "data.max_length", d.max_length, "must be > 0", "use 512 or more")
    _require(mo.lm_head_chunks >= 0, "model.lm_head_chunks", mo.lm_head_chunks,
             "the LM head's chunks per forward must be >= 0", "use 8 (0: the model's own head in one piece)")
    _require(d.num_images > 0, "data.num_images", d.num_images, "must be > 0", "use e.g. 48")
    _require(d.num_workers >= 0, "data.num_workers", d.num_workers, "must be >= 0", "use 0 (no worker processes; up to 8)")
    _require(o.optimizer in ("adamw", "sgd"), "optim.optimizer", o.optimizer, "must be adamw or sgd", "use adamw")
    _require(math.isfinite(o.max_lr) and o.max_lr > 0, "optim.max_lr", o.max_lr, "must be a finite number > 0",
             "use 1.0 (the default)")
    _require(o.lr > 0, "optim.lr", o.lr, "must be > 0", "use 1e-5 (paper)")
    _require(o.lr <= o.max_lr, "optim.lr", o.lr,
             f"must be at most optim.max_lr = {o.max_lr:g}: one AdamW update moves every weight by about lr, so "
             "larger steps wreck the weights in a step (fine-tuning uses 1e-6 to 1e-3)",
             "use 1e-5 (paper); raise optim.max_lr only for an optimizer whose learning rate is not a step size")
    _require(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0", "use 0.05 (paper)")
    _require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", o.betas,
             "must be two numbers in [0, 1)", "use [0.9, 0.999]")
    _require(o.epochs >= 1, "optim.epochs", o.epochs, "must be >= 1", "use 1 (gradient ascent diverges when run long)")
    _require(o.max_steps >= 0, "optim.max_steps", o.max_steps, "must be >= 0", "0 runs the full epochs")
    _require(o.grad_accum_steps >= 1, "optim.grad_accum_steps", o.grad_accum_steps, "must be >= 1", "use 1")
    _require(o.clip_grad_norm >= 0, "optim.clip_grad_norm", o.clip_grad_norm, "must be >= 0", "0 disables clipping")
    _require(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "must be >= 0", "use 0")
    _require(o.kernels in ("auto", "triton", "torch"), "optim.kernels", o.kernels, "must be auto, triton or torch",
             "use auto")
    _require(o.schedule in ("constant", "cosine"), "optim.schedule", o.schedule, "must be constant or cosine", "use constant")
    _require(mo.dtype in ("float32", "bfloat16", "float16"), "model.dtype", mo.dtype,
             "must be float32, bfloat16 or float16", "use bfloat16 on GPUs, float32 on CPU")
    _require(mo.trainable in ("mapping", "mapping+lora", "regex"), "model.trainable", mo.trainable,
             "must be mapping, mapping+lora or regex", "use mapping (the paper trains the projector only)")
    if mo.trainable == "regex":
        _require(bool(mo.trainable_regex), "model.trainable_regex", mo.trainable_regex,
                 "trainable=regex needs a pattern", "e.g. model.trainable_regex='multi_modal_projector'")
    if mo.trainable_regex:
        try:
            re.compile(mo.trainable_regex)
        except re.error as e:
            raise ConfigError(
                f"model.trainable_regex = {mo.trainable_regex!r} is invalid: not a regular expression ({e}). "
                "Fix: write a Python regex searched in parameter names; escape literal characters such as "
                r"( ) [ ] . + * ? with a backslash, e.g. model.trainable_regex='multi_modal_projector\.linear_1'"
            ) from None
    _require(mo.lora_r > 0, "model.lora_r", mo.lora_r, "must be > 0", "use 8")
    _require(mo.attn_implementation in ATTN_IMPLEMENTATIONS, "model.attn_implementation", mo.attn_implementation,
             f"must be one of {ATTN_IMPLEMENTATIONS}", "use sdpa")
    if mo.attn_implementation == "flash_attention_2":
        import importlib.util

        _require(importlib.util.find_spec("flash_attn") is not None, "model.attn_implementation",
                 mo.attn_implementation, "flash_attention_2 needs the flash-attn package, which is not installed",
                 "pip install flash-attn --no-build-isolation on a CUDA machine, or use sdpa")
    _require(0 <= mo.lora_dropout < 1, "model.lora_dropout", mo.lora_dropout, "must be in [0, 1)", "use 0.0")
    _require(cfg.logging.log_every >= 1, "logging.log_every", cfg.logging.log_every, "must be >= 1", "use 1 (or up to 50 for long runs)")
    _require(d.source in ("shards", "synthetic"), "data.source", d.source, "unknown data source",
             "use shards (curated by launch/curate.py) or synthetic")
    if d.source == "shards":
        _require(bool(d.shards), "data.shards", d.shards, "data.source=shards needs shards",
                 "point it at the output.dir of launch/curate.py")
    _require(d.shuffle_buffer >= 1, "data.shuffle_buffer", d.shuffle_buffer, "must be >= 1", "use 1000")
    _require(cfg.distributed.backend in ("auto", "nccl", "gloo"), "distributed.backend", cfg.distributed.backend,
             "must be auto, nccl or gloo", "use auto")
    if cfg.distributed.ds_config:
        _require(Path(cfg.distributed.ds_config).is_file(), "distributed.ds_config", cfg.distributed.ds_config,
                 "the DeepSpeed JSON does not exist", "pass a file from ds_configs/ (e.g. ds_configs/zero3_bf16.json)")
    _require(cfg.output.save_every >= 0, "output.save_every", cfg.output.save_every, "must be >= 0", "0 saves at the end only")
    if cfg.output.resume:
        _require(bool(cfg.distributed.ds_config), "output.resume", True,
                 "resuming restores a DeepSpeed checkpoint, so it needs distributed.ds_config", "set distributed.ds_config")


# --------------------------------------------------------------------------- dump

def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: TrainConfig) -> str:
    """YAML of the resolved tree, each field preceded by its docstring as a comment."""
    lines: list[str] = ["# Resolved sare_ds configuration (defaults <- YAML <- overrides)."]
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        lines.append(f"{section.name}:")
        docs = field_docs(type(sub))
        for f in dataclasses.fields(sub):
            if f.name in docs:
                lines.append(f"  # {docs[f.name]}")
            value = yaml.safe_dump({f.name: getattr(sub, f.name)}, default_flow_style=True, width=10_000).strip()
            lines.append("  " + value[1:-1] if value.startswith("{") else "  " + value)
    return "\n".join(lines) + "\n"


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(dump_config(cfg))


def config_markdown() -> str:
    """docs/config.md: every section and field with its default and docstring."""
    out = ["# Configuration reference", "",
           "Generated by `python -m sare_ds.config > docs/config.md` from the docstrings in",
           "`sare_ds/config.py` (a test checks it is current). Set fields in a YAML file",
           "(`--config`) or on the command line as `section.field=value`.", ""]
    root_docs = field_docs(TrainConfig)
    for section in dataclasses.fields(TrainConfig):
        sub = section.default_factory()
        out += [f"## `{section.name}`: {root_docs.get(section.name, '')}", "", "| field | default | meaning |",
                "| --- | --- | --- |"]
        docs = field_docs(type(sub))
        for f in dataclasses.fields(sub):
            default = yaml.safe_dump(getattr(sub, f.name), default_flow_style=True, width=10_000).strip()
            default = default.removesuffix("\n...").removesuffix("...").strip().replace("|", "\\|")
            out.append(f"| `{f.name}` | `{default}` | {docs.get(f.name, '').replace('|', '/')} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(config_markdown(), end="")
