"""Curation: window scores against a direct per-window computation, the split rules with injected
scores (caption spans against the per-sample split), curation's use of the CHAIR vocabulary, caption
shards + manifest + histogram, every skipped-input case, resume after an interruption, converting an
old per-kind directory, calibration, shard inputs and the real MLLM captioner.

    .venv/bin/python -m pytest tests/test_curation.py -q
"""
from __future__ import annotations

import io
import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sare_ds.config import ConfigError
from sare_ds.curation.calibrate import calibrate_dir, propose_thresholds
from sare_ds.curation.config import ClipConfig, CurationConfig, load_curation_config
from sare_ds.curation.convert import convert_to_captions
from sare_ds.curation.pipeline import ResumeMismatchError, curate
from sare_ds.curation.scoring import TINY_CLIP_NAME, ClipScorer, window_grid
from sare_ds.curation.split import ObjectScore, split_caption, split_caption_spans
from sare_ds.curation.synthetic_coco import write_synthetic_coco
from sare_ds.data.samples import KINDS, Caption
from sare_ds.data.shards import (
    ShardWriter,
    iter_captions,
    iter_members,
    iter_samples,
    list_shards,
    make_record,
    read_manifest,
    shard_format,
    shard_index,
    shard_name,
)
from sare_ds.data.subsentence import fragments


# --------------------------------------------------------------------------- window scores

@pytest.fixture(scope="module")
def tiny_scorer():
    cfg = ClipConfig(model=TINY_CLIP_NAME, pretrained="", patch_size=16, window_patches=2, top_k=3, batch_size=7)
    return ClipScorer.from_config(cfg, "cpu")


def direct_local_score(scorer: ClipScorer, image: Image.Image, obj: str) -> float:
    """EFUF's local score the slow way: one window at a time, explicit loops, no caches."""
    p, k = scorer.patch, scorer.window
    cols, rows = window_grid(image.width, image.height, p, k)
    resized = image.resize((cols * p, rows * p), Image.BICUBIC)
    with torch.no_grad():
        text = F.normalize(scorer.encode_text([scorer.prompt.format(obj=obj)]).float(), dim=-1)[0]
        win = {}
        for i in range(rows - k + 1):
            for j in range(cols - k + 1):
                crop = resized.crop((j * p, i * p, (j + k) * p, (i + k) * p))
                t = torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
                t = F.interpolate(t, size=(scorer.input_size,) * 2, mode="bicubic", antialias=True,
                                  align_corners=False).clamp(0, 1)
                emb = F.normalize(scorer.encode_image((t - scorer.mean) / scorer.std).float(), dim=-1)[0]
                win[i, j] = 100.0 * float(emb @ text)
    patch_scores = []
    for a in range(rows):
        for b in range(cols):
            covering = [win[i, j] for i in range(a - k + 1, a + 1) for j in range(b - k + 1, b + 1) if (i, j) in win]
            patch_scores.append(sum(covering) / len(covering))
    top = sorted(patch_scores, reverse=True)[: scorer.top_k]
    return sum(top) / len(top)


def test_window_scores_match_direct_computation(tiny_scorer):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((70, 90), (64, 64), (40, 100))]
    objects = [["dog", "frisbee"], ["cat"], ["dog", "toilet", "bird"]]
    fast = tiny_scorer.score(images, objects)  # all windows of all images batched (batch_size 7)
    for img, objs, scores in zip(images, objects, fast):
        for obj, s in zip(objs, scores):
            assert math.isclose(s, direct_local_score(tiny_scorer, img, obj), abs_tol=2e-3)
    # 4x5 patch grid of the 70x90 image -> 3x4 windows; each encoded once for both objects.
    assert window_grid(90, 70, 16, 2) == (6, 4)
    assert tiny_scorer.windows(images[0])[1] == (3, 5)


