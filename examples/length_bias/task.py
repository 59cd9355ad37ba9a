"""The toy task of the length-bias study, generated here (deterministic for a seed).

Prompts ask for a short list of digits in sorted order: ``sort 3 1 4 1 .``. A response states the
sorted list digit by digit, then adds 0 to ``MAX_FILLER`` filler sentences that carry no
information::

    the answer is 1 1 3 4 . i hope this helps . let me know if you need more .

Quality lives in several response tokens (every digit of the list), which attention can copy from
the prompt, so a tiny model can learn it; length is mostly filler. The two are independent by
construction: quality is whether the digits before the first ``.`` are the sorted list
(:func:`is_correct`); a wrong answer has the same number of digits, with one or two of them
changed (:func:`corrupt`), so it is exactly as long.

- SFT data: the right answer in ``SFT_CORRECT_SHARE`` of the examples (else a corrupted one), with
  a uniformly drawn filler count, so the warm-up model, sampled at temperature 1, is right about
  that often and has no length preference of its own.
- Preference pairs: chosen = right answer, rejected = a corrupted one, each with its own filler
  count; the chosen response is the longer one in a tunable share of the pairs
  (``long_chosen_share``), the shorter one in the rest (never equal). The paper's "long" / "short"
  subsets are the pairs whose chosen response is longer / shorter.
"""

from __future__ import annotations

import random
import re

MIN_ITEMS, MAX_ITEMS = 3, 5
MAX_FILLER = 4
SFT_CORRECT_SHARE = 0.5
FILLERS = (
    "i hope this helps .",
    "let me know if you need more .",
    "this is a good question .",
    "thank you for asking me this .",
    "sorting is always fun .",
    "lists can be very useful .",
)


def prompt_text(digits: list[int]) -> str:
    return "sort " + " ".join(map(str, digits)) + " ."


def random_list(rng: random.Random) -> list[int]:
    return [rng.randint(0, 9) for _ in range(rng.randint(MIN_ITEMS, MAX_ITEMS))]


def prompt_digits(prompt: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d", prompt)]


def answer_text(answer: list[int]) -> str:
    return "the answer is " + " ".join(map(str, answer)) + " ."


def response_text(answer: list[int], fillers: int, rng: random.Random) -> str:
    """``the answer is d d d .`` followed by ``fillers`` distinct filler sentences."""
    return " ".join([answer_text(answer)] + rng.sample(FILLERS, fillers))


def corrupt(answer: list[int], rng: random.Random) -> list[int]:
    """The list with one or two of its digits changed (each to a different digit): as long, and wrong."""
    wrong = list(answer)
    for i in rng.sample(range(len(wrong)), rng.choice([1, 2])):
        wrong[i] = rng.choice([d for d in range(10) if d != answer[i]])
    return wrong


def is_correct(prompt: str, response: str) -> bool:
    """Whether the digits of ``response`` before its first ``.`` are the prompt's list, sorted."""
    head = response.split(".", 1)[0]
    return [int(x) for x in re.findall(r"\d+", head)] == sorted(prompt_digits(prompt))


def sft_records(seed: int, count: int) -> list[dict]:
    """SFT warm-up examples as pairs (the SFT loss reads only ``chosen``; ``rejected`` differs so the
    record is a valid pair)."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        digits = random_list(rng)
        right = sorted(digits)
        answer = right if rng.random() < SFT_CORRECT_SHARE else corrupt(right, rng)
        chosen = response_text(answer, rng.randint(0, MAX_FILLER), rng)
        records.append({"prompt": prompt_text(digits), "chosen": chosen, "rejected": "the answer is ."})
    return records


def preference_pair(digits: list[int], chosen_longer: bool, rng: random.Random) -> dict:
    """A right-vs-wrong pair whose chosen response is the longer (or the shorter) one by >= 1 filler."""
    short, long = sorted(rng.sample(range(MAX_FILLER + 1), 2))
    chosen_fill, rejected_fill = (long, short) if chosen_longer else (short, long)
    right = sorted(digits)
    return {
        "prompt": prompt_text(digits),
        "chosen": response_text(right, chosen_fill, rng),
        "rejected": response_text(corrupt(right, rng), rejected_fill, rng),
    }


def list_key(prompt: str) -> tuple[int, ...]:
    """What a prompt asks, whatever the order of its digits (the same key, the same right answer)."""
    return tuple(sorted(prompt_digits(prompt)))


def _new_list(rng: random.Random, exclude: frozenset) -> list[int]:
    while True:
        digits = random_list(rng)
        if tuple(sorted(digits)) not in exclude:
            return digits


def preference_records(seed: int, count: int, long_chosen_share: float, exclude: frozenset = frozenset()) -> list[dict]:
    """``count`` pairs, exactly ``round(count * long_chosen_share)`` of them with the longer chosen;
    none of whose lists (as multisets) is in ``exclude`` (held-out pairs: the training data's)."""
    rng = random.Random(seed)
    longs = round(count * long_chosen_share)
    flags = [True] * longs + [False] * (count - longs)
    rng.shuffle(flags)
    return [preference_pair(_new_list(rng, exclude), flag, rng) for flag in flags]


def eval_prompts(seed: int, count: int, exclude: frozenset = frozenset()) -> list[str]:
    """``count`` distinct prompts for the monitor's generations, none asking for a list in ``exclude``."""
    rng = random.Random(seed)
    prompts: dict[str, None] = {}
    while len(prompts) < count:
        prompts[prompt_text(_new_list(rng, exclude))] = None
    return list(prompts)


def vocabulary_lines() -> list[str]:
    """Every word the task can produce (the tokenizer is trained on these)."""
    return [prompt_text(list(range(10))), answer_text([]), *FILLERS]
