"""Synthetic long-context retrieval prompts shared by the demo model's trainer and the passkey bench.

Three tasks, all in the style of the Qwen2.5-1M passkey example: (1) a pass key (digits, a word or a
letters-and-digits code, in one of several wordings) hidden at a given depth inside irrelevant filler text,
(2) a key-value lookup where several "code for the <item>" records (the decoys) are scattered in the filler
and the question asks for one of them, and (3) the passkey prompt without a key, answered "There is no pass
key in the text.". The fillers are in bench/haystacks.py. Prompts are sized in
*tokens* of the caller's tokenizer (passed in as a counting function) so a length grid means what it
says. Stdlib only: the bench CLI imports this at parse time.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from longserve.bench import haystacks as hs

PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. "
                 "Find it and memorize it. I will quiz you about the important information there.\n\n")
PASSKEY_QUESTION = "\nWhat is the pass key?"
KV_INTRO = ("Some records are hidden inside a lot of irrelevant text. Each record gives the code of one "
            "item. Find them and memorize them. I will ask you about one of them.\n\n")

# The seed prompt's filler, repeated block by block (as in the Qwen2.5-1M example).
QWEN_FILLER = ["The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
               "There and back again."]

FILLER_SENTENCES = [
    "The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.",
    "The river runs to the sea.", "A cat sleeps on the warm mat.", "The wind moves the tall trees.",
    "Rain falls on the quiet town.", "The old man walks his dog.", "Birds sing in the early morning.",
    "The train leaves at noon.", "Children play in the park.", "The moon rises over the hills.",
    "A small boat drifts on the lake.", "The bakery smells of fresh bread.", "Snow covers the mountain top.",
    "The clock on the wall is slow.", "Leaves turn red in the autumn.", "The road goes on and on.",
    "A farmer plants seeds in spring.", "The library is open late today.", "Waves crash against the rocks.",
    "The kettle whistles in the kitchen.", "Stars shine on a clear night.", "The market is busy on Sunday.",
    "A gentle breeze comes from the west.", "The door creaks when it opens.", "Fish swim under the bridge.",
    "The painter mixes blue and white.", "Clouds gather before the storm.", "The bell rings at the school.",
    "A fox runs across the field.", "The lamp lights up the room.", "Bees fly from flower to flower.",
    "The garden needs some water.", "An owl watches from the branch.", "The bus is late again.",
    "Tea is served in the afternoon.", "The forest is dark and deep.", "A letter arrives in the mail.",
    "The baker wakes before dawn.", "Ships wait in the harbor.", "The path winds through the woods.",
    "A dog barks at the mailman.", "The city sleeps under the rain.", "Music plays in the next room.",
    "The candle burns down slowly.", "Horses graze in the meadow.", "The bridge crosses a wide river.",
]

KV_ITEMS = [
    "apple", "river", "tiger", "violin", "garden", "rocket", "candle", "island", "pepper", "mirror",
    "falcon", "lemon", "castle", "anchor", "basket", "copper", "dragon", "forest", "ginger", "hammer",
    "jacket", "kettle", "ladder", "marble", "needle", "orange", "parrot", "quartz", "rabbit", "saddle",
    "tomato", "velvet", "walnut", "yellow", "zebra", "bridge", "cherry", "donkey", "engine", "feather",
    "guitar", "helmet", "igloo", "jungle", "koala", "lantern", "meadow", "napkin", "otter", "pillow",
]


@dataclass(frozen=True)
class Sample:
    """One chat-style retrieval example: the user prompt, the reference answer and the value to find."""
    task: str          # "passkey" or "kv"
    prompt: str        # user message text
    answer: str        # the assistant reply the model is trained to give
    target: str        # the digits that must appear (exact match)
    depth: float       # fraction of the filler placed before the needle


def training_length(model_dir) -> int:
    """The training length T of a model made by tools/train_demo_model.py: the last stage's ``seq_len`` in its
    train_args.json. (DCA's chunk_size is a separate, measured choice and may be below T.)"""
    meta = json.loads((Path(model_dir) / "train_args.json").read_text())
    return int((meta["stages"][-1] if "stages" in meta else meta)["seq_len"])


def chat_prompt(user: str) -> str:
    """The demo model's ChatML template applied to one user turn, ending where the assistant starts."""
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def random_digits(rng: random.Random, n: int) -> str:
    """An n-digit number without a leading zero (so its spoken value has exactly n digits)."""
    if n < 1:
        raise ValueError("key length must be >= 1")
    return str(rng.randint(1, 9)) + "".join(str(rng.randint(0, 9)) for _ in range(n - 1))


def filler_sentences(rng: random.Random, n: int, style: str) -> list[str]:
    """n filler sentences: "qwen" repeats the seed block in order, "varied" samples the pool; the other styles
    are the haystacks of bench/haystacks.py (real prose, generated prose, a mix, and the held-out source)."""
    if style == "qwen":
        return [QWEN_FILLER[i % len(QWEN_FILLER)] for i in range(n)]
    if style == "varied":
        return [rng.choice(FILLER_SENTENCES) for _ in range(n)]
    if style in hs.PROSE_SOURCES:
        return hs.contiguous(hs.prose(style), rng, n)
    if style == "generated":
        return hs.generated(rng, n)
    if style == "mixed":
        return hs.mixed(rng, n, FILLER_SENTENCES)
    raise ValueError(f"unknown filler style {style!r} (expected one of {', '.join(hs.ALL_STYLES)})")


def _join(sentences: list[str]) -> str:
    return "".join(s + " " for s in sentences)


# Needle wordings: the seed prompt's first; training draws among NEEDLES, the suite also asks with NEEDLE_UNSEEN.
NEEDLES = [
    "The pass key is {k}. Remember it. {k} is the pass key.\n",
    "Remember this: the pass key is {k}.\n",
    "Note well, the pass key is {k}. Keep it in mind.\n",
    "Here is the important info: the pass key is {k}.\n",
    "The secret pass key is {k}. Do not forget it.\n",
    "Important: {k} is the pass key. Memorize it.\n",
]
NEEDLE_UNSEEN = "Listen carefully, because the pass key is {k} and you will need it later.\n"
NO_KEY_ANSWER = "There is no pass key in the text."
VALUE_KINDS = ("digits", "word", "mixed")
VALUE_WORDS = [
    "amber", "balloon", "cactus", "dolphin", "eclipse", "fountain", "glacier", "harbor", "iris", "jasmine",
    "kayak", "lighthouse", "mango", "nectar", "orchid", "pebble", "quill", "raven", "sapphire", "thistle",
    "umbrella", "volcano", "whistle", "yarn", "zephyr", "biscuit", "canyon", "dandelion", "emerald", "flamingo",
    "gazelle", "hazel", "indigo", "juniper", "kiwi", "lavender", "magnet", "nutmeg", "olive", "penguin",
    "raisin", "saffron", "tulip", "walrus", "cobalt", "pumpkin", "sparrow", "tangerine", "compass", "pretzel",
]
_MIXED_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ"


def random_value(rng: random.Random, kind: str, digits: int = 5) -> str:
    """A needle value: an n-digit number, a word, or a 5-7 character code of capitals and digits with at least
    one of each."""
    if kind == "digits":
        return random_digits(rng, digits)
    if kind == "word":
        return rng.choice(VALUE_WORDS)
    if kind == "mixed":
        n = rng.randint(5, 7)
        chars = [rng.choice(_MIXED_ALPHABET), str(rng.randint(0, 9))]
        chars += [rng.choice(_MIXED_ALPHABET + "0123456789") for _ in range(n - 2)]
        rng.shuffle(chars)
        return "".join(chars)
    raise ValueError(f"unknown value kind {kind!r} (expected one of {', '.join(VALUE_KINDS)})")


def passkey_sample(n_filler: int, depth: float, key: str, style: str, rng: random.Random,
                   needle: str = NEEDLES[0]) -> Sample:
    """The seed-style passkey prompt with the key line after round(depth * n_filler) filler sentences;
    `needle` is the key line's wording (a format string with {k})."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    sents = filler_sentences(rng, n_filler, style)
    cut = round(depth * n_filler)
    prompt = PASSKEY_INTRO + _join(sents[:cut]) + needle.format(k=key) + _join(sents[cut:]) + PASSKEY_QUESTION
    return Sample("passkey", prompt, f"The pass key is {key}.", key, depth)


def no_key_sample(n_filler: int, style: str, rng: random.Random) -> Sample:
    """The passkey prompt with no key in it: the answer says so (the target is the whole reply's core)."""
    prompt = PASSKEY_INTRO + _join(filler_sentences(rng, n_filler, style)) + PASSKEY_QUESTION
    return Sample("none", prompt, NO_KEY_ANSWER, "no pass key", 0.0)


def kv_sample(n_filler: int, depth: float, rng: random.Random, style: str, n_records: int,
              value_digits: tuple[int, int] = (2, 6)) -> Sample:
    """Key-value lookup: n_records "code for the <item>" lines (distinct items and values) spread through
    the filler; the asked-for record sits at `depth`, the decoys at random depths."""
    if n_records < 1 or n_records > len(KV_ITEMS):
        raise ValueError(f"n_records must be in [1, {len(KV_ITEMS)}]")
    items = rng.sample(KV_ITEMS, n_records)
    values: list[str] = []
    while len(values) < n_records:
        v = random_digits(rng, rng.randint(*value_digits))
        if v not in values:
            values.append(v)
    sents = filler_sentences(rng, n_filler, style)
    cuts = [round(depth * n_filler)] + [rng.randint(0, n_filler) for _ in range(n_records - 1)]
    order = sorted(range(n_records), key=lambda i: (cuts[i], i))
    pieces, prev = [], 0
    for i in order:
        pieces.append(_join(sents[prev:cuts[i]]))
        pieces.append(f"The code for the {items[i]} is {values[i]}. ")
        prev = cuts[i]
    pieces.append(_join(sents[prev:]))
    prompt = KV_INTRO + "".join(pieces) + f"\nWhat is the code for the {items[0]}?"
    return Sample("kv", prompt, f"The code for the {items[0]} is {values[0]}.", values[0], depth)


def fit_to_length(make: Callable[[int], Sample], count_tokens: Callable[[Sample], int], target: int,
                  tokens_per_sentence: float = 6.0) -> tuple[Sample, int]:
    """Choose the filler size so the prompt has at most `target` tokens and as close to it as possible.

    `make(n)` builds a sample with n filler sentences (it must be deterministic in n); `count_tokens`
    measures the full prompt as the model sees it (chat template included). Returns (sample, tokens).
    """
    base = count_tokens(make(0))
    if base > target:
        raise ValueError(f"target length {target} is below the prompt's fixed part ({base} tokens)")
    n = max(0, int((target - base) / tokens_per_sentence))
    best = (make(0), base)
    for _ in range(8):
        s = make(n)
        got = count_tokens(s)
        if got <= target:
            if got > best[1]:
                best = (s, got)
            if target - got < tokens_per_sentence * 1.5:
                return s, got
        per = (got - base) / n if n else tokens_per_sentence
        step = int((target - got) / max(per, 1.0))
        n = max(0, n + (step if step != 0 else (-1 if got > target else 1)))
    return best


TASKS = ("passkey", "kv", "none")


def sized_sample(count_tokens: Callable[[Sample], int], rng: random.Random, length: int, task: str,
                 depth: float | None = None, key_digits: int | None = None, style: str | None = None,
                 value_kind: str = "digits", needle: str | None = NEEDLES[0], records: int | None = None) -> Sample:
    """A random `task` sample ("passkey", "kv" or "none") whose prompt fills at most `length` tokens.

    Unset choices are drawn from `rng`: depth uniform, key length 3-8 digits, 2-6 records, the filler style
    ("qwen" 30%, "varied" 70%) and, with `needle=None`, the needle's wording (among NEEDLES; by default the seed
    prompt's)."""
    depth = rng.random() if depth is None else depth
    style = style or ("qwen" if rng.random() < 0.3 else "varied")
    sub_seed = rng.getrandbits(32)
    if task == "passkey":
        key = random_value(rng, value_kind, key_digits or rng.randint(3, 8))
        wording = needle or rng.choice(NEEDLES)
        return fit_to_length(lambda n: passkey_sample(n, depth, key, style, random.Random(sub_seed), wording),
                             count_tokens, length)[0]
    if task == "kv":
        n_rec = records or rng.randint(2, 6)
        return fit_to_length(lambda n: kv_sample(n, depth, random.Random(sub_seed), style, n_rec),
                             count_tokens, length)[0]
    if task == "none":
        return fit_to_length(lambda n: no_key_sample(n, style, random.Random(sub_seed)), count_tokens, length)[0]
    raise ValueError(f"unknown task {task!r} (expected one of {', '.join(TASKS)})")