def test_local_score_finds_small_object_global_dilutes():
    """Controlled embeddings: an 'encoder' that sees colour (mean deviation from grey + a constant),
    text 'red' points at red. A small red square scores high locally, far lower globally."""
    grey = torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)
    mean, std = [0.0] * 3, [1.0] * 3

    def encode_image(x):
        return torch.cat([(x - grey).mean((2, 3)), torch.full((len(x), 1), 0.05)], 1)

    def encode_text(texts):
        table = {"red": [1.0, -1.0, -1.0, 0.0], "blue": [-1.0, -1.0, 1.0, 0.0]}
        return torch.tensor([table[t.split()[-1].rstrip(".")] for t in texts])

    img = Image.new("RGB", (128, 128), (128, 128, 128))
    img.paste((255, 0, 0), (0, 0, 24, 24))
    kw = dict(patch_size=16, window_patches=2, top_k=4, prompt="a {obj}")
    local = ClipScorer(encode_image, encode_text, 32, mean, std, mode="local", **kw)
    glob = ClipScorer(encode_image, encode_text, 32, mean, std, mode="global", **kw)
    (red_l, blue_l), = local.score([img], [["red", "blue"]])
    (red_g, _), = glob.score([img], [["red", "blue"]])
    assert red_l > 80 and red_l > red_g + 20 and blue_l < 0
    assert local.images_encoded == 49  # 8x8 patches -> 7x7 windows, encoded once for both objects


# --------------------------------------------------------------------------- split rules

def test_split_with_injected_scores():
    cap = "A dog runs on grass, a cat sleeps; two cups and a bottle."
    def obj(cat, word, score):
        start = cap.index(word)
        return ObjectScore(cat, word, start, start + len(word), score)

    samples, dropped = split_caption(cap, [obj("dog", "dog", 40), obj("cat", "cat", 10), obj("cup", "cups", 33),
                                           obj("bottle", "bottle", 25)], t0=32, t1=23, t2=27.5)
    got = [(s.kind, s.object, s.context, s.target) for s in samples]
    assert got == [("pos", "dog", "", "A dog runs on grass"), ("neg", "cat", "A dog runs on grass,", " a cat sleeps"),
                   ("pos", "cup", "A dog runs on grass, a cat sleeps;", " two cups and a bottle")]
    assert dropped == {}  # the bottle (25) lies between t1 and t0: no sub-sentence sample
    # A pos object sharing its fragment with a neg object: kept by default (the method: every object
    # above t0 is a pos sample), left out with the exclusive_fragments deviation.
    two = [obj("cup", "cups", 40), obj("bottle", "bottle", 5)]
    s1, d1 = split_caption(cap, two, 32, 23, 27.5)
    assert [s.kind for s in s1] == ["pos", "neg"] and d1 == {}
    s2, d2 = split_caption(cap, two, 32, 23, 27.5, exclusive_fragments=True)
    assert [s.kind for s in s2] == ["neg"] and d2 == {"pos_fragment_names_neg_object": 1}
    assert CurationConfig().split.exclusive_fragments is False
    # sent: mean > t2 and every object > t1 (strict inequalities, as EFUF's thresholds).
    sent, _ = split_caption(cap, [obj("dog", "dog", 30), obj("cat", "cat", 26)], 32, 23, 27.5)
    assert [(s.kind, s.target, s.score) for s in sent] == [("sent", cap, 28.0)]
    none, _ = split_caption(cap, [obj("dog", "dog", 40), obj("cat", "cat", 23)], 32, 23, 27.5)
    assert [s.kind for s in none] == ["pos"]  # 23 is not > t1, and not < t1 either


def per_sample_reference(caption, objects, t0, t1, t2, exclusive):
    """The per-sample split as curation wrote it before caption records, written plainly: (kind, object,
    context, target, score) per sample, the sent sample last."""
    def fragment(o):
        for a, b in fragments(caption):
            if a <= o.start and o.end <= b:
                return caption[:a], caption[a:b]
        return None

    neg_fragments = {fragment(o) for o in objects if o.score < t1} - {None}
    out = []
    for o in objects:
        f = fragment(o)
        if f is not None and o.score > t0 and not (exclusive and f in neg_fragments):
            out.append(("pos", o.category, *f, o.score))
        elif f is not None and o.score < t1:
            out.append(("neg", o.category, *f, o.score))
    scores = [o.score for o in objects]
    if scores and sum(scores) / len(scores) > t2 and min(scores) > t1:
        out.append(("sent", "", "", caption, sum(scores) / len(scores)))
    return out


