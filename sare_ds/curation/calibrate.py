"""Score histograms and threshold calibration for a CLIP model other than EFUF's.

EFUF chose t0 = 32 and t1 = 23 by looking at the scores of present and hallucinated objects
(its Figure 2); those numbers belong to its ViT-B/32. For another CLIP, label the objects of
curated captions present / absent (COCO instance annotations do that: the curation run
records, for every scored object, whether its category is annotated in the image) and:

- t1 = the `present_below_t1` quantile of present scores (e.g. 5 % of real objects would be
  unlearned as hallucinations),
- t0 = the (1 - `absent_above_t0`) quantile of absent scores (5 % of hallucinations would be
  trained as grounded),
- t2 = (t0 + t1) / 2 (EFUF's 27.5 is exactly the midpoint of 23 and 32).

If the two distributions are so well separated that t1 > t0, both become the midpoint.

    python launch/curate.py calibrate runs/curated      # writes calibration.json and calibration.png
"""
from __future__ import annotations

import json
from pathlib import Path

from sare_ds.plotting import save_figure

import numpy as np


def propose_thresholds(present: list[float], absent: list[float], present_below_t1: float = 0.05,
                       absent_above_t0: float = 0.05) -> dict:
    if len(present) < 2 or len(absent) < 2:
        raise ValueError(
            f"calibration needs at least 2 present and 2 absent object scores, got {len(present)} present and "
            f"{len(absent)} absent; fix: curate a COCO layout with instance annotations (input.annotations) "
            "and enough images that captions mention both real and hallucinated objects")
    p, a = np.asarray(present, dtype=np.float64), np.asarray(absent, dtype=np.float64)
    t1 = float(np.quantile(p, present_below_t1))
    t0 = float(np.quantile(a, 1.0 - absent_above_t0))
    if t1 > t0:
        t0 = t1 = (t0 + t1) / 2.0
    t2 = (t0 + t1) / 2.0
    return {
        "t0": t0, "t1": t1, "t2": t2,
        "present": {"n": int(p.size), "mean": float(p.mean()), "above_t0": float((p > t0).mean()),
                    "below_t1": float((p < t1).mean())},
        "absent": {"n": int(a.size), "mean": float(a.mean()), "above_t0": float((a > t0).mean()),
                   "below_t1": float((a < t1).mean())},
        # Of the objects each threshold selects, how many carry the right label.
        "pos_precision": float((p > t0).sum() / max(1, (p > t0).sum() + (a > t0).sum())),
        "neg_precision": float((a < t1).sum() / max(1, (a < t1).sum() + (p < t1).sum())),
        "rule": {"present_below_t1": present_below_t1, "absent_above_t0": absent_above_t0},
    }


def plot_scores(path: str | Path, groups: dict[str, list[float]], thresholds: dict[str, float], bins: int,
                title: str) -> None:
    """Histogram(s) of object scores with the thresholds drawn as vertical lines."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on training machines
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    values = [v for vs in groups.values() for v in vs]
    edges = np.histogram_bin_edges(values if values else [0.0, 1.0], bins=bins)
    for label, vs in groups.items():
        if vs:
            ax.hist(vs, bins=edges, alpha=0.55, label=f"{label} (n={len(vs)})")
    styles = {"t0": ("tab:green", "-"), "t1": ("tab:red", "-"), "t2": ("tab:gray", "--")}
    for name, value in thresholds.items():
        colour, ls = styles.get(name, ("k", ":"))
        ax.axvline(value, color=colour, linestyle=ls, label=f"{name} = {value:.2f}")
    ax.set_xlabel("CLIP score (100 x cosine)")
    ax.set_ylabel("objects")
    ax.set_title(title)
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=100)


def calibrate_dir(out_dir: str | Path, present_below_t1: float = 0.05, absent_above_t0: float = 0.05,
                  bins: int = 60) -> dict:
    """Read the labelled object scores a curation run recorded and write calibration.json/.png."""
    out_dir = Path(out_dir)
    from sare_ds.curation.pipeline import load_chunk_records

    present, absent = [], []
    for rec in load_chunk_records(out_dir):
        for _obj, score, label in rec["scores"]:
            if label is True:
                present.append(score)
            elif label is False:
                absent.append(score)
    if not present and not absent:
        raise ValueError(f"{out_dir}: no labelled object scores; calibration needs a curation run of a COCO "
                         "layout with instance annotations (input.annotations=...)")
    result = propose_thresholds(present, absent, present_below_t1, absent_above_t0)
    (out_dir / "calibration.json").write_text(json.dumps(result, indent=1))
    plot_scores(out_dir / "calibration.png", {"present (annotated)": present, "absent (hallucinated)": absent},
                {k: result[k] for k in ("t0", "t1", "t2")}, bins, "Calibration: proposed thresholds")
    return result
