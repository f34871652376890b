"""Benchmark of the SARE primitives: Python loop vs foreach ops vs fused Triton kernels.

    DS_ACCELERATOR=cpu .venv/bin/python -m sare_kernels.bench --sizes 1e6,1e7 --json bench.json

One SARE cycle on flat buffers is timed phase by phase: gradient sum of squares (the norm),
perturb (theta + rho * g / ||g||) and restore (theta again). Methods:

    loop+clone    per-parameter Python loop as common SAM code does it: norms per tensor,
                  a cloned backup of each weight, p.add_(g * scale), restore by copy_
    loop add/sub  the same loop without the backup: p.add_(e), restore by p.sub_(e) (keeps e;
                  not exact in low precision, shown because it is common)
    foreach       sare_kernels.reference (torch._foreach_* ops), the torch path of the dispatch
    fused         sare_kernels.triton_sam, only where Triton compiles (CUDA); the CPU interpreter
                  is a correctness tool, not a fast path, so it is not timed
    ... /backup   the no-master mode (perturb_with_backup_ into the gradient buffer, restore_from_)

Layout: weights of the given dtype, fp32 master, fp32 gradient (a ZeRO-3 partition). GB/s
counts the bytes the task needs at minimum (each operand read or written once: 16n + 2sn
bytes per cycle for weights of s bytes, 16n + 3sn for the no-master mode), divided by the
measured time; a method that moves more than that shows a lower figure. "% peak" divides by
the device's peak memory bandwidth: on CUDA a datasheet value per GPU (table below) or the
memory clock x bus width, on the CPU a measured large copy_ (so CPU percentages are relative
to what a copy reaches on this machine, not to the DRAM datasheet). Peak extra memory is
what a cycle allocates beyond the buffers (CUDA: allocator peak; CPU: every tensor the ops
allocate, tracked through a TorchDispatchMode).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import time
import weakref
from dataclasses import asdict, dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from sare_kernels import reference

@dataclass(frozen=True)
class DevicePeak:
    label: str
    bandwidth_gbps: float          # datasheet memory bandwidth, GB/s (1e9 bytes/s)
    bf16_tflops: float | None      # datasheet dense bf16 tensor-core peak, TFLOP/s


# Datasheet peaks of GPUs, matched in order against torch.cuda.get_device_name(): the more specific
# names first. Memory bandwidth for the % of peak here; bf16 TFLOP/s for MFU (sare_ds.gpu_check).
DEVICE_PEAKS: tuple[tuple[str, DevicePeak], ...] = (
    (r"GH200", DevicePeak("GH200", 4000.0, 989.0)),  # before "H200"; 96 GB HBM3 version
    (r"(?<!G)H200", DevicePeak("H200", 4800.0, 989.0)),
    (r"H100.*PCIe", DevicePeak("H100 PCIe", 2000.0, 756.0)),
    (r"H100.*NVL", DevicePeak("H100 NVL", 3900.0, 835.0)),
    (r"H100", DevicePeak("H100 SXM", 3350.0, 989.0)),
    (r"A100.*PCIe.*80GB|A100.*80GB.*PCIe", DevicePeak("A100 80GB PCIe", 1935.0, 312.0)),
    (r"A100.*(80GB|SXM4-80)", DevicePeak("A100 80GB SXM", 2039.0, 312.0)),
    (r"A100", DevicePeak("A100 40GB", 1555.0, 312.0)),
)


def device_peak(name: str) -> DevicePeak | None:
    """The datasheet peaks of a device name, or None when the device is not in the table."""
    for pattern, peak in DEVICE_PEAKS:
        if re.search(pattern, name or ""):
            return peak
    return None


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RHO = 0.05


# -- the methods: each returns (norm, perturb, restore) callables over prepared buffers --------
def _loop_clone(params, masters, grads):
    state = {}

    def norm():
        state["scale"] = RHO / torch.stack([g.norm(2) for g in grads]).norm(2).clamp_min(1e-12)

    def perturb():
        state["backup"] = [p.clone() for p in params]
        for p, g in zip(params, grads):
            p.add_(g * state["scale"])

    def restore():
        for p, b in zip(params, state.pop("backup")):
            p.copy_(b)
    return norm, perturb, restore


def _loop_add_sub(params, masters, grads):
    state = {}

    def norm():
        state["scale"] = RHO / torch.stack([g.norm(2) for g in grads]).norm(2).clamp_min(1e-12)

    def perturb():
        state["eps"] = [g * state["scale"] for g in grads]
        for p, e in zip(params, state["eps"]):
            p.add_(e)

    def restore():
        for p, e in zip(params, state.pop("eps")):
            p.sub_(e)
    return norm, perturb, restore


def _with_master(impl):
    def build(params, masters, grads):
        state = {}

        def norm():
            state["scale"] = RHO / impl.sum_of_squares(grads).sqrt().clamp_min(1e-12)

        def perturb():
            impl.perturb_(params, masters, grads, state["scale"])

        def restore():
            impl.restore_(params, masters)
        return norm, perturb, restore
    return build


def _with_backup(impl):
    def build(params, masters, grads):
        state = {}

        def norm():
            state["scale"] = RHO / impl.sum_of_squares(grads).sqrt().clamp_min(1e-12)

        def perturb():
            # theta goes into the gradient buffer (dead once eps* is formed): no extra memory.
            impl.perturb_with_backup_(params, grads, state["scale"], grads)

        def restore():
            impl.restore_from_(params, grads)
        return norm, perturb, restore
    return build


# -- measuring ----------------------------------------------------------------------------------
class _AllocationTracker(TorchDispatchMode):
    """Peak bytes of tensors allocated by the ops run inside it (CPU has no allocator stats)."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage.data_ptr() in seen or storage.nbytes() == 0:
                    continue  # a view or in-place result: no new memory
                seen.add(storage.data_ptr())
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, storage.nbytes())
        return out


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)  # the device work is what is measured, not the launch
    return time.perf_counter() - start


