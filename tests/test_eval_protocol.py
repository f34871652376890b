"""Image lists, the coco-chair-pope protocol and how results name their CHAIR mode.

    .venv/bin/python -m pytest tests/test_eval_protocol.py -q
"""
import json

import pytest

from sare_ds.eval.evaluate import EvalConfig, describe_setting, markdown_table, summary_row
from sare_ds.eval.images import (POPE_IMAGE_LIST, ImageListError, dump_image_list, image_list_of_pope, pope_image_list,
                                 read_image_list)
from sare_ds.eval.pope import load_questions, packaged_pope_files
from sare_ds.eval.protocol import ProtocolError, load_protocol
from sare_ds.eval.report import comparison_rows, markdown_report


def test_default_images_are_the_500_of_the_pope_files():
    images = pope_image_list()
    assert images.name == POPE_IMAGE_LIST and len(images.ids) == 500 and len(set(images.ids)) == 500
    named = {q["image"] for q in load_questions(packaged_pope_files()["adversarial"])}
    assert {f"COCO_val2014_{i:012d}.jpg" for i in images.ids} == named


def test_image_list_file(tmp_path):
    path = tmp_path / "ids.txt"
    path.write_text("# my images\n391895\n\n522418\n")
    images = read_image_list(path)
    assert images.ids == (391895, 522418) and images.to_json()["count"] == 2 and images.source == str(path)
    path.write_text(dump_image_list(pope_image_list()))
    assert read_image_list(path).ids == pope_image_list().ids
    for text, message in (("391895\nCOCO_val2014_1.jpg\n", "line 2: 'COCO_val2014_1.jpg' is not a COCO image id"),
                          ("5\n5\n", "image 5 is listed twice"), ("# nothing\n", "no image id")):
        path.write_text(text)
        with pytest.raises(ImageListError, match=message):
            read_image_list(path)
    with pytest.raises(FileNotFoundError, match="one a line"):
        read_image_list(tmp_path / "missing.txt")


def test_pope_splits_must_share_their_images(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    q = {"question_id": 1, "text": "Is there a dog in the image?", "label": "yes"}
    a.write_text(json.dumps({**q, "image": "COCO_val2014_000000000001.jpg"}) + "\n")
    b.write_text(json.dumps({**q, "image": "COCO_val2014_000000000002.jpg"}) + "\n")
    assert image_list_of_pope({"a": a})[0] == (1,)
    with pytest.raises(ImageListError, match="asks about other images"):
        image_list_of_pope({"a": a, "b": b})


def test_protocol_fixes_the_published_setting():
    protocol = load_protocol("coco-chair-pope")
    cfg = protocol.apply(EvalConfig(), changed={})
    assert cfg.chair_mode == "reference" and cfg.num_beams == 1 and cfg.max_new_tokens == 200
    assert cfg.caption_prompt.startswith("Please describe the image in great detail.") and cfg.num_images == 0
    assert protocol.data["pope"]["splits"] == ["random", "popular", "adversarial"]
    assert protocol.images().ids == pope_image_list().ids
    assert protocol.to_json()["name"] == "coco-chair-pope"
    assert protocol.apply(EvalConfig(batch_size=4), changed={"batch_size": 4}).batch_size == 4  # not a protocol field
    with pytest.raises(ProtocolError, match=r"fixes chair_mode='corrected' \(protocol: 'reference'\)"):
        protocol.apply(EvalConfig(chair_mode="corrected"), changed={"chair_mode": "corrected"})
    with pytest.raises(ProtocolError, match="no packaged protocol"):
        load_protocol("coco-chair")


def test_bad_protocol_file(tmp_path):
    path = tmp_path / "p.json"
    data = json.loads(json.dumps(load_protocol("coco-chair-pope").data))
    data["caption"]["chair_mode"] = "published"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="'published' is not a CHAIR mode"):
        load_protocol(str(path))
    del data["pope"]["splits"]
    path.write_text(json.dumps(data))
    with pytest.raises(ProtocolError, match=r"`pope` lacks \['splits'\]"):
        load_protocol(str(path))


def _caption_result(mode):
    return {"chair_mode": mode, "CHAIR_S": 0.5, "CHAIR_I": 0.25, "recall": 0.75, "BLEU-1": 0.1, "BLEU-2": 0.1,
            "BLEU-4": 0.1, "mean_length_words": 90.0, "tokens_per_s": 1.0}


def test_tables_never_mix_modes():
    rows = {"a": summary_row({"captions": _caption_result("reference")}),
            "b": summary_row({"captions": _caption_result("corrected")})}
    assert rows["a"]["CHAIR_S"] == 50.0 and "CHAIR_S" not in rows["b"] and rows["b"]["CHAIR_S (corrected)"] == 50.0
    table = markdown_table(rows)
    assert "| CHAIR_S |" in table and "CHAIR_S (corrected)" in table
    text = describe_setting({"chair_mode": "corrected", "protocol": None,
                             "images": {"name": "ids.txt", "count": 2, "source": "ids.txt", "limit": 1}})
    assert "NOT comparable" in text and "Protocol: none" in text and "only the first 1 captioned" in text
    results = {"x": {"none": _caption_result("corrected")}, "y": {"none": _caption_result("corrected")}}
    columns, _ = comparison_rows(results)
    assert columns[0] == "CHAIR_S (corrected)" and "NOT comparable" in markdown_report(results)
    results["y"]["none"]["chair_mode"] = "reference"
    with pytest.raises(ValueError, match="different CHAIR modes"):
        comparison_rows(results)


@pytest.mark.parametrize("script, extra, needle", [
    ("launch/evaluate.py", ["--protocol", "coco-chair-pope", "--scenes", "x"], "fixes the images"),
    ("launch/evaluate.py", ["--images", "missing_ids.txt"], "missing_ids.txt does not exist"),
    ("launch/evaluate.py", ["--protocol", "no-such-protocol"], "no-such-protocol"),
    ("launch/attack.py", ["--method", "base", "--scenes", "x", "--images", "ids.txt"], "captions all its own images"),
    ("launch/attack.py", ["--method", "base", "--images", "missing_ids.txt"], "missing_ids.txt does not exist"),
])
def test_cli_refuses_contradicting_image_flags(tmp_path, script, extra, needle):
    """The CLIs name the flag and the fix, exit 2 (argparse), before any model loads."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / script), *extra], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert needle in proc.stderr, proc.stderr[-2000:]


def test_a_truncated_adversarial_prompt_file_names_itself(tmp_path):
    from sare_ds.eval.attacks import load_adversarial_prompts

    bad = tmp_path / "prompts.json"
    bad.write_text('{"prompts": [{"id": "a", "templ')
    with pytest.raises(ValueError, match="prompts.json"):
        load_adversarial_prompts(bad)
    assert load_adversarial_prompts()  # the shipped set loads


def test_plan_refuses_a_string_stage(tmp_path):
    from sare_ds.plan import PlanError, ZeroSettings

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": "3"}}))
    with pytest.raises(PlanError, match="must be an integer"):
        ZeroSettings.from_json(path)