def test_caption_spans_equal_the_per_sample_split():
    """A span [start, end) is the per-sample target caption[start:end], its context caption[:start]; the
    sent flag is the sent sample. Random captions, scores around the thresholds, both fragment rules."""
    rng = np.random.default_rng(0)
    words = ["dog", "cat", "cup", "car", "bird", "a", "the", "runs", "near", "two", "big", "on"]
    n_spans = n_sent = 0
    for trial in range(300):
        tokens = rng.choice(words, size=int(rng.integers(1, 16)))
        caption = "".join(str(w) + (str(rng.choice([" ", " ", " ", ", ", ". ", "; ", "! "]))) for w in tokens).strip()
        objects, seen = [], set()
        for cat in ("dog", "cat", "cup", "car", "bird"):
            at = caption.find(cat)
            if at < 0 or cat in seen:
                continue
            seen.add(cat)
            end = at + len(cat) + (3 if rng.random() < 0.1 else 0)  # now and then across a delimiter
            objects.append(ObjectScore(cat, cat, at, min(end, len(caption)), float(rng.uniform(15, 40))))
        objects.sort(key=lambda o: o.start)
        exclusive = bool(trial % 2)
        split = split_caption_spans(caption, objects, 32, 23, 27.5, exclusive)
        got = [(s.kind, s.object, caption[:s.start], caption[s.start:s.end], s.score) for s in split.spans]
        if split.sent:
            got.append(("sent", "", "", caption, split.sent_score))
        assert got == per_sample_reference(caption, objects, 32, 23, 27.5, exclusive), caption
        assert split.empty == (not got)
        if objects:
            assert split.sent_min_score == min(o.score for o in objects)
        # The per-sample view is the same rule.
        samples, _ = split_caption(caption, objects, 32, 23, 27.5, exclusive)
        assert [(s.kind, s.object, s.context, s.target, s.score) for s in samples] == got
        n_spans += len(split.spans)
        n_sent += split.sent
    assert n_spans > 200 and n_sent > 10  # the cases were exercised


# --------------------------------------------------------------------------- the run

class FakeScorer:
    """Scores from a table by object text; records what it was asked."""

    def __init__(self, table):
        self.table, self.calls = table, []

    def score(self, images, objects):
        self.calls.append(objects)
        return [[self.table.get(o, 28.0) for o in objs] for objs in objects]


def fake_captioner(captions):
    calls = []

    def caption(images, prompt, image_ids):
        calls.append(list(image_ids))
        return [captions[i] for i in image_ids]

    caption.calls = calls
    return caption


def make_folder(root, n, bad=()):
    root.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (40, 40), (i * 20, 50, 50)).save(root / f"{i:03d}.png")
    return root


def config(tmp_path, images, **over) -> CurationConfig:
    cfg = load_curation_config(None, [f"input.path={images}", f"output.dir={tmp_path / 'out'}",
                                      "output.images_per_chunk=3"] + [f"{k}={v}" for k, v in over.items()])
    return cfg


