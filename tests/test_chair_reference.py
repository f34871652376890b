"""The published CHAIR script's pieces, reproduced: nltk's word_tokenize, pattern's singularize, the tables.

    .venv/bin/python -m pytest tests/test_chair_reference.py -q
"""
import json
from importlib import resources
from pathlib import Path

import pytest
from nltk.tokenize import NLTKWordTokenizer

from sare_ds.eval.chair_reference import ReferenceVocabulary, pair_table
from sare_ds.eval.singular import IRREGULAR, singularize
from sare_ds.eval.treebank import sentences, treebank_words, word_tokenize
from sare_ds.objects import RuleFileError, chair_vocabulary

ROWS = [json.loads(line) for line in
        (Path(__file__).parent / "data" / "chair_parity.jsonl").read_text(encoding="utf-8").splitlines()]


def test_treebank_stages_match_installed_nltk_where_its_rules_did_not_change():
    # plain reference: nltk's own NLTKWordTokenizer, on every corpus sentence that has none of the
    # three inputs whose rules changed after nltk 3.8.1 (leading single quote, en/em dash, tab/newline)
    nltk_tok, compared = NLTKWordTokenizer(), 0
    for row in ROWS:
        for sentence in sentences(row["caption"].lower()):
            if any(ch in sentence for ch in "'—–\t\n"):
                continue
            assert treebank_words(sentence) == nltk_tok.tokenize(sentence), sentence
            compared += 1
    assert compared > 2000


def test_treebank_pins_nltk_381_where_later_nltk_differs():
    assert treebank_words("a banner reading 'dog park' here") == ["a", "banner", "reading", "'dog", "park", "'", "here"]
    assert treebank_words("a dog—probably a terrier") == ["a", "dog—probably", "a", "terrier"]
    assert treebank_words("'a cat' and the dog's bowl") == ["'", "a", "cat", "'", "and", "the", "dog", "'s", "bowl"]


@pytest.mark.parametrize("text, tokens", [
    # the sentence split decides whether "dog." loses its period
    ("a dog. the cat.", ["a", "dog", ".", "the", "cat", "."]),
    ("a boat.there is a pier.", ["a", "boat.there", "is", "a", "pier", "."]),
    ("a dog! a cat? yes.", ["a", "dog", "!", "a", "cat", "?", "yes", "."]),
    ("(a dog.) the end.", ["(", "a", "dog", ".", ")", "the", "end", "."]),
    ('he said "a dog." then left.', ["he", "said", "``", "a", "dog", ".", "''", "then", "left", "."]),
    # abbreviations keep their period and do not end a sentence before a lower-case word
    ("mr. smith walks his dog on st. mark's square at 3 p.m. today.",
     ["mr.", "smith", "walks", "his", "dog", "on", "st.", "mark", "'s", "square", "at", "3", "p.m.", "today", "."]),
    ("a dog... and a cat", ["a", "dog", "...", "and", "a", "cat"]),
    ("it is 3 o'clock, elephants'harnesses", ["it", "is", "3", "o'clock", ",", "elephants'harnesses"]),
    ("a dog\u200b sits", ["a", "dog\u200b", "sits"]),
    ("a cup,a spoon; cannot stop", ["a", "cup", ",", "a", "spoon", ";", "can", "not", "stop"]),
])
def test_word_tokenize(text, tokens):
    assert word_tokenize(text) == tokens


@pytest.mark.parametrize("word, singular", [
    ("bus", "bu"), ("minibus", "minibu"), ("airbus", "airbu"), ("buses", "bus"), ("ties", "ty"), ("tie", "tie"),
    ("canoes", "cano"), ("skies", "sky"), ("skis", "ski"), ("glass", "glas"), ("glasses", "glass"),
    ("doggies", "doggies"), ("collies", "collies"), ("people", "person"), ("women", "woman"), ("policemen", "policeman"),
    ("geese", "goose"), ("mice", "mouse"), ("oxen", "ox"), ("knives", "knife"), ("calves", "calf"), ("wolves", "wolf"),
    ("gloves", "glove"), ("microwaves", "microwave"), ("scissors", "scissors"), ("sheep", "sheep"), ("ski", "ski"),
    ("broccoli", "broccoli"), ("taxis", "taxi"), ("buffaloes", "buffalo"), ("ponies", "pony"), ("trolleys", "trolley"),
    ("sandwiches", "sandwich"), ("dogs'", "dog's"), ("mothers-in-law", "mother-in-law"), ("four", "fmy"),
    ("elephants'harnesses", "elephants'harness"), ("o'clock", "o'clock"), ("'s", "'"), ("ice", "ice"),
    ("bases", "basis"), ("cacti", "cactus"), ("criteria", "criterium"), ("'cats", "'cat"),
])
def test_singularize_follows_pattern_rules(word, singular):
    assert singularize(word) == singular


def test_irregular_order_cannot_matter():
    assert not [(a, b) for a in IRREGULAR for b in IRREGULAR if a != b and a.endswith(b)]


def test_synonyms_are_read_as_the_script_reads_them():
    vocab = ReferenceVocabulary.default()
    packaged = (resources.files("sare_ds") / "resources" / "chair_reference_synonyms.txt").read_bytes()
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "chair" / "synonyms.txt"
    if shared.is_file():  # the published file, where the checkout has it: byte-for-byte the same
        assert packaged == shared.read_bytes()
    assert len(vocab.categories) == 80 and vocab.categories[0] == "person" and vocab.categories[-1] == "toothbrush"
    # entries that can never equal a lower-cased token, kept on purpose
    assert {" motor bike", " cheesecake", "iPhone"} <= vocab.entries
    assert not {"motor bike", "cheesecake", "iphone"} & vocab.entries
    assert vocab.category_of("dining table") == "dining table" and vocab.category_of("Dining Table") is None


def test_pair_table_is_the_scripts():
    vocab = ReferenceVocabulary.default()
    assert vocab.pairs["bow tie"] == "tie" and vocab.pairs["toilet seat"] == "toilet"
    assert vocab.pairs["wine glas"] == "wine glass" and vocab.pairs["train track"] == "train track"
    assert vocab.pairs["baby cub"] == "cub" and vocab.pairs["passenger jet"] == "jet"
    assert "dining table" not in vocab.pairs and "stove top oven" in vocab.pairs  # as in the script
    assert len(vocab.pairs) == 27 + 24 + 2 + 2  # distinct double words + animals + vehicles + overrides not in them
    assert vocab.caption_to_words("A passenger jet over two buses and a bus.") == (["jet", "bus"], ["airplane", "bus"])
    with pytest.raises(RuleFileError, match="needs double_words"):
        pair_table({"qualifiers": []})


def test_modes_are_named_and_checked():
    assert chair_vocabulary().mode == "reference" and chair_vocabulary("corrected").mode == "corrected"
    with pytest.raises(ValueError, match="'published' is not a CHAIR mode; use `reference`"):
        chair_vocabulary("published")
