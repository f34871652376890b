"""One optimizer step of any method in sare_ds.methods, written once against a ParameterSpace.

SARE (targeted SAM, docs/method.md section 4), per optimizer step over all micro-batches:

    1. g      = grad L_neg(theta)                          over the step's neg spans, all ranks
    2. eps*   = rho * g / ||g||_2                          norm over ALL trainable params, all ranks
    3. theta' = theta + eps*;  g_neg = grad L_neg(theta')  perturbed pass (captions with neg spans)
    4. restore theta exactly                               (also when step 3 raises)
    5. g_cap  = grad [L_pos + lambda2 L_sent](theta)
    6. g      = lambda1 g_neg + g_cap; clip; optimizer step

L_k is the mean over ALL spans of kind k in the step (every micro-batch, every rank): span counts
are summed once per step (one all-reduce, before the first backward) and each micro-batch's
loss is its sum of span NLLs over that count, so packing, accumulation and world size leave the
objective unchanged. FT and EFUF are one pass with the weights of their `at_theta`.

Two schedules of the same six steps (docs/architecture.md):
- shared forward at theta (a space with a separate direction buffer: PlainParameterSpace, and
  ZeRO-3 by default): one forward of every caption at theta; the backward of L_neg goes to the
  direction buffer (g), the backward of the capability losses to the gradient; after the perturbed
  pass the gradient holds g_cap + lambda1 g_neg. Passes over the data: 1 forward + 2 backwards at
  theta, 1 forward+backward at theta + eps*.
- separate passes (ZeRO-2, ZeRO-3 with optimizer offload or distributed.zero3_shared_forward=false:
  one gradient store): steps 1, 3 and 5 as three passes; the neg passes only forward captions with
  neg spans, cut after their last neg token.
Every rank runs the same passes whatever its data (a micro-batch with nothing of a pass's kinds
forwards a weightless stand-in): ZeRO-3 gathers parameters inside each forward, and a rank that
skipped one would leave the others waiting.

No value crosses to the host inside the step (metrics are device tensors), except the optional
finite check before the optimizer step.
"""
from __future__ import annotations

import inspect
import logging

import torch

from sare_ds.data.samples import KIND_INDEX, KINDS
from sare_ds.data.tokenize import TokenizedCaption, collate_captions, empty_pass_batch
from sare_ds.methods import get_method
from sare_ds.train.losses import KIND_SIGN, chunked_span_sums, span_sums
from sare_ds.train.params import ParameterSpace
from sare_ds.train.timing import PhaseTimer

log = logging.getLogger(__name__)
_TINY_NORM = 1e-12
MicroBatch = list[TokenizedCaption]