def test_curate_uses_vocabulary_and_writes_shards(tmp_path):
    images = make_folder(tmp_path / "imgs", 5)
    captions = {
        "000": "Two puppies chase a frisbee. A toilet seat is up, a baby bird sits on it.",
        "001": "A man rides a motor bike past a hot dog stand.",
        "002": "Teddy bears sit on a couch; a passenger jet flies over.",
        "003": "A red cup.",
        "004": "A chair.",  # 25: between t1 and t0, mean below t2: nothing to train, not written
    }
    scorer = FakeScorer({"puppies": 40, "frisbee": 10, "toilet seat": 35, "baby bird": 30, "man": 36,
                         "motor bike": 20, "hot dog": 33, "teddy bears": 34, "couch": 34, "passenger jet": 31,
                         "cup": 40, "chair": 25})
    cap = fake_captioner(captions)
    manifest = curate(config(tmp_path, images, **{"split.exclusive_fragments": "true"}), captioner=cap, scorer=scorer)
    asked = [o for call in scorer.calls for objs in call for o in objs]
    assert asked == ["puppies", "frisbee", "toilet seat", "baby bird", "man", "motor bike", "hot dog",
                     "teddy bears", "couch", "passenger jet", "cup", "chair"]
    # One record per caption with something to train, Caption.to_json() beside its image, in cap-<chunk>.tar.
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.tar")) == ["cap-000000.tar", "cap-000001.tar"]
    members = list(iter_members(str(out / "cap-000000.tar")))
    assert [k for k, _ in members] == ["000000_0000000", "000000_0000001", "000000_0000002"]
    assert all(set(m) == {"png", "json"} for _, m in members)
    first = json.loads(members[0][1]["json"])
    assert set(first) == {"image_id", "prompt", "caption", "spans", "sent", "sent_score", "sent_min_score"}
    assert first["caption"] == captions["000"] and first["sent"] is False
    assert [(s["kind"], s["object"], captions["000"][s["start"]:s["end"]]) for s in first["spans"]] == [
        ("neg", "frisbee", "Two puppies chase a frisbee"), ("pos", "toilet", " A toilet seat is up")]
    caps = {c.image_id: c for c in iter_captions(out)}
    assert set(caps) == {"000", "001", "002", "003"}
    assert (caps["002"].sent, caps["002"].sent_score, caps["002"].sent_min_score) == (
        True, pytest.approx((34 + 34 + 31) / 3), 31)
    assert all(isinstance(c, Caption) and c.check() is None for c in caps.values())
    # The per-sample view (iter_samples unpacks caption shards) is what the per-sample format held.
    got = {(s.image_id, s.kind, s.object): s for s in iter_samples(out)}
    # "puppies" (dog, 40) shares its fragment with the hallucinated frisbee, "man" (person) with the
    # hallucinated motor bike (so is "hot dog"): exclusive fragments drop those pos candidates.
    assert set(got) == {
        ("000", "neg", "frisbee"), ("000", "pos", "toilet"), ("001", "neg", "motorcycle"),
        ("002", "pos", "teddy bear"), ("002", "pos", "couch"), ("002", "sent", ""),
        ("003", "pos", "cup"), ("003", "sent", ""),
    }
    toilet = got["000", "pos", "toilet"]
    assert (toilet.context, toilet.target) == ("Two puppies chase a frisbee.", " A toilet seat is up")
    assert got["001", "neg", "motorcycle"].target == "A man rides a motor bike past a hot dog stand"
    assert got["000", "neg", "frisbee"].target == "Two puppies chase a frisbee"
    sent = got["002", "sent", ""]
    assert (sent.context, sent.target, sent.score) == ("", captions["002"], pytest.approx((34 + 34 + 31) / 3))
    assert sent.meta["caption"] == captions["002"] and sent.prompt == CurationConfig().caption.prompt
    assert got["003", "pos", "cup"].image.getpixel((0, 0)) == (60, 50, 50)
    assert manifest["dropped_candidates"] == {"pos_fragment_names_neg_object": 3}  # dog, person, hot dog
    assert manifest["format"] == "captions" and shard_format(out) == "captions"
    assert manifest["counts"] == {"captions": 4, "pos": 4, "neg": 2, "sent": 2}
    assert manifest["nothing_to_train"] == 1 and manifest["images"] == {"input": 5, "curated": 5}
    assert sum(s["count"] for s in manifest["shards"]) == 4
    assert [(s["name"], s["kind"], s["chunk"]) for s in manifest["shards"]] == [
        ("cap-000000.tar", "cap", 0), ("cap-000001.tar", "cap", 1)]
    assert manifest["config"]["split"]["t0"] == 32.0 and "torch" in manifest["versions"]
    assert (out / "scores.png").stat().st_size > 1000
    assert cap.calls == [["000", "001", "002"], ["003", "004"]]
    # The default (the method) keeps those three pos samples.
    default = curate(config(tmp_path / "default", images), captioner=fake_captioner(captions), scorer=scorer)
    assert default["counts"] == {"captions": 4, "pos": 7, "neg": 2, "sent": 2} and default["dropped_candidates"] == {}


def test_nothing_written_is_a_warning_naming_why(tmp_path, caplog):
    images = make_folder(tmp_path / "imgs", 3)
    (images / "001.png").write_bytes(b"broken")
    captions = {"000": "A picture of nothing in particular.", "002": "A dog."}
    with caplog.at_level(logging.WARNING, logger="sare_ds.curation"):
        manifest = curate(config(tmp_path, images), captioner=fake_captioner(captions), scorer=FakeScorer({"dog": 25}))
    assert manifest["counts"]["captions"] == 0 and manifest["shards"] == []
    assert "wrote NO caption record" in manifest["warning"] and "1 no_objects" in manifest["warning"]
    assert "1 of them with nothing to train" in manifest["warning"] and "calibrate" in manifest["warning"]
    assert "wrote NO caption record" in caplog.text and "001.png" in caplog.text  # the unreadable file, named


