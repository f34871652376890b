"""POPE (Li et al. 2023): yes/no object-existence questions, the reference answer parser, metrics.

    questions = load_questions(packaged_pope_files()["random"])
    answers = ["Yes, there is a dog.", ...]            # the model's replies
    pope_metrics([parse_answer(a) for a in answers], [q["label"] for q in questions])

Question files hold one JSON object a line: question_id, image (file name), text, label
(yes/no). The COCO files (random / popular / adversarial, 3000 questions on 500 val2014
images each) ship in sare_ds/resources/pope/.

Answer parsing has the reference evaluation's semantics, so numbers compare with published
ones: the first sentence is the text before the first "."; with its commas removed and cut at
single spaces, it answers "no" iff one of its words is exactly "No", "not" or "no", else "yes".
Consequences: matching is case-sensitive ("Not sure" and "NO" count as yes), and other
punctuation stays part of the word ("No!" and "no;" count as yes).
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

NEGATIVE_WORDS = frozenset({"No", "not", "no"})
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
    """'yes' or 'no' by POPE's rule (docs/method.md section 5): only the first sentence counts,
    and it means no when one of its words is "no", "not" or "No"."""
    # The first sentence is everything before the first "." (the whole text if there is none).
    sentence = text.partition(".")[0]
    # Words: commas removed, then cut at single spaces (so "No!" or "no;" stay non-matching
    # words, as in the reference evaluation the published numbers come from).
    sentence_words = set(sentence.replace(",", "").split(" "))
    return "no" if sentence_words & NEGATIVE_WORDS else "yes"


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
