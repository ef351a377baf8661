"""Needles for long-context retrieval: a pass key or a fact hidden at some depth of a haystack text,
the question that asks for it, the reply that answers it, and exact-match scoring.

Shared by the needle-in-a-haystack harness (niah.py) and the long-context training data
(train/long_context.py), so that the model is tested on the phrasing it was trained on. A needle is
placed at a sentence boundary at or before its depth (0.0: the start of the text, 1.0: the end), as
in the original "needle in a haystack" test.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

KINDS = ("passkey", "fact")
_SUBJECTS = ("the blue door", "the old lighthouse", "the red notebook", "the north gate", "the glass tower",
             "the silver key", "the green boat", "the quiet library", "the stone bridge", "the paper kite",
             "the iron clock", "the hidden garden")
_FACTS = {  # attribute -> values; one word each, so that a reply either names it or does not
    "secret colour": ("amber", "crimson", "indigo", "olive", "scarlet", "teal", "violet", "ivory", "maroon"),
    "secret fruit": ("apricot", "mango", "plum", "cherry", "lemon", "papaya", "quince", "melon", "fig"),
    "secret animal": ("otter", "falcon", "badger", "heron", "lynx", "walrus", "gecko", "bison", "raven"),
    "secret city": ("Lisbon", "Oslo", "Nairobi", "Quito", "Hanoi", "Dublin", "Lima", "Cairo", "Kyoto"),
}


@dataclass(frozen=True)
class Needle:
    text: str  # the sentence hidden in the haystack
    question: str
    answer: str  # the reply the training data teaches
    value: str  # what a reply must contain, as a whole word, to score 1


def make_needle(kind: str, rng: random.Random) -> Needle:
    if kind == "passkey":
        key = str(rng.randrange(10000, 100000))
        return Needle(f"The pass key is {key}. Remember it. {key} is the pass key.", "What is the pass key?",
                      f"The pass key is {key}.", key)
    if kind == "fact":
        attribute = rng.choice(sorted(_FACTS))
        subject, value = rng.choice(_SUBJECTS), rng.choice(_FACTS[attribute])
        return Needle(f"The {attribute} of {subject} is {value}.", f"What is the {attribute} of {subject}?",
                      f"The {attribute} of {subject} is {value}.", value)
    raise ValueError(f"unknown needle kind {kind!r} (known: {', '.join(KINDS)})")


def insert_needle(haystack: str, needle: str, depth: float) -> str:
    """The haystack with the needle sentence inserted at the last sentence or line end at or before
    depth * len(haystack) (the start when there is none)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    cut = int(round(depth * len(haystack)))
    if cut < len(haystack):
        ends = [haystack.rfind(mark, 0, cut) for mark in (". ", ".\n", "\n")]
        cut = max(ends) + 1 if max(ends) >= 0 else 0
    before, after = haystack[:cut].rstrip(" "), haystack[cut:].lstrip(" ")
    if before and not before.endswith("\n"):
        before += " "
    return before + needle + (" " + after if after else "")


def retrieval_prompt(haystack_with_needle: str, needle: Needle) -> str:
    """The user message: the text, then the question."""
    return f"{haystack_with_needle}\n\n{needle.question}"


def score(reply: str, needle: Needle) -> float:
    """Exact match: 1.0 if the needle's value appears in the reply as a whole word, else 0.0."""
    return 1.0 if re.search(rf"(?<![\w]){re.escape(needle.value)}(?![\w])", reply) else 0.0
