"""The toy CLIP (sare_ds.toy.clip): trained on toy scenes, loaded through curation's own path
(ClipScorer.from_config with a model-config JSON and a checkpoint file), calibrated, cached."""
from __future__ import annotations

import json
import random

import pytest
import torch

import sare_ds  # noqa: F401  (torchvision guard before open_clip)
from sare_ds.config import ConfigError
from sare_ds.curation.config import ClipConfig, load_curation_config
from sare_ds.curation.scoring import ClipScorer
from sare_ds.toy import clip as toy_clip
from sare_ds.toy.scenes import ToyWorld

WORLD = ToyWorld()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One toy CLIP (ci preset: ~8 s of training on 2 cores) for the module, and its build log."""
    out = tmp_path_factory.mktemp("toy-clip")
    logs: list[str] = []
    toy_clip.build_toy_clip(out, WORLD, preset="ci", seed=0, log=logs.append)
    return out, logs


def clip_config(out, **kw) -> ClipConfig:
    return ClipConfig(model=str(out / toy_clip.CONFIG_FILE), pretrained=str(out / toy_clip.WEIGHTS_FILE),
                      patch_size=toy_clip.patch_size_for(WORLD), window_patches=toy_clip.WINDOW_PATCHES,
                      top_k=toy_clip.TOP_K, **kw)


def held_out_scenes(n: int, seed: int = 1234):
    rng = random.Random(seed)  # neither the training (seed) nor the calibration (seed + 1) stream
    scenes = [WORLD.sample_scene(rng) for _ in range(n)]
    return scenes, [WORLD.draw(s, rng) for s in scenes]


def test_scores_separate_present_from_absent(built):
    out, logs = built
    scorer = ClipScorer.from_config(clip_config(out), "cpu")
    scenes, images = held_out_scenes(40)
    scores = scorer.score(images, [WORLD.categories] * len(images))
    present = [s for sc, row in zip(scenes, scores) for c, s in zip(WORLD.categories, row) if c in sc.objects]
    absent = [s for sc, row in zip(scenes, scores) for c, s in zip(WORLD.categories, row) if c not in sc.objects]
    p, a = torch.tensor(present), torch.tensor(absent)
    assert p.mean() - a.mean() > 25, (p.mean(), a.mean())
    # Share of (present, absent) pairs in the right order (the ROC AUC).
    assert (p[:, None] > a[None, :]).float().mean() > 0.98
    # The calibration (absent = hallucinated partners named by training captions) selects cleanly.
    t = json.loads((out / toy_clip.THRESHOLDS_FILE).read_text())
    assert t["t1"] <= t["t2"] <= t["t0"]
    assert t["pos_precision"] > 0.9 and t["neg_precision"] > 0.9, t
    assert t["absent"]["n"] > 10 and t["present"]["n"] > 100
    assert any("step 400/400" in line for line in logs)


def test_loaded_model_scores_as_trained_one_and_training_is_deterministic(tmp_path):
    # A few steps suffice: what is checked is the save / load path and the seeding, not the quality.
    kw = {"num_scenes": 8, "steps": 3, "batch_size": 8, "seed": 3, "log": lambda _: None}
    a = toy_clip.train_toy_clip(tmp_path / "a", WORLD, **kw)
    b = toy_clip.train_toy_clip(tmp_path / "b", WORLD, **kw)
    for (name, x), y in zip(a["model"].state_dict().items(), b["model"].state_dict().values()):
        assert torch.equal(x, y), name
    cfg = clip_config(tmp_path / "a")
    _, images = held_out_scenes(3)
    objects = [["dog", "cat", "sink"]] * 3
    in_memory = ClipScorer.from_model(a["model"], a["tokenizer"], cfg, "cpu").score(images, objects)
    loaded = ClipScorer.from_config(cfg, "cpu").score(images, objects)
    assert in_memory == loaded


def test_curation_overrides_validate(built, tmp_path):
    out, _ = built
    overrides = toy_clip.curation_overrides(out)
    cfg = load_curation_config(None, ["input.path=images", *overrides])
    t = json.loads((out / toy_clip.THRESHOLDS_FILE).read_text())
    assert (cfg.split.t0, cfg.split.t1, cfg.split.t2) == (t["t0"], t["t1"], t["t2"])
    assert cfg.clip.model == str((out / toy_clip.CONFIG_FILE).resolve())
    assert (cfg.clip.patch_size, cfg.clip.window_patches, cfg.clip.object_text) == (16, 2, "category")
    with pytest.raises(FileNotFoundError, match=r"lacks toy-clip.json.*python -m sare_ds.toy.clip"):
        toy_clip.curation_overrides(tmp_path)


def test_second_build_reuses(built):
    out, _ = built
    weights = out / toy_clip.WEIGHTS_FILE
    before = weights.stat().st_mtime_ns
    logs: list[str] = []
    assert toy_clip.build_toy_clip(out, WORLD, preset="ci", seed=0, log=logs.append) == out
    assert weights.stat().st_mtime_ns == before
    assert logs and "reusing" in logs[0]
    record = json.loads((out / toy_clip.RECORD_FILE).read_text())
    assert record["key"]["preset"] == "ci" and record["training"]["seconds"] > 0


def test_bad_model_config_path_is_a_clear_error(tmp_path):
    missing = tmp_path / "nowhere.json"
    with pytest.raises(ConfigError, match=r"clip.model = .*nowhere.json.*Fix: pass an existing open_clip"):
        ClipScorer.from_config(ClipConfig(model=str(missing), pretrained=""), "cpu")
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"embed_dim": 8}))
    with pytest.raises(ConfigError, match=r"wrong.json.*lacks embed_dim / vision_cfg / text_cfg"):
        ClipScorer.from_config(ClipConfig(model=str(wrong), pretrained=""), "cpu")
