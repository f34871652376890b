"""Writes tests/data/chair_parity.jsonl: the CHAIR parity corpus (tests/test_chair_parity.py).

    .venv/bin/python tests/data/make_chair_parity.py     # rewrites the .jsonl (deterministic)

Each caption is a long, MLLM-style description assembled from hand-written sentences. Every
phrase that names (or seems to name) an object carries its expected COCO categories in both
CHAIR modes, written by hand from the published script's rules (docs/evaluation.md, "CHAIR
modes") -- nothing here calls sare_ds. A caption's expectation is the concatenation of its
phrases' expectations, in order; the filler sentences around them name no object in either
mode (the tests would catch one that did). `CLASSES` documents, per class, which rule of the
published script gives the `reference` expectation and what `corrected` does instead.
"""
import json
import random
from pathlib import Path

# class -> (why, [(phrase, reference categories, corrected categories), ...])
CLASSES = {
    "singular_bus": (
        "pattern.en singularises 'bus' to 'bu' (final-s rule), also 'minibus' and 'airbus': the script "
        "never counts a singular bus; corrected counts it",
        [("a red double-decker bus parked by the curb", [], ["bus"]),
         ("a white minibus with tinted windows", [], ["bus"]),
         ("an Airbus jetliner climbing above the runway", ["airplane"], ["airplane", "airplane"]),
         ("a yellow school bus waiting at the corner", [], ["bus"]),
         ("a crowded Bus covered in colorful advertisements", [], ["bus"]),
         ("a bus stop with a glass shelter", [], ["bus"]),
         ("an articulated bus turning onto the avenue", [], ["bus"]),
         ("an old Airbus parked near the hangar", [], ["airplane"])]),
    "plural_bus": (
        "'buses' matches pattern's (bus)es rule and becomes 'bus': counted in both modes",
        [("two city buses lined up at the terminal", ["bus"], ["bus"]),
         ("several minibuses waiting for the next group", ["bus"], ["bus"]),
         ("a row of Buses parked along the depot wall", ["bus"], ["bus"])]),
    "ties": (
        "'ties' falls through pattern's -ie list (its '^tie' entry has a literal caret) to the -ies rule: 'ty', "
        "no object; corrected finds 'tie'. 'bow ties' -> 'bow ty': the pair does not join, 'bow' alone is a tie",
        [("a rack of silk ties in different patterns", [], ["tie"]),
         ("colorful ties hanging on a display stand", [], ["tie"]),
         ("groomsmen in matching bow ties", ["tie"], ["tie"]),
         ("a neatly knotted tie", ["tie"], ["tie"])]),
    "canoes": (
        "pattern's (o)es rule turns 'canoes' into 'cano', no object; corrected finds 'canoe' (boat)",
        [("three canoes pulled up on the sandy shore", [], ["boat"]),
         ("red canoes drifting near the dock", [], ["boat"]),
         ("a single canoe gliding across the lake", ["boat"], ["boat"]),
         ("kayaks and canoes stacked on a rack", ["boat"], ["boat", "boat"])]),
    "ie_plurals": (
        "pattern 3.6 returns words ending in one of its -ie words + 's' unchanged ('doggies', 'collies'), so the "
        "script misses them; corrected singularises to 'doggie' / 'collie' (dog)",
        [("two playful doggies chasing each other", [], ["dog"]),
         ("a pair of collies resting in the shade", [], ["dog"]),
         ("a fluffy collie sitting upright", ["dog"], ["dog"])]),
    "skies": (
        "'skies' -> 'sky' in pattern, no object; sare_ds used to reach 'ski' (skis) and corrected no longer does",
        [("clear blue skies stretching over the hills", [], []),
         ("stormy skies gathering above the rooftops", [], []),
         ("a pair of skis leaning against the fence", ["skis"], ["skis"]),
         ("a skier gliding under cloudless skies", ["person"], ["person"])]),
    "oclock": (
        "nltk keeps \"o'clock\" as one token (no clock) in both modes; with a curly apostrophe nltk splits "
        "o ’ clock, so the script counts a clock there and corrected does not",
        [("a tower clock showing ten o'clock", ["clock"], ["clock"]),
         ("what looks like about three o'clock in the afternoon", [], []),
         ("a sign announcing that the shop opens at nine o’clock", ["clock"], []),
         ("a wall clock that reads five o'clock", ["clock"], ["clock"])]),
    "no_space_after_period": (
        "a period followed by a letter is no sentence boundary and nltk keeps 'boat.there' as one token: the "
        "script misses the object, corrected splits at the period",
        [("a small fishing boat.There is also a wooden pier", [], ["boat"]),
         ("two sleeping cats.In the corner, a rug is visible", [], ["cat"]),
         ("a parked truck.The paint looks faded", [], ["truck"]),
         ("an open umbrella.Behind it, a fence runs along the path", [], ["umbrella"])]),
    "apostrophe_no_space": (
        "\"elephants'harnesses\" is one nltk token, no object; corrected splits at the apostrophe. With a space "
        "(\"elephants' harnesses\") nltk splits the possessive and both modes count",
        [("the elephants'harnesses decorated with tassels", [], ["elephant"]),
         ("the horses'manes braided with ribbons", [], ["horse"]),
         ("the elephants' harnesses decorated with bells", ["elephant"], ["elephant"]),
         ("the dog's red collar", ["dog"], ["dog"])]),
    "zero_width_space": (
        "U+200B is not white space for str.split, so nltk glues it to the word ('dog\u200b'): no object for the "
        "script; corrected splits at it. A no-break space (U+00A0) is white space: both modes count",
        [("a brown dog\u200b sitting on the grass", [], ["dog"]),
         ("a tabby\u200bcat curled up asleep", [], ["cat", "cat"]),
         ("three \u200bzebras grazing together", [], ["zebra"]),
         ("a sleepy\u00a0dog stretched out on the rug", ["dog"], ["dog"])]),
    "single_quotes": (
        "nltk 3.8.1 splits a leading single quote only before a one-letter word, so \"'dog\" stays one token, no "
        "object; corrected ignores quotes. Double quotes become `` '' tokens: both modes count",
        [("a banner reading 'dog park' above the gate", [], ["dog"]),
         ("a poster titled 'cats of the city' on the wall", [], ["cat"]),
         ("a mug printed with the words \"teddy bear\"", ["teddy bear"], ["teddy bear"]),
         ("a sign that says “hot dogs” in bold letters", ["hot dog"], ["hot dog"])]),
    "dashes": (
        "nltk 3.8.1 keeps an em dash inside the token ('dog—probably'), so the script misses both words; "
        "corrected splits at it. A spaced dash or a double hyphen separates words in both modes",
        [("a dog—probably a young terrier—trotting past", [], ["dog", "dog"]),
         ("a horse — a chestnut mare — grazing calmly", ["horse", "horse"], ["horse", "horse"]),
         ("a cat--possibly a tabby--watching from the window", ["cat", "cat"], ["cat", "cat"])]),
    "unmatchable_synonyms": (
        "the script reads ' motor bike' and ' cheesecake' with a leading space and 'iPhone' with a capital, so a "
        "lower-cased token never equals them ('motor bike' even consumes 'bike'); corrected strips and lower-cases",
        [("an iPhone resting on the armrest", [], ["cell phone"]),
         ("a slice of cheesecake with berries", [], ["cake"]),
         ("a vintage motor bike parked by the wall", [], ["motorcycle"]),
         ("a shiny motorbike with chrome details", ["motorcycle"], ["motorcycle"]),
         ("a classic motor cycle with a sidecar", ["motorcycle"], ["motorcycle"])]),
    "regular_plurals": (
        "plain -s / -es plurals: pattern's final-s and (x|ch|ss|sh)es rules reach the synonym; both modes count",
        [("two dogs running along the path", ["dog"], ["dog"]),
         ("three horses grazing in the meadow", ["horse"], ["horse"]),
         ("several benches facing the fountain", ["bench"], ["bench"]),
         ("a plate of sandwiches cut into triangles", ["sandwich"], ["sandwich"]),
         ("ripe bananas and apples in a basket", ["banana", "apple"], ["banana", "apple"]),
         ("a few giraffes reaching for the leaves", ["giraffe"], ["giraffe"]),
         ("colorful kites flying high overhead", ["kite"], ["kite"]),
         ("stacked bowls and cups on the counter", ["bowl", "cup"], ["bowl", "cup"]),
         ("ponies with braided tails", ["horse"], ["horse"]),
         ("taxis waiting outside the hotel", ["car"], ["car"]),
         ("toothbrushes standing in a glass", ["toothbrush"], ["toothbrush"]),
         ("microwaves lined up on a shelf", ["microwave"], ["microwave"])]),
    "irregular_plurals": (
        "pattern's irregular table (men, people, geese, oxen, children) and -ice / -ves rules; both modes count",
        [("two women chatting on the sidewalk", ["person"], ["person"]),
         ("a group of men unloading crates", ["person"], ["person"]),
         ("dozens of people crossing the square", ["person"], ["person"]),
         ("children playing near the swings", ["person"], ["person"]),
         ("a flock of geese crossing the road", ["bird"], ["bird"]),
         ("two computer mice beside the screen", ["laptop", "mouse"], ["laptop", "mouse"]),
         ("sharp knives on a magnetic strip", ["knife"], ["knife"]),
         ("a pair of oxen pulling a cart", ["cow"], ["cow"]),
         ("young calves huddled together", ["cow"], ["cow"])]),
    "two_word_objects": (
        "the script's two-word table joins neighbouring singularised words: 'hot dogs' -> 'hot dog', "
        "'wine glasses' -> 'wine glass', 'wine glass' -> 'wine glas' -> 'wine glass'; 'dining table' is no table "
        "entry, so its 'table' names the category; both modes count one mention",
        [("a couple of hot dogs with mustard", ["hot dog"], ["hot dog"]),
         ("a stuffed teddy bear on the pillow", ["teddy bear"], ["teddy bear"]),
         ("a red stop sign at the intersection", ["stop sign"], ["stop sign"]),
         ("a yellow fire hydrant on the sidewalk", ["fire hydrant"], ["fire hydrant"]),
         ("an old parking meter by the curb", ["parking meter"], ["parking meter"]),
         ("traffic lights glowing green", ["traffic light"], ["traffic light"]),
         ("a cell phone lying face down", ["cell phone"], ["cell phone"]),
         ("a tennis racket leaning on the net post", ["tennis racket"], ["tennis racket"]),
         ("a baseball bat and a baseball glove", ["baseball bat", "baseball glove"],
          ["baseball bat", "baseball glove"]),
         ("potted plants along the windowsill", ["potted plant"], ["potted plant"]),
         ("two wine glasses filled with red wine", ["wine glass"], ["wine glass"]),
         ("a single wine glass on the tray", ["wine glass"], ["wine glass"]),
         ("a long dining table set for dinner", ["dining table"], ["dining table"]),
         ("a hair drier on the vanity", ["hair drier"], ["hair drier"]),
         ("a laptop computer open on the desk", ["laptop", "dining table"], ["laptop", "dining table"]),
         ("a stove top oven with four burners", ["oven", "oven"], ["oven", "oven"])]),
    "qualifiers": (
        "'baby'/'adult' + animal and 'passenger' + jet/train are one word that is the animal/vehicle, not a "
        "person; 'baby animal' names nothing but consumes 'baby'",
        [("a baby elephant following its mother", ["elephant", "person"], ["elephant", "person"]),
         ("an adult giraffe and a baby giraffe", ["giraffe", "giraffe"], ["giraffe", "giraffe"]),
         ("a passenger train pulling into the station", ["train"], ["train"]),
         ("a passenger jet high above the clouds", ["airplane"], ["airplane"]),
         ("a baby asleep in a stroller", ["person"], ["person"]),
         ("a tiny baby animal hiding in the grass", [], []),
         ("passengers waiting on the platform", ["person"], ["person"])]),
    "phrases_without_object": (
        "'train track' and 'home plate' are table entries that name no object: 'train tracks' is no train",
        [("rusty train tracks curving into the distance", [], []),
         ("a freight train on the train tracks", ["train"], ["train"]),
         ("the catcher crouching behind home plate", [], [])]),
    "punctuation": (
        "commas without a space, ellipses, brackets and sentence-final objects are split off by the Treebank "
        "rules; both modes count",
        [("a cup,a spoon and a fork", ["cup", "spoon", "fork"], ["cup", "spoon", "fork"]),
         ("a cat... or perhaps a small dog", ["cat", "dog"], ["cat", "dog"]),
         ("(what appears to be a sheep)", ["sheep"], ["sheep"]),
         ("a large refrigerator (stainless steel, by the look of it)", ["refrigerator"], ["refrigerator"]),
         ("a vase of tulips, or so it seems", ["vase"], ["vase"]),
         ("what might be a bench! It is hard to tell", ["bench"], ["bench"]),
         ("a clock? Perhaps it is just a round sign", ["clock"], ["clock"]),
         ("a hot-dog stand and a dog-friendly cafe", [], [])]),
}
# Whole captions for the toilet/seat rule (a caption-wide rule, so not mixed with other phrases).
TOILET_CAPTIONS = [
    ("The bathroom is small but tidy. It has a white toilet with the seat raised, a pedestal sink and a round "
     "mirror. A wooden seat stands by the window, and a folded towel hangs on a hook.", ["toilet", "sink"],
     ["toilet", "sink"]),
    ("The photo shows a toilet seat lying on the tiled floor of a renovated bathroom. Tools and a bucket are "
     "scattered nearby, suggesting ongoing work.", ["toilet"], ["toilet"]),
    ("In this image, a padded seat and a folding chair are placed near the entrance of a quiet waiting room. "
     "The walls are painted a soft green.", ["chair", "chair"], ["chair", "chair"]),
    ("The seat of the toilet is closed, and a roll of paper sits on the tank. A small sink with a brass tap is "
     "to the right.", ["toilet", "sink"], ["toilet", "sink"]),
]

