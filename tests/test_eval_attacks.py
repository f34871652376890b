"""Attacks, the sharpness probe, the weights loader and both CLIs, end to end on the tiny model.

    .venv/bin/python -m pytest tests/test_eval_attacks.py -q
"""
import io
import json
import runpy
import sys

import pytest
import torch

from sare_ds.config import MethodConfig
from sare_ds.eval.attacks import fine_tune_attack, load_neg_samples
from sare_ds.eval.probe import sharpness_probe


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_relearning_trains_only_the_mapping_and_lowers_the_nll(adapter):
    samples = load_neg_samples("synthetic", 8)
    assert len(samples) == 8 and all(s.kind == "neg" for s in samples)
    before = _snapshot(adapter.model)
    out = fine_tune_attack(adapter, samples, trainable="mapping", lr=3e-3, steps=6, batch_size=4)
    assert out["steps"] == 6 and out["samples"] == 8
    assert out["losses"][-1] < out["losses"][0]
    changed = {n for n, p in adapter.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("multi_modal_projector" in n for n in changed)
    assert not any(p.requires_grad for p in adapter.model.parameters())


def test_lora_attack_leaves_the_mapping_as_it_was(adapter):
    before = _snapshot(adapter.model)
    out = fine_tune_attack(adapter, load_neg_samples("synthetic", 4), trainable="lora", lr=1e-2, steps=2,
                           batch_size=2)
    assert out["trainable"] == "lora" and out["num_trainable_tensors"] > 0
    lora = {n: p for n, p in adapter.model.named_parameters() if "lora_B" in n}
    assert lora and any(p.abs().sum() > 0 for p in lora.values())  # lora_B starts at 0: it trained
    for name, p in adapter.model.named_parameters():
        base_name = name.replace("base_model.model.", "").replace(".base_layer", "")
        if "lora_" not in name and base_name in before:
            assert torch.equal(p, before[base_name]), name


def test_attack_data_from_webdataset_shards(tmp_path):
    import webdataset as wds
    from PIL import Image

    with wds.TarWriter(str(tmp_path / "neg-000000.tar")) as sink:
        for i in range(3):
            record = {"image_id": f"img{i}", "prompt": "Describe.", "context": "A cat", "target": " and a dog.",
                      "kind": "neg", "object": "dog", "score": 12.5, "caption": "A cat and a dog."}
            sink.write({"__key__": f"s{i}", "png": Image.new("RGB", (32, 32)), "json": record})
    samples = load_neg_samples(tmp_path, 2)
    assert [s.image_id for s in samples] == ["img0", "img1"]
    assert samples[0].target == " and a dog." and samples[0].score == 12.5 and samples[0].image.size == (32, 32)
    with pytest.raises(ValueError, match="only 3 neg samples"):
        load_neg_samples(tmp_path, 5)


def test_probe_gap_equals_the_steps_sharpness_gap(adapter, tmp_path):
    from sare_ds.data.samples import Caption
    from sare_ds.data.tokenize import tokenize_caption
    from sare_ds.eval.probe import plot_landscape
    from sare_ds.train.params import PlainParameterSpace
    from sare_ds.train.step import UnlearningStep

    samples = load_neg_samples("synthetic", 4)
    probe = sharpness_probe(adapter, samples, rho=0.05, num_radii=3, num_random=2, batch_size=8)
    assert probe["radii"] == pytest.approx([0.0, 0.05, 0.1])
    assert probe["gradient_direction"][0] == pytest.approx(probe["loss_neg_at_theta"])
    assert all(c[0] == pytest.approx(probe["loss_neg_at_theta"]) for c in probe["random_directions"])

    # The training step's own sam/sharpness_gap on the same neg batch (SGD with lr 0: no update).
    params = [p for p in adapter.model.parameters()]
    for n, p in adapter.model.named_parameters():
        p.requires_grad_("multi_modal_projector" in n)
    params = [p for p in params if p.requires_grad]
    space = PlainParameterSpace(params, torch.optim.SGD(params, lr=0.0))
    step = UnlearningStep(adapter.model, adapter.forward_inputs, space, MethodConfig(name="sare", rho=0.05),
                          device=torch.device("cpu"), dtype=torch.float32, pad_token_id=adapter.tokenizer.pad_token_id)
    micro = [s for smp in samples for s in tokenize_caption(Caption.from_sample(smp), adapter, 512)]
    metrics = step([micro])
    assert probe["sharpness_gap"] == pytest.approx(float(metrics["sam/sharpness_gap"]), rel=1e-4, abs=1e-6)
    assert probe["sharpness_gap"] > 0  # ascent direction of L_neg
    assert plot_landscape(probe, tmp_path / "l.png").stat().st_size > 1000


def test_weights_loader_applies_a_run(tiny_model_dir, tmp_path):
    from safetensors.torch import save_file

    from sare_ds.eval.weights import RunWeightsError, load_method_model

    base = load_method_model(None, base=str(tiny_model_dir))
    name = next(n for n, _ in base.model.named_parameters() if "multi_modal_projector" in n)
    run = tmp_path / "run"
    run.mkdir()
    save_file({name: torch.full_like(dict(base.model.named_parameters())[name], 0.25)}, str(run / "trainable.safetensors"))
    loaded = load_method_model(run, base=str(tiny_model_dir))
    assert torch.all(dict(loaded.model.named_parameters())[name] == 0.25)
    save_file({"not.a.parameter": torch.zeros(2)}, str(run / "trainable.safetensors"))
    with pytest.raises(RunWeightsError, match="no parameter of that name"):
        load_method_model(run, base=str(tiny_model_dir))


def _run_cli(script, argv, monkeypatch):
    monkeypatch.setattr(sys, "argv", [script, *argv])
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    # main() in this process: the script's `__main__` block leaves through os._exit (sare_ds.dist.run_main),
    # which would end pytest itself; that exit path is tested in tests/test_dist.py.
    runpy.run_path(script, run_name="cli")["main"]()


def test_evaluate_and_attack_clis_end_to_end(tiny_model_dir, tmp_path, monkeypatch):
    scenes, out = tmp_path / "scenes", tmp_path / "eval"
    common = ["--scenes", str(scenes), "--scene-images", "4"]
    _run_cli("launch/evaluate.py", ["--base", str(tiny_model_dir), "--run", "base", *common, "--out", str(out),
                                    "--max-new-tokens", "8", "--pope-limit", "6"], monkeypatch)
    result = json.loads((out / "base" / "eval.json").read_text())
    assert result["captions"]["num_captions"] == 4 and result["pope"]["splits"]["random"]["num_questions"] == 6
    assert len((out / "base" / "captions.jsonl").read_text().splitlines()) == 4
    assert (out / "summary.md").read_text().startswith("| model | CHAIR_S")
    # the setting is recorded: CHAIR mode, the scene set's own images, no protocol
    assert result["chair_mode"] == "reference" and result["captions"]["chair_mode"] == "reference"
    assert result["images"]["name"] == "scene eval set: all images" and result["images"]["count"] == 4
    assert result["protocol"] is None and "CHAIR mode: reference" in (out / "base" / "eval.md").read_text()

    report = tmp_path / "report"
    _run_cli("launch/attack.py", ["--base", str(tiny_model_dir), "--method", "base=base", *common, "--out", str(report),
                                  "--relearn-sizes", "4,8", "--relearn-lr", "1e-3", "--batch-size", "2",
                                  "--probe-samples", "4", "--probe-radii", "3", "--probe-random", "1",
                                  "--eval-max-new-tokens", "6", "--eval-pope-limit", "4"], monkeypatch)
    data = json.loads((report / "report.json").read_text())["base"]
    assert set(data["relearn"]) == {"4", "8"} and data["relearn"]["8"]["train"]["samples"] == 8
    assert {"none", "lora", "adversarial", "probe"} <= set(data)
    assert len(data["adversarial"]["per_prompt"]) == 6
    table = (report / "report.md").read_text()
    assert "relearn n=8 CHAIR_S" in table and "| base |" in table and "CHAIR mode: reference" in table
    assert json.loads((report / "config.json").read_text())["images"]["count"] == 4
    for png in ("relearn_curve.png", "landscape.png"):
        assert (report / png).stat().st_size > 1000


def test_parse_runs_names_and_paths():
    from sare_ds.eval.runs import parse_runs

    assert parse_runs(["runs/sare"]) == {"sare": "runs/sare"}            # a folder alone is that run
    assert parse_runs(["runs/sare/", "base", "FT=runs/ft", "b=base"]) == {
        "sare": "runs/sare/", "base": None, "FT": "runs/ft", "b": None}
    with pytest.raises(ValueError, match="needs both a name and a folder"):
        parse_runs(["sare="])            # e.g. an unset shell variable: not silently the base model
    with pytest.raises(ValueError, match="given twice"):
        parse_runs(["runs/a/sare", "runs/b/sare"])


def test_attack_cli_method_without_name_is_that_run(tmp_path, monkeypatch):
    import sare_ds.eval.suite as suite

    seen = {}

    def fake_suite(methods, data, cfg, *, eval_cfg, out_dir, base, toy_world=False):
        seen.update(methods)
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "report.md").write_text("report")

    monkeypatch.setattr(suite, "run_attack_suite", fake_suite)
    _run_cli("launch/attack.py", ["--method", str(tmp_path / "sare"), "--method", "base",
                                  "--scenes", str(tmp_path / "scenes"), "--scene-images", "2",
                                  "--out", str(tmp_path / "out")], monkeypatch)
    assert seen == {"sare": str(tmp_path / "sare"), "base": None}


def test_probe_loss_is_the_per_sample_mean_whatever_the_batch_size(adapter):
    samples = load_neg_samples("synthetic", 4)
    kwargs = dict(rho=0.05, num_radii=2, num_random=1)
    whole = sharpness_probe(adapter, samples, batch_size=8, **kwargs)["loss_neg_at_theta"]
    uneven = sharpness_probe(adapter, samples, batch_size=3, **kwargs)["loss_neg_at_theta"]  # batches of 3 + 1
    assert uneven == pytest.approx(whole, rel=1e-5)
