"""Data faults of issue 13 (part B): every skip counted once and reported, shard counts checked against
what the shards yield, remote sources refused after brace expansion, brace alternatives with commas,
JSON and ds_config errors that name the file and the fix, and the scene set of launch/evaluate.py
(--scenes must exist unless asked for; eval_set.json relative to itself).

    DS_ACCELERATOR=cpu .venv/bin/python -m pytest -q tests/test_faults_data.py
"""
from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

import sare_ds  # noqa: F401  (before transformers)
from sare_ds.data.samples import Caption, Span
from sare_ds.data.shards import (CorruptShardError, ShardWriter, list_shards, make_record, read_manifest,
                                 shard_format, shard_name)
from sare_ds.data.stream import NotEnoughShardsError, ShardStream

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- helpers

def _png(n: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (n % 256, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def write_captions(root: Path, sizes: list[int], corrupt_every: int = 0) -> None:
    """Caption shards cap-<i>.tar with a caption-format manifest; with corrupt_every = k, the .json of
    every k-th caption (overall) is not JSON."""
    root.mkdir(parents=True, exist_ok=True)
    shards, n = [], 0
    for index, count in enumerate(sizes):
        with ShardWriter(root / shard_name("cap", index)) as w:
            for _ in range(count):
                text = f"A dog {n} runs, a cat {n} sleeps."
                cut = text.index(",")
                cap = Caption(None, "Describe.", text, [Span(0, cut, "pos", "dog", 33.0),
                                                       Span(cut + 1, len(text) - 1, "neg", "cat", 12.0)],
                              image_id=f"img{n}")
                w.write(f"{index:06d}_{w.count:07d}", _png(n), "png", cap.to_json())
                n += 1
        shards.append({"name": w.path.name, "kind": "cap", "count": count, "chunk": index})
    (root / "manifest.json").write_text(json.dumps({"format": "captions", "shards": shards}))
    if corrupt_every:
        n = 0
        for index, count in enumerate(sizes):
            path = root / shard_name("cap", index)
            with tarfile.open(path) as tar:
                members = [(m, tar.extractfile(m).read()) for m in tar]
            with tarfile.open(path, "w") as tar:
                for m, data in members:
                    if m.name.endswith(".json"):
                        if n % corrupt_every == 0:
                            data = b"{not json"
                            m.size = len(data)
                        n += 1
                    tar.addfile(m, io.BytesIO(data))


def cut_after_samples(path: Path, keep: int) -> None:
    """Cut a shard at a member boundary: only its first `keep` samples (two members each) stay, with no
    end-of-archive blocks, as a copy interrupted between members leaves it."""
    with tarfile.open(path) as tar:
        members = [m for m in tar if m.isreg()]
    last = members[2 * keep - 1]
    end = last.offset_data + (last.size + 511) // 512 * 512
    path.write_bytes(path.read_bytes()[:end])


def cap_id(caption):  # module level: DataLoader workers pickle it
    return caption.image_id


def run(stream) -> list:
    return [x for step in stream for mb in step for x in mb["cap"]]


# --------------------------------------------------------------------------- shard counts

def test_truncated_shard_is_an_error_naming_shard_counts_and_fix(tmp_path):
    root = tmp_path / "curated"
    write_captions(root, [64, 64])
    cut_after_samples(root / "cap-000001.tar", 32)
    with pytest.raises(CorruptShardError) as e:
        run(ShardStream(root, per_step={"cap": 4}, tokenize=cap_id))
    msg = str(e.value)
    assert "cap-000001.tar: manifest.json counts 64 samples for it, but its tar ends after 32 sample(s)" in msg
    assert "samples 32..63 of it (32) cannot be read" in msg
    assert ".chunks/chunk-000001.json" in msg and "data.skip_corrupt=true" in msg and "manifest.json" in msg


def test_truncated_shard_with_skip_corrupt_is_a_counted_skip(tmp_path, caplog):
    root = tmp_path / "curated"
    write_captions(root, [64, 64])
    cut_after_samples(root / "cap-000001.tar", 32)
    s = ShardStream(root, per_step={"cap": 4}, tokenize=cap_id, skip_corrupt=True, epochs=2)
    counts = s.skipped  # taken before the loop, as the trainer's data report does
    with caplog.at_level(logging.WARNING, logger="sare_ds.data.stream"):
        ids = run(s)
    assert len(ids) == 2 * 128  # the step count is kept: 32 repeats per epoch in place of the missing ones
    assert counts == {"truncated_shard": 32, "topped_up": 64}
    assert set(ids) == {f"img{n}" for n in range(96)}
    lines = [r.getMessage() for r in caplog.records if "truncated_shard" in r.getMessage()
             and r.getMessage().startswith("skipping")]
    assert len(lines) == 1 and "cap-000001.tar" in lines[0] and "32..63" in lines[0]


def test_shard_holding_more_than_its_count(tmp_path):
    root = tmp_path / "curated"
    write_captions(root, [40, 24])
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["shards"][0]["count"] = 36  # the shard holds 40
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptShardError, match=r"cap-000000.tar: manifest.json counts 36 samples for it, but it "
                                                r"holds more than 36.*skip_corrupt"):
        run(ShardStream(root, per_step={"cap": 4}, tokenize=cap_id))
    s = ShardStream(root, per_step={"cap": 4}, tokenize=cap_id, skip_corrupt=True)
    run(s)
    assert s.skipped == {"beyond_manifest_count": 4}


# --------------------------------------------------------------------------- skips counted once

@pytest.mark.parametrize("workers", [0, 2])
def test_skips_counted_once_and_reach_the_main_process(tmp_path, workers, caplog):
    root = tmp_path / "curated"
    write_captions(root, [64, 64], corrupt_every=2)  # 64 corrupt records of 128
    # 2 epochs plus top-ups re-read every corrupt member several times; each is counted once.
    s = ShardStream(root, per_step={"cap": 4}, tokenize=cap_id, skip_corrupt=True, epochs=2, num_workers=workers)
    counts = s.skipped
    with caplog.at_level(logging.WARNING, logger="sare_ds.data.stream"):
        ids = run(s)
    assert len(ids) == len(s) * 4
    assert counts["corrupt_member"] == 64 and set(counts) == {"corrupt_member", "topped_up"}
    assert all(int(i[3:]) % 2 == 1 for i in ids)
    if workers == 0:  # worker processes log to their own stderr; in-process, one line per skipped sample
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping corrupt member")]
        keys = {line.split("sample ")[1].split(" ")[0] for line in lines}
        assert len(lines) == 64 and len(keys) == 64
        assert all("cap-00000" in line for line in lines)
    assert any("64 x corrupt_member" in r.getMessage() for r in caplog.records)  # the end-of-run summary


# --------------------------------------------------------------------------- remote sources, brace patterns

def test_brace_pipe_is_refused_and_never_run(tmp_path, monkeypatch):
    from sare_ds.data.shards import RemoteSourceError, shard_list

    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "marker"
    spec = "{p..p}ipe:touch " + str(marker)
    for call in (lambda: shard_list(spec), lambda: list_shards(spec), lambda: shard_format(spec),
                 lambda: ShardStream(spec, per_step={"cap": 1}, tokenize=cap_id),
                 lambda: shard_list(["runs/x", "{g,h}s:bucket/cap-000000.tar"])):
        with pytest.raises(RemoteSourceError, match="allow_remote"):
            call()
    # Curation's shard input goes through the same check.
    from sare_ds.curation.config import load_curation_config
    from sare_ds.curation.inputs import open_source

    cfg = load_curation_config(None, [f"input.path={spec}.tar", "input.format=shards"])
    with pytest.raises(RemoteSourceError, match="input.allow_remote"):
        open_source(cfg.input, 4)
    assert not marker.exists()


def test_brace_alternatives_expand_before_the_comma_split(tmp_path):
    from sare_ds.data.shards import shard_list

    assert shard_list("{neg,pos,sent}-00000{0..4}.tar") == [
        f"{k}-00000{i}.tar" for k in ("neg", "pos", "sent") for i in range(5)]
    assert shard_list("a.tar, {b,c}-{0..1}.tar,,d/") == ["a.tar", "b-0.tar", "b-1.tar", "c-0.tar", "c-1.tar", "d/"]
    root = tmp_path / "old"
    root.mkdir()
    for kind in ("neg", "pos", "sent"):
        for i in range(2):
            with ShardWriter(root / shard_name(kind, i)) as w:
                w.write(f"{i:06d}_0000000", _png(i), "png",
                        make_record(f"{kind}{i}", "p", "A ", "dog", kind, "dog", 20.0, "A dog"))
    spec = f"{root}/{{neg,pos}}-00000{{0..1}}.tar,{root}/sent-000000.tar"
    assert [Path(u).name for u in list_shards(spec)] == [
        "neg-000000.tar", "neg-000001.tar", "pos-000000.tar", "pos-000001.tar", "sent-000000.tar"]
    assert shard_format(spec) == "samples"


def test_no_neg_hint_never_suggests_a_rejected_value(tmp_path):
    root = tmp_path / "old"
    root.mkdir()
    for kind in ("pos", "sent"):
        with ShardWriter(root / shard_name(kind, 0)) as w:
            w.write("000000_0000000", _png(1), "png", make_record("1", "p", "A ", "dog", kind, "dog", 40.0, "A dog"))
    with pytest.raises(NotEnoughShardsError) as e:
        ShardStream(root, per_step={"pos": 1, "neg": 1, "sent": 1}, tokenize=cap_id)
    assert "neg_per_step=0" not in str(e.value) and "split.t1" in str(e.value)
    from sare_ds.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="neg_per_step"):  # what the old hint suggested
        load_config(None, ["method.name=sare", "data.neg_per_step=0"])
    from sare_ds.data.steps import StepComposer

    with pytest.raises(ValueError) as e:
        StepComposer({"pos": [1]}, {"pos": 1, "neg": 1}, 1, 1, 0)
    assert "neg_per_step=0" not in str(e.value)


