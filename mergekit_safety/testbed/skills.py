"""Exact-match skills generated in code (seeded), short enough for ≤ 64-token examples.

Each skill maps a random input (drawn from small fixed vocabularies) to one exact answer.
Held-out evaluation inputs are drawn first and reserved, so no evaluation prompt occurs in any
training set. ``CANDIDATES`` holds every skill that was tried (see docs/testbed.md);
``EXPERT_SKILLS`` the ones the testbed's experts learn; ``GENERAL`` the replay skill.
"""

from __future__ import annotations

import random
from typing import Callable, Dict, List, Tuple

NOUNS = (
    "apple banana cherry grape lemon mango melon orange peach pear plum river mountain forest "
    "ocean desert island valley garden window door table chair pencil paper book candle mirror "
    "basket bottle cloud rain snow storm wind moon star planet tiger lion zebra horse rabbit "
    "monkey eagle parrot dolphin whale turtle piano guitar violin drum flute trumpet bread cheese "
    "butter honey coffee water lamp clock shoe hat coat ring bell boat train bus truck bridge "
    "castle tower farm village city road stone sand leaf tree flower grass seed egg milk soup"
).split()

CATEGORIES = {
    "fruit": "apple banana cherry grape lemon mango peach pear plum".split(),
    "animal": "tiger lion zebra horse rabbit monkey eagle parrot dolphin whale".split(),
    "instrument": "piano guitar violin drum flute trumpet harp".split(),
    "vehicle": "boat train bus truck bicycle car plane".split(),
    "color": "red blue green yellow purple black white".split(),
    "clothing": "shoe hat coat shirt scarf jacket sock".split(),
}
WORD_CATEGORY = {w: c for c, ws in CATEGORIES.items() for w in ws}

FRENCH = {
    "cat": "chat", "dog": "chien", "house": "maison", "water": "eau", "bread": "pain", "apple": "pomme",
    "tree": "arbre", "book": "livre", "car": "voiture", "sun": "soleil", "moon": "lune", "door": "porte",
    "table": "table", "chair": "chaise", "milk": "lait", "fish": "poisson", "bird": "oiseau", "flower": "fleur",
    "horse": "cheval", "city": "ville", "sea": "mer", "river": "rivière", "window": "fenêtre", "hand": "main",
    "red": "rouge", "green": "vert", "blue": "bleu", "big": "grand", "small": "petit", "cheese": "fromage",
}

NAMES = "Anna Ben Carla David Emma Felix Grace Hugo Iris Jack Lena Mario Nina Oscar Paula Quinn Rosa Sam Tara Victor".split()
CITIES = "Paris Berlin Madrid Rome Lisbon Vienna Prague Oslo Dublin Athens Warsaw Zurich".split()
MONTHS = "January February March April May June July August September October November December".split()

Gen = Callable[[random.Random], Tuple[Tuple, str, str]]  # rng -> (key, prompt, answer)


def _words(rng: random.Random, lo: int, hi: int, pool=NOUNS) -> List[str]:
    return rng.sample(pool, rng.randint(lo, hi))


def _reverse(rng):
    ws = _words(rng, 3, 5)
    return tuple(ws), f"Reverse the order of these words: {' '.join(ws)}", " ".join(reversed(ws))


def _copy(rng):
    ws = _words(rng, 3, 5)
    return tuple(ws), f"Repeat these words exactly: {' '.join(ws)}", " ".join(ws)


def _last_word(rng):
    ws = _words(rng, 3, 6)
    return tuple(ws), f"What is the last word of this list: {' '.join(ws)}? Answer with the word only.", ws[-1]


def _count(rng):
    ws = _words(rng, 2, 8)
    return tuple(ws), f"How many words are in this list: {' '.join(ws)}? Answer with a number.", str(len(ws))


def _category(rng):
    ws = rng.sample(sorted(WORD_CATEGORY), 3)
    return tuple(ws), f"Name the category of each word: {', '.join(ws)}", ", ".join(WORD_CATEGORY[w] for w in ws)


def _french(rng):
    ws = rng.sample(sorted(FRENCH), 3)
    return tuple(ws), f"Translate word by word into French: {' '.join(ws)}", " ".join(FRENCH[w] for w in ws)


def _acronym(rng):
    ws = _words(rng, 3, 5)
    return tuple(ws), f"Make an acronym from the first letters of: {' '.join(ws)}", "".join(w[0].upper() for w in ws)


def _json(rng):
    name, age, city = rng.choice(NAMES), rng.randint(18, 90), rng.choice(CITIES)
    return ((name, age, city), f"Write as JSON: name {name}, age {age}, city {city}",
            f'{{"name": "{name}", "age": {age}, "city": "{city}"}}')


def _date(rng):
    y, m, d = rng.randint(1950, 2030), rng.randint(1, 12), rng.randint(1, 28)
    return (y, m, d), f"Write the date {y}-{m:02d}-{d:02d} in words.", f"{MONTHS[m - 1]} {d}, {y}"


CANDIDATES: Dict[str, Gen] = {
    "reverse": _reverse, "last_word": _last_word, "count": _count, "category": _category, "french": _french,
    "acronym": _acronym, "json": _json, "date": _date, "copy": _copy,
}
EXPERT_SKILLS = ("json", "french", "category")  # chosen after the measurements in docs/testbed.md
GENERAL = "copy"


def normalize(text: str) -> str:
    """Exact match up to surrounding whitespace, a trailing full stop and surrounding quotes/backticks."""
    text = text.strip().strip("`").strip()
    if text.endswith(".") and not text.endswith(".."):
        text = text[:-1]
    return text.strip()


def correct(answer: str, reference: str) -> bool:
    return normalize(answer) == normalize(reference)


def make_records(skill: str, n: int, rng: random.Random, reserved: set) -> List[Dict[str, str]]:
    """``n`` distinct records of ``skill`` whose inputs are not in ``reserved`` (which is updated)."""
    gen = CANDIDATES[skill]
    records = []
    tries = 0
    while len(records) < n:
        key, prompt, answer = gen(rng)
        tries += 1
        if tries > 200 * n + 1000:
            raise ValueError(f"skill {skill}: cannot draw {n} distinct inputs")
        if (skill, key) in reserved:
            continue
        reserved.add((skill, key))
        records.append({"prompt": prompt, "response": answer, "skill": skill})
    return records
