"""The toy world as an instrument: relearning dose-response, comparisons at equal erasure, SARE's variants.

    python -m sare_ds.toy.study run --seed 0 --root runs/toy            # one seed (its world is built or reused)
    python -m sare_ds.toy.study aggregate runs/toy runs/toy-seed1 ... --out docs/toy_world_study --finding
    bash launch/toy_study.sh                                             # all of it: 5 seeds, 2 at a time

Per seed (a world of its own: captioner, CLIP, scenes; `sare_ds.toy.world`, cached in the root):
1. curation of the captioner's descriptions (launch/curate.py, as the quickstart does);
2. training, single process with 2 micro-batches a step (the quickstart's step of 2 ranks x 8 captions, which
   tests/test_zero.py shows equal on the same data; here the captions come in the single reader's order, not
   split between two ranks' shard readers, so a model differs from the quickstart's within the seed spread): FT; EFUF and SARE at three unlearning strengths (lr 5e-4, 1e-3, 2e-3; the
   quickstart's is 1e-3); SARE's variants at lr 1e-3: adaptive radius (ASAM, rho 0.5) and the ascent
   direction reused for 2 and 4 steps (method.ascent_every);
3. for the base and every trained model: CHAIR_S / CHAIR_I / recall on the 200 held-out scenes, L_neg on 32
   curated neg samples no relearning dose trains on (part of the unlearning data), the sharpness probe (gap along the ascent direction and along random ones), and
   relearning as a dose-response: one epoch of n in {20, 60, 140} curated neg samples at lr in {1e-4, 3e-4,
   1e-3} (the quickstart's attack is lr 1e-3), each dose on a fresh copy.
Writes <root>/study/study.json. `aggregate` reads several seeds' and writes <out>.md (tables), <out>.png
(dose-response curves with seed bands; CHAIR_S after one dose against the CHAIR_S reached before it) and the one-sentence
finding the quickstart's report prints (sare_ds/resources/toy_world_finding.txt).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STRENGTHS = (5e-4, 1e-3, 2e-3)
DOSE_SIZES = (20, 60, 140)
DOSE_LRS = (1e-4, 3e-4, 1e-3)
FINDING = ROOT / "sare_ds" / "resources" / "toy_world_finding.txt"


def model_grid() -> dict[str, list[str]]:
    """name -> training overrides (on launch/configs/toy.yaml). Names: method[@lr][+variant]."""
    grid = {"FT": ["method.name=ft"]}
    for method in ("efuf", "sare"):
        for lr in STRENGTHS:
            grid[f"{method.upper()}@{lr:g}"] = [f"method.name={method}", f"optim.lr={lr}"]
    grid["SARE+adaptive"] = ["method.name=sare", "method.rho_mode=adaptive", "method.rho=0.5"]
    grid["SARE+every2"] = ["method.name=sare", "method.ascent_every=2"]
    grid["SARE+every4"] = ["method.name=sare", "method.ascent_every=4"]
    return grid


def run_seed(root: Path, seed: int, log=print) -> Path:
    """Everything for one seed; returns <root>/study/study.json."""
    import torch

    from sare_ds.config import load_config
    from sare_ds.eval.evaluate import EvalConfig
    from sare_ds.eval.scenes import load_scene_eval_data
    from sare_ds.eval.suite import AttackConfig, _free_memory, attack_method
    from sare_ds.eval.attacks import load_neg_samples
    from sare_ds.eval.weights import load_method_model
    from sare_ds.train.trainer import train

    torch.set_num_threads(1)
    t0 = time.time()
    py = sys.executable
    subprocess.run([py, "-m", "sare_ds.toy.world", str(root), "--preset", "full", "--seed", str(seed)],
                   cwd=ROOT, check=True)
    world = json.loads((root / "world.json").read_text())
    if world["seed"] != seed:
        raise ValueError(f"{root}/world.json is the world of seed {world['seed']}, not {seed}; use another --root")
    captioner = root / "models" / "captioner"
    overrides = (root / "curate_overrides.txt").read_text().splitlines()
    subprocess.run([py, "launch/curate.py", f"input.path={root}/scenes/curation/images",
                    f"input.annotations={root}/scenes/curation/instances.json", f"model.name_or_path={captioner}",
                    "caption.max_new_tokens=40", "caption.batch_size=32", *overrides, f"output.dir={root}/curated",
                    "output.images_per_chunk=100", "output.resume=false"], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    out = root / "study"
    out.mkdir(parents=True, exist_ok=True)
    models: dict[str, dict] = {"base": {"run": None, "overrides": []}}
    for name, extra in model_grid().items():
        run_dir = out / "runs" / name.replace("@", "_lr").replace("+", "_")
        cfg = load_config(ROOT / "launch/configs/toy.yaml", [
            f"model.name_or_path={captioner}", f"data.shards={root}/curated", f"optim.seed={seed}",
            "optim.grad_accum_steps=2", f"output.run_dir={run_dir}", "output.overwrite=true",
            "logging.progress_bar=false", *extra])
        t = time.time()
        train(cfg)
        rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
        models[name] = {"run": str(run_dir), "overrides": extra, "train_s": time.time() - t,
                        "steps": len(rows), "eps_norm_mean": _mean([r.get("sam/eps_norm") for r in rows]),
                        "ascents": sum(int(r.get("sam/ascent", 0)) for r in rows)}
        log(f"seed {seed}: trained {name} in {time.time() - t:.0f} s")
    data = load_scene_eval_data(root / "scenes" / "eval" / "eval_set.json")
    eval_cfg = EvalConfig(max_new_tokens=40, batch_size=32, perplexity=False)
    attack_cfg = AttackConfig(data=str(root / "curated"), relearn_sizes=[], lora=False, adversarial=False,
                              probe=True, rho=0.05, dose_sizes=list(DOSE_SIZES), dose_lrs=list(DOSE_LRS),
                              relearn_lr=1e-3, pope_unattacked=False, seed=seed)
    samples = load_neg_samples(attack_cfg.data, max(DOSE_SIZES) + attack_cfg.heldout_samples, seed=seed)
    for name, m in models.items():
        t = time.time()
        m["eval"] = attack_method(lambda: load_method_model(m["run"], base=str(captioner)),  # noqa: B023
                                  data, eval_cfg, attack_cfg, samples)
        _free_memory()
        log(f"seed {seed}: evaluated {name} in {time.time() - t:.0f} s")
    result = {"seed": seed, "root": str(root), "world": world, "attack_config": asdict(attack_cfg),
              "eval_config": asdict(eval_cfg), "models": models, "seconds": time.time() - t0}
    path = out / "study.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    return path


def _mean(xs) -> float | None:
    xs = [float(x) for x in xs if x is not None]
    return statistics.mean(xs) if xs else None


def _ms(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


# ------------------------------------------------------------------------------ aggregation

def load_studies(roots: list[str | Path]) -> list[dict]:
    studies = []
    for root in roots:
        path = Path(root) / "study" / "study.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; run `python -m sare_ds.toy.study run --root {root} --seed N`")
        studies.append(json.loads(path.read_text()))
    names = [list(s["models"]) for s in studies]
    if any(n != names[0] for n in names):
        raise ValueError(f"the studies hold different models ({names}); aggregate studies of one design only")
    return studies


def dose_keys(study: dict) -> list[str]:
    return list(study["models"]["base"]["eval"]["dose"])


def table(studies: list[dict]) -> dict:
    """Per model: mean and sd over seeds of every figure (CHAIR in %)."""
    models = list(studies[0]["models"])
    keys = dose_keys(studies[0])
    out = {}
    for name in models:
        ev = [s["models"][name]["eval"] for s in studies]
        row = {"CHAIR_S": _ms([100 * e["none"]["CHAIR_S"] for e in ev]),
               "CHAIR_I": _ms([100 * e["none"]["CHAIR_I"] for e in ev]),
               "recall": _ms([100 * e["none"]["recall"] for e in ev]),
               "L_neg_heldout": _ms([e["none"]["L_neg_heldout"] for e in ev]),
               "sharpness_gap": _ms([e["probe"]["sharpness_gap"] for e in ev]),
               "random_gap": _ms([e["probe"]["random_gap"] for e in ev]),
               "dose": {k: {"CHAIR_S": _ms([100 * e["dose"][k]["CHAIR_S"] for e in ev]),
                            "resurgence": _ms([100 * (e["dose"][k]["CHAIR_S"] - e["none"]["CHAIR_S"]) for e in ev]),
                            "L_neg_heldout": _ms([e["dose"][k]["L_neg_heldout"] for e in ev])} for k in keys}}
        if name != "base":
            row["train_s"] = _ms([s["models"][name]["train_s"] for s in studies])
            row["eps_norm"] = _mean([s["models"][name].get("eps_norm_mean") for s in studies])
        out[name] = row
    return out


def separating_doses(t: dict, a: str = "SARE@0.001", b: str = "EFUF@0.001") -> list[dict]:
    """Per dose: how far apart base, EFUF and SARE end (seed means), against the seed spread."""
    rows = []
    for key in t["base"]["dose"]:
        means = {m: t[m]["dose"][key]["CHAIR_S"][0] for m in ("base", a, b)}
        sds = [t[m]["dose"][key]["CHAIR_S"][1] for m in ("base", a, b)]
        rows.append({"dose": key, **means, "spread": max(means.values()) - min(means.values()),
                     "mean_sd": statistics.mean(sds)})
    return rows


def finding(studies: list[dict], t: dict) -> str:
    """The seed-averaged answer, in one or two sentences (what the quickstart's report prints)."""
    keys = list(t["base"]["dose"])
    sare, efuf = "SARE@0.001", "EFUF@0.001"
    diffs = {k: [100 * (s["models"][sare]["eval"]["dose"][k]["CHAIR_S"] - s["models"][efuf]["eval"]["dose"][k]["CHAIR_S"])
                 for s in studies] for k in keys}
    clear = [k for k, d in diffs.items() if len(d) > 1 and abs(statistics.mean(d)) > 2 * statistics.stdev(d) / len(d) ** 0.5]
    n = len(studies)
    if not clear:
        return (f"over {n} seeds, SARE (lr 1e-3) and EFUF (lr 1e-3) end at CHAIR_S levels within 2 standard errors of "
                f"each other after every relearning dose (n x lr = {', '.join(keys)}); the toy world shows no "
                "robustness advantage of SARE at any dose.")
    parts = [f"{k}: SARE {'lower' if statistics.mean(diffs[k]) < 0 else 'higher'} by "
             f"{abs(statistics.mean(diffs[k])):.1f} points" for k in clear]
    return (f"over {n} seeds, SARE (lr 1e-3) and EFUF (lr 1e-3) differ beyond 2 standard errors after relearning at "
            + "; ".join(parts) + f"; at the other doses ({', '.join(k for k in keys if k not in clear)}) they do not.")


def _fmt(ms: tuple[float, float], digits: int = 1) -> str:
    return f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}"


