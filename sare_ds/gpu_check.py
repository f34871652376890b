"""One GPU check of sare_ds on a CUDA machine (one H100 / H200), in at most --minutes (default 8).

    bash launch/gpu_check.sh [--out runs/gpu_check] [--minutes 8] [--steps 8] [--methods ft,efuf,sare]
                             [--parts env,kernels,bench,train,quickstart] [--dry-run] [--allow-cpu]
    bash launch/gpu_check.sh --build-wheels     # on a machine WITH network: fill .whl/ for an offline GPU machine

Parts, each with a share of the time (unused time passes to the next part); a part that fails or
runs out of time is reported and the next one runs:
  env         device, driver and versions; installs the wheels of .whl/ whose packages are missing
              (pip install --no-deps --no-index), then checks deepspeed / open_clip / webdataset import
  kernels     pytest tests/test_kernels.py: the compiled Triton kernels on CUDA (their CUDA cases must run)
  bench       python -m sare_kernels.bench --json: GB/s of the fused kernels and % of the device's peak bandwidth
  train       bf16 ZeRO-3 training of the 7B preset, FT / EFUF / SARE, synthetic data: full depth if the
              memory plan (sare_ds/plan.py) says it fits, else the deepest preset:llava-1.5-7b,text_layers=K
              that does; per run the step time, tokens/s, phases, MFU from the plan's FLOPs, and the
              measured peak memory against the plan's prediction
  quickstart  bash launch/quickstart.sh --ci (its GPU branch: all GPUs, ZeRO-3 bf16)
Writes <out>/gpu_check.md (the one summary), <out>/gpu_check.json (the same figures) and
<out>/logs/<part>.log. Without CUDA it refuses (exit 2) unless --dry-run (print and record what would
run) or --allow-cpu (run the plumbing on the CPU, with a small --model).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("env", "kernels", "bench", "train", "quickstart")
METHODS = ("ft", "efuf", "sare")
# Shares of the time budget (8 minutes: 58 s, 58 s, 38 s, 206 s, 120 s); unused time rolls over. env
# installs up to ~30 wheels offline (pip must not be cut off mid-install).
SHARES = {"env": 0.12, "kernels": 0.12, "bench": 0.08, "train": 0.43, "quickstart": 0.25}
DEFAULT_MODEL = "preset:llava-1.5-7b"
RECIPE = "launch/configs/llava15_7b_sare.yaml"
GPU_DS_CONFIG, CPU_DS_CONFIG = "ds_configs/zero3_bf16.json", "ds_configs/zero3_cpu_fp32.json"
# `python -m sare_kernels.bench` that also works from a checkout that is not installed (`import sare_ds`
# maps the kernels/ folder to sare_kernels first).
SARE_KERNELS_BENCH = (sys.executable, "-c", "import sare_ds, runpy; runpy.run_module('sare_kernels.bench', "
                      "run_name='__main__', alter_sys=True)")
WARMUP_STEPS = 2  # first steps (allocator, kernel compilation, ZeRO-3 trace) are left out of the medians


# ------------------------------------------------------------------------------- device peaks

# The datasheet table lives with the kernel benchmark, which reports % of peak bandwidth too.
from sare_kernels.bench import device_peak  # noqa: E402


# ------------------------------------------------------------------------------------ arguments

def _csv(choices: Sequence[str], flag: str):
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if not items or bad:
            raise argparse.ArgumentTypeError(f"{flag} {text!r}: {', '.join(bad) or 'empty'} not among "
                                              f"{', '.join(choices)}; give a comma-separated subset")
        return items
    return parse


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="launch/gpu_check.sh", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/gpu_check", help="output folder (default runs/gpu_check)")
    p.add_argument("--minutes", type=float, default=8.0, help="time budget of the whole check (default 8)")
    p.add_argument("--parts", type=_csv(PARTS, "--parts"), default=list(PARTS),
                   help=f"parts to run, comma-separated subset of {','.join(PARTS)} (default all)")
    p.add_argument("--methods", type=_csv(METHODS, "--methods"), default=list(METHODS),
                   help="methods the train part runs (default ft,efuf,sare)")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per training run (default 8; the "
                                                         f"first {WARMUP_STEPS} are left out of the medians)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model of the train part (default preset:llava-1.5-7b; "
                                                          "layers are cut if the plan says it does not fit)")
    p.add_argument("--bench-sizes", default="1e7,1e8", help="element counts of the kernel benchmark (default 1e7,1e8)")
    p.add_argument("--wheels", default=".whl", help="folder of wheels to install when packages are missing")
    p.add_argument("--dry-run", action="store_true", help="run nothing: record the commands and budgets of each part")
    p.add_argument("--allow-cpu", action="store_true", help="run without CUDA (plumbing check; needs a small --model)")
    p.add_argument("--build-wheels", action="store_true",
                   help="on a machine with network: build the wheels the offline GPU machine needs into --wheels")
    args = p.parse_args(argv)
    if not 0 < args.minutes <= 120:
        p.error(f"--minutes {args.minutes}: give a time budget in (0, 120] minutes")
    if args.steps < WARMUP_STEPS + 1:
        p.error(f"--steps {args.steps}: needs at least {WARMUP_STEPS + 1} (the first {WARMUP_STEPS} are warm-up)")
    try:
        args.bench_sizes = [int(float(x)) for x in args.bench_sizes.split(",")]
    except ValueError:
        p.error(f"--bench-sizes {args.bench_sizes!r}: write comma-separated element counts, e.g. 1e7,1e8")
    if any(n < 1 for n in args.bench_sizes):
        p.error("--bench-sizes: element counts must be >= 1")
    return args


# ------------------------------------------------------------------------------------- results

PASS, FAIL, SKIPPED = "pass", "FAIL", "skipped"


@dataclass
class PartResult:
    name: str
    status: str = SKIPPED
    seconds: float = 0.0
    budget_s: float = 0.0
    detail: str = ""
    figures: dict = field(default_factory=dict)
    log: str = ""


class Budget:
    """Time shares per part; what a part leaves unused goes to the next one."""

    def __init__(self, minutes: float, parts: Sequence[str]):
        self.total = minutes * 60.0
        self.start = time.monotonic()
        weights = {p: SHARES[p] for p in parts}
        scale = sum(weights.values()) or 1.0
        self.shares = {p: self.total * w / scale for p, w in weights.items()}
        self.carry = 0.0

    def left(self) -> float:
        return self.total - (time.monotonic() - self.start)

    def take(self, part: str) -> float:
        return max(0.0, min(self.shares[part] + self.carry, self.left()))

    def give_back(self, part: str, used: float, granted: float) -> None:
        self.carry = max(0.0, granted - used)


# ----------------------------------------------------------------------------------- processes

def child_env(allow_cpu: bool = False, wheels: str | Path = ".whl") -> dict:
    """The environment of every command: the checkout importable (no install needed), DeepSpeed's accelerator."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["DS_ACCELERATOR"] = "cpu" if allow_cpu else "cuda"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    wheels = ROOT / wheels
    if wheels.is_dir():  # set-up steps (launch/setup_env.sh) then install from the wheels, offline
        env.setdefault("PIP_FIND_LINKS", str(wheels))
        env.setdefault("PIP_NO_INDEX", "1")
    return env


