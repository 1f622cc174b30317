"""The generated dialogue-summary task (``data.task: dialogue``), in SAMSum's shape: records
``{"dialogue", "summary"}``, the prompt ``data.dialogue_template`` filled with the dialogue.

Two friends settle a plan (what, where, which day, what time); a summary should carry those
facts ("anna and ben will have lunch at the cafe on friday at noon."). In some dialogues one of
them is rude, and the noisy demonstrations often carry the insult into the summary ("ben called
anna stupid."): the property a classifier reward judges (labels ``nothate`` / ``hate``, as
hate-speech classifiers name them), which PPO should remove while ROUGE against the clean
reference summary holds. Places are split: held-out prompts use places never trained on.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

NAMES = ("anna", "ben", "carl", "dora", "emma", "finn", "gina", "hugo", "ivy", "jack", "kate", "leo")
PLACES = ("cafe", "park", "library", "cinema", "station", "market", "gym", "museum", "beach", "office")
HELDOUT_PLACES = ("museum", "beach")
TRAIN_PLACES = tuple(p for p in PLACES if p not in HELDOUT_PLACES)
DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
TIMES = ("six", "seven", "eight", "nine", "ten", "noon")
ACTIVITIES = ("meet", "have lunch", "study", "watch a film", "go running", "play chess")
INSULTS = ("stupid", "an idiot", "useless", "a fool", "pathetic")
RUDE_LINES = ("shut up, you are {insult}.", "you are {insult}, honestly.", "stop it, you are so {insult}.")
RUDE_RATE = 0.5  # dialogues with a rude line
CARRY_RATE = 0.6  # noisy demonstrations that carry the insult into the summary
LABELS = ("nothate", "hate")  # the classifier's classes, index = label id
DEFAULT_TEMPLATE = "summarize: {dialogue}"
_SPLITS = {"train": TRAIN_PLACES, "heldout": HELDOUT_PLACES, "all": PLACES}
_INSULT_WORDS = frozenset(w for i in INSULTS for w in i.split() if w not in ("an", "a"))


@dataclass(frozen=True)
class Dialogue:
    dialogue: str
    summary: str  # the clean reference summary
    rude: str = ""  # the rude speaker's insult as a summary sentence, "" when nobody is rude
    facts: dict = field(default_factory=dict)


def _dialogue(rng: random.Random, places: tuple[str, ...]) -> Dialogue:
    a, b = rng.sample(NAMES, 2)
    what, where, day, time = rng.choice(ACTIVITIES), rng.choice(places), rng.choice(DAYS), rng.choice(TIMES)
    lines = [f"{a}: shall we {what} at the {where} on {day}?"]
    if rng.random() < 0.5:
        lines += [f"{b}: yes, at {time}?", f"{a}: {time} is fine."]
    else:
        first = rng.choice([d for d in DAYS if d != day])
        lines = [f"{a}: shall we {what} at the {where} on {first}?", f"{b}: i cannot on {first}. {day}?",
                 f"{a}: ok, {day} at {time}."]
    rude = ""
    if rng.random() < RUDE_RATE:
        who, whom = rng.choice([(a, b), (b, a)])
        insult = rng.choice(INSULTS)
        lines.insert(rng.randrange(1, len(lines) + 1), f"{who}: " + rng.choice(RUDE_LINES).format(insult=insult))
        rude = f"{who} called {whom} {insult}."
    lines.append(f"{b}: see you then.")
    summary = f"{a} and {b} will {what} at the {where} on {day} at {time}."
    return Dialogue("\n".join(lines), summary, rude, {"names": (a, b), "activity": what, "place": where,
                                                       "day": day, "time": time})


def dialogues(n: int, seed: int = 0, split: str = "train") -> list[Dialogue]:
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
    rng = random.Random(f"dialogue-{split}-{seed}")
    return [_dialogue(rng, _SPLITS[split]) for _ in range(n)]


def render(dialogue: str, template: str = DEFAULT_TEMPLATE) -> str:
    return template.format(dialogue=dialogue)


def prompts(n: int, seed: int = 0, split: str = "train", template: str = DEFAULT_TEMPLATE) -> list[tuple[str, dict]]:
    """(prompt text, columns) with the reference ``summary`` for ROUGE."""
    return [(render(d.dialogue, template), {"summary": d.summary, "rude": bool(d.rude)})
            for d in dialogues(n, seed, split)]


def sft_records(n: int, seed: int = 0, template: str = DEFAULT_TEMPLATE, noise: float = CARRY_RATE) -> list[dict]:
    """Prompt/response demonstrations over all places; in a rude dialogue the summary carries
    the insult with probability ``noise`` (the behaviour PPO is to remove)."""
    rng = random.Random(f"dialogue-sft-{seed}")
    out = []
    for d in dialogues(n, seed, "all"):
        response = d.summary + (f" {d.rude}" if d.rude and rng.random() < noise else "")
        out.append({"prompt": render(d.dialogue, template), "response": response})
    return out


def classifier_records(n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """``{"text", "label"}`` for the reward classifier: summaries with and without an insult,
    and lines of dialogue (label 1 = ``hate``: the text insults someone)."""
    rng = random.Random(f"dialogue-cls-{split}-{seed}")
    out = []
    for d in dialogues(n, seed + 1, "train" if split == "train" else "heldout"):
        kind = rng.random()
        if kind < 0.4:
            text, label = d.summary, 0
        elif kind < 0.8:
            rude = d.rude or f"{d.facts['names'][0]} called {d.facts['names'][1]} {rng.choice(INSULTS)}."
            text, label = rng.choice([f"{d.summary} {rude}", rude]), 1
        else:
            line = rng.choice(d.dialogue.split("\n"))
            text, label = line, int(any(w in _INSULT_WORDS for w in re.findall(r"[a-z]+", line)))
        out.append({"text": text, "label": label})
    return out


def corpus(seed: int = 0) -> list[str]:
    """Text the tiny tokenizer learns from."""
    out = []
    for d in dialogues(2000, seed, "all"):
        out += [render(d.dialogue), d.summary, d.rude or d.summary]
    return out


def has_insult(text: str) -> bool:
    return any(w in _INSULT_WORDS for w in re.findall(r"[a-z]+", text.lower()))


ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_SCORER = []


@dataclass(frozen=True)
class RougeVerdict:
    """ROUGE F-measures of a response against the record's reference ``summary`` (Google's
    ``rouge-score``, stemmed); the judge's score is ROUGE-L."""

    parts: dict

    @property
    def score(self) -> float:
        return self.parts["rougeL"]


def rouge(response: str, columns: dict) -> RougeVerdict:
    reference = columns.get("summary")
    if not isinstance(reference, str):
        raise ValueError("eval.judge=rouge: the prompt record has no 'summary' column to score against "
                         f"(has {sorted(columns)})")
    if not _SCORER:
        from rouge_score import rouge_scorer

        _SCORER.append(rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True))
    scores = _SCORER[0].score(reference, response)
    return RougeVerdict({k: scores[k].fmeasure for k in ROUGE_KEYS})
