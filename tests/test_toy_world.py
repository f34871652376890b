"""The toy world: scene generator, and the CI variant of quickstart command 1 end to end.

The end-to-end test runs `bash launch/quickstart.sh --ci` (the same script and code paths as the
full quickstart: world build, launch/curate.py, deepspeed launch/train.py under ZeRO-3 on 2 CPU
ranks, launch/evaluate.py, launch/attack.py) and asserts what must hold: the pipeline completes,
the base captioner hallucinates (CHAIR_S >= 20 % on held-out scenes, mostly co-occurring
partners), and unlearning lowers CHAIR_S.
"""
import json
import os
import random
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from sare_ds.toy.scenes import COCO_IDS, LOOKS, PAIRS, ToyWorld, write_scene_set

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- scenes

def test_scenes_have_distinct_looks_and_valid_coco_files(tmp_path):
    assert len(LOOKS) >= 10 and len(set(LOOKS.values())) == len(LOOKS)
    world = ToyWorld()
    paths = write_scene_set(tmp_path, world, 40, seed=3)
    inst = json.loads(Path(paths["instances"]).read_text())
    caps = json.loads(Path(paths["captions"]).read_text())
    assert len(inst["images"]) == 40 and {c["id"] for c in inst["categories"]} == set(COCO_IDS.values())
    per_image = Counter(a["image_id"] for a in inst["annotations"])
    assert set(per_image) == {im["id"] for im in inst["images"]} and set(per_image.values()) <= {1, 2, 3, 4}
    for ann in inst["annotations"]:  # boxes lie inside the image
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and x + w <= world.image_size and y + h <= world.image_size
    assert Counter(c["image_id"] for c in caps["annotations"]) == Counter({im["id"]: 2 for im in inst["images"]})
    for split in ("random", "adversarial"):
        qs = [json.loads(l) for l in Path(paths["pope"][split]).read_text().splitlines()]
        labels = Counter(q["label"] for q in qs)
        assert labels["yes"] == labels["no"] > 0
    from sare_ds.eval.evaluate import EvalData

    data = EvalData.from_eval_set(tmp_path / "eval_set.json")  # the evaluation tools read it
    assert len(data.truth.objects) == 40


def test_objects_are_drawn_where_the_boxes_say():
    world = ToyWorld()
    rng = random.Random(0)
    for _ in range(20):
        scene = world.sample_scene(rng)
        image = world.draw(scene, rng)
        for name, (x, y, w, h) in zip(scene.objects, scene.boxes):
            colour = LOOKS[name][1]
            box = [image.getpixel((i, j)) for i in range(x, x + w) for j in range(y, y + h)]
            assert sum(p == colour for p in box) >= 0.1 * w * h  # even a ring or a bar covers 10 %


def test_co_occurrence_and_caption_noise_rates():
    world = ToyWorld(co_occurrence=0.6, caption_noise=0.75)
    rng = random.Random(1)
    with_trigger = with_partner = absent = named = prone = 0
    for _ in range(4000):
        objs = world.sample_objects(rng)
        prone += bool(world.hallucination_prone(objs))
        for trigger, partner in PAIRS.items():
            if trigger in objs:
                with_trigger += 1
                with_partner += partner in objs
                if partner not in objs:
                    absent += 1
                    named += partner in world.noisy_objects(objs, rng)
    # The rates the ToyWorld docstring states (one-object scenes never hold a pair).
    assert with_partner / with_trigger == pytest.approx(0.46, abs=0.04)
    assert prone / 4000 == pytest.approx(0.43, abs=0.04)
    assert named / absent == pytest.approx(0.75, abs=0.04)
    # Clean captions name exactly the drawn objects, partners right after their trigger.
    assert world.caption(["frisbee", "dog", "cat"]) == "The image shows a dog, a frisbee and a cat."
    assert world.caption(["car"]) == "The image shows a car."