def test_skipped_inputs_are_counted(tmp_path):
    scenes = write_synthetic_coco(tmp_path / "scenes", 8, 40, seed=1)
    (scenes / "images" / "000001.png").write_bytes(b"not an image at all")
    data = (scenes / "images" / "000002.png").read_bytes()
    (scenes / "images" / "000002.png").write_bytes(data[: len(data) // 2])  # truncated
    (scenes / "images" / "000003.png").unlink()  # listed in the annotations, missing on disk
    captions = {str(i): "The image shows a dog." for i in range(1, 9)}
    captions["4"] = "   "
    captions["5"] = "A picture of nothing in particular."
    cfg = config(tmp_path, scenes / "images", **{"input.annotations": scenes / "instances.json"})
    manifest = curate(cfg, captioner=fake_captioner(captions), scorer=FakeScorer({"dog": 40}))
    assert manifest["skipped"] == {"empty_caption": 1, "missing_image": 1, "no_objects": 1, "unreadable_image": 2}
    assert manifest["images"] == {"input": 8, "curated": 3}
    # Each skipped input is named: its id, its file and the reason (issue 13).
    named = {(x["image_id"], Path(x["file"]).name, x["reason"]) for x in manifest["skipped_inputs"]}
    assert named == {("1", "000001.png", "unreadable_image"), ("2", "000002.png", "unreadable_image"),
                     ("3", "000003.png", "missing_image"), ("4", "000004.png", "empty_caption"),
                     ("5", "000005.png", "no_objects")}
    assert manifest["skipped_inputs_not_listed"] == 0 and "warning" not in manifest
    # COCO annotations label every scored object present / absent (for calibration).
    labels = json.load(open(tmp_path / "out" / ".chunks" / "chunk-000002.json"))["scores"]
    assert all(isinstance(x[2], bool) for x in labels)


def test_resume_redoes_only_unfinished_chunks(tmp_path):
    images = make_folder(tmp_path / "imgs", 8)
    captions = {f"{i:03d}": f"A dog and a cat, number {i}." for i in range(8)}
    scores = {"dog": 40, "cat": 10}
    full = curate(config(tmp_path / "a", images), captioner=fake_captioner(captions), scorer=FakeScorer(scores))
    cfg = config(tmp_path / "b", images)
    assert curate(cfg, captioner=fake_captioner(captions), scorer=FakeScorer(scores), max_chunks=1) is None
    out = tmp_path / "b" / "out"
    (out / "cap-000001.tar.tmp").write_bytes(b"half a shard")  # what a killed writer leaves
    cap = fake_captioner(captions)
    resumed = curate(cfg, captioner=cap, scorer=FakeScorer(scores))
    assert cap.calls == [["003", "004", "005"], ["006", "007"]]  # chunk 0 was not redone
    assert not list(out.glob("*.tmp"))
    assert resumed["counts"] == full["counts"] and resumed["shards"] == full["shards"]
    for shard in full["shards"]:  # byte-identical shards
        assert (out / shard["name"]).read_bytes() == (tmp_path / "a" / "out" / shard["name"]).read_bytes()
    with pytest.raises(ResumeMismatchError, match="split.t0"):
        curate(config(tmp_path / "b", images, **{"split.t0": 35}), captioner=cap, scorer=FakeScorer(scores))
    # A directory of the per-sample format is not resumed into caption shards (the two would mix).
    old = tmp_path / "old"
    write_per_sample_dir(out, old)
    cfg.output.dir = str(old)
    with pytest.raises(ResumeMismatchError, match="per-sample format.*launch/curate.py convert"):
        curate(cfg, captioner=cap, scorer=FakeScorer(scores))


def write_per_sample_dir(caption_dir: Path, old_dir: Path) -> None:
    """What curation wrote before caption records, made from a caption directory: per chunk one shard
    per kind of one record per sample (make_record, the whole caption in its "caption" field), and a
    manifest of the old format string (same images, thresholds, config)."""
    shards, counts = [], {k: 0 for k in KINDS}
    for url in list_shards(caption_dir):
        chunk, writers = shard_index(url), {}
        for _, members in iter_members(url):
            cap = Caption.from_json(json.loads(members["json"]), None)
            ext = "png" if "png" in members else "jpg"
            for smp in cap.unpack():
                w = writers.setdefault(smp.kind, ShardWriter(old_dir / shard_name(smp.kind, chunk)))
                w.write(f"{chunk:06d}_{w.count:07d}", members[ext], ext, make_record(
                    cap.image_id, cap.prompt, smp.context, smp.target, smp.kind, smp.object, smp.score, cap.caption))
                counts[smp.kind] += 1
        shards += [{"name": w.path.name, "kind": k, "count": w.commit(), "chunk": chunk} for k, w in writers.items()]
    manifest = {k: v for k, v in read_manifest(caption_dir).items() if k != "nothing_to_train"}
    manifest.update(format="sare_ds curated shards v1", counts=counts,
                    shards=sorted(shards, key=lambda s: (KINDS.index(s["kind"]), s["chunk"])))
    (old_dir / "manifest.json").write_text(json.dumps(manifest))


def caption_table(captions) -> dict:
    """image id -> what a caption record says (spans sorted; the mean score of a caption that is not sent
    and the minimum score, which the per-sample format did not keep, left out)."""
    return {c.image_id: (c.prompt, c.caption, sorted((s.start, s.end, s.kind, s.object, s.score) for s in c.spans),
                         c.sent, pytest.approx(c.sent_score) if c.sent else None) for c in captions}


def test_convert_old_directory_round_trip(tmp_path):
    images = make_folder(tmp_path / "imgs", 8)
    captions = {
        "000": "A dog and a cat, number 0.",      # one fragment, a pos and a neg span (the method's default)
        "001": "A bird sits on a chair. A cup.",   # pos chair, sent
        "002": "A car.",                           # neg only
        "003": "A bird.",                          # sent only
        "004": "A chair.",                         # pos and sent
        "005": "Nothing here.",                    # no object: skipped
        "006": "A cup.",                           # 28: nothing to train
        "007": "A toilet, a dog and a car.",       # pos dog, neg car
    }
    scores = {"dog": 40, "cat": 10, "bird": 30, "chair": 34, "cup": 26, "car": 10, "toilet": 28}
    fresh = curate(config(tmp_path / "a", images), captioner=fake_captioner(captions), scorer=FakeScorer(scores))
    assert fresh["counts"] == {"captions": 6, "pos": 4, "neg": 3, "sent": 3} and fresh["nothing_to_train"] == 1
    old, new = tmp_path / "old", tmp_path / "new"
    write_per_sample_dir(tmp_path / "a" / "out", old)
    assert shard_format(old) == "samples" and sorted(p.name for p in old.glob("*.tar")) == [
        "neg-000000.tar", "neg-000002.tar", "pos-000000.tar", "pos-000001.tar", "pos-000002.tar",
        "sent-000000.tar", "sent-000001.tar"]
    reference = caption_table(iter_captions(tmp_path / "a" / "out"))
    # Read as it is: the per-kind samples grouped into the same captions.
    assert caption_table(iter_captions(old)) == reference
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "launch/curate.py"), "convert", str(old), str(new)],
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"written: {new}/manifest.json and 3 caption shard(s) (6 captions)" in proc.stdout
    manifest = read_manifest(new)
    assert manifest["format"] == "captions" and shard_format(new) == "captions"
    assert manifest["converted_from"]["dir"] == str(old.resolve()) and manifest["converted_from"]["format"] == "samples"
    assert manifest["counts"] == fresh["counts"] and manifest["thresholds"] == fresh["thresholds"]
    assert [s["name"] for s in manifest["shards"]] == ["cap-000000.tar", "cap-000001.tar", "cap-000002.tar"]
    converted = list(iter_captions(new))
    assert caption_table(converted) == reference
    by_id = {c.image_id: c for c in converted}
    assert by_id["001"].sent_min_score == by_id["001"].sent_score  # the old format kept the mean only
    assert by_id["004"].image.getpixel((0, 0)) == (80, 50, 50)  # images copied unchanged
    assert not list(new.glob("*.tmp"))
    with pytest.raises(FileExistsError, match="already holds shards"):
        convert_to_captions(old, new)
    with pytest.raises(ValueError, match="already holds caption shards"):
        convert_to_captions(new, tmp_path / "again")


