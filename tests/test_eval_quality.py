"""BLEU against nltk's own numbers and a hand-worked pair; perplexity against a direct computation.

    .venv/bin/python -m pytest tests/test_eval_quality.py -q
"""
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sare_ds.eval.quality import bleu, mean_length, perplexity, token_nll_sums, words


def test_bleu_by_hand():
    got = bleu(["The cat sat on the mat."], [["the cat is on the mat"]])
    # unigrams: 5 of 6 match (the x2, cat, on, mat); bigrams: 3 of 5 (the cat, on the, the mat); BP = 1
    assert got["BLEU-1"] == pytest.approx(5 / 6)
    assert got["BLEU-2"] == pytest.approx(math.sqrt(5 / 6 * 3 / 5))


def test_bleu_equals_the_library_on_a_fixed_corpus():
    from nltk.translate.bleu_score import corpus_bleu

    hyps = ["A dog runs on the green grass near a red ball.", "Two people sit at a dining table with food."]
    refs = [["A dog running on the grass with a ball.", "A brown dog runs across a green lawn near a red ball."],
            ["Two people are sitting at a table with plates of food.", "People eat at a dining table."]]
    got = bleu(hyps, refs)
    tok_refs = [[r.lower().replace(".", "").split() for r in rs] for rs in refs]
    tok_hyps = [h.lower().replace(".", "").split() for h in hyps]
    for name, weights in {"BLEU-1": (1.0,), "BLEU-2": (0.5, 0.5), "BLEU-4": (0.25,) * 4}.items():
        assert got[name] == pytest.approx(corpus_bleu(tok_refs, tok_hyps, weights=weights), abs=1e-12)
    assert got["BLEU-4"] > 0
    assert bleu(["a dog"], [[]])["bleu_skipped_no_reference"] == 1


def test_words_and_length():
    assert words("A dog's toy, a T-shirt.") == ["a", "dog's", "toy", "a", "t-shirt"]
    assert mean_length(["one two", "three"]) == 1.5


def test_perplexity_matches_direct_computation(adapter):
    from sare_ds.data.samples import Sample
    from sare_ds.data.tokenize import tokenize_sample

    images = [Image.new("RGB", (32, 32), (200, 30, 30)), Image.new("RGB", (32, 32), (30, 30, 200))]
    texts = ["The image shows a dog.", "A cat and a car."]
    got = perplexity(adapter, images, "Describe the image.", texts, batch_size=2)
    total, count = 0.0, 0
    with torch.no_grad():
        for image, text in zip(images, texts):
            s = tokenize_sample(Sample(image, "Describe the image.", "", text, "pos"), adapter, 512)
            logits = adapter.model(input_ids=s.input_ids[None], pixel_values=s.image["pixel_values"]).logits[0]
            pos = (s.labels != -100).nonzero().flatten()
            total += float(F.cross_entropy(logits[pos - 1], s.labels[pos], reduction="sum"))
            count += len(pos)
    assert got["tokens"] == count
    assert got["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    sums = token_nll_sums(adapter, images, "Describe the image.", ["", texts[1]])
    assert sums[0] == (0.0, 0) and sums[1][1] > 0  # an empty text is skipped, not scored
