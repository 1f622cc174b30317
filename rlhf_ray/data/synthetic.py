"""A seeded generator of short review-style text with mixed sentiment.

It is the project's own data: the tiny tokenizer is trained on it, and the default task
(prompts, SFT text, preference pairs) is drawn from the same vocabulary so every test
and the default run work with no hub access.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

SUBJECTS = ["movie", "film", "book", "phone", "laptop", "restaurant", "hotel", "album",
            "game", "camera", "show", "cafe", "novel", "headset", "bakery", "museum"]
ASPECTS = ["story", "acting", "battery", "screen", "service", "food", "price", "sound",
           "design", "staff", "ending", "music", "pacing", "room", "plot", "quality"]
POSITIVE = ["great", "wonderful", "excellent", "lovely", "brilliant", "superb", "delightful",
            "fantastic", "charming", "solid", "good", "amazing"]
NEGATIVE = ["awful", "terrible", "boring", "poor", "dull", "bad", "disappointing",
            "weak", "broken", "bland", "horrible", "annoying"]
POS_CLOSERS = ["i would recommend it to anyone", "i loved every minute",
               "worth every penny", "i will come back again", "a real pleasure"]
NEG_CLOSERS = ["i would not recommend it", "a waste of money", "i regret it",
               "never again", "i want my money back"]
OPENERS = ["the {s} was", "this {s} is", "honestly the {s} felt", "my new {s} is",
           "overall the {s} seemed", "i think the {s} is"]


@dataclass(frozen=True)
class Review:
    text: str
    positive: bool


def _sentence(rng: random.Random, positive: bool) -> str:
    words = POSITIVE if positive else NEGATIVE
    closers = POS_CLOSERS if positive else NEG_CLOSERS
    subject = rng.choice(SUBJECTS)
    aspect = rng.choice(ASPECTS)
    opener = rng.choice(OPENERS).format(s=subject)
    parts = [f"{opener} {rng.choice(words)}.",
             f"the {aspect} was {rng.choice(words)} and {rng.choice(words)}."]
    if rng.random() < 0.6:
        parts.append(f"{rng.choice(closers)}.")
    return " ".join(parts)


def reviews(n: int, seed: int = 0, positive_share: float = 0.5) -> list[Review]:
    """``n`` reviews, each wholly positive or negative, in a seeded order."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        pos = rng.random() < positive_share
        out.append(Review(_sentence(rng, pos), pos))
    return out


def corpus(n: int = 4000, seed: int = 0) -> list[str]:
    """Plain text lines (both sentiments) for training the tiny tokenizer."""
    return [r.text for r in reviews(n, seed)]
