"""sare_ds.bench: the structure of its quick run and the parts of it that are deterministic.

No timing is asserted here (times are the benchmark's output, docs/performance.md); what is checked
is what the figures are made of: the generated data, the tokens each configuration forwards
(against counts made by hand from the per-sample tokenisation), the sizes behind the loss-path
memory comparison, and the summary of the ZeRO traffic counts.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from PIL import Image

from sare_ds import bench
from sare_ds.config import ModelConfig
from sare_ds.data.samples import Caption, Span
from sare_ds.data.subsentence import object_span
from sare_ds.data.tokenize import IGNORE_INDEX, tokenize_sample

PROMPT = "Describe the image."


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["--quick", "--image-size", "112", "--words", "30", "--objects", "3",
            "--json", str(out / "bench.json"), "--png", str(out / "bench.png")]
    bench.main(argv)
    return json.loads((out / "bench.json").read_text()), out


def test_quick_run_writes_json_and_chart(quick_result):
    result, out = quick_result
    assert (out / "bench.png").stat().st_size > 10_000
    assert result["command"].startswith("python -m sare_ds.bench --quick")
    t = result["timing"]
    assert t["model"]["vocab"] == 32064 and t["model"]["image_tokens"] == 64  # (112 // 14)^2
    names = {f"{m}/{p}" for m in bench.METHODS for p in ("packed", "unpacked")} | {"efuf/unpacked+fullhead"}
    variants = {"sare/packed+adaptive", "sare/packed+every2", "sare/packed+every4"}
    assert {v.name for v in bench.VARIANTS} == variants
    assert set(t["configs"]) == names | variants
    for v in variants:
        assert t["ratios"][f"{v.replace('/', '_')}/efuf_packed"]["median"] > 0
    for name, c in t["configs"].items():
        assert c["epoch_s"]["median"] > 0 and len(c["epoch_s"]["reps"]) == 1, name
        assert set(c["tokens"]) == {"forwards", "positions", "real", "head"}
        assert c["phases_s"] and "optimizer_step" in c["phases_s"], name
    assert {"theta", "grad_norm", "perturb", "neg_at_eps", "restore"} <= set(t["configs"]["sare/packed"]["phases_s"])
    for key in ("sare_packed/efuf_unpacked", "sare_packed/efuf_packed", "sare_packed/efuf_unpacked_fullhead"):
        assert t["ratios"][key]["median"] > 0
    assert [s["neg_share"] for s in t["neg_share_sweep"]] == [0.2]
    assert set(t["memory"]) == {"packed_caption", "packed_sent_caption", "unpacked_sample", "packed_kept/unpacked_full"}


def test_quick_run_is_internally_consistent(quick_result):
    t = quick_result[0]["timing"]
    n = t["data"]["curated_samples"]
    assert n == sum(t["data"]["samples"].values()) == 2 * 3 + t["data"]["samples"]["sent"]
    for name, c in t["configs"].items():
        # What the model forwarded is what the labels say the step must forward (no more, no less).
        assert c["tokens"]["positions"] == c["hand_count_positions"], name
        assert c["tokens"]["real"] <= c["tokens"]["positions"]
        assert c["tokens_per_curated_sample"] == pytest.approx(c["tokens"]["positions"] / n)
        if c["full_head"]:
            assert c["tokens"]["head"] == c["tokens"]["positions"]
        else:
            assert c["tokens"]["head"] < c["tokens"]["positions"] / 2
    for m in bench.METHODS:
        packed, unpacked = t["configs"][f"{m}/packed"], t["configs"][f"{m}/unpacked"]
        assert packed["tokens_per_curated_sample"] < unpacked["tokens_per_curated_sample"], m
        assert packed["sequences"] < unpacked["sequences"], m
    # SARE forwards each caption at theta plus its neg captions once more (cut after the last neg token).
    assert t["configs"]["sare/packed"]["tokens"]["forwards"] == 2 * t["configs"]["efuf/packed"]["tokens"]["forwards"] - 1
    # The variants forward what SARE does; the quick epoch (1 step, after a warm-up step that computed the
    # ascent) of ascent_every = 2 reuses it: no norm of a new direction, and still a perturbed pass.
    for v in ("sare/packed+adaptive", "sare/packed+every2", "sare/packed+every4"):
        assert t["configs"][v]["tokens"] == t["configs"]["sare/packed"]["tokens"], v
    assert "grad_norm" in t["configs"]["sare/packed+adaptive"]["phases_s"]
    reused = t["configs"]["sare/packed+every2"]["phases_s"]
    assert "grad_norm" not in reused and {"theta", "perturb", "neg_at_eps", "restore"} <= set(reused)
    for key in ("packed_caption", "packed_sent_caption", "unpacked_sample"):
        m = t["memory"][key]
        assert m["vocab"] == 32064
        assert m["kept_logits_bytes"] * m["positions"] == m["full_logits_bytes"] * m["labelled"]
        assert 0 < m["kept_peak_bytes"] < m["full_peak_bytes"]
        assert 0 < m["chunked_peak_bytes"] < m["full_peak_bytes"]
        assert m["full_peak_bytes"] >= m["full_logits_bytes"]  # at least the fp32 logits themselves


def test_synthetic_captions_follow_the_requested_shape():
    for share, negs in ((0.0, 0), (0.2, 8), (0.4, 16), (1.0, 40)):
        caps = bench.synthetic_captions(8, words=90, objects=5, neg_share=share, image_size=28)
        assert sum(s.kind == "neg" for c in caps for s in c.spans) == negs
        for c in caps:
            c.check()
            assert len(c.spans) == 5 and len({s.object for s in c.spans}) == 5
            assert c.sent == (not any(s.kind == "neg" for s in c.spans))
            assert len(c.caption.split()) == 90
            for s in c.spans:
                assert s.object in c.caption[s.start:s.end]
    a = bench.synthetic_captions(4, neg_share=0.2, image_size=28)
    b = bench.synthetic_captions(4, neg_share=0.6, image_size=28)
    assert [c.caption for c in a] == [c.caption for c in b]  # the sweep varies the kinds only
    assert bench.negs_per_caption(4, 5, 0.1) == [0, 1, 0, 1]
    assert bench.negs_per_caption(3, 5, 0.2) == [1, 1, 1]


@pytest.fixture()
def trainable_adapter(adapter):
    from sare_ds.models import select_trainable

    select_trainable(adapter, ModelConfig())
    return adapter


def span(text: str, obj: str, kind: str) -> Span:
    context, target = object_span(text, obj)
    return Span(len(context), len(context) + len(target), kind, obj, 35.0 if kind == "pos" else 15.0)


def hand_made_captions() -> list[Caption]:
    img = Image.new("RGB", (32, 32), (200, 30, 30))
    one = "A dog runs on the grass, a cat sleeps near the car. The sky is blue."
    two = "There is a bird, a cup on a chair."
    return [
        Caption(img, PROMPT, one, [span(one, "dog", "pos"), span(one, "cat", "neg")]),
        Caption(img, PROMPT, two, [span(two, "bird", "pos"), span(two, "cup", "pos")],
                sent=True, sent_score=35.0, sent_min_score=35.0),
    ]


def test_tokens_forwarded_equal_a_hand_count(trainable_adapter):
    """One micro-batch per caption: packed, a caption is forwarded up to the end of its last span (the
    per-sample tokenisation of that span has exactly that prefix; the sent response runs to EOS);
    unpacked, each of its samples is forwarded, padded to the longest. SARE adds its neg captions cut
    after the last neg span."""
    ad = trainable_adapter
    caps = hand_made_captions()
    args = SimpleNamespace(max_length=512, captions_per_step=2, micro_captions=1, head_chunks=8)
    samples = [[tokenize_sample(s, ad, 512) for s in c.unpack()] for c in caps]
    lengths = [[len(t.input_ids) for t in per] for per in samples]
    # caption 1: pos, neg; caption 2: pos, pos, sent (the whole response + EOS is its longest sample)
    packed_efuf = lengths[0][1] + lengths[1][2]
    unpacked_efuf = 2 * max(lengths[0]) + 3 * max(lengths[1])
    packed_ft = lengths[0][0] + lengths[1][2]  # FT reads pos and sent: caption 1 ends at its pos span
    unpacked_ft = 1 * lengths[0][0] + 3 * max(lengths[1])
    neg_pass = lengths[0][1]  # SARE's perturbed pass: caption 1 only, cut after its neg span
    want = {("efuf", True): packed_efuf, ("efuf", False): unpacked_efuf, ("ft", True): packed_ft,
            ("ft", False): unpacked_ft, ("sare", True): packed_efuf + neg_pass,
            ("sare", False): unpacked_efuf + neg_pass}
    for (method, packing), positions in want.items():
        r = bench.Runner(ad, bench.Config(method, packing), caps, args)
        r.epoch(ad.model)
        assert r.tokens["positions"] == positions == bench.hand_count(r.steps, method), (method, packing)
        assert r.tokens["real"] <= positions
        labelled = sum(int((s.labels != IGNORE_INDEX).sum()) for cap in
                       bench.tokenize(caps, ad, method, packing, 512)[0] for s in cap)
        if method != "sare":  # one forward at theta: the head sees each labelled token once (BOS excepted)
            assert r.tokens["head"] >= labelled - 2
    assert packed_efuf / 5 < unpacked_efuf / 5  # tokens per curated sample (5 samples)


def test_labelled_only_logits_are_smaller_by_the_labelled_share(trainable_adapter):
    ad = trainable_adapter
    [seq] = bench.tokenize(hand_made_captions()[:1], ad, "efuf", True, 512)[0][0]
    m = bench.loss_path_memory(ad, seq)
    labelled_positions = int((seq.labels[1:] != IGNORE_INDEX).sum())
    assert m["positions"] == len(seq.input_ids) and m["labelled"] == labelled_positions
    assert m["kept_logits_bytes"] / m["full_logits_bytes"] == pytest.approx(m["labelled"] / m["positions"])
    assert 0 < m["kept_peak_bytes"] < m["full_peak_bytes"]
    # In K/4-position chunks the loss path holds a few (K/4) x V logits, not the labelled positions' K x V.
    small = bench.loss_path_memory(ad, seq, chunks=4)
    assert m["labelled"] >= 4 and small["chunked_peak_bytes"] < small["kept_peak_bytes"]


def test_zero3_summary_counts_per_step_and_ratios():
    mib = 2**20

    def run(variant, method, gathered, hpz=0):
        steps = [{"bytes": {"neg_at_theta|forward|gather": gathered - hpz, "neg_at_theta|forward|gather_hpz": hpz,
                            "between|-|reduce": 8}, "calls": {}} for _ in range(2)]
        return {"variant": variant, "about": "", "method": method, "packing": True, "model": {"parameters": mib},
                "steps": steps, "metrics": [{"sam/sharpness_gap": 0.1}], "perturbation_seen": None}

    raw = {"world_size": 2, "captions_per_rank_step": 1,
           "runs": [run("zero3", "efuf", 4 * mib), run("zero3", "sare", 12 * mib),
                    run("zero3-hpz2", "efuf", 4 * mib, hpz=4 * mib), run("zero3-hpz2", "sare", 12 * mib, hpz=11 * mib)]}
    s = bench.summarise_zero3(raw)
    assert s["sare/efuf"] == {"zero3/packed": 3.0, "zero3-hpz2/packed": 3.0}
    by = {(r["variant"], r["method"]): r for r in s["runs"]}
    assert by[("zero3", "sare")]["gather_bytes_per_step"] == 12 * mib
    assert by[("zero3-hpz2", "sare")]["gather_hpz_bytes_per_step"] == 11 * mib
    assert by[("zero3", "efuf")]["reduce_bytes_per_step"] == 8 and by[("zero3", "efuf")]["same_every_step"]
    assert set(s["sare_checks_vs_zero3"]) == {"zero3-hpz2"}
    assert bench.table({"zero3": s}).count("\n") >= 5


def test_worker_argv_round_trips():
    args = bench.parse_args(["--quick", "--text-hidden", "128", "--neg-share", "0.4"])
    again = bench.parse_args(bench._worker_argv(args) + ["--zero3-worker"])
    for name in bench.WORKER_OPTIONS:
        assert getattr(again, name) == getattr(args, name), name
    assert again.quick_zero and not again.quick
    with pytest.raises(SystemExit):
        bench.parse_args(["--neg-share", "1.5"])
