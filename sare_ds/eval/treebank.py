"""The published CHAIR script's word splitting: `nltk.word_tokenize`, reproduced without data files.

    word_tokenize("a dog. the bus.there")   # ['a', 'dog', '.', 'the', 'bus.there']
    sentences("a dog. the cat")              # ['a dog.', 'the cat']

CHAIR's `caption_to_words` (LisaAnne/Hallucination `utils/chair.py`) runs
`nltk.word_tokenize(caption.lower())`. That function does two things:

1. splits the text into sentences with Punkt (`sent_tokenize`, which needs the trained English
   Punkt model from nltk_data, not downloadable here);
2. cuts every sentence into Penn Treebank tokens (`NLTKWordTokenizer`, regular expressions only).

The split matters for objects because the Treebank rules detach a period only at the *end* of
the string they are given: inside one string "boat. there" keeps the token "boat.", which names
no object, so a caption's objects depend on where Punkt put the sentence boundaries.

**Sentence split without the English model.** `sentences` runs nltk's own
`PunktSentenceTokenizer` (its boundary detection, closing-quote realignment and token
classification) with parameters written here instead of the trained ones. On lower-cased text
(CHAIR lower-cases before tokenising) the trained model decides a candidate boundary
(". ", "? ", "! " and a period followed by a bracket or quote) as follows, and so does this one:

- after an ordinary word, e.g. "dog.", "bus.": always a boundary (the model's learned
  collocations only pair numbers and initials with a following word);
- after a known abbreviation or an ellipsis: never a boundary when a lower-case word follows
  (the orthographic and frequent-sentence-starter tests only fire on a capitalised next word,
  and lower-cased text has none). `ABBREVIATIONS` lists common abbreviations of the English
  model; an abbreviation missing from it differs only in whether that abbreviation token
  keeps its period ("etc." is no abbreviation there either);
- after a number or an initial ("3.", "b."): no boundary before a lower-case word here; the
  English model agrees except before words its training text only ever showed in lower case
  at a sentence start, which again only changes the number or initial token.

None of these tokens (abbreviations, numbers, initials) is a word of CHAIR's synonym list, so
the objects found are the same as with the trained model. What no model changes: a period not
followed by white space ("boat.there") is never a boundary, and white space is what Python's
`str.split` calls white space (a zero-width space U+200B is not, so "dog\u200bsits" is one token).

**Word tokens, pinned to nltk 3.8.1.** `treebank_words` applies the Treebank stages of
`NLTKWordTokenizer` as they stood from nltk 3.6 to 3.8.1 (the CHAIR repository pins nltk 3.2.5,
whose rules were not compared here). Later nltk releases
changed three rules that change object mentions, so the installed nltk is *not* used for
this step: they split a leading single quote from any word ("'dog" -> "'", "dog"; 3.8.1 only
splits it before a single letter), split en/em dashes ("dog—cat"; 3.8.1 keeps one token) and
normalise white space before the clitic rules. tests/test_chair_reference.py checks these
stages against the installed `NLTKWordTokenizer` on every corpus sentence the changed rules
do not touch, and pins the three differences.
"""
from __future__ import annotations

import re
from functools import lru_cache

# -- sentence splitting -------------------------------------------------------------------

ABBREVIATIONS = frozenset({
    # titles, companies, streets, months, times and places: entries of the English Punkt
    # model that turn up in image descriptions (the model holds ~150, mostly newswire).
    "mr", "mrs", "ms", "dr", "prof", "jr", "sr", "st", "ave", "co", "corp", "inc", "ltd", "vs",
    "ft", "mg", "gen", "col", "lt", "maj", "sen", "rep", "jan", "feb", "aug", "sep", "sept", "oct", "nov",
    "dec", "a.m", "p.m", "u.s", "u.k", "u.n", "d.c",
})
"""Abbreviations whose period is no sentence boundary (lower case, without the final period)."""


@lru_cache(maxsize=1)
def _sentence_splitter():
    from nltk.tokenize.punkt import PunktLanguageVars, PunktParameters, PunktSentenceTokenizer

    class _Nltk381LanguageVars(PunktLanguageVars):
        # nltk 3.8.1's view of what may follow a sentence end: later releases also count curly
        # quotes and guillemets as closing punctuation, which moves boundaries after 'dog.”'.
        _re_non_word_chars = r"(?:[)\";}\]\*:@\'\({\[!?])"
        re_boundary_realignment = re.compile(r'["\')\]}]+?(?:\s+|(?=--)|$)', re.MULTILINE)

    params = PunktParameters()
    params.abbrev_types = set(ABBREVIATIONS)
    return PunktSentenceTokenizer(params, lang_vars=_Nltk381LanguageVars())