OPENERS = [
    "The image shows a lively scene captured on a bright afternoon.",
    "This photograph captures an everyday moment in a busy part of town.",
    "The picture presents a detailed view of a quiet neighborhood.",
    "In this image, the setting appears to be a sunny morning outdoors.",
    "The photo offers a wide view of a pleasant open space.",
    "This image depicts a calm and well-lit environment.",
    "The scene in the image is full of small details worth noticing.",
    "The photograph was taken from a slightly elevated angle.",
]
CONNECTORS = [
    "In the foreground, you can see {}.",
    "Nearby, there is {}.",
    "Off to the left, the image includes {}.",
    "Further back, the photo shows {}.",
    "On the right side of the frame, there is {}.",
    "Close to the center, you can spot {}.",
    "Behind that, the picture reveals {}.",
    "Along the edge of the frame, there is {}.",
]
MIDDLES = [
    "The colors are vivid, with shades of green, blue and yellow.",
    "Sunlight filters through the leaves and casts soft shadows on the ground.",
    "Tall buildings and leafy trees frame the view.",
    "The ground is covered with patches of grass and gravel.",
    "A few clouds drift slowly across the sky.",
    "The lighting suggests that it is late in the day.",
]
CLOSERS = [
    "Overall, the image conveys a relaxed and peaceful atmosphere.",
    "The composition draws the eye toward the middle of the frame.",
    "Altogether, it is an ordinary yet charming snapshot of daily life.",
    "The overall mood of the picture is calm and inviting.",
    "The background is slightly blurred, which keeps the focus on the main subjects.",
    "In summary, the photo is well balanced and full of interesting details.",
]


