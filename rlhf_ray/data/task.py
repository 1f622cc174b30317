"""The embedded default task: make review continuations positive.

A prompt is a review opener, sometimes after a sentence that already leans one way
("the battery was awful and weak. overall the phone seemed"); the response carries the
judgement (" great. the screen was lovely and good."). SFT text follows the lead most of
the time, so the SFT model is positive about half the time; preference pairs prefer the
positive response; PPO should push held-out prompts to positive continuations.

Subjects are split: PPO prompts and reward-model pairs never use the held-out subjects,
and the judge is run on prompts made only from them.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Optional

from .math_task import exact_match
from .objective import label_match
from .synthetic import ASPECTS, NEG_CLOSERS, NEGATIVE, OPENERS, POS_CLOSERS, POSITIVE, SUBJECTS

HELDOUT_SUBJECTS = tuple(SUBJECTS[3::4])  # 4 of 16
TRAIN_SUBJECTS = tuple(s for s in SUBJECTS if s not in HELDOUT_SUBJECTS)
FOLLOW_LEAD = 0.8  # how often an SFT response keeps the prompt's leaning
_SPLITS = {"train": TRAIN_SUBJECTS, "heldout": HELDOUT_SUBJECTS, "all": tuple(SUBJECTS)}
_VOCAB = frozenset(
    w for phrase in [*SUBJECTS, *ASPECTS, *POSITIVE, *NEGATIVE, *POS_CLOSERS, *NEG_CLOSERS, *OPENERS, "the was and"]
    for w in re.findall(r"[a-z]+", phrase)
)
_POSITIVE, _NEGATIVE = frozenset(POSITIVE), frozenset(NEGATIVE)


@dataclass(frozen=True)
class TaskPrompt:
    text: str
    lead: Optional[bool]  # True/False: the prompt already leans positive/negative; None: neutral
    subject: str


def _words(positive: bool) -> list[str]:
    return POSITIVE if positive else NEGATIVE


def _aspect_sentence(rng: random.Random, positive: bool) -> str:
    w = _words(positive)
    return f"the {rng.choice(ASPECTS)} was {rng.choice(w)} and {rng.choice(w)}."


def _prompt(rng: random.Random, subjects: tuple[str, ...]) -> TaskPrompt:
    subject = rng.choice(subjects)
    lead = rng.choice([None, True, False])
    opener = rng.choice(OPENERS).format(s=subject)
    text = opener if lead is None else f"{_aspect_sentence(rng, lead)} {opener}"
    return TaskPrompt(text, lead, subject)


def _response(rng: random.Random, positive: bool, mixed: bool = False) -> str:
    """`` great. the story was lovely and good. i loved every minute.``; ``mixed`` turns
    the second sentence against the first."""
    parts = [f" {rng.choice(_words(positive))}.", _aspect_sentence(rng, positive != mixed)]
    if not mixed and rng.random() < 0.5:
        parts.append(f"{rng.choice(POS_CLOSERS if positive else NEG_CLOSERS)}.")
    return " ".join(parts)


def task_prompts(n: int, seed: int = 0, split: str = "train") -> list[TaskPrompt]:
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
    rng = random.Random(f"prompts-{split}-{seed}")
    return [_prompt(rng, _SPLITS[split]) for _ in range(n)]


def sft_records(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``{"prompt", "response"}`` pairs over all subjects: the language, not the preference."""
    rng = random.Random(f"sft-{seed}")
    out = []
    for _ in range(n):
        p = _prompt(rng, _SPLITS["all"])
        positive = rng.random() < 0.5 if p.lead is None else (p.lead if rng.random() < FOLLOW_LEAD else not p.lead)
        out.append({"prompt": p.text, "response": _response(rng, positive)})
    return out


def _garble(rng: random.Random, text: str) -> str:
    """The same text with one or two words broken (a letter lost, or run into the next word),
    the kind of damage a policy drifting from its SFT model does first."""
    words = text.split(" ")
    for _ in range(rng.choice([1, 2])):
        long = [i for i, w in enumerate(words) if len(w.rstrip(".")) >= 4]
        i = rng.choice(long)
        w = words[i]
        if rng.random() < 0.5 or i + 1 == len(words):
            j = rng.randrange(1, len(w.rstrip(".")) - 1)
            words[i] = w[:j] + w[j + 1:]
        else:
            words[i:i + 2] = [w.rstrip(".") + words[i + 1]]
    return " ".join(words)


def preference_pairs(n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """``{"prompt", "chosen", "rejected", "margin"}``: the chosen response is positive and
    fluent; the rejected one is negative (margin 1), starts positive and turns negative
    (margin 0.5), or is the chosen one with broken words (margin 0.5)."""
    rng = random.Random(f"pairs-{split}-{seed}")
    out = []
    for _ in range(n):
        p = _prompt(rng, _SPLITS[split])
        chosen = _response(rng, True)
        kind = rng.random()
        if kind < 0.5:
            rejected, margin = _response(rng, positive=False), 1.0
        elif kind < 0.75:
            rejected, margin = _response(rng, positive=True, mixed=True), 0.5
        else:
            rejected, margin = _garble(rng, chosen), 0.5
        out.append({"prompt": p.text, "chosen": chosen, "rejected": rejected, "margin": margin})
    return out


@dataclass(frozen=True)
class Verdict:
    positive_words: int
    negative_words: int
    in_vocabulary: bool

    @property
    def score(self) -> float:
        """1 for a positive, well-formed continuation, else 0."""
        return float(self.in_vocabulary and self.positive_words > self.negative_words)


def judge(response: str) -> Verdict:
    """The rule-based judge of the target property; shares no weights or data with the reward
    model. A response counts if it uses more positive than negative judgement words and every
    word is one of the task's own (so gibberish that happens to say 'great' does not count)."""
    words = re.findall(r"[a-z]+|[^a-z\s.]", response.lower())
    return Verdict(
        positive_words=sum(w in _POSITIVE for w in words),
        negative_words=sum(w in _NEGATIVE for w in words),
        in_vocabulary=bool(words) and all(w in _VOCAB for w in words),
    )


def _sentiment(response: str, columns: dict) -> Verdict:
    return judge(response)


def _rouge(response: str, columns: dict):
    from .dialogue import rouge

    return rouge(response, columns)


# name -> judge(response, the prompt record's other columns) -> a verdict with .score in [0, 1]
# (and, for ROUGE, .parts: each ROUGE figure)
JUDGES = {"positive_sentiment": _sentiment, "exact_match": exact_match, "label_match": label_match,
          "rouge": _rouge}
TASKS = ("reviews", "math", "objective", "dialogue")  # data.task: what the stages generate when no file is given
