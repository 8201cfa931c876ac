"""Haystacks for the demo model's retrieval prompts: real prose, generated prose and the two seed filler styles.

Why: a model trained on one or two filler styles learns the filler, not retrieval; trained on varied text and
measured on a source it never saw, its accuracy means something. The real prose is the Python documentation,
snapshotted in bench/haystack_data/ by tools/build_haystacks.py (sources and licence in that folder's README):

- ``pydoc``     training: the language-reference topics;
- ``generated`` training: sentences from a small seeded grammar (with numbers, so digits in the filler are normal);
- ``mixed``     training: runs of a few sentences from each training source in turn, within one prompt;
- ``stdlib``    held out: standard-library docstrings; training never reads it (``TRAINING_STYLES`` excludes it).

A filler of n sentences is a contiguous run from a random start (real text reads as text), chosen by the caller's
seeded ``random.Random``. Stdlib only: the bench CLI imports this at parse time.
"""
from __future__ import annotations

import functools
import gzip
import random
from pathlib import Path

DATA = Path(__file__).resolve().parent / "haystack_data"
PROSE_SOURCES = ("pydoc", "stdlib")
HELD_OUT = "stdlib"
TRAINING_STYLES = ("qwen", "varied", "pydoc", "generated", "mixed")
ALL_STYLES = TRAINING_STYLES + (HELD_OUT,)


@functools.lru_cache(maxsize=None)
def prose(name: str) -> tuple[str, ...]:
    """The sentences of one snapshotted prose source."""
    if name not in PROSE_SOURCES:
        raise ValueError(f"unknown prose source {name!r} (expected one of {', '.join(PROSE_SOURCES)})")
    with gzip.open(DATA / f"{name}.txt.gz", "rt", encoding="utf-8") as f:
        return tuple(line.rstrip("\n") for line in f if line.strip())


def contiguous(sentences: tuple[str, ...], rng: random.Random, n: int) -> list[str]:
    start = rng.randrange(len(sentences))
    return [sentences[(start + i) % len(sentences)] for i in range(n)]


# ---------------------------------------------------------------- generated prose
_SUBJECTS = ["the old farmer", "a young teacher", "the city council", "my neighbour", "the small company",
             "a tired traveller", "the museum guide", "our team", "the ship's captain", "a quiet student",
             "the village baker", "the night nurse", "an engineer", "the radio host", "the gardener",
             "a group of hikers", "the librarian", "the new manager", "a street musician", "the pilot"]
_VERBS = ["repaired", "painted", "visited", "described", "carried", "ordered", "measured", "cleaned",
          "forgot", "found", "sold", "borrowed", "watched", "opened", "planned", "wrote about", "photographed",
          "moved", "checked", "mentioned"]
_OBJECTS = ["the wooden fence", "a red bicycle", "the east window", "an old map", "the kitchen table",
            "a box of apples", "the stone bridge", "a long letter", "the broken lamp", "the north field",
            "a pair of boots", "the harbour wall", "the spare key", "a bag of flour", "the garden gate",
            "the train schedule", "a jar of honey", "the roof tiles", "a blue umbrella", "the last chapter"]
_TAILS = ["before the rain started", "on a cold morning", "after lunch", "without saying a word",
          "for the second time", "near the market", "late in the evening", "with great care", "in a hurry",
          "during the holidays", "as the sun went down", "at the end of the week", "while the kettle boiled",
          "in the small town", "before anyone noticed", "under a grey sky"]
_FACTS = ["The bus to the coast leaves every {n} minutes.", "The hall has room for {n} people.",
          "The bridge is {n} metres long.", "About {n} birds nest on the cliffs each spring.",
          "The recipe needs {n} grams of sugar.", "The library keeps {n} old maps.",
          "The road climbs for {n} kilometres.", "The festival ran for {n} days."]


def generated(rng: random.Random, n: int) -> list[str]:
    """n sentences of a seeded grammar: everyday events, and now and then a fact with a number in it."""
    out = []
    for _ in range(n):
        if rng.random() < 0.12:
            out.append(rng.choice(_FACTS).format(n=rng.randint(2, 950)))
        else:
            s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}."
            out.append(s[0].upper() + s[1:])
    return out


def mixed(rng: random.Random, n: int, simple: list[str]) -> list[str]:
    """Runs of 3-12 sentences from the training sources in turn (``simple`` is the sentence pool of the
    "varied" style), so one prompt changes style several times."""
    out: list[str] = []
    while len(out) < n:
        k = min(n - len(out), rng.randint(3, 12))
        source = rng.choice(("pydoc", "generated", "varied"))
        if source == "pydoc":
            out += contiguous(prose("pydoc"), rng, k)
        elif source == "generated":
            out += generated(rng, k)
        else:
            out += [rng.choice(simple) for _ in range(k)]
    return out
