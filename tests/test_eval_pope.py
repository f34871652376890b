"""POPE: the reference answer parser on edge cases, the metrics by hand, the shipped files.

    .venv/bin/python -m pytest tests/test_eval_pope.py -q
"""
import pytest

from sare_ds.eval.pope import (PopeFormatError, load_questions, mean_over_splits, packaged_pope_files,
                               parse_answer, pope_metrics)


@pytest.mark.parametrize("answer, parsed", [
    ("Yes, there is a dog in the image.", "yes"),
    ("No, there is no dog.", "no"),
    ("No.", "no"),
    ("no", "no"),
    ("The image does not show a dog", "no"),
    ("There is snow on the ground.", "yes"),        # "snow" contains "no" but is not the word
    ("I don't know.", "yes"),                        # "know", "don't" are not negative words
    ("Not sure.", "yes"),                            # the reference is case-sensitive: "Not" is not in its list
    ("NO", "yes"),
    ("No! There is none", "yes"),                    # only "." ends the first sentence: the word is "No!"
    ("no; there is none", "yes"),                    # the same reference quirk: the word is "no;"
    ("There is not a dog", "no"),
    ("Yes,no", "yes"),                               # commas are deleted, not split at: one word "Yesno"
    ("There is a dog. There is no cat.", "yes"),     # only the first sentence counts
    ("No, ", "no"),                                  # commas are deleted before splitting
    ("", "yes"),
])
def test_parse_answer_follows_the_reference(answer, parsed):
    assert parse_answer(answer) == parsed


def test_metrics_by_hand():
    m = pope_metrics(["yes", "yes", "no", "no", "yes"], ["yes", "no", "no", "yes", "yes"])
    # TP = 2, FP = 1, TN = 1, FN = 1
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 1, 1)
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3) and m["yes_ratio"] == pytest.approx(0.6)
    none_yes = pope_metrics(["no", "no"], ["yes", "no"])
    assert none_yes["precision"] == 0.0 and none_yes["f1"] == 0.0 and none_yes["accuracy"] == 0.5
    mean = mean_over_splits({"a": m, "b": none_yes})
    assert mean["accuracy"] == pytest.approx(0.55)
    with pytest.raises(ValueError, match="one each"):
        pope_metrics(["yes"], [])


def test_packaged_coco_files():
    files = packaged_pope_files()
    assert set(files) == {"random", "popular", "adversarial"}
    for path in files.values():
        questions = load_questions(path)
        assert len(questions) == 3000
        assert len({q["image"] for q in questions}) == 500
        assert sum(q["label"] == "yes" for q in questions) == 1500
    assert len(load_questions(files["random"], limit=10)) == 10


def test_bad_question_line_is_named(tmp_path):
    path = tmp_path / "q.json"
    path.write_text('{"question_id": 1, "image": "a.jpg", "text": "Is there a dog?", "label": "maybe"}\n')
    with pytest.raises(PopeFormatError, match="line 1"):
        load_questions(path)