def sentences(text: str) -> list[str]:
    """Punkt's sentence split of (lower-cased) text, as nltk.sent_tokenize gives it; see above."""
    return _sentence_splitter().tokenize(text)


# -- Treebank word tokens (nltk 3.8.1 NLTKWordTokenizer) --------------------------------------

def _stage(*rules):
    return tuple((re.compile(pattern), replacement) for pattern, replacement in rules)


# 1. Opening quotes become the token ``; curly and French quotes and backquotes stand alone.
_OPENING_QUOTES = _stage(
    (r"([«“‘„]|[`]+)", r" \1 "),
    (r'^"', r"``"),
    (r"(``)", r" \1 "),
    (r"""([ ([{<])("|'{2})""", r"\1 `` "),
    # a single quote before a one-letter word ("'a") unless it starts a clitic ('s, 're ...)
    (r"(?i)(')(?!re|ve|ll|m|t|s|d|n)(\w)\b", r"\1 \2"),
)
# 2. Punctuation. The two "final period" rules only look at the end of the string: this is why
#    the sentence split decides whether "dog." loses its period.
_PUNCTUATION = _stage(
    (r"""([^.])(\.)([\]\)}>"'»”’ ]*)\s*$""", r"\1 \2 \3 "),
    (r"([:,])([^\d])", r" \1 \2"),              # comma/colon not between digits ("3,000" stays)
    (r"([:,])$", r" \1 "),
    (r"\.{2,}", r" \g<0> "),                     # ellipsis
    (r"[;@#$%&]", r" \g<0> "),
    (r"""([^.])(\.)([\]\)}>"']*)\s*$""", r"\1 \2\3 "),
    (r"[?!]", r" \g<0> "),
    (r"([^'])' ", r"\1 ' "),                    # closing single quote / plural possessive
    (r"[*]", r" \g<0> "),
)
_BRACKETS = _stage((r"[\]\[(){}<>]", r" \g<0> "), (r"--", r" -- "))
# 3. Closing quotes become ''; clitics split off ("dog's" -> "dog", "'s"; "don't" -> "do", "n't").
#    They need a space after them, which the padding around the text provides at its end.
_CLOSING_QUOTES = _stage(
    (r"([»”’])", r" \1 "),
    (r"''", " '' "),
    (r'"', " '' "),
    (r"([^' ])('[sS]|'[mM]|'[dD]|') ", r"\1 \2 "),
    (r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) ", r"\1 \2 "),
)
# 4. Robert MacIntyre's contractions: "cannot" -> "can", "not"; "'tis" -> "'t", "is" ...
_CONTRACTIONS = _stage(*[(p, r" \1 \2 ") for p in (
    r"(?i)\b(can)(not)\b", r"(?i)\b(d)('ye)\b", r"(?i)\b(gim)(me)\b", r"(?i)\b(gon)(na)\b",
    r"(?i)\b(got)(ta)\b", r"(?i)\b(lem)(me)\b", r"(?i)\b(more)('n)\b", r"(?i)\b(wan)(na)(?=\s)",
    r"(?i) ('t)(is)\b", r"(?i) ('t)(was)\b")])


def treebank_words(sentence: str) -> list[str]:
    """Treebank tokens of one sentence (nltk 3.8.1 `NLTKWordTokenizer().tokenize`)."""
    text = sentence
    for stage in (_OPENING_QUOTES, _PUNCTUATION, _BRACKETS):
        for pattern, replacement in stage:
            text = pattern.sub(replacement, text)
    text = f" {text} "
    for stage in (_CLOSING_QUOTES, _CONTRACTIONS):
        for pattern, replacement in stage:
            text = pattern.sub(replacement, text)
    return text.split()


def word_tokenize(text: str) -> list[str]:
    """`nltk.word_tokenize(text)` as the published CHAIR numbers saw it: sentences, then Treebank tokens."""
    return [token for sentence in sentences(text) for token in treebank_words(sentence)]
