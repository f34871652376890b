"""Aggregate toy-world reports over seeds: one table (mean +- sd) and one relearning curve.

    python -m sare_ds.toy.results runs/toy runs/toy-seed1 runs/toy-seed2 --out docs/toy_world_results
    python -m sare_ds.toy.results runs/toy ... --report report-rho --out docs/toy_world_rho   # another attack.py --out

Each argument is the output folder of one `bash launch/quickstart.sh --seed N --out DIR`
(its report/report.json and world.json). Writes <out>.md (the table, per-seed rows included)
and <out>.png (CHAIR_S against relearning samples, mean and range over seeds per method).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from sare_ds.plotting import save_figure


def load_reports(roots: list[str | Path], report: str = "report") -> list[dict]:
    """One entry per root: its seed and preset (world.json) and <root>/<report>/report.json."""
    out = []
    for root in roots:
        root = Path(root)
        path = root / report / "report.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; run `bash launch/quickstart.sh --out {root}` first")
        world = json.loads((root / "world.json").read_text())
        out.append({"root": str(root), "seed": world["seed"], "preset": world["preset"],
                    "report": json.loads(path.read_text())})
    # Averages only mean something over runs of one design: same preset, methods and attacks.
    def design(r):
        return (r["preset"], list(r["report"]),
                {m: sorted(v.get("relearn", {}), key=int) for m, v in r["report"].items()})

    for r in out[1:]:
        if design(r) != design(out[0]):
            raise ValueError(f"{r['root']} differs from {out[0]['root']} in preset, methods or relearning sizes "
                             f"({design(r)} vs {design(out[0])}); aggregate runs of one design only")
    return out


def _metrics(method_result: dict) -> dict[str, float]:
    none = method_result["none"]
    m = {"CHAIR_S": 100 * none["CHAIR_S"], "CHAIR_I": 100 * none["CHAIR_I"], "recall": 100 * none["recall"],
         "BLEU-4": 100 * none["BLEU-4"]}
    if "POPE_F1" in none:
        m["POPE F1"] = 100 * none["POPE_F1"]
    for n, r in sorted(method_result.get("relearn", {}).items(), key=lambda kv: int(kv[0])):
        m[f"relearn {n}"] = 100 * r["CHAIR_S"]
    if "lora" in method_result:
        m["LoRA"] = 100 * method_result["lora"]["CHAIR_S"]
    if method_result.get("probe"):
        m["sharpness gap"] = method_result["probe"]["sharpness_gap"]
    return m


def hallucination_kinds(root: str | Path, method: str) -> dict[str, float] | None:
    """Hallucinated objects per 100 held-out captions of one unattacked model, split into absent
    co-occurring partners of drawn triggers (the toy world's mechanism) and other objects; from
    launch/evaluate.py's <root>/eval/<method>/captions.jsonl (None if it is not there)."""
    from sare_ds.toy.scenes import PAIRS

    path = Path(root) / "eval" / method / "captions.jsonl"
    if not path.is_file():
        return None
    partner = other = n = 0
    for line in path.read_text().splitlines():
        cap = json.loads(line)
        n += 1
        for obj in cap["hallucinated"]:
            if any(PAIRS.get(g) == obj for g in cap["ground_truth"]):
                partner += 1
            else:
                other += 1
    return {"partner": 100 * partner / max(1, n), "other": 100 * other / max(1, n)}


def _fmt(values: list[float], digits: int) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def aggregate_table(reports: list[dict]) -> str:
    methods = list(reports[0]["report"])
    per = {m: [_metrics(r["report"][m]) for r in reports if m in r["report"]] for m in methods}
    columns = [c for c in _metrics(reports[0]["report"][methods[0]])]
    seeds = ", ".join(str(r["seed"]) for r in reports)
    lines = [(f"Mean ± sd over seeds {seeds} ({len(reports)} runs); CHAIR, recall, BLEU-4, POPE F1 in %; "
              "relearn n / LoRA: CHAIR_S (%) after the attack."), "",
             "| method | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)]
    for m in methods:
        cells = [_fmt([x[c] for x in per[m] if c in x], 4 if c == "sharpness gap" else 1) for c in columns]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "Per seed (CHAIR_S %: unattacked -> after relearning with the largest n):", "",
              "| seed | " + " | ".join(methods) + " |", "| --- |" + " --- |" * len(methods)]
    for r in reports:
        cells = []
        for m in methods:
            x = _metrics(r["report"][m])
            last = [k for k in x if k.startswith("relearn")]
            cells.append(f"{x['CHAIR_S']:.1f} -> {x[last[-1]]:.1f}" if last else f"{x['CHAIR_S']:.1f}")
        lines.append(f"| {r['seed']} | " + " | ".join(cells) + " |")
    kinds = {m: [k for k in (hallucination_kinds(r["root"], m) for r in reports) if k] for m in methods}
    if all(kinds.values()):
        lines += ["", ("Hallucinated objects per 100 held-out captions (unattacked): absent partners of drawn "
                       "triggers / other objects:"), "", "| method | partner | other |", "| --- | --- | --- |"]
        lines += [f"| {m} | {_fmt([k['partner'] for k in kinds[m]], 1)} | {_fmt([k['other'] for k in kinds[m]], 1)} |"
                  for m in methods]
    return "\n".join(lines) + "\n"


def plot_curves(reports: list[dict], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for m in reports[0]["report"]:
        curves = []
        for r in reports:
            res = r["report"][m]
            pts = [(0, res["none"]["CHAIR_S"])] + sorted((int(n), v["CHAIR_S"]) for n, v in res.get("relearn", {}).items())
            curves.append(pts)
        xs = [p[0] for p in curves[0]]
        ys = [[100 * c[i][1] for c in curves] for i in range(len(xs))]
        mean = [statistics.mean(v) for v in ys]
        line, = ax.plot(xs, mean, "-o", ms=4, label=m)
        if len(curves) > 1:
            ax.fill_between(xs, [min(v) for v in ys], [max(v) for v in ys], color=line.get_color(), alpha=0.15)
    ax.set_xlabel("relearning samples n")
    ax.set_ylabel("CHAIR_S (%)")
    ax.set_title(f"Toy world: relearning attack ({len(reports)} seeds, mean and range)")
    ax.legend()
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m sare_ds.toy.results", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("roots", nargs="+", help="quickstart output folders (one per seed)")
    ap.add_argument("--out", required=True, help="path prefix of the .md and .png written")
    ap.add_argument("--report", default="report", help="report folder inside each root (launch/attack.py --out)")
    a = ap.parse_args(argv)
    reports = load_reports(a.roots, a.report)
    table = aggregate_table(reports)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out + ".md").write_text(table)
    plot_curves(reports, a.out + ".png")
    print(table)


if __name__ == "__main__":
    main()
