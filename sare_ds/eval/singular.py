"""pattern.en's `singularize`, as the published CHAIR script calls it, reproduced offline.

    singularize("buses")   # 'bus'
    singularize("bus")     # 'bu'    (the script never counts a singular bus)
    singularize("ties")    # 'ty'    (nor plural ties)

CHAIR's `caption_to_words` singularises every token with `pattern.en.singularize` (pattern 3.6,
the version in the CHAIR repository's requirements.txt; its singulariser is unchanged from
pattern 2.6). pattern is not installable here, so its behaviour is re-stated below from
pattern's published rules (clips/pattern, `pattern/text/en/inflect.py`, "SINGULARIZE", adapted
there from Bermi Ferrer's Inflector). The order of the checks is pattern's:

1. a hyphenated compound whose second part is a preposition ("mothers-in-law") singularises
   its first part;
2. a word ending in an apostrophe ("dogs'") becomes the singular + "'s";
3. a word that is the *end* of an uninflected or uncountable word ("sheep"... and also "s",
   "ice" or "ad", because the test is `known.endswith(word)`) is returned unchanged;
4. a word ending in one of the -ie words + "s" ("doggies", "collies", "cookies") is returned
   *as it is*, plural: pattern 3.6 returns the lower-cased input there (pattern 2.6 returned
   the -ie word). This is why the script never counts "doggies" or "collies" as dogs;
5. a word ending in an irregular plural ("men", "people", "geese", "oxen") gets the singular;
6. otherwise the first matching suffix rule applies; the last one drops a final "s", which
   gives the quirks the script is known for: "bus" -> "bu", "glass" -> "glas" (hence the
   script's "wine glas" pair), "ties" -> "ty", "canoes" -> "cano", "skies" -> "sky".

Every quirk is kept on purpose: reference mode must give the published script's counts.
"""
from __future__ import annotations

import re

PREPOSITIONS = frozenset(
    "about before during of till above behind except off to across below for on under after beneath from "
    "onto until among beside in out unto around besides into over upon at between near since with athwart "
    "betwixt beyond but by".split())
"""Second parts of compounds whose first part is the noun ("mother-in-law")."""

UNINFLECTED = frozenset(
    "bison debris headquarters pincers trout bream diabetes herpes pliers tuna breeches djinn high-jinks "
    "proceedings whiting britches eland homework rabies wildebeest carp elk innings salmon chassis flounder "
    "jackanapes scissors christmas gallows mackerel series clippers georgia measles shears cod graffiti mews "
    "species contretemps mumps swine corps news swiss".split())
UNCOUNTABLE = frozenset(
    "advice equipment happiness luggage news software bread fruit information mathematics progress "
    "understanding butter furniture ketchup mayonnaise research water cheese garbage knowledge meat rice "
    "electricity gravel love mustard sand".split())
# pattern lists "^pie" and "^tie" here; the caret is a literal character in an endswith test,
# so those two entries never match (and "ties" falls through to the -ies rule: "ty").
IE_WORDS = frozenset(
    "alergie cutie hoagie newbie softie veggie auntie doggie hottie nightie sortie weenie beanie eyrie indie "
    "oldie stoolie yuppie birdie freebie junkie ^pie sweetie zombie bogie goonie laddie pixie techie bombie "
    "groupie laramie quickie ^tie collie hankie lingerie reverie toughie cookie hippie meanie rookie "
    "valkyrie".split())
