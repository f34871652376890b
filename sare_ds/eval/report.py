"""The comparison report: base / FT / EFUF / SARE under each attack.

    write_report(results, "runs/report")   # report.md, report.json, relearn_curve.png, landscape.png

`results[method]` is what sare_ds.eval.suite.attack_method returns: the unattacked metrics
("none"), "relearn" {n: metrics}, "lora", "adversarial", "probe". Every attacked number is
shown with its change against the same method unattacked (percentage points for CHAIR).
CHAIR columns carry the CHAIR mode in their name unless it is `reference` (the published
script), and results of two modes are never put in one table.
"""
from __future__ import annotations

import json
from pathlib import Path

from sare_ds.plotting import save_figure


def _cell(value: float | None, base: float | None = None) -> str:
    if value is None:
        return "-"
    if base is None:
        return f"{value:.1f}"
    return f"{value:.1f} ({value - base:+.1f})"


def chair_mode_of(results: dict[str, dict]) -> str:
    """The one CHAIR mode of a suite's results (results without a mode predate modes: reference)."""
    modes = {r["none"].get("chair_mode", "reference") for r in results.values()}
    if len(modes) > 1:
        raise ValueError(f"report: the methods were scored in different CHAIR modes {sorted(modes)}; their numbers "
                         "cannot share a table. Re-run the suite with one --eval-chair-mode")
    return modes.pop() if modes else "reference"


def comparison_rows(results: dict[str, dict]) -> tuple[list[str], dict[str, list[str]]]:
    """Column names and one row of cells per method (CHAIR in %, attacks with their delta)."""
    mode = chair_mode_of(results)
    tag = "" if mode == "reference" else f" ({mode})"
    sizes = sorted({int(n) for r in results.values() for n in r.get("relearn", {})})
    columns = [f"CHAIR_S{tag}", f"CHAIR_I{tag}", "BLEU-4", "POPE F1"]
    columns += [f"relearn n={n} CHAIR_S{tag}" for n in sizes]
    columns += [f"LoRA CHAIR_S{tag}", f"adv. prompts CHAIR_S{tag}", "sharpness gap", "random gap"]
    rows = {}
    for method, r in results.items():
        none = r["none"]
        base_s = 100 * none["CHAIR_S"]
        cells = [_cell(base_s), _cell(100 * none["CHAIR_I"]),
                 _cell(100 * none["BLEU-4"]) if "BLEU-4" in none else "-",
                 _cell(100 * none["POPE_F1"]) if "POPE_F1" in none else "-"]
        relearn = {int(n): m for n, m in r.get("relearn", {}).items()}
        cells += [_cell(100 * relearn[n]["CHAIR_S"], base_s) if n in relearn else "-" for n in sizes]
        cells.append(_cell(100 * r["lora"]["CHAIR_S"], base_s) if "lora" in r else "-")
        cells.append(_cell(100 * r["adversarial"]["CHAIR_S"], base_s) if "adversarial" in r else "-")
        probe = r.get("probe")
        cells += [f"{probe['sharpness_gap']:.4g}", f"{probe['random_gap']:.4g}"] if probe else ["-", "-"]
        rows[method] = cells
    return columns, rows


