"""CHAIR's object vocabulary, offline: which COCO categories a caption mentions, and where.

    vocab = CocoVocabulary.default()
    vocab.objects("Two puppies and a hot dog on a dining table.")   # ['dog', 'hot dog', 'dining table']
    vocab.mentions("A baby bird.")   # [Mention(category='bird', word='baby bird', start=2, end=11)]

Semantics follow the CHAIR reference (Rohrbach et al. 2018, `chair.py`; docs/method.md
section 2, docs/evaluation.md):

1. Vocabulary: one line of the synonyms file per COCO category; its first entry is the
   category, every entry (the category included) maps to it.
2. Tokens are lower-cased words; each is singularised before matching.
3. Two adjacent tokens that form a two-word rule become one unit: COCO's compound names
   ("hot dog", "teddy bear", "cell phone"...), qualifiers that would otherwise fire a
   `person` ("baby bird" -> bird, "adult cow" -> cow, "passenger jet" -> jet -> airplane,
   "passenger train" -> train), "bow tie" -> tie, "toilet seat" -> toilet, and two phrases
   that name no object ("home plate", "train track": a train track is not a train).
4. If a caption contains "toilet" and "seat", "seat" is dropped (it would fire `chair`).
5. Units in the vocabulary are mentions; each maps to its category.

Where this differs from the reference script, on purpose (all listed in docs/evaluation.md):
synonym entries are stripped of spaces and lower-cased (the reference kept " motor bike"
with its leading space, so it never matched, and "iPhone" never matched lower-cased text);
singularisation is a small rule set aimed at the vocabulary (no pattern/nltk download);
two tokens only merge when nothing but white space separates them ("hot, dog" is two words,
as nltk's tokenizer would also have split on the comma).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

# --------------------------------------------------------------------------- CHAIR's rules

# The reference's list of COCO "double words" that count as one unit. A phrase maps to itself;
# "home plate" and "train track" are not vocabulary entries, so they are consumed and then
# dropped: "train tracks" must not count as a train.
COCO_DOUBLE_WORDS = (
    "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal",
    "stop light", "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball",
    "baseball bat", "baseball glove", "tennis racket", "wine glass", "hot dog", "cell phone",
    "mobile phone", "teddy bear", "hair drier", "potted plant", "bow tie", "laptop computer",
    "stove top oven", "home plate", "train track",
)
# "baby"/"adult" and "passenger" are person synonyms; before these nouns they are qualifiers.
ANIMAL_WORDS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe",
                "animal", "cub")
VEHICLE_WORDS = ("jet", "train")
SPECIAL_DOUBLE_WORDS = {"bow tie": "tie", "toilet seat": "toilet", "wine glas": "wine glass"}

# Irregular plurals that a suffix rule cannot undo (only those whose singular is a vocabulary word
# or part of a two-word rule matter; others are harmless).
IRREGULAR_PLURALS = {
    "men": "man", "women": "woman", "mice": "mouse", "geese": "goose", "knives": "knife",
    "pocketknives": "pocketknife", "calves": "calf", "wolves": "wolf", "feet": "foot", "teeth": "tooth",
}
# Suffix rules, tried in order; a candidate is only accepted if it is a vocabulary word, so
# "horses" -> "hors" (rejected) -> "horse" (accepted), "buses" -> "bus", "puppies" -> "puppy".
SUFFIX_RULES = (("men", "man"), ("ies", "y"), ("ves", "f"), ("ves", "fe"), ("es", ""), ("s", ""))

# A word: letters/digits, hyphenated compounds kept whole ("t-shirt", as nltk keeps them);
# apostrophes split ("dog's" -> "dog", "s"), as nltk splits off "'s".
_WORD = re.compile(r"[^\W_]+(?:-[^\W_]+)*")
_SPACE_ONLY = re.compile(r"\s+")


@dataclass(frozen=True)
class Mention:
    category: str
    """COCO category, e.g. "dog", "dining table"."""
    word: str
    """Surface text matched, e.g. "puppies", "hot dog"."""
    start: int
    """Start of the character span in the caption."""
    end: int
    """End (exclusive) of the character span in the caption."""


class SynonymFileError(ValueError):
    """The synonyms file breaks the one-category-per-line format."""


class CocoVocabulary:
    """The 80 COCO categories, their synonyms and CHAIR's two-word rules."""

    def __init__(self, synonym_lines: list[list[str]], source: str = "<lines>"):
        self.source = source
        self.categories: list[str] = []
        self.synonym_to_category: dict[str, str] = {}
        for i, entries in enumerate(synonym_lines, start=1):
            entries = [e.strip().lower() for e in entries if e.strip()]
            if not entries:
                continue
            category = entries[0]
            if category in self.categories:
                raise SynonymFileError(
                    f"{source}, line {i}: category {category!r} already has a line; merge the two lines")
            self.categories.append(category)
            for entry in entries:
                # A later line wins, as in the reference's dictionary build.
                self.synonym_to_category[entry] = category
        if not self.categories:
            raise SynonymFileError(f"{source}: no categories; give one comma-separated line per category")

        self.double_words: dict[str, str] = {w: w for w in COCO_DOUBLE_WORDS}
        # Every two-word entry of the file is a unit too (e.g. "dining table"): with the
        # reference's list this only adds phrases whose second word already maps to the same
        # category, so counts are unchanged; the surface text is the whole phrase.
        for entry in self.synonym_to_category:
            if len(entry.split()) == 2:
                self.double_words.setdefault(entry, entry)
        for animal in ANIMAL_WORDS:
            self.double_words[f"baby {animal}"] = animal
            self.double_words[f"adult {animal}"] = animal
        for vehicle in VEHICLE_WORDS:
            self.double_words[f"passenger {vehicle}"] = vehicle
        self.double_words.update(SPECIAL_DOUBLE_WORDS)

        # Singularisation aims at these words: all single words of the vocabulary and the rules.
        self._known_words = {w for phrase in list(self.synonym_to_category) + list(self.double_words)
                             for w in phrase.split()}

    # -- construction ------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | Path) -> "CocoVocabulary":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"synonyms file {path} does not exist; pass CHAIR's synonyms.txt "
                                    "(one line per category: category, synonym, ...)")
        lines = [line.split(",") for line in path.read_text(encoding="utf-8").splitlines()]
        return cls(lines, str(path))

    @classmethod
    def default(cls) -> "CocoVocabulary":
        """The packaged CHAIR synonyms file (sare_ds/resources/coco_synonyms.txt); cached."""
        return _default_vocabulary()

    # -- words ---------------------------------------------------------------------------
    def singularize(self, word: str) -> str:
        """The singular of a lower-case word if it leads to a vocabulary word, else the word."""
        if word in self._known_words:
            return word
        irregular = IRREGULAR_PLURALS.get(word)
        if irregular is not None:
            return irregular
        for suffix, replacement in SUFFIX_RULES:
            if word.endswith(suffix) and len(word) > len(suffix) + 1:
                candidate = word[: -len(suffix)] + replacement
                if candidate in self._known_words:
                    return candidate
        return word

    def category_of(self, name: str) -> str | None:
        """Category of a vocabulary entry (e.g. a COCO category name or synonym), else None."""
        return self.synonym_to_category.get(name.strip().lower())

    # -- captions ------------------------------------------------------------------------
    def mentions(self, caption: str) -> list[Mention]:
        """Every object mention in caption order (a category may appear several times)."""
        tokens = [(m.start(), m.end(), self.singularize(m.group().lower())) for m in _WORD.finditer(caption)]
        units: list[tuple[int, int, str]] = []
        i = 0
        while i < len(tokens):
            start, end, word = tokens[i]
            if i + 1 < len(tokens):
                n_start, n_end, n_word = tokens[i + 1]
                phrase = self.double_words.get(f"{word} {n_word}")
                if phrase is not None and _SPACE_ONLY.fullmatch(caption[end:n_start]):
                    units.append((start, n_end, phrase))
                    i += 2
                    continue
            units.append((start, end, word))
            i += 1
        words = {u[2] for u in units}
        if "toilet" in words and "seat" in words:
            # The reference's rule: "the seat of the toilet" must not fire `chair`.
            units = [u for u in units if u[2] != "seat"]
        return [Mention(self.synonym_to_category[w], caption[s:e], s, e)
                for s, e, w in units if w in self.synonym_to_category]

    def objects(self, caption: str) -> list[str]:
        """Unique categories mentioned, in order of first mention."""
        return list(dict.fromkeys(m.category for m in self.mentions(caption)))


@lru_cache(maxsize=1)
def _default_vocabulary() -> CocoVocabulary:
    ref = resources.files("sare_ds") / "resources" / "coco_synonyms.txt"
    with resources.as_file(ref) as path:
        return CocoVocabulary.from_file(path)