def run_command(cmd: Sequence[str], timeout: float, log: Path, env: dict | None = None,
                cwd: Path = ROOT) -> tuple[int, bool, float]:
    """Run `cmd` with its output into `log`; (exit code, timed out, seconds). On a timeout the whole
    process group is killed (the deepspeed launcher and its ranks too)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log, "a") as out:
        out.write(f"$ {' '.join(map(str, cmd))}   (timeout {timeout:.0f} s)\n")
        out.flush()
        if timeout <= 1:
            out.write("not started: no time left\n")
            return 124, True, 0.0
        proc = subprocess.Popen(list(map(str, cmd)), stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=10)
                    break
                except subprocess.TimeoutExpired:
                    continue
            rc, timed_out = 124, True
        out.write(f"[exit {rc}{', timed out' if timed_out else ''} after {time.monotonic() - start:.1f} s]\n")
    return rc, timed_out, time.monotonic() - start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 12) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ------------------------------------------------------------------------------------- part: env

WHEEL_NAME = re.compile(r"^(?P<name>[A-Za-z0-9_.]+?)-(?P<version>[^-]+)-.*\.whl$")


def missing_wheels(folder: Path, installed: Callable[[str], bool] | None = None) -> list[Path]:
    """Wheels in `folder` whose distribution is not installed (installed ones are left alone, so a
    wheel never replaces what the machine has)."""
    from importlib import metadata

    def is_installed(name: str) -> bool:
        try:
            metadata.version(name)
            return True
        except metadata.PackageNotFoundError:
            return False

    check = installed or is_installed
    out = []
    for wheel in sorted(folder.glob("*.whl")) if folder.is_dir() else []:
        m = WHEEL_NAME.match(wheel.name)
        if m and not check(m.group("name").replace("_", "-")):
            out.append(wheel)
    return out


DEVICE_QUERY = """
import json, os, platform, torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda or "none",
        "host": platform.node(), "device": "none", "device_memory_gib": 0.0, "driver": "n/a"}
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    info.update(device=torch.cuda.get_device_name(0), device_memory_gib=props.total_memory / 2 ** 30,
                device_count=torch.cuda.device_count(), capability=f"{props.major}.{props.minor}")
