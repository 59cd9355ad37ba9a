#!/usr/bin/env python
"""Generates the tiny demo assets shipped in ``examples/data/`` (deterministic for a given seed).

- ``tiny_pairs.jsonl``: simple question prompts (arithmetic, colours, animal legs, opposites,
  capitals, days and months) with a correct answer as ``chosen`` and a wrong or evasive answer as
  ``rejected``. All text is produced here from templates, so the data is license-clean. In about
  65% of the pairs the chosen response is the longer one (a correct answer with explanation against
  a terse wrong one); in the rest the chosen answer is concise and the rejected one is padded, so a
  length-biased objective has something to get wrong.
- ``length_bias_pairs.jsonl``: the same kind of pairs with a controllable length bias: the
  chosen response is the longer one (by >= 2 words) in exactly ``--length-bias-fraction`` of the
  pairs (default 0.9, a strongly length-biased set; 0.5 is unbiased, 0.1 favours short answers).
  ``tools/preprocess_preference_data.py --split-by-length long short`` splits it like the paper's
  UltraFeedback long/short subsets.
- ``tiny_tokenizer/``: a word-level ``tokenizers`` tokenizer trained on ``tiny_pairs.jsonl`` and the
  template words (so every generated pair, of either set, is in vocabulary), saved as a
  Hugging Face tokenizer directory (loads with ``transformers.AutoTokenizer``), special tokens
  ``<pad>`` ``<s>`` ``</s>`` ``<unk>`` with ids 0-3.

Usage: ``python tools/make_tiny_assets.py [--out-dir examples/data] [--seed 0] [--num-pairs 256]
[--length-bias-fraction 0.9] [--length-bias-pairs 256]``
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sampo_megatron.data.wordlevel import MAX_VOCAB, SPECIAL_TOKENS, save_hf_dir, train_tokenizer  # noqa: E402

CHOSEN_LONGER_FRACTION = 0.65
MIN_WORDS, MAX_WORDS = 5, 60

ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_word(n: int) -> str:
    """English words for 0..102 (ten times ten, and a wrong answer just above it)."""
    if n < 20:
        return ONES[n]
    if n >= 100:
        return "one hundred" + ("" if n == 100 else " " + ONES[n - 100])
    tens, ones = divmod(n, 10)
    return TENS[tens] + ("" if ones == 0 else "-" + ONES[ones])


def cap(s: str) -> str:
    return s[:1].upper() + s[1:]


COLOURS = {
    "sky on a clear day": "blue", "grass": "green", "fresh snow": "white", "coal": "black",
    "ripe banana": "yellow", "ripe tomato": "red", "carrot": "orange", "lemon": "yellow",
    "summer leaf": "green", "strawberry": "red", "glass of milk": "white", "night sky": "black",
    "pumpkin": "orange", "lime": "green", "blueberry": "blue", "cherry": "red",
}
ALL_COLOURS = sorted(set(COLOURS.values()) | {"purple", "brown", "pink", "grey"})
LEGS = {
    "spider": 8, "dog": 4, "cat": 4, "bird": 2, "ant": 6, "horse": 4, "chicken": 2, "bee": 6,
    "cow": 4, "duck": 2, "snake": 0, "beetle": 6, "goat": 4, "crab": 10, "octopus": 8, "frog": 4,
}
OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "day": "night", "fast": "slow", "happy": "sad",
    "open": "closed", "light": "dark", "wet": "dry", "early": "late", "full": "empty",
    "loud": "quiet", "hard": "soft", "old": "new", "high": "low", "strong": "weak",
}
CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin",
    "Egypt": "Cairo", "Canada": "Ottawa", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo",
    "Greece": "Athens", "Portugal": "Lisbon", "Austria": "Vienna", "Ireland": "Dublin",
    "Sweden": "Stockholm", "Chile": "Santiago",
}
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
MONTHS = "January February March April May June July August September October November December".split()

CONTEXTS = [
    "I am helping my little brother with his homework.",
    "My teacher asked us this in class today.",
    "This is for a quiz night with my friends.",
    "I want to check my answer before I hand it in.",
    "We were talking about this at dinner.",
    "I am practicing for a test tomorrow.",
]
STYLES = ["{q}", "Question: {q}", "Please answer briefly. {q}", "Can you tell me this? {q}", "Quick question. {q}"]
FILLER = [
    "That is a really interesting question.",
    "Many people have asked about this before.",
    "Let me think about it for a moment.",
    "There are many ways to look at this.",
    "It is important to be careful with questions like this.",
    "Some people might say one thing and others might say another.",
    "I want to give you a complete and helpful answer.",
    "Before I answer, it is good to remember the basics.",
    "In the end, the answer depends on how you look at it.",
    "I am not completely sure, but here is my best guess.",
    "Questions like this come up in school all the time.",
    "It is always good to be curious about the world.",
]
CLOSERS = ["I hope this helps.", "Let me know if you have another question.", "Good luck with your studies."]
HEDGES = [
    "It is hard to say for certain.",
    "I would need more information to be sure.",
    "You might want to ask someone else about this.",
]


@dataclass
class Fact:
    """One question with its correct and a wrong short answer, and explanation sentences."""

    question: str
    right: str
    wrong: str
    explanations: list[str]


def make_fact(rng: random.Random) -> Fact:
    """Draws one question from one of the categories."""
    kind = rng.choice(["plus", "minus", "times", "colour", "legs", "opposite", "capital", "day", "month"])
    if kind in ("plus", "minus", "times"):
        a, b = rng.randint(1, 10), rng.randint(1, 10)
        if kind == "minus" and b > a:
            a, b = b, a
        c = {"plus": a + b, "minus": a - b, "times": a * b}[kind]
        wrong = c + rng.choice([-2, -1, 1, 2]) if c > 2 else c + rng.choice([1, 2, 3])
        A, B, C, W = number_word(a), number_word(b), number_word(c), number_word(wrong)
        q = f"What is {A} {kind} {B}?"
        right, bad = f"{cap(A)} {kind} {B} is {C}.", f"{cap(A)} {kind} {B} is {W}."
        if kind == "plus":
            ex = [f"If you start at {A} and count up {B} more, you reach {C}.",
                  f"Adding {B} to {A} gives {C}.",
                  "You can check this by counting on your fingers."]
        elif kind == "minus":
            ex = [f"If you have {A} apples and give away {B}, you keep {C}.",
                  f"Taking {B} away from {A} leaves {C}.",
                  f"You can check it, because {C} plus {B} is {A} again."]
        else:
            ex = [f"{cap(A)} groups of {B} make {C} in total.",
                  f"You can add {B} to itself {A} times and you will get {C}.",
                  "Learning the times table makes this much faster."]
        return Fact(q, right, bad, ex)
    if kind == "colour":
        obj = rng.choice(sorted(COLOURS))
        col = COLOURS[obj]
        bad = rng.choice([c for c in ALL_COLOURS if c != col])
        # Mass nouns and one-of-a-kind things take "the", countable objects "a".
        article = "the" if obj.startswith(("sky", "night", "grass", "fresh", "coal")) else "a"
        return Fact(f"What color is {article} {obj}?", f"It is {col}.", f"It is {bad}.",
                    [f"Most people would describe it as {col}.",
                     f"When you look at it, the color you notice first is {col}.",
                     f"Children often paint it {col} in their pictures."])
    if kind == "legs":
        animal = rng.choice(sorted(LEGS))
        n = LEGS[animal]
        bad = rng.choice([m for m in (0, 2, 4, 6, 8, 10) if m != n])
        N, BAD = number_word(n), number_word(bad)
        return Fact(f"How many legs does a {animal} have?",
                    f"A {animal} has {N} legs.", f"A {animal} has {BAD} legs.",
                    [f"If you count the legs of a {animal}, you will find {N}.",
                     f"This is true for almost every healthy {animal}.",
                     "Animals of the same kind usually have the same number of legs."])
    if kind == "opposite":
        w = rng.choice(sorted(OPPOSITES))
        o = OPPOSITES[w]
        bad = rng.choice([x for x in sorted(OPPOSITES) if x != w])
        return Fact(f"What is the opposite of {w}?",
                    f"The opposite of {w} is {o}.", f"The opposite of {w} is {bad}.",
                    [f"When something is not {w} at all, we often say it is {o}.",
                     f"The words {w} and {o} sit at the two ends of the same scale.",
                     "Opposites help us describe the world more clearly."])
    if kind == "capital":
        country = rng.choice(sorted(CAPITALS))
        city = CAPITALS[country]
        bad = rng.choice([c for c in sorted(CAPITALS.values()) if c != city])
        return Fact(f"What is the capital of {country}?",
                    f"The capital of {country} is {city}.", f"The capital of {country} is {bad}.",
                    [f"The government of {country} meets in {city}.",
                     f"Many visitors travel to {city} every year.",
                     f"You can find {city} on any map of {country}."])
    names, unit = (DAYS, "day") if kind == "day" else (MONTHS, "month")
    i = rng.randrange(len(names))
    nxt = names[(i + 1) % len(names)]
    bad = rng.choice([x for x in names if x not in (nxt, names[i])])
    return Fact(f"What {unit} comes after {names[i]}?",
                f"{nxt} comes after {names[i]}.", f"{bad} comes after {names[i]}.",
                [f"The {unit}s always follow the same order.",
                 f"If today is {names[i]} in that list, the next one is {nxt}.",
                 f"There are {number_word(len(names))} {unit}s in the cycle."])


def words(text: str) -> int:
    return len(text.split())


def make_pair(rng: random.Random, chosen_longer: bool) -> dict[str, str]:
    """One record; retries until the lengths have the wanted order (by >= 2 words) and range."""
    while True:
        fact = make_fact(rng)
        q = rng.choice(STYLES).format(q=fact.question)
        prompt = f"{rng.choice(CONTEXTS)} {q}" if rng.random() < 0.4 else q
        if chosen_longer:
            ex = rng.sample(fact.explanations, rng.randint(1, len(fact.explanations)))
            chosen = [fact.right, *ex] + ([rng.choice(CLOSERS)] if rng.random() < 0.5 else [])
            rejected = [fact.wrong] + ([rng.choice(FILLER)] if rng.random() < 0.3 else [])
        else:
            chosen = [fact.right] + ([rng.choice(fact.explanations)] if rng.random() < 0.3 else [])
            pad = rng.sample(FILLER, rng.randint(2, 6))
            if rng.random() < 0.3:
                # Evasive: lots of words and no answer at all.
                rejected = pad + [rng.choice(HEDGES)]
            else:
                cut = rng.randint(0, len(pad))
                rejected = pad[:cut] + [fact.wrong] + pad[cut:]
        chosen_text, rejected_text = " ".join(chosen), " ".join(rejected)
        lc, lr = words(chosen_text), words(rejected_text)
        in_range = all(MIN_WORDS <= n <= MAX_WORDS for n in (lc, lr))
        ordered = lc >= lr + 2 if chosen_longer else lr >= lc + 2
        if in_range and ordered:
            return {"prompt": prompt, "chosen": chosen_text, "rejected": rejected_text}


def make_pairs(seed: int, num_pairs: int, chosen_longer_fraction: float = CHOSEN_LONGER_FRACTION) -> list[dict[str, str]]:
    """``num_pairs`` records, exactly ``round(chosen_longer_fraction * num_pairs)`` of them with the
    longer chosen response (the length bias of the set)."""
    if not 0.0 <= chosen_longer_fraction <= 1.0:
        raise ValueError(f"chosen_longer_fraction must be in [0, 1], got {chosen_longer_fraction}")
    rng = random.Random(seed)
    n_longer = round(chosen_longer_fraction * num_pairs)
    flags = [True] * n_longer + [False] * (num_pairs - n_longer)
    rng.shuffle(flags)
    return [make_pair(rng, flag) for flag in flags]


def corpus(pairs: list[dict[str, str]]) -> list[str]:
    """Training text: the pairs plus every template word, so any regenerated pair is in vocabulary."""
    lines = [r[k] for r in pairs for k in ("prompt", "chosen", "rejected")]
    lines += [number_word(n) for n in range(101)]
    lines += [" ".join(COLOURS) + " " + " ".join(ALL_COLOURS), " ".join(LEGS), " ".join(OPPOSITES.values()),
              " ".join(OPPOSITES), " ".join(CAPITALS) + " " + " ".join(CAPITALS.values()),
              " ".join(DAYS + MONTHS), *CONTEXTS, *STYLES, *FILLER, *CLOSERS, *HEDGES]
    return lines


def write_jsonl(path: str, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=True) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "..", "examples", "data"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-pairs", type=int, default=256)
    parser.add_argument("--length-bias-fraction", type=float, default=0.9,
                        help="share of length_bias_pairs.jsonl whose chosen response is the longer one")
    parser.add_argument("--length-bias-pairs", type=int, default=256)
    args = parser.parse_args(argv)

    pairs = make_pairs(args.seed, args.num_pairs)
    biased = make_pairs(args.seed + 1, args.length_bias_pairs, args.length_bias_fraction)
    # Trained on the first set only: the ids (and so every shipped result) do not move when the
    # length-biased set changes; its text comes from the same templates, checked below.
    tok = train_tokenizer(corpus(pairs))
    vocab = tok.get_vocab_size()
    assert vocab <= MAX_VOCAB, vocab
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    unk = tok.token_to_id("<unk>")
    shares = {}
    for name, records in (("tiny_pairs.jsonl", pairs), ("length_bias_pairs.jsonl", biased)):
        longer = 0
        for r in records:
            ids = {k: tok.encode(r[k]).ids for k in ("prompt", "chosen", "rejected")}
            assert all(unk not in v for v in ids.values()), f"{name}: out-of-vocabulary word in {r}"
            longer += len(ids["chosen"]) > len(ids["rejected"])
        shares[name] = longer / len(records)

    os.makedirs(args.out_dir, exist_ok=True)
    save_hf_dir(tok, os.path.join(args.out_dir, "tiny_tokenizer"))
    for name, records in (("tiny_pairs.jsonl", pairs), ("length_bias_pairs.jsonl", biased)):
        write_jsonl(os.path.join(args.out_dir, name), records)
    print(f"wrote {len(pairs)} pairs (chosen longer in tokens: {shares['tiny_pairs.jsonl']:.1%}), "
          f"{len(biased)} length-biased pairs (chosen longer in tokens: {shares['length_bias_pairs.jsonl']:.1%}), "
          f"vocab {vocab}, to {os.path.normpath(args.out_dir)}")


if __name__ == "__main__":
    main()
