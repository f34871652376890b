"""EFUF's sub-sentence rule: split a caption on `[,.;!?:]+`; an object's sample targets the
first fragment that mentions it, with the caption text before that fragment as context.
"""
from __future__ import annotations

import re

DELIMITERS = re.compile(r"[,.;!?:]+")


def fragments(caption: str) -> list[tuple[int, int]]:
    """(start, end) character spans of the non-empty fragments between delimiters."""
    spans, start = [], 0
    for m in DELIMITERS.finditer(caption):
        if caption[start:m.start()].strip():
            spans.append((start, m.start()))
        start = m.end()
    if caption[start:].strip():
        spans.append((start, len(caption)))
    return spans


def object_span(caption: str, mention: str) -> tuple[str, str] | None:
    """(context, target) for the first fragment containing `mention` as a word; None if absent."""
    word = re.compile(rf"\b{re.escape(mention)}\b", re.IGNORECASE)
    for start, end in fragments(caption):
        if word.search(caption, start, end):
            return caption[:start], caption[start:end]
    return None