print(json.dumps(info))
"""


def environment(allow_cpu: bool) -> dict:
    """Device, memory and versions, read in a child process: this process never creates a CUDA context
    (it would hold ~0.5 GiB of the GPU through every measurement)."""
    try:
        res = subprocess.run([sys.executable, "-c", DEVICE_QUERY], capture_output=True, text=True, timeout=120)
        info = json.loads(res.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError) as e:
        info = {"device": "unknown", "device_memory_gib": 0.0, "error": f"device query failed: {e}"}
    if info.get("device") not in ("none", "unknown"):
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            pass
    elif allow_cpu:
        info["device"] = f"CPU ({os.cpu_count()} cores; --allow-cpu)"
    return info


def versions(env: dict, timeout: float = 120.0) -> dict:
    """Versions as the child processes see them (after the wheels were installed)."""
    code = ("import json, sys; sys.path.insert(0, '.');\n"
            "import sare_ds\n"
            "out = {}\n"
            "for m in ('triton', 'transformers', 'deepspeed', 'open_clip', 'webdataset', 'peft', 'pytest'):\n"
            "    try:\n"
            "        mod = __import__(m); out[m] = str(getattr(mod, '__version__', '?'))\n"
            "    except Exception as e:\n"
            "        out[m] = 'missing (' + type(e).__name__ + ')'\n"
            "print(json.dumps(out))")
    try:
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env,
                             cwd=ROOT)
        return json.loads(res.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError) as e:
        return {"error": f"could not read versions: {e}"}


def part_env(args, ctx: dict, timeout: float) -> PartResult:
    r = PartResult("env")
    log = ctx["logs"] / "env.log"
    deadline = time.monotonic() + timeout
    wheels = missing_wheels(ROOT / args.wheels)
    if wheels:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", *map(str, wheels)]
        rc, timed_out, _ = run_command(cmd, timeout, log, ctx["env"])
        if rc and "externally-managed" in log.read_text(errors="replace"):
            rc, timed_out, _ = run_command(cmd + ["--break-system-packages"], timeout, log, ctx["env"])
        r.figures["wheels_installed"] = [w.name for w in wheels] if rc == 0 else []
        if rc:
            r.detail = f"installing {len(wheels)} wheel(s) from {args.wheels}/ failed (exit {rc}); see {log.name}. "
        # This process plans the training runs: let it see what was just installed.
        import importlib
        import site

        importlib.invalidate_caches()
        user_site = site.getusersitepackages()
        if os.path.isdir(user_site) and user_site not in sys.path:
            site.addsitedir(user_site)
    ctx["versions"] = versions(ctx["env"], max(20.0, deadline - time.monotonic()))
    r.figures.update(ctx["versions"])
    missing = [m for m in ("deepspeed", "open_clip", "webdataset", "transformers", "triton")
               if str(ctx["versions"].get(m, "missing")).startswith("missing")]
    if missing:
        r.status = FAIL
        r.detail += (f"missing: {', '.join(missing)}. Fix: on a machine with network run `bash launch/gpu_check.sh "
                     f"--build-wheels`, carry {args.wheels}/ here, run again.")
    else:
        r.status = PASS
        r.detail += "all imports work"
    r.log = str(log)
    return r


# ------------------------------------------------------------------------------- part: kernels

def parse_pytest(text: str) -> dict:
    """Counts of pytest's final line ('33 passed, 21 skipped in 5.9s') and CUDA-skip lines."""
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", text)}
    if "errors" in counts:
        counts["error"] = counts.pop("errors")
    skips = re.findall(r"SKIPPED \[(\d+)\][^\n]*need a CUDA GPU", text)
    counts["cuda_skipped"] = sum(int(n) for n in skips)
    return counts


def part_kernels(args, ctx: dict, timeout: float) -> PartResult:
    r = PartResult("kernels")
    log = ctx["logs"] / "kernels.log"
    cmd = [sys.executable, "-m", "pytest", "tests/test_kernels.py", "-q", "-rs", "-p", "no:cacheprovider"]
    rc, timed_out, _ = run_command(cmd, timeout, log, ctx["env"])
    counts = parse_pytest(log.read_text(errors="replace"))
    r.figures = counts
    if timed_out:
        r.status, r.detail = FAIL, f"timed out after {timeout:.0f} s"
    elif rc != 0:
        r.status, r.detail = FAIL, (f"pytest exit {rc}: {counts.get('failed', 0)} failed, {counts.get('error', 0)} "
                                    f"errors; last lines:\n{_tail(log, 8)}")
    elif counts["cuda_skipped"]:
        r.status, r.detail = FAIL, f"{counts['cuda_skipped']} CUDA cases skipped: the compiled kernels did not run"
    else:
        r.status, r.detail = PASS, f"{counts.get('passed', 0)} passed, {counts.get('skipped', 0)} skipped"
    r.log = str(log)
    return r