def markdown_report(results: dict[str, dict], title: str = "Robustness of hallucination unlearning",
                    toy_world: bool = False) -> str:
    """The report's text; `toy_world`: the models are the toy world's (scene eval sets), so the study's
    seed-averaged finding is printed beside this run's verdict."""
    columns, rows = comparison_rows(results)
    mode = chair_mode_of(results)
    mode_line = ("CHAIR mode: reference (the published CHAIR script; comparable with published numbers)."
                 if mode == "reference" else
                 f"CHAIR mode: {mode} (sare_ds's corrections; NOT comparable with published CHAIR numbers).")
    lines = [f"# {title}", "", mode_line, "",
             "CHAIR in % (lower is better); attacked values show (change vs the same model unattacked). "
             "Sharpness gap: L_neg(theta + eps*) - L_neg(theta) at ||eps*|| = rho along the normalised gradient; "
             "random gap: the same along random directions of equal norm.", "",
             "| method | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)]
    lines += [f"| {m} | " + " | ".join(cells) + " |" for m, cells in rows.items()]
    dose = dose_rows(results)
    if dose:
        lines += ["", "Relearning dose-response (CHAIR_S % after one epoch of n hallucinated samples at lr; "
                  "L_neg = -NLL of neg samples no dose trains on, lower is better):", "",
                  "| method | dose (n @ lr) | CHAIR_S | CHAIR_I | recall | L_neg held-out |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {m} | {d} | {c} | {i} | {r} | {l} |" for m, d, c, i, r, l in dose]
    verdict = relearning_verdict(results)
    if verdict:
        lines += ["", verdict]
    finding = seed_averaged_finding() if toy_world else ""
    if finding:
        lines += ["", f"Over seeds (docs/toy_world.md): {finding}"]
    lines += ["", "Files: report.json (all numbers), relearn_curve.png, landscape.png."]
    return "\n".join(lines) + "\n"


def dose_rows(results: dict[str, dict]) -> list[tuple[str, ...]]:
    rows = []
    for method, r in results.items():
        for key, m in r.get("dose", {}).items():
            loss = m.get("L_neg_heldout")
            rows.append((method, key, f"{100 * m['CHAIR_S']:.1f}", f"{100 * m['CHAIR_I']:.1f}", f"{100 * m['recall']:.1f}",
                         f"{loss:.3f}" if loss is not None else "-"))
    return rows


def _difference_se(p1: float, p2: float, n: int) -> float:
    """Standard error of the difference of two CHAIR_S proportions, each over n captions (binomial)."""
    return (p1 * (1 - p1) / n + p2 * (1 - p2) / n) ** 0.5


def relearning_verdict(results: dict[str, dict], a: str = "SARE", b: str = "EFUF") -> str:
    """One or two sentences drawn from this run's numbers: did `a` resist relearning better than `b`, and at
    which dose. A difference of CHAIR_S after the attack is called one only beyond 2 standard errors of a
    difference of two proportions over the evaluated captions; else "no clear difference"."""
    if a not in results or b not in results or not results[a].get("relearn") or not results[b].get("relearn"):
        return ""
    n_captions = results[a]["none"].get("captions") or 0
    if not n_captions:
        return ""
    better, worse, tied = [], [], []
    for n in sorted(set(results[a]["relearn"]) & set(results[b]["relearn"]), key=int):
        pa, pb = results[a]["relearn"][n]["CHAIR_S"], results[b]["relearn"][n]["CHAIR_S"]
        two_se = 2 * _difference_se(pa, pb, n_captions)
        cell = f"n = {n}: {100 * pa:.1f} vs {100 * pb:.1f} %"
        (better if pb - pa > two_se else worse if pa - pb > two_se else tied).append(cell)
    start = (f"In this run ({a} {100 * results[a]['none']['CHAIR_S']:.1f} %, {b} {100 * results[b]['none']['CHAIR_S']:.1f} % "
             f"CHAIR_S before the attack, {n_captions} captions each), ")
    parts = []
    if better:
        parts.append(f"{a} resisted relearning better than {b} at " + "; ".join(better))
    if worse:
        parts.append(f"{a} resisted it worse at " + "; ".join(worse))
    if tied:
        parts.append("there is no clear difference (within 2 standard errors of a difference of two proportions) at "
                     + "; ".join(tied))
    return start + ", and ".join(parts) + " (CHAIR_S after relearning)."


def seed_averaged_finding() -> str:
    """The toy world's seed-averaged finding (written by `python -m sare_ds.toy.study`), if shipped."""
    path = Path(__file__).resolve().parents[1] / "resources" / "toy_world_finding.txt"
    return path.read_text().strip() if path.is_file() else ""


def plot_relearn_curve(results: dict[str, dict], path: str | Path) -> Path:
    """CHAIR_S against the number of relearning samples (0 = unattacked), one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for method, r in results.items():
        points = [(0, r["none"]["CHAIR_S"])] + sorted((int(n), m["CHAIR_S"]) for n, m in r.get("relearn", {}).items())
        ax.plot([p[0] for p in points], [100 * p[1] for p in points], "-o", ms=4, label=method)
    ax.set_xlabel("relearning samples n (hallucinated targets, plain NLL)")
    ax.set_ylabel("CHAIR_S (%)")
    ax.set_title("Relearning attack")
    ax.legend()
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def write_report(results: dict[str, dict], out_dir: str | Path, toy_world: bool = False) -> dict[str, Path]:
    from sare_ds.eval.probe import plot_landscape

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out_dir / "report.md", "json": out_dir / "report.json"}
    paths["markdown"].write_text(markdown_report(results, toy_world=toy_world))
    paths["json"].write_text(json.dumps(results, indent=1, default=str))
    if any(r.get("relearn") for r in results.values()):
        paths["relearn_curve"] = plot_relearn_curve(results, out_dir / "relearn_curve.png")
    probes = {m: r["probe"] for m, r in results.items() if r.get("probe")}
    if probes:
        paths["landscape"] = plot_landscape(probes, out_dir / "landscape.png")
    return paths
