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