# --------------------------------------------------------------------------- config and JSON errors

def test_ds_config_stage_must_be_an_integer(tmp_path):
    from sare_ds.config import ConfigError, TrainConfig
    from sare_ds.train.ds_config import build_ds_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": "3"}}))
    cfg = TrainConfig()
    cfg.distributed.ds_config = str(path)
    with pytest.raises(ConfigError) as e:
        build_ds_config(cfg, 1, on_gpu=False)
    msg = str(e.value)
    assert "stage = '3' is a str; it must be an integer" in msg and '"stage": 3 without quotes' in msg
    assert "is not supported" not in msg


def test_truncated_json_names_the_file(tmp_path):
    from sare_ds.curation.inputs import coco_source
    from sare_ds.curation.pipeline import annotation_captions
    from sare_ds.eval.coco import CocoFormatError, CocoTruth

    whole = json.dumps({"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"image_id": 1, "caption": "x"}]})
    bad = tmp_path / "captions_val.json"
    bad.write_text(whole[:40])
    with pytest.raises(CocoFormatError, match=r"captions_val.json is not valid JSON.*truncated\?.*fix"):
        CocoTruth.from_files([], [bad])
    with pytest.raises(ValueError, match=r"caption.captions_file = .*captions_val.json is not valid JSON.*truncated"):
        annotation_captions(bad)
    with pytest.raises(ValueError, match=r"input.annotations = .*captions_val.json is not valid JSON.*fix"):
        coco_source(tmp_path, bad, 4, 0)
    (tmp_path / "manifest.json").write_text('{"format": "captions", "shards": [')
    with pytest.raises(CorruptShardError, match=r"manifest .*manifest.json is not valid JSON.*re-run launch/curate"):
        read_manifest(tmp_path)


# --------------------------------------------------------------------------- scene sets

def _script(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_misspelled_scenes_is_refused(tmp_path):
    from sare_ds.eval.scenes import write_scene_eval_set

    write_scene_eval_set(tmp_path / "scenes", num_images=2, image_size=16)  # the folder meant
    r = _script("launch/evaluate.py", "--run", "base", "--base", "no/such/model", "--scenes", "scnes",
                "--out", "out", cwd=tmp_path)
    assert r.returncode != 0, r.stdout
    assert "--scenes scnes: the folder does not exist" in r.stderr and "--make-scenes" in r.stderr
    assert "Did you mean scenes?" in r.stderr
    assert not (tmp_path / "scnes").exists() and not (tmp_path / "out").exists()
    r = _script("launch/attack.py", "--method", "base", "--scenes", "scnes", "--out", "out", cwd=tmp_path)
    assert r.returncode != 0 and "--make-scenes" in r.stderr and not (tmp_path / "scnes").exists()


def test_eval_set_paths_are_relative_to_itself(tmp_path, monkeypatch):
    from sare_ds.eval.scenes import load_scene_eval_data, read_eval_set, write_scene_eval_set

    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    write_scene_eval_set("runs/scenes", num_images=3, image_size=16)
    stored = json.loads(Path("runs/scenes/eval_set.json").read_text())
    assert stored == {"image_dir": "images", "instances": "instances.json", "captions": "captions.json",
                      "pope": {"random": "pope_random.json"}}
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "b")  # another working directory
    data = load_scene_eval_data(tmp_path / "a/runs/scenes/eval_set.json")
    assert len(data.truth.image_ids) == 3
    assert all(p.is_file() for _, p in data.truth.image_paths(data.image_dir))
    assert Path(data.pope_files["random"]).is_file()
    # A file written before (paths relative to the folder its writer ran in) still loads from there.
    old = tmp_path / "a/runs/scenes/eval_set.json"
    old.write_text(json.dumps({"image_dir": "runs/scenes/images", "instances": "runs/scenes/instances.json",
                               "captions": "runs/scenes/captions.json"}))
    monkeypatch.chdir(tmp_path / "a")
    assert read_eval_set(old)["instances"] == str(tmp_path / "a/runs/scenes/instances.json")
    assert len(load_scene_eval_data(old).truth.image_ids) == 3
