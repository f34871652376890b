"""CHAIR's object vocabulary, offline: which COCO categories a caption mentions, and where.

    vocab = chair_vocabulary("reference")    # the published script's extraction (the default)
    vocab = chair_vocabulary("corrected")    # CocoVocabulary: sare_ds's corrected extraction
    vocab.objects("Two puppies and a hot dog on a dining table.")   # ['dog', 'hot dog', 'dining table']
    vocab.mentions("A baby bird.")   # [Mention(category='bird', word='baby bird', start=2, end=11)]

Two CHAIR modes (docs/evaluation.md, "CHAIR modes"):

- `reference` (sare_ds.eval.chair_reference.ReferenceVocabulary): the published CHAIR script's
  `caption_to_words`, quirks included, so numbers can stand beside published ones;
- `corrected` (`CocoVocabulary`, this module): the same CHAIR rules with the script's accidents
  fixed. Its numbers are NOT comparable with published CHAIR numbers and are always reported
  under the mode's name.

`CocoVocabulary` reads two data files and only applies them:

- `resources/coco_synonyms.txt`: one line per COCO category, the category first, then its
  synonyms; every entry names that category.
- `resources/chair_rules.json`: word pairs that are one unit besides the synonyms file's own
  two-word entries: qualifiers ("baby"/"adult" before an animal, "passenger" before a jet or a
  train) that would otherwise name a person, phrases with a fixed meaning ("toilet seat" is a
  toilet, "train track" names nothing), and words dropped in context ("seat" beside a toilet).

Matching: lower-cased word tokens, each singularised towards the vocabulary; two neighbouring
tokens separated only by white space become one unit when a rule or a two-word synonym covers
them (scanned left to right, a token joins at most one pair); units that name a category are
the mentions.

What `corrected` changes against the published script (each a mention the script misses or
invents; all listed in docs/evaluation.md):
synonym entries are stripped of spaces and lower-cased (the script kept " motor bike" and
" cheesecake" with a leading space and "iPhone" with a capital, so they never matched);
singularisation aims at the vocabulary instead of pattern.en ("bus", "minibus", "airbus" stay
buses and planes, "ties" is tie, "canoes" canoe, "doggies" doggie; "skies" is sky, not skis,
and "manes" no man: -es is only cut after s, x, z, ch, sh and o);
words are letters and digits, so a missing space ("boat.There"), an apostrophe without a space
("elephants'harnesses") or a zero-width space does not hide a word, while "o'clock" is one word
(no clock); two tokens only merge when nothing but white space separates them ("hot, dog" is
two words, as nltk's tokenizer would also have split on the comma).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

# Irregular plurals that a suffix rule cannot undo (only those whose singular is a vocabulary word
# or part of a two-word rule matter; others are harmless).
IRREGULAR_PLURALS = {
    "men": "man", "women": "woman", "mice": "mouse", "geese": "goose", "knives": "knife",
    "pocketknives": "pocketknife", "calves": "calf", "wolves": "wolf", "feet": "foot", "teeth": "tooth",
}
# Suffix rules, tried in order; a candidate is only accepted if it is a vocabulary word, so
# "horses" -> "hors" (rejected) -> "horse" (accepted), "buses" -> "bus", "puppies" -> "puppy".
# A word ending in -ies only tries -y and -ie ("ties" -> "tie", "doggies" -> "doggie"): the
# shorter cuts would turn "skies" into "ski", a COCO object (skis) no sky is.
SUFFIX_RULES = (("men", "man"), ("ies", "y"), ("ies", "ie"), ("ves", "f"), ("ves", "fe"), ("es", ""), ("s", ""))

# A word: letters/digits, hyphenated compounds kept whole ("t-shirt", as nltk keeps them);
# apostrophes split ("dog's" -> "dog", "s"), as nltk splits off "'s", except in "o'clock",
# one word that names no clock.
_WORD = re.compile(r"\bo['’]clock\b|[^\W_]+(?:-[^\W_]+)*", re.IGNORECASE)

# Endings after which a plural takes -es ("buses", "boxes", "benches", "brushes", "buffaloes").
_ES_STEMS = ("s", "x", "z", "ch", "sh", "o")

CHAIR_MODES = ("reference", "corrected")
"""`reference`: the published CHAIR script's extraction; `corrected`: CocoVocabulary (not comparable)."""


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