def test_two_ranks_write_what_one_rank_writes(tmp_path):
    """No collective: rank 0 (a thread here) does its chunks, then waits for rank 1's records; rank 1
    exits when its own chunks are done. Shards are byte-identical to a one-rank run."""
    import threading

    images = make_folder(tmp_path / "imgs", 11)  # 4 chunks of 3: rank 0 gets 0 and 2, rank 1 gets 1 and 3
    captions = {f"{i:03d}": f"A dog and a cat, number {i}." for i in range(11)}
    scores = {"dog": 40, "cat": 10}
    one = curate(config(tmp_path / "one", images), captioner=fake_captioner(captions), scorer=FakeScorer(scores))
    cfg = config(tmp_path / "two", images)
    result = {}
    rank0 = threading.Thread(target=lambda: result.update(m=curate(
        cfg, captioner=fake_captioner(captions), scorer=FakeScorer(scores), rank=0, world_size=2, poll_s=0.05)))
    rank0.start()
    rank1_cap = fake_captioner(captions)
    assert curate(cfg, captioner=rank1_cap, scorer=FakeScorer(scores), rank=1, world_size=2) is None
    rank0.join(timeout=60)
    assert not rank0.is_alive()
    assert rank1_cap.calls == [["003", "004", "005"], ["009", "010"]]
    two = result["m"]
    assert two["counts"] == one["counts"] and two["shards"] == one["shards"]
    for shard in one["shards"]:
        assert (tmp_path / "two" / "out" / shard["name"]).read_bytes() == \
            (tmp_path / "one" / "out" / shard["name"]).read_bytes()
    # A config mismatch is raised on every rank, not only on rank 0 (the others would wait for it).
    for rank in (1, 0):
        with pytest.raises(ResumeMismatchError, match="split.t0"):
            curate(config(tmp_path / "two", images, **{"split.t0": 35}), captioner=rank1_cap,
                   scorer=FakeScorer(scores), rank=rank, world_size=2)