def caption(rng: random.Random, phrases: list) -> dict:
    sentences = [rng.choice(OPENERS)]
    connectors = rng.sample(CONNECTORS, len(phrases))
    for k, (text, _, _) in enumerate(phrases):
        sentences.append(connectors[k].format(text))
        if k == 0:
            sentences.append(rng.choice(MIDDLES))
    sentences.append(rng.choice(CLOSERS))
    return {"caption": " ".join(sentences),
            "reference": [c for _, ref, _ in phrases for c in ref],
            "corrected": [c for _, _, cor in phrases for c in cor]}


def main() -> None:
    rng = random.Random(14)
    shared = [p for name in ("regular_plurals", "irregular_plurals", "two_word_objects") for p in CLASSES[name][1]]
    rows = []
    for name, (_, phrases) in CLASSES.items():
        # every phrase of the class in several captions, next to one or two phrases of the shared classes
        for repeat in range(4):
            for phrase in phrases:
                company = rng.sample(shared, rng.choice((1, 2)))
                where = rng.randrange(len(company) + 1)
                chosen = company[:where] + [phrase] + company[where:]
                rows.append({"class": name, **caption(rng, chosen)})
    for text, ref, cor in TOILET_CAPTIONS:
        for _ in range(3):
            rows.append({"class": "toilet_seat", "caption": text, "reference": ref, "corrected": cor})
    for k, row in enumerate(rows):
        row["id"] = k
    out = Path(__file__).with_name("chair_parity.jsonl")
    out.write_text("".join(json.dumps({k: row[k] for k in ("id", "class", "caption", "reference", "corrected")},
                                      ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    print(f"{out}: {len(rows)} captions")


if __name__ == "__main__":
    main()
