"""ParameterSpace for DeepSpeed ZeRO: the SARE primitives on partitioned weights and grads.

ZeRO-3 (Zero3ParameterSpace). Each rank holds, per trainable parameter, a flat partition of
  - the low-precision weights the forward all-gathers: `p.ds_tensor` (bf16/fp16/fp32);
  - the fp32 master weights (the optimizer's copy): `safe_get_local_fp32_param(p)`;
  - the fp32 reduced gradient: `safe_get_local_grad(p)` (padding is zero).
  local_grad_sq_sum  sums g^2 over this rank's gradient partitions; one all-reduce of that
                     scalar gives the global ||g||^2 (padding contributes nothing).
  perturb            writes cast(master + scale * g) into `ds_tensor`: the next forward gathers
                     theta + eps*. (Writing the fp32 master instead would not be seen.)
  restore            writes cast(master) back: bit-exact, no backup copy needed, because the
                     master partition IS theta and it is never touched by the perturbation.
  Persistent parameters (numel <= stage3_param_persistence_threshold) keep a gathered full
  copy that ignores `ds_tensor` edits; they are re-partitioned and re-gathered after each
  perturb and restore so the forward sees the same weights as the partitioned ones.
  Shared forward (`shared_forward=True`, the default): one forward at theta serves the ascent
  direction and the capability gradient (the step's shared schedule, as in one process), which
  saves SARE one gather of the whole model per micro-batch. Two things make the second backward
  through one ZeRO-3 forward correct:
    - the direction has its own buffer, shaped like the optimizer's flat gradient buffer (one
      rank's partition: trainable / world elements, in the gradient accumulation dtype: bf16 in a
      bf16 run unless data_types.grad_accum_dtype says fp32). `backward_direction` swaps the two
      buffers' contents around its backward, so the direction and the capability gradient
      accumulate apart over the micro-batches, each through DeepSpeed's own reduce-scatter;
    - DeepSpeed's ZeRO-3 hooks gather a module's weights before its backward only while the
      module's `applied_pre_backward_ref_cnt` is positive, and release them when
      `ds_grads_remaining` reaches zero; the first backward counts both down. They are read
      after the forward (at the first backward that retains the graph) and set back before the
      next backward through the same graph, so it gathers and releases exactly like the first.

ZeRO-2 (Zero2ParameterSpace). Weights are whole on every rank; each rank owns a fragment of
the fp32 master and of the reduced gradient of each parameter (`p._hp_mapping`). Each rank
computes its fragments of theta + eps* (or theta), writes them into a zero buffer of all
trainable elements, and one all-reduce(SUM) assembles the full tensors (fragments are
disjoint, so the sum is exact); the result is cast into the weights.

Internals used here are those of DeepSpeed 0.19 (pinned by the tests that compare every
path against a single-process reference).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

import sare_kernels as kernels
from sare_ds.train.params import ParameterSpace


def _by_device(*lists):
    """Group parallel lists of tensors by the device of the first list (foreach needs one device)."""
    groups: dict = {}
    for items in zip(*lists):
        groups.setdefault(items[0].device, []).append(items)
    return [tuple(list(col) for col in zip(*g)) for g in groups.values()]


class _ZeroSpace(ParameterSpace):
    lockstep = True  # parameters are gathered (ZeRO-3) or gradients reduced inside the passes

    def __init__(self, engine):
        self.engine = engine
        # The data-parallel ranks (all ranks: sare_ds runs no other parallelism).
        self.world_size = int(getattr(engine, "dp_world_size", dist.get_world_size() if dist.is_initialized() else 1))
        # DeepSpeed averages gradients over the data-parallel ranks; the step's losses are normalised
        # by the step's global span counts, so the sum over ranks is wanted.
        self.grad_sum_scale = float(self.world_size)
        self.params = [p for p in engine.module.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the DeepSpeed engine has no trainable parameters")
        self._perturbed = False

    def backward(self, loss: torch.Tensor, boundary: bool = True, retain_graph: bool = False) -> None:
        # ZeRO-3 reduces every backward into the partitions and adds them up until
        # optimizer.zero_grad(), so the flag is not needed there.
        self.engine.backward(loss, retain_graph=retain_graph)

    def zero_grad(self) -> None:
        # engine.zero_grad() only drops param.grad; the ZeRO optimizer's zero_grad also resets
        # its accumulation state, so the next backward overwrites the gradient partitions.
        self.engine.optimizer.zero_grad()

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def clip_and_step(self, grad_norm: torch.Tensor) -> None:
        # DeepSpeed clips with `gradient_clipping` (filled from optim.clip_grad_norm) using its
        # own global norm of the same accumulated gradient, then steps optimizer and schedule.
        self.engine.step()

    @property
    def lr(self) -> float:
        return float(self.engine.get_lr()[0])


class Zero3ParameterSpace(_ZeroSpace):
    def __init__(self, engine, shared_forward: bool = True):
        super().__init__(engine)
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_grad

        self._get_master = safe_get_local_fp32_param
        self._get_grad = safe_get_local_grad
        self.persistent = [p for p in self.params if getattr(p, "ds_persist", False)]
        for p in self.params:
            master = self._get_master(p)
            if master.numel() != p.ds_tensor.numel():
                raise RuntimeError(f"ZeRO-3 partition sizes differ (weights {p.ds_tensor.numel()}, master "
                                   f"{master.numel()}); this DeepSpeed version is not supported by sare_ds")
            if master.data_ptr() == p.ds_tensor.data_ptr():
                raise RuntimeError("the fp32 master partition aliases the weights; exact restore is impossible")
        opt = engine.optimizer
        # With optimizer offload the fp32 gradients the optimizer reads are per-sub-group buffers
        # written at accumulation boundaries: there is no single buffer to swap, so offload runs
        # the separate passes.
        self.separate_direction = bool(shared_forward) and not getattr(opt, "offload_optimizer", False)
        self._direction: torch.Tensor | None = None  # shaped like opt.grad_partitions_flat_buffer
        self._direction_views: list[torch.Tensor] = []
        self._direction_mode = False
        self._hook_counts: list | None = None  # ZeRO-3 backward-hook counters after the last forward

    # -- backwards: several through one forward --------------------------------------------
    def backward(self, loss: torch.Tensor, boundary: bool = True, retain_graph: bool = False) -> None:
        if self._hook_counts is not None:
            self._rearm_backward_hooks(self._hook_counts)  # a further backward through the same forward
        elif retain_graph:
            self._hook_counts = self._backward_hook_counts()
        try:
            self.engine.backward(loss, retain_graph=retain_graph)
        finally:
            if not retain_graph:
                self._hook_counts = None

    def _backward_hook_counts(self) -> list:
        counts = [(m, m.__dict__.get("applied_pre_backward_ref_cnt"), m.__dict__.get("ds_grads_remaining"))
                  for m in self.engine.module.modules()]
        if not any(pre for _, pre, _ in counts):
            raise RuntimeError(
                "ZeRO-3: no module has DeepSpeed's pre-backward counter (applied_pre_backward_ref_cnt) after the "
                "forward, so a second backward through it would run on released weights. This DeepSpeed version "
                "is not supported by the shared forward; set distributed.zero3_shared_forward=false")
        return counts

    @staticmethod
    def _rearm_backward_hooks(counts: list) -> None:
        for module, pre, remaining in counts:
            if pre is not None:
                module.applied_pre_backward_ref_cnt = pre
            if remaining is not None:
                module.ds_grads_remaining = remaining

    # -- the direction buffer ----------------------------------------------------------------
    def begin_direction(self) -> None:
        if not self.separate_direction:
            super().begin_direction()  # raises: this space runs the separate passes
        opt = self.engine.optimizer
        flat = opt.grad_partitions_flat_buffer  # in the gradient accumulation dtype (bf16 runs: bf16)
        if self._direction is None or self._direction.shape != flat.shape:
            self._direction = torch.zeros_like(flat)
            self._swap_tmp = torch.empty(min(flat.numel(), 1 << 22), dtype=flat.dtype, device=flat.device)
            # Each parameter's partition is a view of the flat buffer (safe_get_local_grad returns an
            # fp32 copy of it when the buffer is bf16, so the view is read from the optimizer's map).
            parts = self._grad_partition_map("the shared forward (set distributed.zero3_shared_forward=false)")
            self._direction_views = [self._view_like(self._direction, flat, parts[p.ds_id]) for p in self.params]
        else:
            self._direction.zero_()
        self._direction_mode = True

    @staticmethod
    def _view_like(buffer: torch.Tensor, flat: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
        """The view of `buffer` at the place `part` (a gradient partition) has in `flat`."""
        if part.untyped_storage().data_ptr() != flat.untyped_storage().data_ptr():
            raise RuntimeError("ZeRO-3 gradient partitions are not views of grad_partitions_flat_buffer; this "
                               "DeepSpeed version is not supported by the shared forward (set "
                               "distributed.zero3_shared_forward=false)")
        offset = part.storage_offset() - flat.storage_offset()
        return buffer.narrow(0, offset, part.numel()).view_as(part)

    @torch.no_grad()
    def _swap_direction(self) -> None:
        """Exchange the contents of the gradient partitions and the direction buffer (in chunks)."""
        flat, direction, tmp = self.engine.optimizer.grad_partitions_flat_buffer, self._direction, self._swap_tmp
        chunk = tmp.numel()
        for a, b in zip(flat.split(chunk), direction.split(chunk)):
            t = tmp[:a.numel()]
            t.copy_(a)
            a.copy_(b)
            b.copy_(t)

    def backward_direction(self, loss: torch.Tensor) -> None:
        if not self._direction_mode:
            raise RuntimeError("backward_direction() before begin_direction()")
        # During this backward the gradient partitions hold the direction: DeepSpeed reduce-scatters
        # into them (adding from the second micro-batch on) as for any backward.
        self._swap_direction()
        try:
            self.backward(loss)
        finally:
            self._swap_direction()

    def local_direction_sq_sum(self) -> torch.Tensor:
        if not self._direction_mode:
            return self.local_grad_sq_sum()
        return kernels.sum_of_squares(self._direction_views).to(self._direction.device)

    def direction_tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if self._direction_mode:
            return list(self._direction_views), self._masters()
        # The direction is the gradient: its partitions in the optimizer's flat buffer (safe_get_local_grad
        # returns a copy when that buffer is bf16, which an in-place scaling would not reach).
        parts = self._grad_partition_map("method.rho_mode=adaptive and method.ascent_every > 1 (use rho_mode="
                                         "absolute and ascent_every=1 with this DeepSpeed version)")
        return [parts[p.ds_id] for p in self.params], self._masters()

    def _grad_partition_map(self, needed_by: str) -> dict:
        """DeepSpeed's map from parameter id to its gradient partition (a view of grad_partitions_flat_buffer)."""
        parts = getattr(self.engine.optimizer, "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition", None)
        if parts is None:
            raise RuntimeError(f"ZeRO-3: the optimizer has no gradient partition map, which {needed_by} needs; this "
                               "DeepSpeed version is not supported for it")
        return parts

    @property
    def exposes_direction(self) -> bool:
        # With optimizer offload the gradient the norm and perturb read is a per-sub-group CPU copy written at
        # boundaries, not the partitions direction_tensors would scale: the variants are refused there.
        return not getattr(self.engine.optimizer, "offload_optimizer", False)

    @torch.no_grad()
    def zero_grad(self) -> None:
        self._hook_counts = None
        if not self._perturbed:
            self._direction_mode = False
        # optimizer.zero_grad() drops param.grad and resets micro_step_id, so the next backward
        # *copies* into the fp32 grad partition of every parameter it reduces; a parameter that
        # backward does not reach is never reduced, and its partition (what safe_get_local_grad
        # returns, and what step() flattens) would keep the previous pass's gradient and leak
        # into ||g||, eps* and the update. The partitions are views of one flat buffer
        # (`grad_partitions_flat_buffer`): one memset clears them all, padding included, so an
        # unreached parameter counts as a zero gradient, as in PlainParameterSpace. No stream
        # sync is needed: the backward epilogue waits for the reduce stream, and the next
        # reduction waits for the current stream.
        super().zero_grad()
        opt = self.engine.optimizer
        opt.grad_partitions_flat_buffer.zero_()
        if getattr(opt, "offload_optimizer", False):
            # With optimizer offload the fp32 gradients the optimizer (and safe_get_local_grad)
            # reads are a separate per-sub-group buffer, written at accumulation boundaries for
            # reduced parameters only. NVMe-swapped sub-groups keep theirs on disk (not cleared).
            for i, flat in enumerate(opt.fp32_partitioned_groups_flat):
                if flat.grad is not None and not opt._swappable_optimizer_subgroup(i):
                    flat.grad.zero_()

    def _weights(self) -> list[torch.Tensor]:
        return [p.ds_tensor.data for p in self.params]

    def _masters(self) -> list[torch.Tensor]:
        return [self._get_master(p) for p in self.params]

    def local_grad_sq_sum(self) -> torch.Tensor:
        grads = [self._get_grad(p) for p in self.params]
        return kernels.sum_of_squares(grads).to(grads[0].device)

    def _drop_secondary(self) -> None:
        # ZeRO++ hpZ (zero_hpz_partition_size): a forward gathers from the node-local secondary
        # partition whenever one exists, and DeepSpeed renews it from the weights only at the
        # optimizer step. Dropping the trainable parameters' secondaries after writing ds_tensor
        # makes the next gather read the primary partition, i.e. theta + eps* (or theta): without
        # it the perturbed forward saw none of eps* on partitioned weights (docs/performance.md).
        # The optimizer step builds them again.
        for p in self.params:
            if getattr(p, "ds_secondary_tensor", None) is not None:
                p.ds_secondary_tensor = None

    def _refresh_persistent(self) -> None:
        # Persistent params keep a full gathered copy that does not follow ds_tensor: drop it
        # and gather it again from the (edited) partitions.
        if self.persistent:
            self.persistent[0].partition(param_list=self.persistent)
            self.persistent[0].all_gather(param_list=self.persistent)

    @torch.no_grad()
    def perturb(self, scale: torch.Tensor, direction: list[torch.Tensor] | None = None) -> None:
        if self._perturbed:
            raise RuntimeError("perturb() called twice without restore()")
        self._perturbed = True
        if direction is not None:
            grads = direction
        else:
            grads = self._direction_views if self._direction_mode else [self._get_grad(p) for p in self.params]
        for weights, masters, gs in _by_device(self._weights(), self._masters(), grads):
            dev = weights[0].device
            kernels.perturb_(weights, [m.to(dev) for m in masters], [g.to(dev) for g in gs], scale.to(dev))
        self._drop_secondary()
        self._refresh_persistent()

    @torch.no_grad()
    def restore(self) -> None:
        if not self._perturbed:
            return
        for weights, masters in _by_device(self._weights(), self._masters()):
            kernels.restore_(weights, [m.to(weights[0].device) for m in masters])
        self._drop_secondary()
        self._refresh_persistent()
        self._perturbed = False


