"""A verifiable task the project generates (no download): one-step arithmetic word problems in
GSM8K's shape, ``{"question", "answer"}`` with the answer's working and ``#### N`` at its end.

Names are split as the review task's subjects are: PPO prompts never use the held-out names,
and the exact-match judge runs on problems made only from them. The reward is a function that
checks the final number (``examples/rewards/math_answer.py``); there is no preference data.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Optional

NAMES = ("Ann", "Ben", "Cal", "Dee", "Eve", "Fay", "Gus", "Hal", "Ida", "Jon", "Kim", "Lee", "Max", "Ned", "Oli", "Pam")
ITEMS = ("apples", "pens", "cards", "coins", "books", "cups", "eggs", "hats", "keys", "shells", "stamps", "toys")
HELDOUT_NAMES = tuple(NAMES[3::4])  # 4 of 16
_SPLITS = {"train": tuple(n for n in NAMES if n not in HELDOUT_NAMES), "heldout": HELDOUT_NAMES, "all": NAMES}
MAX_OPERAND = 9  # 126 distinct problems, each seen in SFT many times
SLIP_RATE = 0.3  # SFT answers that restate a number instead of the result
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def problem(rng: random.Random, names: tuple[str, ...]) -> dict[str, str]:
    name, item = rng.choice(names), rng.choice(ITEMS)
    a, b = rng.randint(1, MAX_OPERAND), rng.randint(1, MAX_OPERAND)
    if rng.random() < 0.5:
        q = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have?"
        return {"question": q, "answer": f"{a} + {b} = {a + b}. #### {a + b}"}
    a, b = max(a, b), min(a, b)
    q = f"{name} has {a} {item} and gives away {b}. How many {item} are left?"
    return {"question": q, "answer": f"{a} - {b} = {a - b}. #### {a - b}"}


def math_problems(n: int, seed: int = 0, split: str = "train") -> list[dict[str, str]]:
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
    rng = random.Random(f"math-{split}-{seed}")
    return [problem(rng, _SPLITS[split]) for _ in range(n)]


def sft_records(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Worked answers to problems over all names; in ``SLIP_RATE`` of them a careless
    demonstrator restates the first number of the question as the result. The SFT policy learns
    the format and both habits, so it samples a right answer about half the time: what a reward
    that checks the answer can raise."""
    rng = random.Random(f"math-sft-{seed}")
    out = []
    for p in math_problems(n, seed, "all"):
        answer = p["answer"]
        if rng.random() < SLIP_RATE:
            work = answer.split(" = ")[0]
            first = work.split()[0]
            answer = f"{work} = {first}. #### {first}"
        out.append({"prompt": p["question"], "response": " " + answer})
    return out


def corpus(n: int = 4000, seed: int = 0) -> list[str]:
    """Text for the tiny tokenizer (``model.tiny_corpus: math``)."""
    return [f"{p['question']} {p['answer']}" for p in math_problems(n, seed, "all")]


def final_number(text: str) -> Optional[str]:
    """The number after the last ``####``, else the last number in the text; None if none."""
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    found = _NUMBER.findall(tail.replace(",", ""))
    return found[-1] if found else None


@dataclass(frozen=True)
class Match:
    score: float  # 1.0: the response's final number equals the record's answer


def exact_match(response: str, columns: dict) -> Match:
    """The held-out judge: the final number of the response against the record's ``answer``."""
    want = final_number(str(columns.get("answer", "")))
    got = final_number(response)
    return Match(float(want is not None and got is not None and float(got) == float(want)))
