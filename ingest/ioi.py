"""The IOI and ABC prompt distributions of the seed (Wang et al. 2022; Kissane et al. 2024).

IOI: "When Mary and John went to the store, John gave a drink to" -> " Mary" (the indirect
object, IO; the repeated name is the subject, S). ABBA puts IO first, BABA puts S first.
ABC: "Then, A and B went to the PLACE. C gave an OBJECT to" with three distinct names — the
seed's mean-ablation reference distribution.

Text is written once; the toy model's word-level tokenizer splits punctuation off, and GPT-2's
byte-level tokenizer reads the same sentences naturally.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

TEMPLATES = [
    "When {A} and {B} went to the {PLACE}, {C} gave {AN} {OBJECT} to",
    "Then, {A} and {B} went to the {PLACE}. {C} gave {AN} {OBJECT} to",
    "After {A} and {B} went to the {PLACE}, {C} gave {AN} {OBJECT} to",
    "While {A} and {B} were working at the {PLACE}, {C} gave {AN} {OBJECT} to",
    "When {A} and {B} got {AN} {OBJECT} at the {PLACE}, {C} decided to give it to",
]

# Single words, single tokens in the toy vocabulary; the GPT-2 lists are filtered at run time
# to those that are single GPT-2 tokens (with a leading space).
NAMES = ["Mary", "John", "Tom", "James", "Dan", "Sid", "Martin", "Amy", "Kate", "Alex", "Anna", "Paul",
         "Lisa", "Mark", "Sarah", "David", "Emma", "Jack", "Laura", "Mike", "Rose", "Sam", "Ben", "Claire"]
PLACES = ["store", "garden", "restaurant", "school", "hospital", "office", "house", "station", "park",
          "library"]
OBJECTS = ["drink", "ring", "kiss", "bone", "basketball", "computer", "necklace", "snack", "apple",
           "book"]
FILLER_TEMPLATES = [
    "{A} went to the {PLACE} and bought {AN} {OBJECT}.",
    "The {OBJECT} was at the {PLACE} with {A}.",
    "{A} saw {B} at the {PLACE} today.",
    "Then, {A} went to the {PLACE}. {B} found the {OBJECT} there.",
    "When {A} was at the {PLACE}, the {OBJECT} was gone.",
]


def article(noun: str) -> str:
    """The indefinite article of ``noun`` ("an apple", "a book"): by its first letter, which is right for
    every object of these lists."""
    return "an" if noun[:1].lower() in "aeiou" else "a"


def fill(template: str, *, OBJECT: str, **words: str) -> str:
    """``template`` with its words, the object's article included."""
    return template.format(OBJECT=OBJECT, AN=article(OBJECT), **words)


@dataclass
class IoiPrompt:
    """One generated prompt; ``answer`` is the correct next word (IO), or None for ABC/filler."""

    text: str
    answer: str | None
    meta: dict = field(default_factory=dict)


def ioi_prompt(rng: random.Random, names=NAMES, places=PLACES, objects=OBJECTS) -> IoiPrompt:
    io, s = rng.sample(names, 2)
    order = rng.choice(["ABBA", "BABA"])
    a, b = (io, s) if order == "ABBA" else (s, io)
    template = rng.randrange(len(TEMPLATES))
    text = fill(TEMPLATES[template], A=a, B=b, C=s, PLACE=rng.choice(places), OBJECT=rng.choice(objects))
    return IoiPrompt(text, io, {"task": "ioi", "order": order, "io": io, "s": s, "template": template})


def abc_prompt(rng: random.Random, names=NAMES, places=PLACES, objects=OBJECTS) -> IoiPrompt:
    a, b, c = rng.sample(names, 3)
    template = rng.randrange(len(TEMPLATES))
    text = fill(TEMPLATES[template], A=a, B=b, C=c, PLACE=rng.choice(places), OBJECT=rng.choice(objects))
    return IoiPrompt(text, None, {"task": "abc", "a": a, "b": b, "c": c, "template": template})


def filler_prompt(rng: random.Random, names=NAMES, places=PLACES, objects=OBJECTS) -> IoiPrompt:
    a, b = rng.sample(names, 2)
    text = fill(rng.choice(FILLER_TEMPLATES), A=a, B=b, PLACE=rng.choice(places), OBJECT=rng.choice(objects))
    return IoiPrompt(text, None, {"task": "filler"})


def name_positions(tokens: list[str], io: str, s: str) -> dict:
    """Token positions of IO, the first and second S, and the last token (the answer position)."""
    clean = [t.strip().lstrip("Ġ") for t in tokens]
    io_pos = [i for i, t in enumerate(clean) if t == io]
    s_pos = [i for i, t in enumerate(clean) if t == s]
    out = {"end_pos": len(tokens) - 1}
    if io_pos:
        out["io_pos"] = io_pos[0]
    if s_pos:
        out["s1_pos"] = s_pos[0]
    if len(s_pos) > 1:
        out["s2_pos"] = s_pos[1]
    return out