def _peak_extra_bytes(phases, device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for fn in phases:
            fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with _AllocationTracker() as tracker:
        for fn in phases:
            fn()
    return tracker.peak


def peak_bandwidth(device) -> tuple[float, str]:
    """(GB/s, where the figure comes from) for the device's memory."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        peak = device_peak(props.name)
        if peak is not None:
            return peak.bandwidth_gbps, f"datasheet value for {props.name} ({peak.label})"
        clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
        if clock_khz and bus_bits:  # double data rate: two transfers per clock
            return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9, f"memory clock x bus width of {props.name}"
    src = torch.empty(1 << 26, device=device).normal_()
    dst = torch.empty_like(src)
    seconds = min(_time(lambda: dst.copy_(src), device) for _ in range(5))
    return 2 * src.nbytes / seconds / 1e9, "measured: best of 5 copy_ of 256 MiB fp32"


def _available_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        info = dict(line.split(":") for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


def _split(n: int, tensor_numel: int) -> list[int]:
    return [tensor_numel] * (n // tensor_numel) + ([n % tensor_numel] if n % tensor_numel else [])


@dataclass
class Row:
    method: str
    elements: int
    dtype: str
    tensors: int
    norm_ms: float
    perturb_ms: float
    restore_ms: float
    cycle_ms: float
    gbps: float
    pct_peak: float
    peak_extra_mib: float


def run(sizes, dtypes, repeats, tensor_numel, device) -> tuple[list[Row], float, str, list[str]]:
    peak_gbps, peak_source = peak_bandwidth(device)
    methods = {"loop+clone": _loop_clone, "loop add/sub": _loop_add_sub, "foreach": _with_master(reference),
               "foreach/backup": _with_backup(reference)}
    notes = []
    if device.type == "cuda":
        from sare_kernels import triton_sam
        if not triton_sam.INTERPRETED:
            methods.update({"fused": _with_master(triton_sam), "fused/backup": _with_backup(triton_sam)})
    else:
        notes.append("fused Triton kernels not timed: no GPU (the CPU interpreter is for tests only)")
    rows = []
    for n in sizes:
        for dname in dtypes:
            dtype = DTYPES[dname]
            size = torch.tensor([], dtype=dtype).element_size()
            # weights + master + grad, plus the largest temporaries (clone, fp32 shifted copy).
            if (size + 4 + 4 + 4 + size) * n > 0.7 * _available_bytes(device):
                notes.append(f"{n:.0e} {dname}: skipped, does not fit in 70% of free memory")
                continue
            gen = torch.Generator(device=device).manual_seed(0)
            masters = [torch.randn(k, generator=gen, device=device) for k in _split(n, tensor_numel)]
            params = [m.to(dtype, copy=True) for m in masters]  # never the master itself
            for name, build in methods.items():
                grads = [torch.randn(m.numel(), generator=gen, device=device) for m in masters]
                phases = build(params, masters, grads)
                for fn in phases:  # warm-up (allocator, kernel compilation)
                    fn()
                # The phases depend on each other (perturb needs the scale, restore the backup),
                # so the cycle is timed in order and each phase keeps its own median.
                per_phase = [[], [], []]
                for _ in range(repeats):
                    for i, fn in enumerate(phases):
                        per_phase[i].append(_time(fn, device))
                norm_s, perturb_s, restore_s = (statistics.median(t) for t in per_phase)
                cycle = norm_s + perturb_s + restore_s
                bytes_needed = (16 + 3 * size) * n if name.endswith("/backup") else (16 + 2 * size) * n
                gbps = bytes_needed / cycle / 1e9
                extra = _peak_extra_bytes(phases, device)
                rows.append(Row(name, n, dname, len(masters), norm_s * 1e3, perturb_s * 1e3, restore_s * 1e3,
                                cycle * 1e3, gbps, 100 * gbps / peak_gbps, extra / 2 ** 20))
                del grads, phases
            del masters, params
    return rows, peak_gbps, peak_source, notes


def format_table(rows: list[Row]) -> str:
    head = ("method", "elements", "dtype", "tensors", "norm ms", "perturb ms", "restore ms", "cycle ms",
            "GB/s", "% peak", "peak extra MiB")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(f"| {r.method} | {r.elements:.0e} | {r.dtype} | {r.tensors} | {r.norm_ms:.2f} | "
                     f"{r.perturb_ms:.2f} | {r.restore_ms:.2f} | {r.cycle_ms:.2f} | {r.gbps:.1f} | "
                     f"{r.pct_peak:.1f} | {r.peak_extra_mib:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e6,1e7", help="comma-separated element counts, e.g. 1e6,1e7,1e8,1e9")
    parser.add_argument("--dtypes", default="fp32,bf16", help=f"comma-separated weight dtypes of {sorted(DTYPES)}")
    parser.add_argument("--repeats", type=int, default=5, help="timed cycles per method (median reported)")
    parser.add_argument("--tensor-numel", type=float, default=2 ** 22,
                        help="elements per tensor: a size is split into tensors this large (the loop's unit)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write the rows and the peak bandwidth here")
    args = parser.parse_args(argv)
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    dtypes = [d.strip() for d in args.dtypes.split(",")]
    for d in dtypes:
        if d not in DTYPES:
            parser.error(f"--dtypes: {d!r} is not one of {sorted(DTYPES)}")
    device = torch.device(args.device)
    rows, peak_gbps, peak_source, notes = run(sizes, dtypes, args.repeats, int(args.tensor_numel), device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; peak bandwidth {peak_gbps:.1f} GB/s ({peak_source})")
    print(format_table(rows))
    for note in notes:
        print(f"note: {note}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "peak_gbps": peak_gbps, "peak_source": peak_source, "notes": notes,
                       "torch": torch.__version__, "rows": [asdict(r) for r in rows]}, f, indent=1)


if __name__ == "__main__":
    main()