# --------------------------------------------------------------------------------- part: bench

def bench_figures(bench: dict, device_name: str) -> dict:
    """Rows of the benchmark JSON with GB/s and % of the device's datasheet peak (None when unknown)."""
    peak = device_peak(device_name)
    rows = []
    for row in bench.get("rows", []):
        gbps = float(row["gbps"])
        rows.append({"method": row["method"], "elements": int(row["elements"]), "dtype": row["dtype"],
                     "cycle_ms": float(row["cycle_ms"]), "gbps": gbps,
                     "pct_peak": 100.0 * gbps / peak.bandwidth_gbps if peak else None,
                     "peak_extra_mib": float(row.get("peak_extra_mib", 0.0))})
    return {"device": device_name, "peak_gbps": peak.bandwidth_gbps if peak else None,
            "peak_label": peak.label if peak else None, "bench_peak_gbps": bench.get("peak_gbps"),
            "bench_peak_source": bench.get("peak_source"), "rows": rows, "notes": bench.get("notes", [])}


def part_bench(args, ctx: dict, timeout: float) -> PartResult:
    r = PartResult("bench")
    log = ctx["logs"] / "bench.log"
    out = ctx["out"] / "bench.json"
    sizes = ",".join(str(n) for n in args.bench_sizes)
    cmd = [*SARE_KERNELS_BENCH, "--sizes", sizes, "--dtypes", "fp32,bf16",
           "--repeats", "3" if args.allow_cpu else "10", "--json", str(out)]
    if args.allow_cpu and not ctx["info"]["device"].startswith("NVIDIA"):
        cmd += ["--device", "cpu"]
    rc, timed_out, _ = run_command(cmd, timeout, log, ctx["env"])
    if rc or not out.is_file():
        r.status = FAIL
        r.detail = f"timed out after {timeout:.0f} s" if timed_out else f"exit {rc}; last lines:\n{_tail(log, 6)}"
    else:
        r.figures = bench_figures(json.loads(out.read_text()), ctx["info"]["device"])
        fused = [row for row in r.figures["rows"] if row["method"] == "fused"]
        if not fused and not args.allow_cpu:
            r.status, r.detail = FAIL, "no fused (Triton) rows: the compiled kernels were not timed"
        else:
            r.status, r.detail = PASS, f"{len(r.figures['rows'])} rows"
    r.log = str(log)
    return r


# --------------------------------------------------------------------------------- part: train

def read_run(run_dir: Path, warmup: int = WARMUP_STEPS) -> dict:
    """Medians over the logged steps after `warmup` of a run's metrics.jsonl, and its summary.json."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path} is missing: the run did not log a step")
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{metrics_path} is empty: the run did not log a step")
    used = rows[warmup:] if len(rows) > warmup else rows[-1:]
    keys = sorted({k for row in used for k in row if k.startswith("perf/")})
    medians = {k: statistics.median(row[k] for row in used if k in row) for k in keys}
    summary = {}
    if (run_dir / "summary.json").is_file():
        summary = json.loads((run_dir / "summary.json").read_text())
    peaks = [row["perf/peak_mem_gb"] for row in rows if "perf/peak_mem_gb" in row]
    peak = summary.get("peak_memory_gb", max(peaks) if peaks else None)
    return {"steps_logged": len(rows), "steps_used": len(used), "medians": medians,
            "phases": {k.split("/", 2)[2]: v for k, v in medians.items() if k.startswith("perf/phase/")},
            "peak_memory_gib": peak, "status": summary.get("status", "no summary.json"),
            "losses": {k: rows[-1][k] for k in rows[-1] if k.startswith(("loss/", "sam/"))}}


def run_lengths(run: dict, per_step: dict, grad_accum: int, method: str) -> tuple[float, dict]:
    """(mean tokens per sample, lengths by kind of one step) from a run's logged throughput."""
    m = run["medians"]
    tokens, samples = m.get("perf/tokens_per_s"), m.get("perf/samples_per_s")
    if not tokens or not samples:
        raise ValueError("the run logged no perf/tokens_per_s or perf/samples_per_s")
    mean = tokens / samples
    from sare_ds.plan import uniform_lengths

    return mean, uniform_lengths(per_step, mean, grad_accum, method)