class Zero2ParameterSpace(_ZeroSpace):
    def backward(self, loss: torch.Tensor, boundary: bool = True, retain_graph: bool = False) -> None:
        # ZeRO-2 reduces at accumulation boundaries only, overwriting the reduced partitions; the
        # backwards in between accumulate locally. Marking only the last backward before a read
        # as a boundary makes lambda1 g_neg(theta + eps*) and g_cap(theta) one reduced sum.
        self.engine.set_gradient_accumulation_boundary(boundary)
        self.engine.backward(loss, retain_graph=retain_graph)

    def __init__(self, engine):
        super().__init__(engine)
        self._offsets = []
        total = 0
        for p in self.params:
            self._offsets.append(total)
            total += p.numel()
        self._total = total

    @torch.no_grad()
    def zero_grad(self) -> None:
        # optimizer.zero_grad() drops param.grad / grad_accum only. Three other places carry a
        # gradient past it into the next read (get_lp_grad_fragment), so they are cleared here:
        #  - `all_grad_tensors`: what backwards before a boundary added up; a backward with
        #    boundary=False whose sum is abandoned (zero_grad before any boundary) would be added
        #    to the next boundary's gradient. Dropping it is what DeepSpeed does at a boundary.
        #  - `averaged_gradients`: the reduced fragments read until the next boundary rebuilds
        #    them; with an fp32 grad_accum_dtype under bf16/fp16 it is one flat buffer that every
        #    reduction adds to, never reset before step(), so two passes would add up. Zeroed in
        #    place (a memset, no allocation) so that after zero_grad the gradient reads as zero.
        #  - with optimizer offload, the fp32 gradient partition (written at boundaries for the
        #    parameters reduced then: an unreached one keeps the old value) and the CPU buffers
        #    backwards accumulate into while micro_step_id > 0 (reset by step() only).
        super().zero_grad()
        opt = self.engine.optimizer
        for grads in opt.averaged_gradients.values():
            if grads is None:
                continue
            flat = getattr(grads, "flat_partition", None)
            if flat is not None:
                flat.zero_()
            elif len(grads):
                torch._foreach_zero_(list(grads))
        for i in list(opt.all_grad_tensors):
            opt.all_grad_tensors[i] = None
        if getattr(opt, "cpu_offload", False):
            for master in opt.single_partition_of_fp32_groups:
                if master.grad is not None:
                    master.grad.zero_()
            for buf in opt.accumulated_grads_in_cpu.values():
                buf.zero_()

    def _fragments(self):
        """(param, its offset in the flat buffer, its fragment mapping) for the fragments this rank owns."""
        for p, off in zip(self.params, self._offsets):
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is None:
                continue
            yield p, off, mapping

    def local_grad_sq_sum(self) -> torch.Tensor:
        grads = [m.get_lp_grad_fragment(p._index_in_param_group) for p, _, m in self._fragments()]
        device = self.params[0].device
        return kernels.sum_of_squares(grads).to(device) if grads else torch.zeros((), device=device)

    def direction_tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        frags = list(self._fragments())
        return ([m.get_lp_grad_fragment(p._index_in_param_group) for p, _, m in frags],
                [m.get_hp_fragment() for _, _, m in frags])

    def _assemble(self, scale: torch.Tensor | None, direction: list[torch.Tensor] | None = None) -> None:
        """weights <- cast(master + scale * d) (or cast(master)), assembled from all ranks' fragments; d is
        the gradient, or `direction` (one tensor per fragment this rank owns, as direction_tensors)."""
        device = self.params[0].device
        flat = torch.zeros(self._total, dtype=torch.float32, device=device)
        for i, (p, off, m) in enumerate(self._fragments()):
            addr = m.lp_fragment_address
            piece = flat.narrow(0, off + addr.start, addr.numel)
            master = m.get_hp_fragment().to(device).float().flatten()
            if scale is None:
                piece.copy_(master)
            else:
                grad = direction[i] if direction is not None else m.get_lp_grad_fragment(p._index_in_param_group)
                piece.copy_(master + scale.to(device) * grad.to(device).float().flatten())
        # Fragments are disjoint and the rest is zero: the sum over ranks is exact.
        self.all_reduce_sum(flat)
        for p, off in zip(self.params, self._offsets):
            p.data.copy_(flat.narrow(0, off, p.numel()).view_as(p))

    @torch.no_grad()
    def perturb(self, scale: torch.Tensor, direction: list[torch.Tensor] | None = None) -> None:
        if self._perturbed:
            raise RuntimeError("perturb() called twice without restore()")
        self._perturbed = True
        self._assemble(scale, direction)

    @torch.no_grad()
    def restore(self) -> None:
        if not self._perturbed:
            return
        self._assemble(None)
        self._perturbed = False


def zero_parameter_space(engine, stage: int, shared_forward: bool = True) -> ParameterSpace:
    if stage == 3:
        return Zero3ParameterSpace(engine, shared_forward)
    if stage == 2:
        return Zero2ParameterSpace(engine)
    raise ValueError(f"ZeRO stage {stage} is not supported (use 2 or 3)")