def markdown(studies: list[dict], t: dict, cost: dict | None) -> str:
    seeds = [s["seed"] for s in studies]
    keys = list(t["base"]["dose"])
    lines = [f"# Toy-world study: {len(studies)} seeds ({', '.join(map(str, seeds))})", "",
             "Produced by `bash launch/toy_study.sh` (docs/toy_world.md, \"The study\"). Mean ± sd over seeds; CHAIR "
             "and recall in % on each seed's 200 held-out scenes; L_neg = -NLL of 32 curated neg samples that no relearning "
             "dose trains on (they are in the unlearning training data; lower: the hallucinations are less likely; "
             "relearning raises it); gaps from the sharpness probe at radius 0.05.", "",
             "## Unlearned models", "",
             "| model | CHAIR_S | CHAIR_I | recall | L_neg (32 neg samples) | sharpness gap | random gap | train s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in t.items():
        lines.append(f"| {name} | {_fmt(r['CHAIR_S'])} | {_fmt(r['CHAIR_I'])} | {_fmt(r['recall'])} | "
                     f"{_fmt(r['L_neg_heldout'], 3)} | {_fmt(r['sharpness_gap'], 4)} | {_fmt(r['random_gap'], 4)} | "
                     f"{_fmt(r['train_s'], 0) if 'train_s' in r else '-'} |")
    lines += ["", "## Relearning dose-response: CHAIR_S (%) after one epoch of n neg samples at lr", "",
              "| model | " + " | ".join(keys) + " |", "| --- |" + " --- |" * len(keys)]
    for name, r in t.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(r["dose"][k]["CHAIR_S"]) for k in keys) + " |")
    lines += ["", "Resurgence (CHAIR_S after the dose minus before, points):", "",
              "| model | " + " | ".join(keys) + " |", "| --- |" + " --- |" * len(keys)]
    for name, r in t.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(r["dose"][k]["resurgence"]) for k in keys) + " |")
    lines += ["", "L_neg on the 32 neg samples no dose trains on, after the dose:", "",
              "| model | " + " | ".join(keys) + " |", "| --- |" + " --- |" * len(keys)]
    for name, r in t.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(r["dose"][k]["L_neg_heldout"], 3) for k in keys) + " |")
    lines += ["", "## Where the doses separate base, EFUF and SARE (lr 1e-3 each)", "",
              "| dose | base | EFUF | SARE | spread of the means | mean seed sd |", "| --- | --- | --- | --- | --- | --- |"]
    for row in separating_doses(t):
        lines.append(f"| {row['dose']} | {row['base']:.1f} | {row['EFUF@0.001']:.1f} | {row['SARE@0.001']:.1f} | "
                     f"{row['spread']:.1f} | {row['mean_sd']:.1f} |")
    if cost:
        lines += ["", "## Cost per epoch (step benchmark, docs/performance.md)", "",
                  "| variant | / EFUF packed | / SARE packed |", "| --- | --- | --- |"]
        for name, (a, b) in cost.items():
            lines.append(f"| {name} | {a:.3f} | {b:.3f} |")
    lines += ["", f"Finding: {finding(studies, t)}", "", "![study](toy_world_study.png)"]
    return "\n".join(lines) + "\n"


