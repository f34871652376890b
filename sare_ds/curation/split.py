"""From a caption, its object mentions and their CLIP scores to the caption's training spans.

EFUF's rule (docs/method.md section 2): an object scoring above t0 gives a pos span, below t1 a
neg span; the span is the first caption fragment (split on `[,.;!?:]+`) that mentions the object.
A caption whose mean object score is above t2 and whose every object scores above t1 is a sent
response (the whole caption is trained on). Objects between t1 and t0 give no span.

One object per category and caption: its first mention picks the fragment (the caption's
own word is located by character span, so "puppies" or "baby bird" need no re-matching).

`split_caption_spans` gives the caption record's view (spans as character offsets, the sent flag),
`split_caption` the per-sample view EFUF's code trains on (context = the caption before the
span, target = the span): the same rule, so a span [start, end) is exactly the per-sample
target caption[start:end] with context caption[:start].
"""
from __future__ import annotations

from dataclasses import dataclass, field

from sare_ds.data.samples import Span
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
class CaptionSplit:
    """What one caption gives to training."""

    spans: list[Span] = field(default_factory=list)
    """pos / neg spans, in the order of the objects' first mentions."""
    sent: bool = False
    """Mean object score > t2 and every object > t1: the whole response is a sent sample."""
    sent_score: float = 0.0
    """Mean object score (0 for a caption without objects)."""
    sent_min_score: float = 0.0
    """Lowest object score (0 for a caption without objects)."""
    dropped: dict[str, int] = field(default_factory=dict)
    """Object candidates that gave no span, by reason."""

    @property
    def empty(self) -> bool:
        """Nothing to train on: no span and not a sent response."""
        return not self.spans and not self.sent


@dataclass
class CuratedSample:
    """The per-sample view of one span (or of the sent response)."""

    kind: str
    context: str
    target: str
    object: str
    score: float


def fragment_of(caption: str, start: int, end: int) -> tuple[int, int] | None:
    """Character offsets of the fragment holding [start, end); None when the mention is not inside one
    fragment (it touches a delimiter)."""
    for f_start, f_end in fragments(caption):
        if f_start <= start and end <= f_end:
            return f_start, f_end
    return None


def first_mentions(mentions) -> list:
    """The first mention of each category, in caption order."""
    seen, out = set(), []
    for m in mentions:
        if m.category not in seen:
            seen.add(m.category)
            out.append(m)
    return out


def split_caption_spans(caption: str, objects: list[ObjectScore], t0: float, t1: float, t2: float,
                        exclusive_fragments: bool = False) -> CaptionSplit:
    """The spans and sent flag of one caption. `exclusive_fragments` (split.exclusive_fragments; off =
    the method) leaves out pos spans whose fragment is also a neg span."""
    out = CaptionSplit()
    frags = {}
    for o in objects:
        frag = fragment_of(caption, o.start, o.end)
        if frag is None:
            out.dropped["object_span_crosses_delimiter"] = out.dropped.get("object_span_crosses_delimiter", 0) + 1
        frags[o.category] = frag
    neg_fragments = {frags[o.category] for o in objects if o.score < t1 and frags[o.category] is not None}
    for o in objects:
        frag = frags[o.category]
        if frag is None:
            continue
        if o.score > t0:
            if exclusive_fragments and frag in neg_fragments:
                out.dropped["pos_fragment_names_neg_object"] = out.dropped.get("pos_fragment_names_neg_object", 0) + 1
                continue
            out.spans.append(Span(frag[0], frag[1], "pos", o.category, o.score))
        elif o.score < t1:
            out.spans.append(Span(frag[0], frag[1], "neg", o.category, o.score))
    if objects:
        scores = [o.score for o in objects]
        out.sent_score, out.sent_min_score = sum(scores) / len(scores), min(scores)
        out.sent = out.sent_score > t2 and out.sent_min_score > t1
    return out


def split_caption(caption: str, objects: list[ObjectScore], t0: float, t1: float, t2: float,
                  exclusive_fragments: bool = False) -> tuple[list[CuratedSample], dict[str, int]]:
    """The per-sample view: one sample per span (context = the caption before it), then the sent sample
    (context empty, target the whole caption, score the mean), and the dropped candidates by reason."""
    split = split_caption_spans(caption, objects, t0, t1, t2, exclusive_fragments)
    samples = [CuratedSample(s.kind, caption[:s.start], caption[s.start:s.end], s.object, s.score)
               for s in split.spans]
    if split.sent:
        samples.append(CuratedSample("sent", "", caption, "", split.sent_score))
    return samples, split.dropped
