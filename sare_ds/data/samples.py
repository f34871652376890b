"""A training sample of EFUF/SARE: an image, the prompt, a caption prefix and a target span.

kind: `pos` (target mentions an object present in the image), `neg` (hallucinated object)
or `sent` (a whole grounded response; its target ends with EOS).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

KINDS = ("pos", "neg", "sent")
KIND_INDEX = {k: i for i, k in enumerate(KINDS)}


class BadSampleError(ValueError):
    """A sample that cannot be trained on; the message names it and the fix. `reason` is the short key
    skips are counted under (samples skipped for the same rule share it)."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message.split(":", 1)[-1].split(";")[0].strip()


def skip_report(skipped: dict[str, int]) -> str:
    """`412 x longer than data.max_length = 512, 3 x ...` (most frequent first), or `none`."""
    items = sorted(skipped.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{n} x {reason}" for reason, n in items) or "none"


@dataclass
class Sample:
    image: Any
    """PIL image (RGB)."""
    prompt: str
    """User prompt the caption answered."""
    context: str
    """Caption text before the target span (empty for sent samples)."""
    target: str
    """The span that carries the loss: a sub-sentence (pos/neg) or the whole response (sent)."""
    kind: str
    """pos, neg or sent."""
    object: str = ""
    """The object the span was chosen for (empty for sent)."""
    score: float = 0.0
    """CLIP score of that object (100 x cosine); the mean object score for sent."""
    image_id: str = ""
    """Identifier of the image (for logs and error messages)."""
    meta: dict = field(default_factory=dict)

    def check(self) -> None:
        where = f"sample (image {self.image_id or '?'}, kind {self.kind!r})"
        if self.kind not in KINDS:
            raise BadSampleError(f"{where}: kind must be one of {KINDS}; fix the curation output")
        if not self.target.strip():
            raise BadSampleError(f"{where}: empty target span; drop the sample or re-run curation")
        if self.image is None:
            raise BadSampleError(f"{where}: no image; check the image file exists and decodes")


# ------------------------------------------------------------------------------ caption records

SPAN_KINDS = ("pos", "neg")


@dataclass
class Span:
    """A sub-sentence of a caption that carries a loss: characters [start, end) of the caption text."""

    start: int
    end: int
    kind: str
    """pos (the object is in the image) or neg (hallucinated)."""
    object: str = ""
    score: float = 0.0
    """CLIP score of the object (100 x cosine)."""

    def to_json(self) -> dict:
        return {"start": self.start, "end": self.end, "kind": self.kind, "object": self.object,
                "score": float(self.score)}


@dataclass
class Caption:
    """One caption of one image with all of its curated spans: the unit of packed training.

    Forwarded once, it gives every span's NLL (`data.tokenize.tokenize_caption`); `unpack()` gives the
    per-sample view (one Sample per span, plus the sent sample), the unit of EFUF's own code.
    """

    image: Any
    """PIL image (RGB)."""
    prompt: str
    caption: str
    """The whole response the MLLM wrote."""
    spans: list[Span] = field(default_factory=list)
    sent: bool = False
    """The whole response is a sent sample (mean object score > t2 and minimum > t1)."""
    sent_score: float = 0.0
    """Mean object score of the response (the sent sample's score)."""
    sent_min_score: float = 0.0
    image_id: str = ""

    def check(self) -> None:
        where = f"caption (image {self.image_id or '?'})"
        if self.image is None:
            raise BadSampleError(f"{where}: no image; check the image file exists and decodes")
        if not self.caption.strip():
            raise BadSampleError(f"{where}: empty caption text; re-run curation")
        for s in self.spans:
            if s.kind not in SPAN_KINDS:
                raise BadSampleError(f"{where}: span kind {s.kind!r} must be one of {SPAN_KINDS}; fix the curation output")
            if not (0 <= s.start < s.end <= len(self.caption)) or not self.caption[s.start:s.end].strip():
                raise BadSampleError(f"{where}: span [{s.start}, {s.end}) is empty or outside the caption "
                                     f"({len(self.caption)} characters); re-run curation",
                                     reason="span outside the caption")

    def kind_counts(self) -> dict[str, int]:
        counts = {k: 0 for k in KINDS}
        for s in self.spans:
            counts[s.kind] += 1
        counts["sent"] = int(self.sent)
        return counts

    def unpack(self) -> list[Sample]:
        """The per-sample view: a pos/neg Sample per span (context = caption text before it, target = the
        span), then the sent Sample (the whole response), as EFUF's code forwards them."""
        out = [Sample(self.image, self.prompt, self.caption[:s.start], self.caption[s.start:s.end], s.kind,
                      s.object, s.score, self.image_id) for s in self.spans]
        if self.sent:
            out.append(Sample(self.image, self.prompt, "", self.caption, "sent", "", self.sent_score, self.image_id))
        return out

    def to_json(self) -> dict:
        """The shard record (the image travels as its own tar member)."""
        return {"image_id": str(self.image_id), "prompt": self.prompt, "caption": self.caption,
                "spans": [s.to_json() for s in self.spans], "sent": bool(self.sent),
                "sent_score": float(self.sent_score), "sent_min_score": float(self.sent_min_score)}

    @classmethod
    def from_json(cls, record: dict, image) -> "Caption":
        return cls(image=image, prompt=record["prompt"], caption=record["caption"],
                   spans=[Span(int(s["start"]), int(s["end"]), s["kind"], s.get("object", ""), float(s.get("score", 0.0)))
                          for s in record["spans"]],
                   sent=bool(record.get("sent", False)), sent_score=float(record.get("sent_score", 0.0)),
                   sent_min_score=float(record.get("sent_min_score", 0.0)), image_id=str(record.get("image_id", "")))

    @classmethod
    def from_sample(cls, sample: Sample) -> "Caption":
        """A per-kind sample (today's shard format) as a caption of one span: its text is context + target,
        cut after the target as the per-sample path tokenises it; a sent sample is a caption with sent set."""
        if sample.kind == "sent":
            return cls(sample.image, sample.prompt, sample.target, [], True, sample.score, sample.score,
                       sample.image_id)
        text = sample.context + sample.target
        return cls(sample.image, sample.prompt, text,
                   [Span(len(sample.context), len(text), sample.kind, sample.object, sample.score)],
                   image_id=sample.image_id)


def captions_from_samples(samples: list[Sample]) -> list[Caption]:
    """Group per-kind samples of the same response (image id, prompt, caption text) into caption records.

    A pos/neg sample's context + target must be a prefix of its caption (`meta["caption"]`, else the
    sent sample of the same image and prompt); samples whose caption is unknown become captions of
    their own (`Caption.from_sample`). Order: first appearance.
    """
    groups: dict[tuple, Caption] = {}
    for s in samples:
        full = s.meta.get("caption") or (s.target if s.kind == "sent" else "")
        if not full:
            groups[("single", id(s))] = Caption.from_sample(s)
            continue
        key = (s.image_id, s.prompt, full)
        cap = groups.setdefault(key, Caption(s.image, s.prompt, full, image_id=s.image_id))
        if s.kind == "sent":
            cap.sent, cap.sent_score, cap.sent_min_score = True, s.score, s.meta.get("min_score", s.score)
            continue
        start, end = len(s.context), len(s.context) + len(s.target)
        if full[:end] != s.context + s.target:
            raise BadSampleError(
                f"sample (image {s.image_id}, kind {s.kind}): context + target is not a prefix of its caption, so "
                "its span cannot be placed; re-run curation", reason="span not found in its caption")
        cap.spans.append(Span(start, end, s.kind, s.object, s.score))
    return list(groups.values())