def test_missing_caption_and_short_scorer_output(tmp_path):
    scenes = write_synthetic_coco(tmp_path / "scenes", 4, 40, seed=3)
    data = json.loads((scenes / "captions.json").read_text())
    data["annotations"] = [a for a in data["annotations"] if str(a["image_id"]) != "2"]  # no caption for image 2
    data["annotations"][0]["caption"] = ""  # an empty caption is another reason
    (scenes / "captions.json").write_text(json.dumps(data))
    cfg = config(tmp_path, scenes / "images", **{"input.annotations": scenes / "instances.json",
                                                 "caption.source": "annotations",
                                                 "caption.captions_file": scenes / "captions.json"})
    manifest = curate(cfg, scorer=FakeScorer({}))
    assert manifest["skipped"].get("no_caption_for_image") == 1 and manifest["skipped"].get("empty_caption") == 1

    class ShortScorer(FakeScorer):
        def score(self, images, objects):
            return super().score(images, objects)[:-1]

    images = make_folder(tmp_path / "imgs", 2)
    captions = {"000": "A dog.", "001": "A cat."}
    with pytest.raises(RuntimeError, match="scores for 1 images but was given 2"):
        curate(config(tmp_path / "short", images), captioner=fake_captioner(captions), scorer=ShortScorer({}))


def test_max_side_bounds_windows(tiny_scorer):
    big = Image.new("RGB", (1600, 400), (10, 20, 30))
    bounded = ClipScorer(tiny_scorer.encode_image, tiny_scorer.encode_text, tiny_scorer.input_size, [0.5] * 3,
                         [0.5] * 3, patch_size=16, window_patches=2, max_side=320)
    # 1600 x 400 -> 320 x 80 -> 20 x 5 patches -> 19 x 4 windows (unbounded: 100 x 25 patches, 2,376 windows).
    assert bounded.windows(big)[1] == (4, 19)
    assert CurationConfig().clip.max_side == 1344
    with pytest.raises(ConfigError, match="clip.max_side"):
        load_curation_config(None, ["input.path=x", "clip.max_side=100"])


