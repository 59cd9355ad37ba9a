"""The toy task of the length-bias study, generated here (deterministic for a seed).

Prompts ask for the sum of two digits: ``what is 3 plus 4 ?``. A response states an answer, then
adds 0 to ``MAX_FILLER`` filler sentences that carry no information::

    the answer is 7 . i hope this helps . let me know if you need more .

Quality and length are independent by construction: quality is whether the first number in the
response is the right sum (:func:`is_correct`), length is mostly filler.

- SFT data: the right answer in ``SFT_CORRECT_SHARE`` of the examples (else off by 1-3), with a
  uniformly drawn filler count, so the warm-up model is sometimes wrong and has no length preference
  of its own.
- Preference pairs: chosen = right answer, rejected = wrong answer, each with its own filler count;
  the chosen response is the longer one in a tunable share of the pairs (``long_chosen_share``),
  the shorter one in the rest (never equal). The paper's "long" / "short" subsets are the pairs
  whose chosen response is longer / shorter.
"""

from __future__ import annotations

import random
import re

MAX_DIGIT = 9
MAX_FILLER = 4
SFT_CORRECT_SHARE = 0.6
FILLERS = (
    "i hope this helps .",
    "let me know if you need more .",
    "this is a good question .",
    "thank you for asking me this .",
    "it is always fun to add numbers .",
    "math can be very useful .",
)


def prompt_text(a: int, b: int) -> str:
    return f"what is {a} plus {b} ?"


def all_prompts() -> list[tuple[int, int]]:
    return [(a, b) for a in range(MAX_DIGIT + 1) for b in range(MAX_DIGIT + 1)]


def response_text(answer: int, fillers: int, rng: random.Random) -> str:
    """``the answer is N .`` followed by ``fillers`` distinct filler sentences."""
    return " ".join([f"the answer is {answer} ."] + rng.sample(FILLERS, fillers))


def wrong_answer(a: int, b: int, rng: random.Random) -> int:
    """A sum off by 1 to 3 (kept non-negative)."""
    while True:
        answer = a + b + rng.choice([-3, -2, -1, 1, 2, 3])
        if answer >= 0:
            return answer


def is_correct(prompt: str, response: str) -> bool:
    """Whether the first number in ``response`` is the sum the prompt asks for."""
    a, b = (int(x) for x in re.findall(r"\d+", prompt)[:2])
    numbers = re.findall(r"\d+", response)
    return bool(numbers) and int(numbers[0]) == a + b


def sft_records(seed: int, count: int) -> list[dict]:
    """SFT warm-up examples as pairs (the SFT loss reads only ``chosen``; ``rejected`` differs so the
    record is a valid pair)."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        a, b = rng.choice(all_prompts())
        answer = a + b if rng.random() < SFT_CORRECT_SHARE else wrong_answer(a, b, rng)
        chosen = response_text(answer, rng.randint(0, MAX_FILLER), rng)
        records.append({"prompt": prompt_text(a, b), "chosen": chosen, "rejected": f"the answer is {answer + 10} ."})
    return records


def preference_pair(a: int, b: int, chosen_longer: bool, rng: random.Random) -> dict:
    """A right-vs-wrong pair whose chosen response is the longer (or the shorter) one by >= 1 filler."""
    short, long = sorted(rng.sample(range(MAX_FILLER + 1), 2))
    chosen_fill, rejected_fill = (long, short) if chosen_longer else (short, long)
    return {
        "prompt": prompt_text(a, b),
        "chosen": response_text(a + b, chosen_fill, rng),
        "rejected": response_text(wrong_answer(a, b, rng), rejected_fill, rng),
    }


def preference_records(seed: int, count: int, long_chosen_share: float) -> list[dict]:
    """``count`` pairs, exactly ``round(count * long_chosen_share)`` of them with the longer chosen."""
    rng = random.Random(seed)
    longs = round(count * long_chosen_share)
    flags = [True] * longs + [False] * (count - longs)
    rng.shuffle(flags)
    return [preference_pair(*rng.choice(all_prompts()), flag, rng) for flag in flags]


def vocabulary_lines() -> list[str]:
    """Every word the task can produce (the tokenizer is trained on these)."""
    numbers = " ".join(str(n) for n in range(2 * MAX_DIGIT + 4 + 10))
    return [prompt_text(1, 2), "the answer is", numbers, *FILLERS]