def mfu(model_flops: float, step_time_s: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation in % (None without a known peak)."""
    if not peak_tflops or not step_time_s:
        return None
    return 100.0 * model_flops / step_time_s / (peak_tflops * 1e12)


def choose_depth(model: str, gpu_mem_gib: float, seq_len: int, methods: Sequence[str], ds_config: Path,
                 dtype: str = "bfloat16") -> tuple[str, dict]:
    """The model spec to train: full depth if the plan says every method fits in `gpu_mem_gib` on one GPU,
    else the deepest `<model>,text_layers=K` that does. Returns (spec, the plan's numbers)."""
    from sare_ds.config import ModelConfig
    from sare_ds.plan import GiB, StepShape, ZeroSettings, rank_peak, summarize

    zero = ZeroSettings.from_json(ds_config, dtype)
    summary = summarize(ModelConfig(name_or_path=model, dtype=dtype))

    def needed(layers: int) -> float:
        s = summary if layers == summary.llm.layers else summary.with_llm_layers(layers)
        return max(rank_peak(s, StepShape(method=m, seq_len=seq_len), zero, 1)["needed"] for m in methods) / GiB

    layers = summary.llm.layers
    full = needed(layers)
    if full <= gpu_mem_gib:
        return model, {"needed_gib": full, "layers": layers, "full_depth": True}
    # Memory falls with depth: bisect for the deepest that fits.
    lo, hi = 1, layers - 1
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        gib = needed(mid)
        if gib <= gpu_mem_gib:
            best, lo = (mid, gib), mid + 1
        else:
            hi = mid - 1
    if best is None:
        raise ValueError(f"even 1 layer of {model} does not fit in {gpu_mem_gib:.0f} GiB by the plan")
    return f"{model},text_layers={best[0]}", {"needed_gib": best[1], "layers": best[0], "full_depth": False,
                                              "full_needed_gib": full}


def train_command(spec: str, method: str, steps: int, run_dir: Path, ds_config: str, allow_cpu: bool,
                  port: int) -> list[str]:
    num_images = max(48, 8 * steps)  # about half the generated images give a neg sample; one neg per step
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(port),
           "launch/train.py", "--config", RECIPE, f"model.name_or_path={spec}", "data.source=synthetic",
           "data.image_size=336", f"data.num_images={num_images}", f"optim.max_steps={steps}", "logging.log_every=1",
           f"output.run_dir={run_dir}", "output.export_hf=false", "output.save_every=0", "output.save_final=false",
           f"distributed.ds_config={ds_config}", f"method.name={method}", "logging.progress_bar=false"]
    if allow_cpu:
        cmd += ["model.dtype=float32"]
    return cmd


def part_train(args, ctx: dict, timeout: float) -> PartResult:
    import shutil

    r = PartResult("train")
    log = ctx["logs"] / "train.log"
    deadline = time.monotonic() + timeout
    info = ctx["info"]
    ds_config = CPU_DS_CONFIG if args.allow_cpu else GPU_DS_CONFIG
    dtype = "float32" if args.allow_cpu else "bfloat16"
    try:
        from sare_ds.config import ModelConfig
        from sare_ds.plan import (ZeroSettings, load_recipe, rank_peak, step_flops, step_from_config,
                                  summarize)

        cfg, _ = load_recipe(ROOT / RECIPE)
        recipe_step = step_from_config(cfg)
        if args.allow_cpu:
            spec = args.model
            probe = summarize(ModelConfig(name_or_path=spec, dtype=dtype))
            if probe.total_params > 5e8:
                raise ValueError(f"--allow-cpu: {spec} has {probe.total_params:,} parameters; on the CPU the train "
                                 "part takes a small --model, e.g. preset:llava-1.5-7b-reduced")
            choice = {"layers": probe.llm.layers, "full_depth": True}
        else:
            spec, choice = choose_depth(args.model, info["device_memory_gib"], recipe_step.seq_len, args.methods,
                                        ROOT / ds_config, dtype)
        summary = summarize(ModelConfig(name_or_path=spec, dtype=dtype))
    except Exception as e:  # noqa: BLE001 - reported, the next part runs
        r.status, r.detail = FAIL, f"could not plan the runs: {type(e).__name__}: {e}"
        return r
    r.figures = {"model": spec, "choice": choice, "ds_config": ds_config, "runs": {}}
    peak = device_peak(info["device"])
    zero = ZeroSettings.from_json(ROOT / ds_config, dtype)
    failures = []
    for i, method in enumerate(args.methods):
        run_dir = ctx["out"] / "train" / method
        shutil.rmtree(run_dir, ignore_errors=True)
        # The first run starts cold (tokenizer build, caches): it may use all but ~45 s per run still to come.
        left = deadline - time.monotonic()
        rest = len(args.methods) - i - 1
        share = max(left / (rest + 1), left - 45.0 * rest)
        rc, timed_out, seconds = run_command(
            train_command(spec, method, args.steps, run_dir, ds_config, args.allow_cpu, free_port()),
            share, log, ctx["env"])
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # a 7B ZeRO-3 checkpoint is ~14 GB
        entry = {"wall_s": seconds, "exit": rc, "timed_out": timed_out}
        try:
            run = read_run(run_dir)
            mean_len, lengths = run_lengths(run, recipe_step.per_step, recipe_step.grad_accum_steps, method)
            flops = step_flops(summary, method, lengths, gradient_checkpointing=recipe_step.gradient_checkpointing)
            step_time = run["medians"].get("perf/step_time_s")
            step = dataclasses.replace(recipe_step, method=method, seq_len=max(2, math.ceil(mean_len)))
            predicted = rank_peak(summary, step, zero, 1)
            entry.update(run, mean_tokens_per_sample=mean_len, model_tflop_per_step=flops["model"] / 1e12,
                         hardware_tflop_per_step=flops["hardware"] / 1e12,
                         mfu_pct=mfu(flops["model"], step_time, peak.bf16_tflops if peak else None),
                         hfu_pct=mfu(flops["hardware"], step_time, peak.bf16_tflops if peak else None),
                         predicted_peak_gib=predicted["allocated"] / 2 ** 30,
                         predicted_activation_gib=predicted["activations"] / 2 ** 30,
                         predicted_static_gib=predicted["static"] / 2 ** 30)
            if rc != 0 or run["status"] != "completed":
                failures.append(f"{method}: exit {rc}{' (timed out)' if timed_out else ''}, status {run['status']}")
        except Exception as e:  # noqa: BLE001
            entry["error"] = f"{type(e).__name__}: {e}"
            failures.append(f"{method}: {'timed out' if timed_out else f'exit {rc}'}; {entry['error']}")
        r.figures["runs"][method] = entry
    r.status = FAIL if failures else PASS
    r.detail = "; ".join(failures) if failures else f"{len(args.methods)} run(s) completed"
    r.log = str(log)
    return r


# ---------------------------------------------------------------------------- part: quickstart

def part_quickstart(args, ctx: dict, timeout: float) -> PartResult:
    r = PartResult("quickstart")
    log = ctx["logs"] / "quickstart.log"
    out = ctx["out"] / "quickstart"
    rc, timed_out, _ = run_command(["bash", "launch/quickstart.sh", "--ci", "--out", str(out)], timeout, log,
                                   ctx["env"])
    report = out / "report" / "report.md"
    if rc == 0 and report.is_file():
        r.status, r.detail = PASS, f"report: {report}"
        r.figures["report"] = report.read_text()[:4000]
    else:
        r.status = FAIL
        r.detail = ((f"timed out after {timeout:.0f} s" if timed_out else f"exit {rc}")
                    + f"; last lines:\n{_tail(log, 8)}")
    r.log = str(log)
    return r


RUNNERS = {"env": part_env, "kernels": part_kernels, "bench": part_bench, "train": part_train,
           "quickstart": part_quickstart}


def dry_commands(args, ctx: dict) -> dict[str, str]:
    """What each part would run (the --dry-run record)."""
    sizes = ",".join(str(n) for n in args.bench_sizes)
    return {
        "env": f"{sys.executable} -m pip install --no-deps --no-index <missing wheels of {args.wheels}/>; "
               "import checks",
        "kernels": f"{sys.executable} -m pytest tests/test_kernels.py -q -rs",
        "bench": f"{sys.executable} -m sare_kernels.bench --sizes {sizes} --dtypes fp32,bf16 --repeats 10 "
                 "--json <out>/bench.json",
        "train": " ".join(train_command(args.model, "<method>", args.steps, Path("<out>/train/<method>"),
                                        CPU_DS_CONFIG if args.allow_cpu else GPU_DS_CONFIG, args.allow_cpu, 0))
                 + f"  for method in {','.join(args.methods)} (depth from the plan)",
        "quickstart": "bash launch/quickstart.sh --ci --out <out>/quickstart",
    }


# ------------------------------------------------------------------------------------ summary

def _fmt(x, spec: str = ".1f", none: str = "n/a") -> str:
    return none if x is None else format(x, spec)


def write_summary(path: Path, info: dict, results: Sequence[PartResult], args=None, versions_: dict | None = None,
                  started: str = "") -> str:
    """The one markdown summary: device, versions, every figure, predicted vs measured peak, pass/fail."""
    lines = ["# sare_ds GPU check", ""]
    if started:
        lines.append(f"Started {started}; total {sum(r.seconds for r in results):.0f} s"
                     + (f" of a {args.minutes:g}-minute budget" if args else "") + ".")
        lines.append("")
    lines += ["## Machine", "", "| | |", "|---|---|"]
    lines.append(f"| device | {info.get('device', '?')} ({_fmt(info.get('device_memory_gib'), '.1f')} GiB) |")
    peak = device_peak(info.get("device", ""))
    lines.append("| datasheet peaks | " + (f"{peak.label}: {peak.bandwidth_gbps:g} GB/s, bf16 dense "
                                             f"{_fmt(peak.bf16_tflops, 'g')} TFLOP/s" if peak else
                                             "unknown device: GB/s and TFLOP/s are reported without % of peak") + " |")
    for key in ("driver", "cuda", "python", "torch"):
        lines.append(f"| {key} | {info.get(key, '?')} |")
    for key, value in (versions_ or {}).items():
        lines.append(f"| {key} | {value} |")
    lines += ["", "## Parts", "", "| part | result | time (s) | budget (s) | detail |", "|---|---|---|---|---|"]
    for r in results:
        detail = r.detail.splitlines()[0] if r.detail else ""
        lines.append(f"| {r.name} | **{r.status}** | {r.seconds:.0f} | {r.budget_s:.0f} | {detail} |")
    by = {r.name: r for r in results}
    if "kernels" in by and by["kernels"].figures:
        k = by["kernels"].figures
        lines += ["", "## Kernel tests", "", f"{k.get('passed', 0)} passed, {k.get('failed', 0)} failed, "
                  f"{k.get('skipped', 0)} skipped ({k.get('cuda_skipped', 0)} CUDA cases skipped)."]
    if "bench" in by and by["bench"].figures.get("rows"):
        b = by["bench"].figures
        head = (f"peak {b['peak_gbps']:g} GB/s ({b['peak_label']} datasheet)" if b["peak_gbps"] else
                f"peak unknown for this device (the benchmark's own estimate: {_fmt(b.get('bench_peak_gbps'))} GB/s, "
                f"{b.get('bench_peak_source', '?')})")
        lines += ["", "## Kernel benchmark (one SARE cycle: norm + perturb + restore)", "", head, "",
                  "| method | elements | dtype | cycle ms | GB/s | % of peak | extra MiB |",
                  "|---|---|---|---|---|---|---|"]
        for row in b["rows"]:
            lines.append(f"| {row['method']} | {row['elements']:.0e} | {row['dtype']} | {row['cycle_ms']:.3f} | "
                         f"{row['gbps']:.1f} | {_fmt(row['pct_peak'])} | {row['peak_extra_mib']:.1f} |")
        for note in b.get("notes", []):
            lines.append(f"- note: {note}")
    if "train" in by and by["train"].figures.get("runs"):
        t = by["train"].figures
        choice = t.get("choice", {})
        depth = ("full depth" if choice.get("full_depth") else
                 f"cut to {choice.get('layers')} LLM layers (the full model needs "
                 f"{_fmt(choice.get('full_needed_gib'))} GiB by the plan)")
        lines += ["", f"## Training: {t['model']} ({depth}), {t['ds_config']}, synthetic data", "",
                  "| method | step s | tokens/s | tokens/sample | model TFLOP/step | MFU % | HFU % | "
                  "peak GiB measured | peak GiB plan | measured / plan | status |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for method, run in t["runs"].items():
            if "error" in run:
                lines.append(f"| {method} | | | | | | | | | | {run['error'][:120]} |")
                continue
            med = run["medians"]
            measured, predicted = run.get("peak_memory_gib"), run.get("predicted_peak_gib")
            ratio = measured / predicted if measured and predicted else None
            cells = [_fmt(med.get("perf/step_time_s"), ".3f"), _fmt(med.get("perf/tokens_per_s"), ".0f"),
                     _fmt(run.get("mean_tokens_per_sample"), ".0f"), _fmt(run.get("model_tflop_per_step"), ".1f"),
                     _fmt(run.get("mfu_pct")), _fmt(run.get("hfu_pct")), _fmt(measured, ".2f", "not logged"),
                     _fmt(predicted, ".2f"), _fmt(ratio, ".2f"), str(run.get("status"))]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines += ["", "Phases of the step (median seconds):", ""]
        phase_names = sorted({p for run in t["runs"].values() for p in run.get("phases", {})})
        if phase_names:
            lines.append("| method | " + " | ".join(phase_names) + " |")
            lines.append("|---|" + "---|" * len(phase_names))
            for method, run in t["runs"].items():
                ph = run.get("phases", {})
                lines.append(f"| {method} | " + " | ".join(_fmt(ph.get(p), '.4f', '') for p in phase_names) + " |")
        lines += ["", "MFU = the plan's model FLOPs per step (sare_ds.plan.step_flops, at the run's mean tokens per "
                  "sample) / median step time / the bf16 dense peak; HFU adds the recompute of gradient checkpointing "
                  "and any backward through the frozen vision tower. Plan peak = static + the step's peak pass at "
                  "that length, torch's allocated bytes (no CUDA context)."]
    if "quickstart" in by and by["quickstart"].figures.get("report"):
        lines += ["", "## Quickstart (--ci) report", "", by["quickstart"].figures["report"]]
    failed = [r for r in results if r.status == FAIL]
    skipped = [r.name for r in results if r.status == SKIPPED]
    heading = ("## Failures" if failed else "## All parts passed" if not skipped else
               f"## No part failed ({len(skipped)} not run: {', '.join(skipped)})")
    lines += ["", heading, ""]
    for r in failed:
        lines.append(f"- **{r.name}**: {r.detail}" + (f" (log: {r.log})" if r.log else ""))
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


# ---------------------------------------------------------------------------------- wheels

# Packages the GPU machine may lack (it has torch, triton, transformers, peft, tensorboard, mpi4py,
# torchvision): what sare_ds and its tests import, with their own requirements.
PURE_WHEELS = ("deepspeed", "open_clip_torch", "webdataset", "pytest-timeout", "protobuf", "hjson",
               "py-cpuinfo", "einops", "ftfy", "wcwidth", "braceexpand", "pytest", "pluggy", "iniconfig", "nltk",
               "timm", "defusedxml", "pygments", "click", "joblib", "annotated-types", "typing-inspection",
               "setuptools", "wheel")
BINARY_WHEELS = ("msgpack", "pydantic", "pydantic-core", "ninja", "sentencepiece")  # downloaded for CPython 3.12, manylinux x86_64


def build_wheels(dest: Path, python_version: str = "3.12") -> int:
    """Fill `dest` with the wheels an offline GPU machine needs (run where pip reaches an index)."""
    from importlib import metadata

    dest.mkdir(parents=True, exist_ok=True)

    def pinned(name: str) -> str:
        try:
            return f"{name}=={metadata.version(name)}"
        except metadata.PackageNotFoundError:
            return name

    env = dict(os.environ, DS_BUILD_OPS="0")
    failures = 0
    for name in PURE_WHEELS:  # one at a time: a failure is reported and the rest still builds
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dest), pinned(name)]
        failures += subprocess.run(cmd, env=env).returncode != 0
    for name in BINARY_WHEELS:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
               python_version, "--implementation", "cp", "--platform", "manylinux_2_17_x86_64", "--platform",
               "manylinux2014_x86_64", "--platform", "manylinux_2_28_x86_64", "-d", str(dest), pinned(name)]
        failures += subprocess.run(cmd, env=env).returncode != 0
    print(f"{len(list(dest.glob('*.whl')))} wheels in {dest}; {failures} package(s) failed")
    return 1 if failures else 0


