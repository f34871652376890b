"""CHAIR on hand-made COCO-format fixtures, answers worked out by hand.

    .venv/bin/python -m pytest tests/test_eval_chair.py -q
"""
import json

import pytest

from sare_ds.eval.chair import chair
from sare_ds.eval.coco import CocoFormatError, CocoTruth

CATEGORIES = [{"id": 1, "name": "person"}, {"id": 17, "name": "cat"}, {"id": 18, "name": "dog"},
              {"id": 67, "name": "dining table"}, {"id": 63, "name": "couch"}]
IMAGES = [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}, {"id": 3, "file_name": "c.png"}]


@pytest.fixture()
def truth(tmp_path):
    instances = {"images": IMAGES, "categories": CATEGORIES, "annotations": [
        {"id": 1, "image_id": 1, "category_id": 18}, {"id": 2, "image_id": 1, "category_id": 67},
        {"id": 3, "image_id": 2, "category_id": 1}]}
    captions = {"images": IMAGES, "annotations": [
        {"id": 1, "image_id": 1, "caption": "A man and his puppy under a table."},   # adds person
        {"id": 2, "image_id": 2, "caption": "A man riding a horse."},               # adds horse
        {"id": 3, "image_id": 3, "caption": "An empty room with a sofa."}]}         # adds couch
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    return CocoTruth.from_files([tmp_path / "instances.json"], [tmp_path / "captions.json"])


def test_ground_truth_is_instances_plus_reference_caption_objects(truth):
    assert truth.objects == {1: {"dog", "dining table", "person"}, 2: {"person", "horse"}, 3: {"couch"}}
    assert truth.captions[2] == ["A man riding a horse."]
    assert [str(p) for _, p in truth.image_paths("imgs")] == ["imgs/a.png", "imgs/b.png", "imgs/c.png"]


def test_chair_scores_by_hand(truth):
    records = [
        # mentions: dog (dogs), dining table, cat, cat -> the two cats are hallucinated
        {"image_id": 1, "caption": "Two dogs sit by the dining table next to a cat and a cat toy."},
        # person, horse, train (passenger train -> train, not a person) -> train hallucinated
        {"image_id": 2, "caption": "A person rides a horse past a passenger train."},
        {"image_id": 3, "caption": "A couch in a room."},
        {"image_id": 99, "caption": "A dog."},  # no ground truth: skipped and counted
    ]
    result = chair(records, truth)
    assert result["CHAIR_S"] == pytest.approx(2 / 3)   # 2 of 3 captions hallucinate
    assert result["CHAIR_I"] == pytest.approx(3 / 8)   # 3 hallucinated of 4 + 3 + 1 mentions
    assert result["recall"] == pytest.approx(5 / 6)    # person of image 1 is never mentioned
    assert result["skipped_no_ground_truth"] == 1
    first, second, third = result["captions"]
    assert first["mentioned"] == ["dog", "dining table", "cat"]
    assert first["grounded"] == ["dog", "dining table"]
    assert first["hallucinated"] == ["cat"]
    assert [w[:2] for w in first["hallucinated_words"]] == [["cat", "cat"], ["cat", "cat"]]
    assert first["CHAIR_I"] == pytest.approx(0.5) and first["CHAIR_S"] == 1
    assert second["hallucinated"] == ["train"] and second["hallucinated_words"][0][0] == "passenger train"
    assert third == {**third, "mentioned": ["couch"], "hallucinated": [], "CHAIR_S": 0, "CHAIR_I": 0.0}


def test_unknown_category_and_missing_fields_are_named(tmp_path):
    bad = {"images": IMAGES, "categories": [{"id": 5, "name": "spaceship"}],
           "annotations": [{"id": 7, "image_id": 1, "category_id": 5}]}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(CocoFormatError, match="spaceship"):
        CocoTruth.from_files([tmp_path / "bad.json"], [])
    (tmp_path / "nocap.json").write_text(json.dumps({"images": IMAGES, "annotations": [{"id": 1, "image_id": 1}]}))
    with pytest.raises(CocoFormatError, match="no `caption`"):
        CocoTruth.from_files([], [tmp_path / "nocap.json"])
    (tmp_path / "empty.json").write_text("{}")
    with pytest.raises(CocoFormatError, match="no `images`"):
        CocoTruth.from_files([tmp_path / "empty.json"], [])