def plot(studies: list[dict], t: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sare_ds.plotting import save_figure

    keys = list(t["base"]["dose"])
    fig, axes = plt.subplots(1, len(DOSE_LRS) + 1, figsize=(4.2 * (len(DOSE_LRS) + 1), 3.8))
    shown = ["base", "FT", "EFUF@0.001", "SARE@0.001", "SARE+adaptive", "SARE+every2"]
    for ax, lr in zip(axes, DOSE_LRS):
        for i, name in enumerate(m for m in shown if m in t):
            xs = [0] + [int(k.split("@")[0]) for k in keys if float(k.split("@")[1]) == lr]
            per_seed = [[100 * s["models"][name]["eval"]["none"]["CHAIR_S"]]
                        + [100 * s["models"][name]["eval"]["dose"][k]["CHAIR_S"] for k in keys
                           if float(k.split("@")[1]) == lr] for s in studies]
            mean = [statistics.mean(c) for c in zip(*per_seed)]
            lo = [min(c) for c in zip(*per_seed)]
            hi = [max(c) for c in zip(*per_seed)]
            ax.plot(xs, mean, "-o", ms=3, color=f"C{i}", label=name)
            ax.fill_between(xs, lo, hi, color=f"C{i}", alpha=0.12)
        ax.set_title(f"relearning at lr {lr:g}")
        ax.set_xlabel("relearning samples n")
        ax.set_ylabel("CHAIR_S (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    ax = axes[-1]
    dose = f"{DOSE_SIZES[1]}@{DOSE_LRS[1]:g}"
    for i, method in enumerate(("EFUF", "SARE")):
        names = [f"{method}@{lr:g}" for lr in STRENGTHS]
        for s in studies:
            ax.scatter([100 * s["models"][n]["eval"]["none"]["CHAIR_S"] for n in names],
                       [100 * s["models"][n]["eval"]["dose"][dose]["CHAIR_S"] for n in names], s=8, color=f"C{i + 2}",
                       alpha=0.5)
        ax.plot([t[n]["CHAIR_S"][0] for n in names], [t[n]["dose"][dose]["CHAIR_S"][0] for n in names], "-o",
                color=f"C{i + 2}", label=f"{method} (lr {', '.join(f'{x:g}' for x in STRENGTHS)}; seed means)")
    ax.scatter([t["base"]["CHAIR_S"][0]], [t["base"]["dose"][dose]["CHAIR_S"][0]], color="C0", marker="s", label="base")
    ax.set_xlabel("CHAIR_S before the attack (%)")
    ax.set_ylabel(f"CHAIR_S after relearning {dose} (%)")
    ax.set_title("resurgence at equal erasure")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def bench_costs(path: str | Path | None) -> dict | None:
    """Variant -> (epoch / EFUF packed, epoch / SARE packed) from a `python -m sare_ds.bench --json` file."""
    if not path:
        return None
    ratios = json.loads(Path(path).read_text())["timing"]["ratios"]
    out = {"SARE (paper)": (ratios["sare_packed/efuf_packed"]["median"], 1.0)}
    for key, r in ratios.items():
        if key.startswith("sare_packed+") and key.endswith("/efuf_packed"):
            name = key.split("/")[0].replace("sare_packed+", "SARE+")
            out[name] = (r["median"], ratios[key.replace("/efuf_packed", "/sare_packed")]["median"])
    return out


def aggregate(roots: list[str], out: str, bench: str | None = None, write_finding: bool = False) -> dict:
    """Tables, curves and (write_finding: the published study) the finding the quickstart's report prints."""
    studies = load_studies(roots)
    t = table(studies)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.md").write_text(markdown(studies, t, bench_costs(bench)).replace(
        "toy_world_study.png", f"{out.name}.png"))
    plot(studies, t, Path(f"{out}.png"))
    Path(f"{out}.json").write_text(json.dumps({"seeds": [s["seed"] for s in studies], "table": t,
                                               "separating_doses": separating_doses(t)}, indent=1))
    if write_finding:
        FINDING.write_text(finding(studies, t) + " (docs/toy_world.md; `bash launch/toy_study.sh`)\n")
    return t


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="one seed")
    r.add_argument("--root", required=True, help="the seed's toy-world folder (built or reused)")
    r.add_argument("--seed", type=int, required=True)
    g = sub.add_parser("aggregate", help="tables, curves and the finding over seeds")
    g.add_argument("roots", nargs="+")
    g.add_argument("--out", default="docs/toy_world_study")
    g.add_argument("--bench", help="a `python -m sare_ds.bench --json` file: the variants' cost per epoch")
    g.add_argument("--finding", action="store_true", help="also write the finding the quickstart's report prints "
                                                          "(sare_ds/resources/toy_world_finding.txt): the published study")
    a = ap.parse_args(argv)
    if a.command == "run":
        print(run_seed(Path(a.root), a.seed))
    else:
        aggregate(a.roots, a.out, a.bench, write_finding=a.finding)


if __name__ == "__main__":
    main()