def test_world_rejects_bad_parameters():
    with pytest.raises(ValueError, match="caption_noise"):
        ToyWorld(caption_noise=1.5)
    with pytest.raises(ValueError, match="max_objects"):
        ToyWorld(max_objects=5)
    with pytest.raises(ValueError, match="no look"):
        ToyWorld(categories=["dog", "giraffe"])
    with pytest.raises(ValueError, match="at least 10 distinct"):
        ToyWorld(categories=["dog", "cat", "car"])


def test_scene_sets_are_reused_and_rebuilt_on_a_new_key(tmp_path):
    from sare_ds.toy.world import build_scenes

    world = ToyWorld()
    build_scenes(tmp_path / "s", world, 6, seed=0, log=lambda *_: None)
    stamp = (tmp_path / "s" / "instances.json").stat().st_mtime_ns
    build_scenes(tmp_path / "s", world, 6, seed=0, log=lambda *_: None)
    assert (tmp_path / "s" / "instances.json").stat().st_mtime_ns == stamp
    build_scenes(tmp_path / "s", world, 4, seed=0, log=lambda *_: None)
    assert len(list((tmp_path / "s" / "images").iterdir())) == 4  # the old images went with the old key


def test_results_aggregate_seeds(tmp_path):
    from sare_ds.toy.results import aggregate_table, load_reports, plot_curves

    def method(chair_s, relearned):
        return {"none": {"CHAIR_S": chair_s, "CHAIR_I": 0.1, "recall": 0.9, "BLEU-4": 0.8},
                "relearn": {"60": {"CHAIR_S": relearned}}}

    roots = []
    for seed, (b, s, r) in enumerate([(0.40, 0.30, 0.35), (0.44, 0.34, 0.41)]):
        root = tmp_path / f"seed{seed}"
        (root / "report").mkdir(parents=True)
        (root / "world.json").write_text(json.dumps({"seed": seed, "preset": "full"}))
        (root / "report" / "report.json").write_text(json.dumps({"base": method(b, b), "SARE": method(s, r)}))
        for m in ("base", "SARE"):  # launch/evaluate.py's per-caption records
            (root / "eval" / m).mkdir(parents=True)
            caps = [{"ground_truth": ["dog"], "hallucinated": ["frisbee"]},  # partner of a drawn trigger
                    {"ground_truth": ["cat"], "hallucinated": ["frisbee", "car"]}, {"ground_truth": ["car"], "hallucinated": []},
                    {"ground_truth": ["dog", "frisbee"], "hallucinated": []}]
            (root / "eval" / m / "captions.jsonl").write_text("".join(json.dumps(c) + "\n" for c in caps))
        roots.append(root)
    reports = load_reports(roots)
    table = aggregate_table(reports)
    # SARE's CHAIR_S: 30 and 34 -> mean 32.0, sd 2.8; relearned 35 and 41 -> 38.0 +- 4.2.
    assert "| SARE | 32.0 ± 2.8 |" in table and "38.0 ± 4.2" in table
    assert "| 1 | 44.0 -> 44.0 | 34.0 -> 41.0 |" in table
    assert "| SARE | 25.0 ± 0.0 | 50.0 ± 0.0 |" in table  # 1 partner, 2 other objects in 4 captions
    assert plot_curves(reports, tmp_path / "curve.png").stat().st_size > 0
    with pytest.raises(FileNotFoundError, match="quickstart"):
        load_reports([tmp_path / "nowhere"])
    # A run of another design (here: another relearning size) is refused, naming the folder.
    odd = tmp_path / "seed1" / "report" / "report.json"
    report = json.loads(odd.read_text())
    report["SARE"]["relearn"] = {"100": {"CHAIR_S": 0.3}}
    odd.write_text(json.dumps(report))
    with pytest.raises(ValueError, match="seed1 differs"):
        load_reports(roots)


