"""Rule-based rewards (``reward.rule``): scored in the reward role instead of a model.

They exist to test the loop's learning direction with a reward whose optimum is known, and
for tasks where a program can check the answer.
"""
from __future__ import annotations

from typing import Callable


def letter_rate(letter: str) -> Callable[[str, str], float]:
    """Share of the response's letters that are ``letter``: a toy objective any policy can move."""
    def score(prompt: str, response: str) -> float:
        letters = [c for c in response.lower() if c.isalpha()]
        return sum(c == letter for c in letters) / len(letters) if letters else 0.0
    return score


def sentiment(prompt: str, response: str) -> float:
    """Positive minus negative judgement words of the generated review task (graded, unlike
    its 0/1 judge): a reward whose right direction is known."""
    from .data.task import judge

    v = judge(response)
    return float(v.positive_words - v.negative_words)


RULES: dict[str, Callable[[str, str], float]] = {
    "letter_e": letter_rate("e"),
    "sentiment": sentiment,
}