class RuleFileError(ValueError):
    """The two-word rule file (chair_rules.json) breaks its format."""


@dataclass(frozen=True)
class PairRules:
    """CHAIR's two-word rules, read from a chair_rules.json file.

    pairs: (first word, second word) -> the vocabulary word the unit stands for, or None when
    the two words together name no object. dropped: word -> the word whose presence drops it.
    """

    pairs: dict
    dropped: dict
    source: str = "<rules>"

    @property
    def words(self) -> set[str]:
        """Every single word the rules mention (singularisation must be able to reach them)."""
        out = {w for pair in self.pairs for w in pair}
        out |= {w for w in self.pairs.values() if w}
        return out | set(self.dropped) | set(self.dropped.values())

    @classmethod
    def from_file(cls, path: str | Path) -> "PairRules":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"rule file {path} does not exist; pass a chair_rules.json "
                                    "(sare_ds/resources/chair_rules.json is the packaged one)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise RuleFileError(f"{path}: not JSON ({e}); fix the file") from None
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: dict, source: str = "<rules>") -> "PairRules":
        def two_words(text, where):
            parts = str(text).lower().split()
            if len(parts) != 2:
                raise RuleFileError(f"{source}: {where} {text!r} is not two words; the matcher joins exactly "
                                    "two neighbouring words, so split or drop the entry")
            return tuple(parts)

        pairs: dict = {}
        for k, group in enumerate(data.get("qualifiers", [])):
            if not {"words", "nouns"} <= set(group):
                raise RuleFileError(f"{source}: qualifiers[{k}] needs `words` and `nouns` lists; add them")
            for noun in group["nouns"]:
                for word in group["words"]:
                    # The qualified noun keeps its own meaning (possibly none, e.g. "animal").
                    pairs[(word.lower(), noun.lower())] = noun.lower()
        for phrase, target in data.get("phrases", {}).items():
            if target is not None and not isinstance(target, str):
                raise RuleFileError(f"{source}: phrase {phrase!r} maps to {target!r}; use a category name or null")
            pairs[two_words(phrase, "phrase")] = target.lower() if target else None
        dropped = {}
        for k, rule in enumerate(data.get("dropped_words", [])):
            if not {"word", "when_caption_has"} <= set(rule):
                raise RuleFileError(f"{source}: dropped_words[{k}] needs `word` and `when_caption_has`; add them")
            dropped[rule["word"].lower()] = rule["when_caption_has"].lower()
        return cls(pairs, dropped, source)

    @classmethod
    def default(cls) -> "PairRules":
        ref = resources.files("sare_ds") / "resources" / "chair_rules.json"
        with resources.as_file(ref) as path:
            return cls.from_file(path)


# Marks "no rule joins these two words" (None already means "joined, names nothing").
_UNJOINED = object()


