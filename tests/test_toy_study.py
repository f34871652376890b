"""The toy-world study's parts: the relearning dose grid, the report's verdict, the aggregation over seeds.

The study itself (sare_ds/toy/study.py, `bash launch/toy_study.sh`) takes about 20 minutes on 2 cores and is
not run here; its pieces are, on the tiny model and on fabricated study files with known answers.
"""
from __future__ import annotations

import json
import statistics

import pytest

from sare_ds.config import load_config
from sare_ds.toy import study
from tests.test_zero import ROOT


def test_every_model_of_the_grid_is_a_valid_config():
    grid = study.model_grid()
    assert {"FT", "EFUF@0.0005", "EFUF@0.001", "EFUF@0.002", "SARE@0.0005", "SARE@0.001", "SARE@0.002",
            "SARE+adaptive", "SARE+every2", "SARE+every4"} == set(grid)
    for name, extra in grid.items():
        cfg = load_config(ROOT / "launch/configs/toy.yaml", [*extra, "optim.grad_accum_steps=2"])
        assert cfg.method.name == name.split("@")[0].split("+")[0].lower()
    assert load_config(ROOT / "launch/configs/toy.yaml", grid["SARE+every4"]).method.ascent_every == 4


def test_dose_grid_relearns_a_fresh_copy_per_dose(tiny_model_dir, tmp_path):
    from sare_ds.data.synthetic import generate_samples
    from sare_ds.eval.evaluate import EvalConfig
    from sare_ds.eval.scenes import load_scene_eval_data, write_scene_eval_set
    from sare_ds.eval.suite import AttackConfig, attack_method
    from sare_ds.eval.weights import load_method_model

    write_scene_eval_set(tmp_path / "scenes", num_images=3, image_size=32, seed=1)
    data = load_scene_eval_data(tmp_path / "scenes" / "eval_set.json")
    samples = [s for s in generate_samples(40, 32, "Describe the image.", seed=4) if s.kind == "neg"][:10]
    loads = []

    def load():
        loads.append(1)
        return load_method_model(None, base=str(tiny_model_dir))

    cfg = AttackConfig(relearn_sizes=[], lora=False, adversarial=False, probe=False, pope_unattacked=False,
                       dose_sizes=[2, 6], dose_lrs=[1e-4, 5e-2], heldout_samples=4)
    out = attack_method(load, data, EvalConfig(max_new_tokens=6, perplexity=False), cfg, samples)
    assert list(out["dose"]) == ["2@0.0001", "6@0.0001", "2@0.05", "6@0.05"]
    assert len(loads) == 1 + 4  # the unattacked model, then a fresh copy per dose
    for key, row in out["dose"].items():
        assert row["n"] == int(key.split("@")[0]) and row["steps"] == max(1, row["n"] // cfg.batch_size)  # full batches (one, of n, when n < batch)
        assert 0.0 <= row["CHAIR_S"] <= 1.0 and row["captions"] == 3
    # Relearning the hallucinated spans makes held-out hallucinations likelier: L_neg (= -NLL) rises, more
    # with the stronger dose.
    before = out["none"]["L_neg_heldout"]
    assert out["dose"]["6@0.05"]["L_neg_heldout"] > out["dose"]["6@0.0001"]["L_neg_heldout"] > before - 1e-6
    from sare_ds.eval.suite import run_attack_suite

    with pytest.raises(ValueError, match="make a grid together"):
        run_attack_suite({"base": None}, data, AttackConfig(dose_sizes=[2], dose_lrs=[]), base=str(tiny_model_dir),
                         out_dir=tmp_path / "r")
    with pytest.raises(ValueError, match=r"whole numbers > 0 .*n = 0 is the unattacked row"):
        run_attack_suite({"base": None}, data, AttackConfig(dose_sizes=[0, 2], dose_lrs=[1e-3]),
                         base=str(tiny_model_dir), out_dir=tmp_path / "r")


def fake_result(before: float, after: dict[str, float], captions: int = 200) -> dict:
    return {"none": {"CHAIR_S": before, "CHAIR_I": before / 2, "captions": captions, "chair_mode": "reference"},
            "relearn": {n: {"CHAIR_S": v, "CHAIR_I": v / 2} for n, v in after.items()}}


def test_the_reports_verdict_is_drawn_from_the_numbers():
    from sare_ds.eval.report import relearning_verdict

    results = {"EFUF": fake_result(0.38, {"60": 0.50, "100": 0.45, "140": 0.40}),
               "SARE": fake_result(0.39, {"60": 0.36, "100": 0.45, "140": 0.52})}
    text = relearning_verdict(results)
    # 200 captions: 2 standard errors of a difference near p = 0.45 are about 10 points.
    assert "SARE resisted relearning better than EFUF at n = 60: 36.0 vs 50.0 %" in text
    assert "SARE resisted it worse at n = 140: 52.0 vs 40.0 %" in text
    assert "no clear difference" in text and "n = 100: 45.0 vs 45.0 %" in text
    assert relearning_verdict({"EFUF": results["EFUF"]}) == ""  # nothing to compare


def test_the_toy_finding_is_printed_for_toy_world_reports_only():
    from sare_ds.eval.report import markdown_report, seed_averaged_finding

    results = {"EFUF": fake_result(0.38, {"60": 0.50}), "SARE": fake_result(0.39, {"60": 0.36})}
    for r in results.values():
        r["none"]["CHAIR_I"] = 0.2
        for m in r["relearn"].values():
            m["CHAIR_I"] = 0.2
    finding = seed_averaged_finding()
    assert finding  # shipped (sare_ds/resources/toy_world_finding.txt, written by the study)
    assert finding in markdown_report(results, toy_world=True)
    assert finding not in markdown_report(results) and "In this run (SARE" in markdown_report(results)


def fake_study(seed: int, shift: float, sare_after: float) -> dict:
    keys = [f"{n}@{lr:g}" for lr in study.DOSE_LRS for n in study.DOSE_SIZES]

    def ev(before, after):
        return {"none": {"CHAIR_S": before, "CHAIR_I": before / 2, "recall": 0.9, "L_neg_heldout": -3.0},
                "probe": {"sharpness_gap": 0.02, "random_gap": 0.001},
                "dose": {k: {"CHAIR_S": after, "L_neg_heldout": -2.0} for k in keys}}

    models = {"base": {"eval": ev(0.45 + shift, 0.47 + shift)}}
    for name in study.model_grid():
        models[name] = {"eval": ev(0.38 + shift, (sare_after if name.startswith("SARE") else 0.48) + shift),
                        "train_s": 10.0, "eps_norm_mean": 0.05}
    return {"seed": seed, "models": models}


def test_aggregation_over_seeds(tmp_path, monkeypatch):
    roots = []
    for seed, shift in enumerate((0.0, 0.02, -0.02)):
        root = tmp_path / f"seed{seed}"
        (root / "study").mkdir(parents=True)
        (root / "study" / "study.json").write_text(json.dumps(fake_study(seed, shift, sare_after=0.44)))
        roots.append(str(root))
    monkeypatch.setattr(study, "FINDING", tmp_path / "finding.txt")
    t = study.aggregate(roots, str(tmp_path / "out"), write_finding=True)
    assert t["base"]["CHAIR_S"] == pytest.approx((45.0, statistics.stdev([45.0, 47.0, 43.0])))
    assert t["SARE@0.001"]["dose"]["60@0.0003"]["resurgence"][0] == pytest.approx(6.0)
    assert t["EFUF@0.001"]["dose"]["60@0.0003"]["resurgence"][0] == pytest.approx(10.0)
    text = (tmp_path / "out.md").read_text()
    assert "| SARE+every2 |" in text and "60@0.0003" in text and (tmp_path / "out.png").stat().st_size > 10_000
    # SARE ends 4 points below EFUF on every seed: a clear difference at every dose.
    finding = (tmp_path / "finding.txt").read_text()
    assert "differ beyond 2 standard errors" in finding and "SARE lower by 4.0 points" in finding
    # Equal outcomes: no advantage claimed.
    for seed, root in enumerate(roots):
        (tmp_path / f"seed{seed}" / "study" / "study.json").write_text(json.dumps(fake_study(seed, 0.01 * seed,
                                                                                              sare_after=0.48)))
    study.aggregate(roots, str(tmp_path / "out2"), write_finding=True)
    assert "no robustness advantage" in (tmp_path / "finding.txt").read_text()


def test_studies_of_different_designs_are_not_averaged(tmp_path):
    a, b = fake_study(0, 0.0, 0.44), fake_study(1, 0.0, 0.44)
    del b["models"]["SARE+every4"]
    for name, s in (("a", a), ("b", b)):
        (tmp_path / name / "study").mkdir(parents=True)
        (tmp_path / name / "study" / "study.json").write_text(json.dumps(s))
    with pytest.raises(ValueError, match="different models"):
        study.load_studies([tmp_path / "a", tmp_path / "b"])