# ------------------------------------------------------------------------------------- main

def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.build_wheels:
        return build_wheels(ROOT / args.wheels)
    import torch

    has_cuda = torch.cuda.is_available()
    if not has_cuda and not (args.dry_run or args.allow_cpu):
        print("gpu_check: no CUDA device is visible (torch.cuda.is_available() is False; torch "
              f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}). This check measures GPUs. Fix: run it "
              "on a machine with an NVIDIA GPU and a CUDA build of torch; --dry-run records what it would run, "
              "--allow-cpu runs the plumbing on the CPU.", file=sys.stderr)
        return 2
    out = Path(args.out)
    out = out if out.is_absolute() else (Path.cwd() / out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = {"out": out, "logs": out / "logs", "env": child_env(args.allow_cpu and not has_cuda, args.wheels),
           "info": environment(args.allow_cpu), "versions": {}}
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    budget = Budget(args.minutes, args.parts)
    results: list[PartResult] = []
    commands = dry_commands(args, ctx) if args.dry_run else {}
    try:
        for part in PARTS:
            if part not in args.parts:
                continue
            granted = budget.take(part)
            if args.dry_run:
                results.append(PartResult(part, SKIPPED, 0.0, granted, f"dry run: {commands[part]}"))
                continue
            print(f"== gpu_check: {part} (budget {granted:.0f} s, {budget.left():.0f} s left)", flush=True)
            start = time.monotonic()
            try:
                result = RUNNERS[part](args, ctx, granted) if granted > 1 else \
                    PartResult(part, FAIL, detail="not started: the time budget is spent")
            except Exception as e:  # noqa: BLE001 - a failing part is reported, the next one runs
                result = PartResult(part, FAIL, detail=f"{type(e).__name__}: {e}")
            result.seconds, result.budget_s = time.monotonic() - start, granted
            budget.give_back(part, result.seconds, granted)
            first = result.detail.splitlines()[0] if result.detail else ""
            print(f"   {part}: {result.status} ({result.seconds:.0f} s) {first}", flush=True)
            results.append(result)
    finally:
        summary = out / "gpu_check.md"
        write_summary(summary, ctx["info"], results, args, ctx.get("versions"), started)
        (out / "gpu_check.json").write_text(json.dumps(
            {"info": ctx["info"], "versions": ctx.get("versions"), "parts": [dataclasses.asdict(r) for r in results]},
            indent=1, default=str))
        print(f"summary: {summary}")
    return 0 if all(r.status != FAIL for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