def test_captioner_is_reused_on_the_same_key_and_rebuilt_on_another(tmp_path, monkeypatch):
    from sare_ds.toy import mllm, world as world_mod

    calls = []

    def fake_train(out_dir, world, cfg, log=print):  # stands in for minutes of training
        calls.append(world.caption_noise)
        (out_dir / "config.json").parent.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text("{}")
        return {"final_loss": 0.1}

    monkeypatch.setattr(mllm, "train_toy_captioner", fake_train)
    out = tmp_path / "captioner"
    first = world_mod.build_captioner(out, ToyWorld(), "ci", 0, log=lambda *_: None)
    again = world_mod.build_captioner(out, ToyWorld(), "ci", 0, log=lambda *_: None)
    other = world_mod.build_captioner(out, ToyWorld(caption_noise=0.5), "ci", 0, log=lambda *_: None)
    assert (first["reused"], again["reused"], other["reused"]) == (False, True, False)
    assert calls == [0.75, 0.5]
    (out / "config.json").unlink()  # weights gone: rebuilt even with the record in place
    assert world_mod.build_captioner(out, ToyWorld(caption_noise=0.5), "ci", 0, log=lambda *_: None)["reused"] is False


def test_96_px_scenes(tmp_path):
    from sare_ds.toy.clip import patch_size_for

    world = ToyWorld(image_size=96)
    paths = write_scene_set(tmp_path, world, 8, seed=0)
    inst = json.loads(Path(paths["instances"]).read_text())
    assert all(im["width"] == im["height"] == 96 for im in inst["images"])
    assert all(a["bbox"][0] + a["bbox"][2] <= 96 and a["bbox"][1] + a["bbox"][3] <= 96 for a in inst["annotations"])
    assert patch_size_for(world) == 24  # curation's windows are one grid cell at any size


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def ci_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy") / "toy-ci"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU branch (2 ranks, fp32) whatever the machine has
    proc = subprocess.run(["bash", "launch/quickstart.sh", "--ci", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out, proc


def test_ci_pipeline_completes(ci_world):
    out, proc = ci_world
    for path in ("world.json", "curated/manifest.json", "runs/efuf/trainable.safetensors",
                 "runs/sare/trainable.safetensors", "eval/summary.md", "report/report.md",
                 "report/relearn_curve.png", "report/report.json"):
        assert (out / path).is_file(), path
    world = json.loads((out / "world.json").read_text())
    assert world["seed"] == 0 and world["seeds"]["eval_scenes"] == 200  # seeds are recorded
    assert "Report:" in proc.stdout and "relearn n=60" in proc.stdout
    # The report says, from this run's numbers, whether SARE resisted relearning better than EFUF.
    assert "In this run (SARE" in proc.stdout and "n = 60:" in proc.stdout
    manifest = json.loads((out / "curated" / "manifest.json").read_text())
    assert manifest["counts"]["neg"] >= 60 and manifest["counts"]["pos"] > 0  # enough for relearning n=60
    for m in ("efuf", "sare"):  # trained under ZeRO-3 on 2 ranks
        summary = json.loads((out / "runs" / m / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["world_size"] == 2, summary


def test_ci_base_hallucinates_co_occurring_partners(ci_world):
    out, _ = ci_world
    base = json.loads((out / "eval" / "base" / "eval.json").read_text())["captions"]
    assert base["CHAIR_S"] >= 0.20
    # The mechanism: most hallucinated objects are absent partners of drawn triggers.
    kinds = Counter()
    for line in (out / "eval" / "base" / "captions.jsonl").read_text().splitlines():
        cap = json.loads(line)
        for obj in cap["hallucinated"]:
            kinds["partner" if any(PAIRS.get(g) == obj for g in cap["ground_truth"]) else "other"] += 1
    assert kinds["partner"] > kinds["other"], kinds


def test_ci_unlearning_lowers_chair_s(ci_world):
    out, _ = ci_world
    report = json.loads((out / "report" / "report.json").read_text())
    base = report["base"]["none"]["CHAIR_S"]
    for method in ("EFUF", "SARE"):
        assert report[method]["none"]["CHAIR_S"] < base, (method, report[method]["none"]["CHAIR_S"], base)
        assert "60" in {str(n) for n in report[method]["relearn"]}  # the relearning attack ran
    summary = json.loads((out / "eval" / "SARE" / "eval.json").read_text())["captions"]
    assert summary["CHAIR_S"] == pytest.approx(report["SARE"]["none"]["CHAIR_S"])  # both tools agree
