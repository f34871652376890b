"""CHAIR mode `reference`: the published script's `caption_to_words`, mention for mention.

    vocab = ReferenceVocabulary.default()
    vocab.objects("Two buses and a bus.")   # ['bus']  (the singular "bus" becomes "bu" and is missed)
    vocab.mentions("A baby elephant.")      # [Mention(category='elephant', word='baby elephant', ...)]

What the published script (LisaAnne/Hallucination `utils/chair.py`, `CHAIR.caption_to_words`)
does with a caption, and what this class does in the same order:

1. `nltk.word_tokenize(caption.lower())` (sare_ds.eval.treebank: Punkt sentences, Treebank tokens);
2. `pattern.en.singularize` on every token (sare_ds.eval.singular);
3. left to right, two neighbouring tokens whose "first second" is in the two-word table become
   the table's word, and both tokens are consumed (resources/chair_reference_pairs.json);
4. if "toilet" is among the words, every "seat" is dropped;
5. the words that are entries of the synonym list are the mentions; the category is the first
   entry of the entry's line (a later line wins for an entry listed twice).

The synonym list is read as the script reads `data/synonyms.txt`: each line stripped, then cut
at ", " (comma + space). So " motor bike" (two spaces after the comma in the file) and
" cheesecake" keep a leading space and "iPhone" keeps its capital: no lower-cased token can be
equal to them, and the script never counts them. They are kept here on purpose
(resources/chair_reference_synonyms.txt is a byte-for-byte copy of the published file).

Output per caption is the script's: the list of matched words and of their categories, a
category repeated as often as it is mentioned. Character spans are added (the script keeps
token indices) by finding each matched token in the lower-cased caption from left to right.
"""
from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

from sare_ds.eval.singular import singularize
from sare_ds.eval.treebank import word_tokenize
from sare_ds.objects import Mention, RuleFileError, SynonymFileError


def pair_table(data: dict, source: str = "<pairs>") -> tuple[dict, dict]:
    """The script's double_word_dict ("first second" -> word) and its dropped words, from the JSON table."""
    for key in ("double_words", "qualifiers", "overrides"):
        if key not in data:
            raise RuleFileError(f"{source}: no `{key}`; the reference pair table needs double_words, qualifiers and "
                                "overrides (see sare_ds/resources/chair_reference_pairs.json)")
    table: dict[str, str] = {}
    for phrase in data["double_words"]:
        table[phrase] = phrase
    for k, group in enumerate(data["qualifiers"]):
        if not {"words", "nouns"} <= set(group):
            raise RuleFileError(f"{source}: qualifiers[{k}] needs `words` and `nouns` lists; add them")
        # the script fills the animal words for "baby" and "adult" together, then the vehicles
        for noun in group["nouns"]:
            for word in group["words"]:
                table[f"{word} {noun}"] = noun
    for k, entry in enumerate(data["overrides"]):
        if len(entry) != 2:
            raise RuleFileError(f"{source}: overrides[{k}] = {entry!r} is not [phrase, word]; fix the entry")
        table[entry[0]] = entry[1]
    dropped = {rule["word"]: rule["when_caption_has"] for rule in data.get("dropped_words", [])}
    return table, dropped


class ReferenceVocabulary:
    """The published CHAIR script's object extraction (see the module docstring)."""

    mode = "reference"

    def __init__(self, synonym_lines: list[str], pairs: dict, source: str = "<lines>"):
        self.source = source
        # exactly `[s.strip().split(', ') for s in open(...).readlines()]`
        lines = [line.strip().split(", ") for line in synonym_lines]
        self.categories: list[str] = []
        self.synonym_to_category: dict[str, str] = {}
        self.entries: set[str] = set()
        for line in lines:
            self.entries.update(line)
            if line[0] and line[0] not in self.categories:
                self.categories.append(line[0])
            for entry in line:
                self.synonym_to_category[entry] = line[0]
        if not self.categories:
            raise SynonymFileError(f"{source}: no categories; give one line per category: category, synonym, ...")
        self.pairs, self.dropped = pair_table(pairs, source)

    @classmethod
    def from_files(cls, synonyms: str | Path, pairs: str | Path) -> "ReferenceVocabulary":
        synonyms, pairs = Path(synonyms), Path(pairs)
        for path, what in ((synonyms, "synonyms file"), (pairs, "pair table")):
            if not path.is_file():
                raise FileNotFoundError(f"{what} {path} does not exist; the packaged ones are "
                                        "sare_ds/resources/chair_reference_synonyms.txt and chair_reference_pairs.json")
        try:
            table = json.loads(pairs.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise RuleFileError(f"{pairs}: not JSON ({e}); fix the file") from None
        # readlines() keeps "\n"; strip() in __init__ removes it, as in the script
        return cls(synonyms.read_text(encoding="utf-8").splitlines(keepends=True), table, str(synonyms))

    @classmethod
    def default(cls) -> "ReferenceVocabulary":
        """The packaged copy of the published synonyms file and the script's pair table; cached."""
        return _default_reference()

    def category_of(self, name: str) -> str | None:
        """Category of an entry, looked up exactly as the script does (no stripping, no lower-casing)."""
        return self.synonym_to_category.get(name)

    def caption_to_words(self, caption: str) -> tuple[list[str], list[str]]:
        """The script's `caption_to_words`: (matched words, their categories), in caption order."""
        words = [word for word, _ in self._words(caption)]
        return words, [self.synonym_to_category[word] for word in words]

    def _words(self, caption: str) -> list[tuple[str, tuple[int, int] | None]]:
        """Matched words with their (start, end) in the lower-cased caption."""
        lowered = caption.lower()
        tokens = word_tokenize(lowered)
        # spans: each token is searched from where the previous one ended; tokens the tokenizer
        # rewrote (quotes become `` and '') are not found and keep no span.
        spans, cursor = [], 0
        for token in tokens:
            at = lowered.find(token, cursor)
            if at < 0:
                spans.append(None)
            else:
                spans.append((at, at + len(token)))
                cursor = at + len(token)
        words = [singularize(t) for t in tokens]
        units: list[tuple[str, tuple[int, int] | None]] = []
        i = 0
        while i < len(words):
            joined = " ".join(words[i:i + 2])
            if joined in self.pairs:
                first, second = spans[i], spans[i + 1]
                span = (first[0], second[1]) if first and second else None
                units.append((self.pairs[joined], span))
                i += 2
            else:
                units.append((words[i], spans[i]))
                i += 1
        present = {word for word, _ in units}
        for word, trigger in self.dropped.items():
            if trigger in present and word in present:
                units = [u for u in units if u[0] != word]
        return [(word, span) for word, span in units if word in self.entries]

    def mentions(self, caption: str) -> list[Mention]:
        """Every object mention in caption order, with the caption's own text as `word` where a span is known."""
        out = []
        same_length = len(caption.lower()) == len(caption)  # spans index the original text only then
        for word, span in self._words(caption):
            start, end = span if (span and same_length) else (-1, -1)
            surface = caption[start:end] if start >= 0 else word
            out.append(Mention(self.synonym_to_category[word], surface, start, end))
        return out

    def objects(self, caption: str) -> list[str]:
        """Unique categories mentioned, in order of first mention."""
        return list(dict.fromkeys(m.category for m in self.mentions(caption)))


@lru_cache(maxsize=1)
def _default_reference() -> ReferenceVocabulary:
    root = resources.files("sare_ds") / "resources"
    with resources.as_file(root / "chair_reference_synonyms.txt") as syn, \
            resources.as_file(root / "chair_reference_pairs.json") as pairs:
        return ReferenceVocabulary.from_files(syn, pairs)
