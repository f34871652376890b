"""From a caption, its object mentions and their CLIP scores to pos / neg / sent samples.

EFUF's rule (docs/method.md section 2): an object scoring above t0 gives a pos sample, below
t1 a neg sample; the sample's target is the first caption fragment (split on `[,.;!?:]+`)
that mentions the object, its context the caption text before that fragment. A caption whose
mean object score is above t2 and whose every object scores above t1 is a sent sample
(target: the whole caption). Objects between t1 and t0 give no sub-sentence sample.

One object per category and caption: its first mention picks the fragment (the caption's
own word is located by character span, so "puppies" or "baby bird" need no re-matching).
"""
from __future__ import annotations

from dataclasses import dataclass

from sare_ds.data.subsentence import fragments


@dataclass
class ObjectScore:
    category: str
    """COCO category (CHAIR's vocabulary)."""
    text: str
    """What CLIP scored (the caption's word or the category)."""
    start: int
    """Character span of the first mention in the caption."""
    end: int
    score: float
    """100 x cosine."""


@dataclass
class CuratedSample:
    kind: str
    context: str
    target: str
    object: str
    score: float


def span_fragment(caption: str, start: int, end: int) -> tuple[str, str] | None:
    """(context, target) of the fragment holding the character span [start, end); None when the span
    is not inside one fragment (it touches a delimiter)."""
    for f_start, f_end in fragments(caption):
        if f_start <= start and end <= f_end:
            return caption[:f_start], caption[f_start:f_end]
    return None


def first_mentions(mentions) -> list:
    """The first mention of each category, in caption order."""
    seen, out = set(), []
    for m in mentions:
        if m.category not in seen:
            seen.add(m.category)
            out.append(m)
    return out


def split_caption(caption: str, objects: list[ObjectScore], t0: float, t1: float, t2: float,
                  exclusive_fragments: bool = False) -> tuple[list[CuratedSample], dict[str, int]]:
    """Samples of one caption, and the number of dropped candidates by reason. `exclusive_fragments`
    (split.exclusive_fragments; off = the method) leaves out pos samples whose fragment is a neg target."""
    samples: list[CuratedSample] = []
    dropped: dict[str, int] = {}
    spans = {}
    for o in objects:
        span = span_fragment(caption, o.start, o.end)
        if span is None:
            dropped["object_span_crosses_delimiter"] = dropped.get("object_span_crosses_delimiter", 0) + 1
        spans[o.category] = span
    neg_targets = {spans[o.category] for o in objects if o.score < t1 and spans[o.category] is not None}
    for o in objects:
        span = spans[o.category]
        if span is None:
            continue
        if o.score > t0:
            if exclusive_fragments and span in neg_targets:
                dropped["pos_fragment_names_neg_object"] = dropped.get("pos_fragment_names_neg_object", 0) + 1
                continue
            samples.append(CuratedSample("pos", span[0], span[1], o.category, o.score))
        elif o.score < t1:
            samples.append(CuratedSample("neg", span[0], span[1], o.category, o.score))
    if objects:
        scores = [o.score for o in objects]
        mean = sum(scores) / len(scores)
        if mean > t2 and min(scores) > t1:
            samples.append(CuratedSample("sent", "", caption, "", mean))
    return samples, dropped