def test_shard_input_and_tiny_clip_end_to_end(tmp_path):
    import webdataset as wds

    src = tmp_path / "in"
    src.mkdir()
    for s in range(2):
        with wds.TarWriter(str(src / f"imgs-{s:06d}.tar")) as w:
            for i in range(2):
                buf = io.BytesIO()
                Image.new("RGB", (64, 48), (200, 10 * i, 0)).save(buf, format="JPEG")
                w.write({"__key__": f"im{s}{i}", "jpg": buf.getvalue()})
    captions = {"im00": "A dog.", "im01": "A cat, a dog.", "im10": "A bird.", "im11": "A cup."}
    cfg = config(tmp_path, str(src / "imgs-{000000..000001}.tar"), **{
        "clip.model": TINY_CLIP_NAME, "clip.pretrained": "", "clip.patch_size": 16, "clip.window_patches": 2,
        "split.t0": 0, "split.t1": -100, "split.t2": 0, "output.image_format": "jpg"})
    manifest = curate(cfg, captioner=fake_captioner(captions))
    assert manifest["counts"]["pos"] + manifest["counts"]["neg"] == 5
    samples = list(iter_samples(tmp_path / "out"))
    assert {s.image_id for s in samples} == set(captions) and all(s.image.size == (64, 48) for s in samples)
    # input.limit counts images on shard inputs too: 3 of the 4, the second shard cut after its first.
    cfg.input.limit, cfg.output.dir, cfg.output.images_per_chunk = 3, str(tmp_path / "limited"), 100
    limited = curate(cfg, captioner=fake_captioner(captions))
    assert limited["images"]["input"] == 3
    assert {s.image_id for s in iter_samples(tmp_path / "limited")} == {"im00", "im01", "im10"}


def test_model_captioner_with_tiny_llava(tmp_path, tiny_model_dir):
    images = make_folder(tmp_path / "imgs", 2)
    cfg = config(tmp_path, images, **{"model.name_or_path": tiny_model_dir, "caption.max_new_tokens": 6,
                                      "caption.batch_size": 2, "clip.mode": "global"})
    manifest = curate(cfg, scorer=FakeScorer({}))
    # A random tiny model rarely names a COCO object: every image is accounted for either way.
    assert manifest["images"]["input"] == 2
    assert manifest["images"]["curated"] + sum(manifest["skipped"].values()) == 2


# --------------------------------------------------------------------------- calibration, config

def test_calibration_proposes_quantiles(tmp_path):
    rng = np.random.default_rng(0)
    present, absent = rng.normal(31, 4, 500), rng.normal(22, 4, 200)  # overlapping, like EFUF's Figure 2
    r = propose_thresholds(list(present), list(absent), 0.05, 0.05)
    assert r["t1"] == pytest.approx(np.quantile(present, 0.05)) and r["t0"] == pytest.approx(np.quantile(absent, 0.95))
    assert r["t1"] < r["t0"] and r["t2"] == pytest.approx((r["t0"] + r["t1"]) / 2)
    assert r["present"]["below_t1"] == pytest.approx(0.05, abs=0.01)
    assert r["absent"]["above_t0"] == pytest.approx(0.05, abs=0.01)
    # Well separated: the quantiles cross (t1 > t0 would break t1 <= t0), both become the midpoint.
    sep = propose_thresholds(list(present + 20), list(absent), 0.05, 0.05)
    mid = (np.quantile(present + 20, 0.05) + np.quantile(absent, 0.95)) / 2
    assert sep["t0"] == sep["t1"] == sep["t2"] == pytest.approx(mid)
    with pytest.raises(ValueError, match="at least 2 present"):
        propose_thresholds([1.0], [1.0, 2.0])
    scenes = write_synthetic_coco(tmp_path / "scenes", 6, 40, seed=2)
    cfg = config(tmp_path, scenes / "images", **{"input.annotations": scenes / "instances.json",
                                                 "caption.source": "annotations",
                                                 "caption.captions_file": scenes / "captions.json"})
    present_words = {"dog": 35, "cat": 34, "car": 33, "bird": 36, "cup": 32, "chair": 31}
    curate(cfg, scorer=FakeScorer(present_words))
    result = calibrate_dir(tmp_path / "out")
    assert result["present"]["n"] > 0 and result["absent"]["n"] > 0
    assert (tmp_path / "out" / "calibration.png").is_file()


def test_config_errors_name_field_rule_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"split.t1 = 40.0 is invalid: must not exceed split.t0.*Fix"):
        load_curation_config(None, ["input.path=x", "split.t1=40"])
    with pytest.raises(ConfigError, match="input.path"):
        load_curation_config(None, [])
    with pytest.raises(ConfigError, match="did you mean `clip.mode`"):
        load_curation_config(None, ["input.path=x", "clip.mdoe=local"])