class CocoVocabulary:
    """The 80 COCO categories, their synonyms and CHAIR's two-word rules (CHAIR mode `corrected`)."""

    mode = "corrected"

    def __init__(self, synonym_lines: list[list[str]], source: str = "<lines>", rules: PairRules | None = None):
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
                # An entry listed under two categories names the later one.
                self.synonym_to_category[entry] = category
        if not self.categories:
            raise SynonymFileError(f"{source}: no categories; give one comma-separated line per category")

        self.rules = rules if rules is not None else _default_rules()
        # Word pair -> the vocabulary word it stands for (None: nothing). Two-word synonyms
        # ("dining table") stand for themselves; the rule file's pairs take precedence.
        self._pairs: dict[tuple[str, str], str | None] = {}
        for entry in self.synonym_to_category:
            parts = entry.split()
            if len(parts) == 2:
                self._pairs[(parts[0], parts[1])] = entry
        self._pairs.update(self.rules.pairs)
        # Singularisation aims at these words: every word of the vocabulary and of the rules.
        self._known_words = {w for entry in self.synonym_to_category for w in entry.split()} | self.rules.words

    # -- construction ------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | Path, rules: PairRules | None = None) -> "CocoVocabulary":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"synonyms file {path} does not exist; pass CHAIR's synonyms.txt "
                                    "(one line per category: category, synonym, ...)")
        lines = [line.split(",") for line in path.read_text(encoding="utf-8").splitlines()]
        return cls(lines, str(path), rules)

    @classmethod
    def default(cls) -> "CocoVocabulary":
        """The packaged synonyms and rule files (sare_ds/resources/); cached."""
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
            if word.endswith("ies") and suffix != "ies":
                continue  # an -ies plural is -y or -ie, never cut shorter (SUFFIX_RULES)
            if not word.endswith(suffix):
                continue
            candidate = word[: -len(suffix)] + replacement
            if len(candidate) < 2 or (suffix == "es" and not candidate.endswith(_ES_STEMS)):
                continue  # "-es" only follows s, x, z, ch, sh, o: "manes" is no plural of "man"
            if candidate in self._known_words:
                return candidate
        return word

    def category_of(self, name: str) -> str | None:
        """Category of a vocabulary entry (e.g. a COCO category name or synonym), else None."""
        return self.synonym_to_category.get(name.strip().lower())

    # -- captions ------------------------------------------------------------------------
    def _units(self, caption: str) -> list[tuple[int, int, str | None]]:
        """(start, end, vocabulary word or None) per word or joined word pair, in caption order."""
        tokens = [(m.start(), m.end(), self.singularize(m.group().lower())) for m in _WORD.finditer(caption)]
        units: list[tuple[int, int, str | None]] = []
        pending = None  # the previous token, not yet emitted, waiting to see if it pairs
        for token in tokens:
            if pending is not None:
                gap = caption[pending[1]:token[0]]
                joined = self._pairs.get((pending[2], token[2]), _UNJOINED) if gap.isspace() else _UNJOINED
                if joined is not _UNJOINED:
                    units.append((pending[0], token[1], joined))
                    pending = None
                    continue
                units.append(pending)
            pending = token
        if pending is not None:
            units.append(pending)
        return units

    def mentions(self, caption: str) -> list[Mention]:
        """Every object mention in caption order (a category may appear several times)."""
        units = self._units(caption)
        present = {word for _, _, word in units}
        found = []
        for start, end, word in units:
            if word is None:
                continue  # a phrase that names no object ("train track")
            trigger = self.rules.dropped.get(word)
            if trigger is not None and trigger in present:
                continue  # e.g. "seat" in a caption with a toilet
            category = self.synonym_to_category.get(word)
            if category is not None:
                found.append(Mention(category, caption[start:end], start, end))
        return found

    def objects(self, caption: str) -> list[str]:
        """Unique categories mentioned, in order of first mention."""
        return list(dict.fromkeys(m.category for m in self.mentions(caption)))


def chair_vocabulary(mode: str = "reference"):
    """The packaged object extractor of a CHAIR mode (cached): ReferenceVocabulary or CocoVocabulary."""
    check_chair_mode(mode)
    if mode == "corrected":
        return CocoVocabulary.default()
    from sare_ds.eval.chair_reference import ReferenceVocabulary  # needs nltk; imported on demand

    return ReferenceVocabulary.default()


def check_chair_mode(mode: str, what: str = "chair mode") -> str:
    """`mode` if it is one of CHAIR_MODES, else a ValueError naming the value and the choices."""
    if mode not in CHAIR_MODES:
        raise ValueError(f"{what} {mode!r} is not a CHAIR mode; use `reference` (the published script, "
                         "comparable with published numbers) or `corrected` (sare_ds's fixes, not comparable)")
    return mode


@lru_cache(maxsize=1)
def _default_rules() -> PairRules:
    return PairRules.default()


@lru_cache(maxsize=1)
def _default_vocabulary() -> CocoVocabulary:
    ref = resources.files("sare_ds") / "resources" / "coco_synonyms.txt"
    with resources.as_file(ref) as path:
        return CocoVocabulary.from_file(path)
