"""POPE (Li et al. 2023): yes/no object-existence questions, the reference answer parser, metrics.

    questions = load_questions(packaged_pope_files()["random"])
    answers = ["Yes, there is a dog.", ...]            # the model's replies
    pope_metrics([parse_answer(a) for a in answers], [q["label"] for q in questions])

Question files hold one JSON object a line: question_id, image (file name), text, label
(yes/no). The COCO files (random / popular / adversarial, 3000 questions on 500 val2014
images each) ship in sare_ds/resources/pope/.

Answer parsing copies the reference evaluation exactly, so numbers compare with published
ones: keep the text before the first ".", delete commas, split on single spaces, and the
answer is "no" iff one of the words is exactly "No", "not" or "no" (case-sensitive: "Not sure"
and "NO" count as yes, "No!" too, since only "." ends the first sentence); else "yes".
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

NEGATIVE_WORDS = ("No", "not", "no")
SPLITS = ("random", "popular", "adversarial")


class PopeFormatError(ValueError):
    """A POPE question file breaks the one-JSON-object-a-line format."""


def packaged_pope_files() -> dict[str, Path]:
    """split -> path of the COCO POPE question files shipped with sare_ds."""
    root = resources.files("sare_ds") / "resources" / "pope"
    return {split: Path(str(root / f"coco_pope_{split}.json")) for split in SPLITS}


def load_questions(path: str | Path, limit: int = 0) -> list[dict]:
    """Questions of one split; `limit` > 0 keeps the first ones (a quick look, not the benchmark)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"POPE question file {path} does not exist; pass a coco_pope_<split>.json "
                                "(sare_ds/resources/pope/ holds the COCO ones)")
    questions = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            q = json.loads(line)
        except json.JSONDecodeError as e:
            raise PopeFormatError(f"{path}, line {lineno}: not JSON ({e}); each line must be one question object") from None
        missing = [k for k in ("question_id", "image", "text", "label") if k not in q]
        if missing or q["label"] not in ("yes", "no"):
            raise PopeFormatError(f"{path}, line {lineno}: needs question_id, image, text and label yes/no "
                                  f"(missing {missing or 'none'}, label {q.get('label')!r}); fix the file")
        questions.append(q)
        if limit and len(questions) >= limit:
            break
    return questions


def parse_answer(text: str) -> str:
    """'yes' or 'no', by the POPE reference rule (first sentence; "No"/"not"/"no" as words)."""
    first_sentence = text.split(".")[0] if "." in text else text
    words = first_sentence.replace(",", "").split(" ")
    return "no" if any(w in NEGATIVE_WORDS for w in words) else "yes"


def pope_metrics(predictions: list[str], labels: list[str]) -> dict:
    """Accuracy, precision, recall, F1 (positive class: yes) and the yes-ratio of the predictions."""
    if len(predictions) != len(labels):
        raise ValueError(f"pope_metrics: {len(predictions)} predictions for {len(labels)} labels; pass one each")
    pairs = list(zip(predictions, labels))
    tp = sum(p == "yes" and l == "yes" for p, l in pairs)
    fp = sum(p == "yes" and l == "no" for p, l in pairs)
    tn = sum(p == "no" and l == "no" for p, l in pairs)
    fn = sum(p == "no" and l == "yes" for p, l in pairs)
    n = len(pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / n if n else 0.0, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / n if n else 0.0, "num_questions": n,
            "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def mean_over_splits(per_split: dict[str, dict]) -> dict:
    keys = ("accuracy", "precision", "recall", "f1", "yes_ratio")
    return {k: sum(m[k] for m in per_split.values()) / len(per_split) for k in keys} if per_split else {}