def to_device(batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict:
    """Move a collated batch; floating image tensors take the model's dtype (bf16 forward)."""
    out = {}
    for k, v in batch.items():
        if k in ("pixel_values",) and v.is_floating_point():
            out[k] = v.to(device=device, dtype=dtype, non_blocking=True)
        else:
            out[k] = v.to(device, non_blocking=True)
    return out


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the model's forward takes `logits_to_keep` (transformers' causal LMs and LLaVA-family
    models do; it then runs the LM head on those positions only). Looks through DeepSpeed and PEFT."""
    inner = getattr(model, "module", model)
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    try:
        return "logits_to_keep" in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


def output_head(model: torch.nn.Module) -> torch.nn.Module:
    """The module the model applies to its final hidden states to get logits (looks through DeepSpeed
    and PEFT). A model that transforms the logits after it (Gemma-2's final soft-capping, Cohere's
    logit_scale, Granite's logits_scaling) cannot have its head run apart from the model: refused, use
    model.lm_head_chunks=0."""
    inner = getattr(model, "module", model)
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    config = getattr(inner, "config", None)
    text = getattr(config, "text_config", None) or config
    if getattr(text, "final_logit_softcapping", None):
        raise ValueError(f"{type(inner).__name__} soft-caps its logits after the LM head, which the chunked head "
                         "does not reproduce; set model.lm_head_chunks=0")
    for name in ("logit_scale", "logits_scaling"):  # Cohere multiplies the logits, Granite divides them
        value = getattr(text, name, None)
        if isinstance(value, (int, float)) and value != 1:
            raise ValueError(f"{type(inner).__name__} scales its logits after the LM head ({name} = {value}), which the "
                             "chunked head does not reproduce; set model.lm_head_chunks=0")
    head = inner.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(inner).__name__} has no output embeddings (get_output_embeddings() is None); "
                         "set model.lm_head_chunks=0")
    return head


def _is_deepspeed(model: torch.nn.Module) -> bool:
    """A DeepSpeed engine (it reduces the gradients itself)."""
    return hasattr(model, "zero_optimization_stage") and hasattr(model, "module")


def flatten(micro_batch) -> MicroBatch:
    """A micro-batch as a list of sequences; a {kind: [sequences]} dict (StepComposer over sequences,
    as fine_tune_attack and the tests build them) is flattened. The trainer flattens the stream's
    {kind: [lists of sequences]} itself (trainer.sequences)."""
    if isinstance(micro_batch, dict):
        return [it for kind in KINDS for it in micro_batch.get(kind, [])]
    return list(micro_batch)


class UnlearningStep:
    """Callable: `metrics = step(micro_batches)`; a micro-batch is a list of TokenizedCaption."""

    def __init__(self, model, forward_inputs, space: ParameterSpace, method_cfg, *, device: torch.device,
                 dtype: torch.dtype, pad_token_id: int, check_finite: bool = True, timer: PhaseTimer | None = None,
                 keep_logits: bool | None = None, head_chunks: int = 8):
        self.model = model
        self.forward_inputs = forward_inputs
        self.space = space
        self.cfg = method_cfg
        self.method = get_method(method_cfg.name)
        self.device = device
        self.dtype = dtype
        self.pad_token_id = pad_token_id
        self.check_finite = check_finite
        self.timer = timer or PhaseTimer(device, enabled=False)
        # The LM head on the labelled positions only, through the model's own `logits_to_keep`; a model
        # without it computes every position's logits and the kept ones are picked (same NLL).
        self.keep_logits = accepts_logits_to_keep(model) if keep_logits is None else keep_logits
        # With the labelled-only head: the model's own head runs on no position (logits_to_keep empty),
        # its final hidden states come back (hidden_states[-1], transformers' last_hidden_state) and
        # the head runs on the kept positions in `head_chunks` chunks (losses.chunked_span_sums).
        if head_chunks < 0:
            raise ValueError(f"head_chunks = {head_chunks}: give the LM-head chunks per forward (>= 1), or 0 for "
                             "the model's own head in one piece")
        self.head_chunks = head_chunks if self.keep_logits else 0
        self.head = output_head(model) if self.head_chunks else None
        if self.head is not None and _is_deepspeed(model) and any(p.requires_grad for p in self.head.parameters()):
            # A trainable head whose gradient DeepSpeed reduces: chunks would reduce it once per chunk within
            # one backward, and ZeRO's first backward after zero_grad copies (not adds) into the partitions,
            # so only the last chunk's gradient would survive. One piece: one reduction.
            log.warning("the LM head is trainable under DeepSpeed: it runs in one piece on the labelled positions "
                        "(model.lm_head_chunks=%d ignored); the loss path then holds their logits at once",
                        self.head_chunks)
            self.head_chunks, self.head = 0, None
        # A ZeRO-3-partitioned head is called a fixed number of times, checkpointed (losses.chunked_span_sums).
        self.head_partitioned = self.head is not None and any(hasattr(p, "ds_id") for p in self.head.parameters())
        self._last_losses: dict[str, torch.Tensor] = {}
        self.steps_done = 0
        """Optimizer steps this object has run (method.ascent_every counts them; a resumed run restarts at 0,
        so its first step computes a new ascent direction)."""
        self._kept_eps: list[torch.Tensor] | None = None  # ascent_every > 1: eps* of the last ascent
        self._kept_eps_norm = None
        variant = method_cfg.rho_mode != "absolute" or method_cfg.ascent_every > 1
        if variant and self.method.sharpness_aware and not space.exposes_direction:
            raise ValueError(
                f"method.rho_mode = {method_cfg.rho_mode!r} / method.ascent_every = {method_cfg.ascent_every}: these "
                f"SARE variants scale or keep the ascent direction where {type(space).__name__} stores it, which "
                "ZeRO-3 with optimizer offload does not expose (its gradient is a CPU copy written at accumulation "
                "boundaries). Fix: use a ds_config without offload_optimizer (ZeRO-2 or ZeRO-3), or rho_mode=absolute "
                "and ascent_every=1")
        self.head_positions = 0
        """Positions the LM head has computed logits for, over all forwards (a host count; the bench reads it)."""

    # -- one forward: per-kind sums of span NLLs -----------------------------------------
    def _sums(self, batch: dict) -> torch.Tensor:
        batch = to_device(batch, self.device, self.dtype)
        keep = batch["keep"]
        rows = batch["input_ids"].shape[0]
        self.head_positions += rows * (keep.numel() if self.keep_logits else batch["input_ids"].shape[1])
        if self.head_chunks:
            out = self.model(**self.forward_inputs(batch), logits_to_keep=keep[:0], output_hidden_states=True)
            return chunked_span_sums(self.head, out.hidden_states[-1][:, keep], batch["targets"], batch["weights"],
                                     self.head_chunks, partitioned=self.head_partitioned)
        if self.keep_logits:
            logits = self.model(**self.forward_inputs(batch), logits_to_keep=keep).logits
        else:
            logits = self.model(**self.forward_inputs(batch)).logits[:, keep]
        return span_sums(logits, batch["targets"], batch["weights"])

    def _batch(self, items: MicroBatch, kinds: tuple[str, ...]) -> dict | None:
        batch = collate_captions(items, self.pad_token_id, kinds)
        if batch is None and self.space.lockstep:
            batch = empty_pass_batch(items, self.pad_token_id)
        return batch

    def _objective(self, sums: torch.Tensor, weights: dict[str, float], counts: torch.Tensor) -> torch.Tensor:
        """sum_k w_k sign_k sums_k / N_k: this micro-batch's share of the step's pooled objective."""
        return sum(w * KIND_SIGN[k] * sums[KIND_INDEX[k]] / counts[KIND_INDEX[k]].clamp_min(1.0)
                   for k, w in weights.items())

    def _pass(self, micro: list[MicroBatch], weights: dict[str, float], counts: torch.Tensor,
              read_after: bool = True, also_forward: tuple[str, ...] = ()) -> torch.Tensor:
        """Forward+backward of sum_k weights[k] L_k over the micro-batches; returns the per-kind sums of
        span NLLs (detached). read_after: the gradient is read right after this pass (a reduction
        boundary for the last backward). also_forward: kinds whose sums are wanted without a gradient."""
        kinds = tuple(k for k, w in weights.items() if w != 0) or tuple(weights)
        kinds = tuple(dict.fromkeys(kinds + tuple(also_forward)))
        total = torch.zeros(len(KINDS), device=self.device)
        for i, items in enumerate(micro):
            batch = self._batch(items, kinds)
            if batch is None:
                continue
            sums = self._sums(batch)
            loss = self._objective(sums, weights, counts) * self.space.grad_sum_scale
            self.space.backward(loss, boundary=read_after and i == len(micro) - 1)
            total += sums.detach()
        return total

    def _shared_pass(self, micro: list[MicroBatch], direction: dict[str, float], capability: dict[str, float],
                     counts: torch.Tensor, direction_backward: bool = True) -> torch.Tensor:
        """One forward at theta per micro-batch for both gradients: the direction losses' backward into
        the space's direction buffer, the capability losses' into the gradient. direction_backward=False
        (a step reusing the last eps*): the direction losses are forwarded (their values are logged) but
        not backpropagated."""
        kinds = tuple(dict.fromkeys([*direction, *capability]))
        total = torch.zeros(len(KINDS), device=self.device)
        if direction_backward:
            self.space.begin_direction()  # a step without direction losses has d = 0, not the gradient
        for items in micro:
            batch = self._batch(items, kinds)
            if batch is None:
                continue
            # Which of the two backwards this batch needs, read on the host tensors (no device sync);
            # in lockstep every rank runs both, a kind it lacks weighing zero.
            has = {k: bool(batch["weights"][:, KIND_INDEX[k]].any()) for k in kinds}
            need_dir = direction_backward and (self.space.lockstep or any(has[k] for k in direction))
            need_cap = self.space.lockstep or any(has[k] and w != 0 for k, w in capability.items())
            sums = self._sums(batch)
            scale = self.space.grad_sum_scale
            if need_cap:
                self.space.backward(self._objective(sums, capability, counts) * scale, retain_graph=need_dir)
            if need_dir:
                self.space.backward_direction(self._objective(sums, direction, counts) * scale)
            total += sums.detach()
        return total

    def _step_counts(self, micro: list[MicroBatch]) -> torch.Tensor:
        """Spans of each kind in the whole optimizer step: this rank's, summed over ranks (one all-reduce)."""
        local = torch.zeros(len(KINDS))
        for items in micro:
            for it in items:
                local += it.counts
        return self.space.all_reduce_sum(local.to(self.device))

    def _losses(self, sums: torch.Tensor, counts: torch.Tensor, kinds) -> dict[str, torch.Tensor]:
        """L_k of the step. Each rank holds its share of the pooled mean; scaled by the world size, the
        mean over ranks (the logging all-reduce) is the pooled mean itself."""
        world = self.space.world_size
        return {k: KIND_SIGN[k] * sums[KIND_INDEX[k]] / counts[KIND_INDEX[k]].clamp_min(1.0) * world
                for k in kinds if not isinstance(kinds, dict) or kinds[k] != 0}  # a kind with weight 0 is not forwarded

    # -- the step ------------------------------------------------------------------------
    def __call__(self, micro_batches) -> dict[str, torch.Tensor]:
        micro = [flatten(mb) for mb in micro_batches]
        method, t = self.method, self.timer
        at_theta = method.weights(method.at_theta, self.cfg)
        metrics: dict[str, torch.Tensor] = {}
        self.space.zero_grad()
        counts = self._step_counts(micro)
        metrics.update({f"data/spans_{k}": counts[KIND_INDEX[k]] for k in method.kinds})

        if not method.sharpness_aware:
            with t(method.name):
                sums = self._pass(micro, at_theta, counts)
            metrics.update(self._losses(sums, counts, at_theta))
        else:
            metrics.update(self._sharpness_aware(micro, at_theta, counts))

        self.steps_done += 1
        self._last_losses = {k: v for k, v in metrics.items() if "/" not in k}
        with t("optimizer_step"):
            metrics["train/grad_norm"] = self.space.step(self.check_finite, self._describe)  # 6.
        return {(k if "/" in k else f"loss/{k}"): v for k, v in metrics.items()}

    def _sharpness_aware(self, micro: list[MicroBatch], at_theta: dict[str, float], counts: torch.Tensor) -> dict:
        """Steps 1-5 of SARE (module docstring); with method.ascent_every = k > 1, steps between two ascents
        skip 1-2 and perturb by the eps* kept from the last ascent."""
        cfg, t, space = self.cfg, self.timer, self.space
        metrics: dict[str, torch.Tensor] = {}
        sharp = self.method.weights(self.method.sharp, cfg)
        unit = {k: 1.0 for k in sharp}  # the direction of eps*: the unweighted gradient of these losses
        every = cfg.ascent_every
        ascent = every == 1 or self._kept_eps is None or self.steps_done % every == 0
        at_theta_sharp: dict = {}
        if space.separate_direction:
            with t("theta"):                                                           # 1. g and 5. g_cap
                sums = self._shared_pass(micro, unit, at_theta, counts, direction_backward=ascent)
            metrics.update(self._losses(sums, counts, at_theta))
            at_theta_sharp = self._losses(sums, counts, unit)
        elif ascent:
            with t("neg_at_theta"):                                                    # 1. g
                at_theta_sharp = self._losses(self._pass(micro, unit, counts), counts, unit)
        if ascent:
            with t("grad_norm"):                                                       # 2. eps* = scale * d
                grad_norm = space.direction_norm()
                if cfg.rho_mode == "adaptive":
                    # ASAM: eps* = rho T^2 g / ||T g||, T = |theta| + eta: d <- T g, its norm, d <- T^2 g.
                    space.scale_direction_by_weights(cfg.adaptive_eta)
                    scale = cfg.rho / space.direction_norm().clamp_min(_TINY_NORM)
                    space.scale_direction_by_weights(cfg.adaptive_eta)
                    eps_norm = scale * space.direction_norm()
                else:
                    scale = cfg.rho / grad_norm.clamp_min(_TINY_NORM)
                    eps_norm = scale * grad_norm
                if every > 1:
                    self._kept_eps = space.copy_direction(scale, self._kept_eps)
            metrics["sam/grad_norm_neg"] = grad_norm
        else:
            scale, eps_norm = torch.ones((), device=self.device), self._kept_eps_norm
        with t("perturb"):
            space.perturb(scale, None if ascent else self._kept_eps)                   # 3. theta + eps*
        try:
            with t("neg_at_eps"):
                if not space.separate_direction:
                    space.zero_grad()  # g has been used; the gradient now collects lambda1 g_neg
                sums_eps = self._pass(micro, sharp, counts, read_after=space.separate_direction)
        finally:
            with t("restore"):
                space.restore()                                                        # 4. theta, exactly
        if not space.separate_direction:
            with t("capability"):                                                      # 5. g_cap adds to it
                # A reusing step ran no neg pass at theta: its L_neg there comes from this forward (weight 0).
                sums_cap = self._pass(micro, at_theta, counts, also_forward=() if ascent else tuple(unit))
                metrics.update(self._losses(sums_cap, counts, at_theta))
                if not ascent:
                    at_theta_sharp = self._losses(sums_cap, counts, unit)
        at_eps = self._losses(sums_eps, counts, unit)
        self._kept_eps_norm = eps_norm
        metrics.update(at_theta_sharp)
        metrics["sam/eps_norm"] = eps_norm
        metrics["sam/ascent"] = torch.tensor(float(ascent), device=self.device)
        metrics["sam/sharpness_gap"] = sum(at_eps[k] - at_theta_sharp[k] for k in sharp)
        return metrics

    def _describe(self) -> str:
        parts = ", ".join(f"loss/{k}={float(v):.4g}" for k, v in self._last_losses.items())
        # Each rank's share of the pooled means (x world size): a rank without spans of a kind shows 0.
        return f"at step losses of this rank's spans ({parts})" if parts else ""
