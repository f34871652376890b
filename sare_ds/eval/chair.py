"""CHAIR (Rohrbach et al. 2018): how many captions / object mentions are hallucinated.

    result = chair([{"image_id": 1, "caption": "A dog on a sofa."}], truth)
    result["CHAIR_S"], result["CHAIR_I"], result["chair_mode"], result["captions"][0]["hallucinated"]

The objects of a caption come from the extractor of the ground truth's CHAIR mode
(`truth.chair_mode`: `reference` = the published script, `corrected` = sare_ds's fixes, see
sare_ds/objects.py); the result names the mode, and numbers of the two modes must never share
a table column (only `reference` compares with published numbers).
The counting is the published script's `compute_chair` (with the extended script's recall):
CHAIR_S = captions with >= 1 hallucinated object / captions;
CHAIR_I = hallucinated object mentions / all object mentions (a category mentioned twice
counts twice, as in the reference). A mention is hallucinated when its category is not in the
image's ground truth (COCO instances + objects of its reference captions; see coco.py).
Recall (also from the reference's extended script) = ground-truth categories mentioned /
ground-truth categories. Per caption, CHAIR_I = its hallucinated mentions / its mentions (0 when
it has none), as the script writes it.

One deliberate difference from the script: a caption whose image is not in the annotation files
at all is skipped and counted (the script would score it against an empty object set, every
mention a hallucination); if that is every caption, chair raises (0.0 would read as a perfect
score). Images that are in the files but have no object are scored, as by the script.
"""
from __future__ import annotations

from sare_ds.eval.coco import CocoTruth
from sare_ds.objects import chair_vocabulary


def chair(records: list[dict], truth: CocoTruth, vocab=None) -> dict:
    """records: [{"image_id", "caption"}]; returns the scores and one entry per scored caption.

    `vocab` defaults to the extractor of `truth.chair_mode`; one of another mode is an error,
    because the ground truth must be found by the same extractor as the captions' objects.
    """
    vocab = vocab or chair_vocabulary(truth.chair_mode)
    if getattr(vocab, "mode", None) != truth.chair_mode:
        raise ValueError(f"chair: the extractor's mode {getattr(vocab, 'mode', None)!r} differs from the ground "
                         f"truth's {truth.chair_mode!r}; the reference captions must be read by the same "
                         "extractor: pass truth.for_mode(<mode>) and that mode's vocabulary, or no vocab")
    per_caption, skipped = [], 0
    n_mentions = n_hallucinated_mentions = n_hallucinated_captions = 0
    n_truth = n_recalled = 0
    for rec in records:
        gt = truth.objects.get(rec["image_id"])
        if gt is None:
            skipped += 1
            continue
        mentions = vocab.mentions(rec["caption"])
        hallucinated_mentions = [m for m in mentions if m.category not in gt]
        mentioned = list(dict.fromkeys(m.category for m in mentions))
        grounded = [c for c in mentioned if c in gt]
        n_mentions += len(mentions)
        n_hallucinated_mentions += len(hallucinated_mentions)
        n_hallucinated_captions += bool(hallucinated_mentions)
        n_truth += len(gt)
        n_recalled += len(grounded)
        per_caption.append({
            "image_id": rec["image_id"],
            "caption": rec["caption"],
            "mentioned": mentioned,
            "grounded": grounded,
            "hallucinated": list(dict.fromkeys(m.category for m in hallucinated_mentions)),
            "words": [[m.word, m.category] for m in mentions],
            "hallucinated_words": [[m.word, m.category, m.start, m.end] for m in hallucinated_mentions],
            "ground_truth": sorted(gt),
            "CHAIR_S": int(bool(hallucinated_mentions)),
            "CHAIR_I": len(hallucinated_mentions) / len(mentions) if mentions else 0.0,
        })
    n = len(per_caption)
    if records and not per_caption:
        raise ValueError(_no_ground_truth_message(records, truth))
    return {
        "chair_mode": truth.chair_mode,
        "CHAIR_S": n_hallucinated_captions / n if n else 0.0,
        "CHAIR_I": n_hallucinated_mentions / n_mentions if n_mentions else 0.0,
        "recall": n_recalled / n_truth if n_truth else 0.0,
        "num_captions": n,
        "num_mentions": n_mentions,
        "num_hallucinated_mentions": n_hallucinated_mentions,
        "skipped_no_ground_truth": skipped,
        "captions": per_caption,
    }


def _no_ground_truth_message(records: list[dict], truth: CocoTruth) -> str:
    ids = [r["image_id"] for r in records]
    record_types = sorted({type(i).__name__ for i in ids})
    truth_types = sorted({type(i).__name__ for i in truth.objects})
    if not truth_types:
        hint = "the annotation files hold no image; pass COCO instances/captions files with their `images`"
    elif record_types != truth_types:
        hint = (f"the captions' image ids are {'/'.join(record_types)} but the annotation files' ids are "
                f"{'/'.join(truth_types)}; convert them to the annotation files' type (COCO ids are int: "
                "int(image_id))")
    else:
        hint = "score captions of images in the annotation files, or pass the annotation files of these images"
    return (f"chair: none of the {len(records)} captions has ground truth (skipped {len(ids)}, e.g. image_id "
            f"{ids[0]!r}; the annotation files know {len(truth.objects)} images); a score over no caption "
            f"would read as 0.0 = no hallucination. Fix: {hint}")