# No key is the end of another key, so the order in which they are tried cannot matter (tested).
IRREGULAR = {
    "atlantes": "atlas", "atlases": "atlas", "axes": "axe", "beeves": "beef", "brethren": "brother",
    "children": "child", "corpora": "corpus", "corpuses": "corpus", "ephemerides": "ephemeris", "feet": "foot",
    "ganglia": "ganglion", "geese": "goose", "genera": "genus", "genii": "genie", "graffiti": "graffito",
    "helves": "helve", "kine": "cow", "leaves": "leaf", "loaves": "loaf", "men": "man", "mongooses": "mongoose",
    "monies": "money", "moves": "move", "mythoi": "mythos", "numena": "numen", "occipita": "occiput",
    "octopodes": "octopus", "opera": "opus", "opuses": "opus", "our": "my", "oxen": "ox", "penes": "penis",
    "penises": "penis", "people": "person", "sexes": "sex", "soliloquies": "soliloquy", "teeth": "tooth",
    "testes": "testis", "trilbys": "trilby", "turves": "turf", "zoa": "zoon",
}
# (pattern, replacement), first match wins. Kept as pattern wrote them, oddities included:
# "[octop|vir]" is a character class, "^(ox)en" has no end anchor, some rules are case-sensitive.
SUFFIX_RULES = tuple((re.compile(p), r) for p, r in (
    (r"(?i)(.)ae$", r"\1a"),
    (r"(?i)(.)itis$", r"\1itis"),
    (r"(?i)(.)eaux$", r"\1eau"),
    (r"(?i)(quiz)zes$", r"\1"),
    (r"(?i)(matr)ices$", r"\1ix"),
    (r"(?i)(ap|vert|ind)ices$", r"\1ex"),
    (r"(?i)^(ox)en", r"\1"),
    (r"(?i)(alias|status)es$", r"\1"),
    (r"(?i)([octop|vir])i$", r"\1us"),
    (r"(?i)(cris|ax|test)es$", r"\1is"),
    (r"(?i)(shoe)s$", r"\1"),
    (r"(?i)(o)es$", r"\1"),
    (r"(?i)(bus)es$", r"\1"),
    (r"(?i)([m|l])ice$", r"\1ouse"),
    (r"(?i)(x|ch|ss|sh)es$", r"\1"),
    (r"(?i)(m)ovies$", r"\1ovie"),
    (r"(?i)(.)ombies$", r"\1ombie"),
    (r"(?i)(s)eries$", r"\1eries"),
    (r"(?i)([^aeiouy]|qu)ies$", r"\1y"),
    # -f / -fe words that take -ves in the plural
    (r"([aeo]l)ves$", r"\1f"),
    (r"([^d]ea)ves$", r"\1f"),
    (r"arves$", r"arf"),
    (r"erves$", r"erve"),
    (r"([nlw]i)ves$", r"\1fe"),
    (r"(?i)([lr])ves$", r"\1f"),
    (r"([aeo])ves$", r"\1ve"),
    (r"(?i)(sive)s$", r"\1"),
    (r"(?i)(tive)s$", r"\1"),
    (r"(?i)(hive)s$", r"\1"),
    (r"(?i)([^f])ves$", r"\1fe"),
    # -ses
    (r"(?i)(^analy)ses$", r"\1sis"),
    (r"(?i)((a)naly|(b)a|(d)iagno|(p)arenthe|(p)rogno|(s)ynop|(t)he)ses$", r"\1\2sis"),
    (r"(?i)(.)opses$", r"\1opsis"),
    (r"(?i)(.)yses$", r"\1ysis"),
    (r"(?i)(h|d|r|o|n|b|cl|p)oses$", r"\1ose"),
    (r"(?i)(fruct|gluc|galact|lact|ket|malt|rib|sacchar|cellul)ose$", r"\1ose"),
    (r"(?i)(.)oses$", r"\1osis"),
    # -a
    (r"(?i)([ti])a$", r"\1um"),
    (r"(?i)(n)ews$", r"\1ews"),
    (r"(?i)s$", ""),
))


def singularize(word: str) -> str:
    """pattern.en 3.6 `singularize(word)` (noun); see the module docstring for the order of checks."""
    if "-" in word:
        parts = word.split("-")
        if len(parts) > 1 and parts[1] in PREPOSITIONS:
            return singularize(parts[0]) + "-" + "-".join(parts[1:])
    if word.endswith("'"):
        return singularize(word[:-1]) + "'s"
    lower = word.lower()
    if any(known.endswith(lower) for known in UNINFLECTED) or any(known.endswith(lower) for known in UNCOUNTABLE):
        return word
    if any(lower.endswith(ie + "s") for ie in IE_WORDS):
        return lower  # pattern 3.6 returns the (lower-cased) plural itself here
    for plural, singular in IRREGULAR.items():
        if lower.endswith(plural):
            return re.sub("(?i)" + plural + "$", singular, word)
    for pattern, replacement in SUFFIX_RULES:
        if pattern.search(word):
            # Python fills a group that did not take part in the match with "", as pattern does by hand.
            return pattern.sub(replacement, word)
    return word