def test_no_caption_with_ground_truth_is_an_error_not_a_perfect_score(truth):
    # str ids against the annotation files' int ids: every caption would be skipped
    with pytest.raises(ValueError, match=r"none of the 2 captions.*skipped 2.*str.*int.*int\(image_id\)"):
        chair([{"image_id": "1", "caption": "A cat."}, {"image_id": "2", "caption": "A dog."}], truth)
    with pytest.raises(ValueError, match="skipped 1.*in the annotation files"):
        chair([{"image_id": 99, "caption": "A cat."}], truth)
    assert chair([], truth)["num_captions"] == 0  # nothing to score is not a mismatch


def test_modes_score_by_hand_and_ground_truth_uses_the_same_extractor(tmp_path):
    # image 1: instances have a bus; its reference caption says "a bus" (no object for the script)
    images = [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}]
    inst = {"images": images, "categories": [{"id": 6, "name": "bus"}, {"id": 1, "name": "person"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 6}]}
    caps = {"images": images, "annotations": [{"id": 1, "image_id": 1, "caption": "A man next to a bus."},
                                              {"id": 2, "image_id": 2, "caption": "Ties and canoes on a bus."}]}
    (tmp_path / "i.json").write_text(json.dumps(inst))
    (tmp_path / "c.json").write_text(json.dumps(caps))
    truth = CocoTruth.from_files([tmp_path / "i.json"], [tmp_path / "c.json"])
    assert truth.chair_mode == "reference"
    assert truth.objects == {1: {"bus", "person"}, 2: set()}          # the script finds nothing in image 2's caption
    corrected = truth.for_mode("corrected")
    assert corrected.objects == {1: {"bus", "person"}, 2: {"tie", "boat", "bus"}}
    records = [{"image_id": 1, "caption": "Two buses, a bus and a dog."},   # reference: bus, dog; corrected: bus x2, dog
               {"image_id": 2, "caption": "A canoe and a tie."}]            # reference: boat, tie (both hallucinated)
    ref = chair(records, truth)
    assert ref["chair_mode"] == "reference"
    assert ref["CHAIR_S"] == pytest.approx(1.0)                  # both captions hallucinate
    assert ref["CHAIR_I"] == pytest.approx(3 / 4)                # dog, boat, tie of bus, dog, boat, tie
    assert ref["recall"] == pytest.approx(1 / 2)                 # bus of {bus, person}; image 2 has no truth
    assert ref["captions"][0]["words"] == [["buses", "bus"], ["dog", "dog"]]
    cor = chair(records, corrected)
    assert cor["chair_mode"] == "corrected"
    assert cor["CHAIR_S"] == pytest.approx(1 / 2)                # image 2's truth now has boat and tie
    assert cor["CHAIR_I"] == pytest.approx(1 / 5)                # dog of bus, bus, dog, boat, tie
    assert cor["recall"] == pytest.approx((1 + 2) / (2 + 3))
    from sare_ds.objects import chair_vocabulary

    with pytest.raises(ValueError, match="differs from the ground truth's 'reference'"):
        chair(records, truth, chair_vocabulary("corrected"))


def test_image_list_fixes_the_captioned_images(truth):
    from sare_ds.eval.images import ImageList

    chosen = truth.restricted_to(ImageList("two", (3, 1), "test"))
    assert [i for i, _ in chosen.image_paths("imgs")] == [3, 1]
    assert chosen.image_paths("imgs", limit=1) == [(3, chosen.image_paths("imgs")[0][1])]
    assert chosen.objects[2] == {"person", "horse"}  # scoring still knows every image
    with pytest.raises(ValueError, match=r"1 of its 2 images \(e.g. \[99\]\) are not in the annotation files.*--images"):
        truth.restricted_to(ImageList("bad", (1, 99), "test"))
