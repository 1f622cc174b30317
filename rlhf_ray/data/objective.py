"""Classification asked as a question ("objective questions"), scored by the generated label's
exact match: the evaluation of the paper this project follows, on four FewCLUE sets.

Records come in the published FewCLUE shapes:

- EPRSTMT (sentiment): ``sentence``, ``label`` (``Positive`` / ``Negative``);
- TNEWS (news topic): ``sentence``, ``label_desc`` (``news_sports``, ...);
- OCNLI (inference): ``sentence1``, ``sentence2``, ``label`` (``entailment`` / ``neutral`` /
  ``contradiction``; ``-`` where annotators disagreed: skipped);
- BUSTM (paraphrase): ``sentence1``, ``sentence2``, ``label`` (``1`` / ``0``).

Each record becomes a question from a template (its fields in braces, ``{options}`` for the
label words) and an answer, the label's word; ``label_match`` is the judge: the response's first
word against the answer. ``convert`` turns a set's records into the project's own records (SFT
``prompt``/``response``, PPO and evaluation prompts with ``answer`` and ``set`` columns), which
``rlhf-ray objective-data`` writes as JSONL; the evaluation then reports accuracy per set and
their mean.

The generated task (``data.task: objective``, no download) makes records in the same four shapes
from the project's own small English vocabulary; held-out records use names, subjects and
topics no training record uses.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from .synthetic import NEG_CLOSERS, NEGATIVE, POS_CLOSERS, POSITIVE, SUBJECTS


@dataclass(frozen=True)
class Shape:
    """One FewCLUE set's record shape and how it is asked by default."""

    fields: tuple[str, ...]  # text columns, in the order the question uses them
    label: str  # the label column
    words: dict[str, str]  # label value -> the word the model answers with (empty: the value itself)
    template: str
    skip: tuple[str, ...] = ()  # label values that are no label (OCNLI's "-")
    strip_prefix: str = ""  # taken off a label value to make its word (TNEWS: "news_")

    def word(self, value: Any) -> str:
        v = str(value)
        if self.words:
            return self.words[v]
        return v[len(self.strip_prefix):] if self.strip_prefix and v.startswith(self.strip_prefix) else v


SHAPES: dict[str, Shape] = {
    "eprstmt": Shape(("sentence",), "label", {"Positive": "positive", "Negative": "negative"},
                     "{sentence} is this review positive or negative? answer:"),
    "tnews": Shape(("sentence",), "label_desc", {}, "{sentence} which topic is this, {options}? answer:",
                   strip_prefix="news_"),
    "ocnli": Shape(("sentence1", "sentence2"), "label", {"entailment": "yes", "neutral": "maybe",
                                                          "contradiction": "no"},
                   "{sentence1} does it follow that {sentence2} yes, no or maybe? answer:", skip=("-",)),
    "bustm": Shape(("sentence1", "sentence2"), "label", {"1": "yes", "0": "no"},
                   "{sentence1} and {sentence2} do they mean the same, yes or no? answer:"),
}


class NotALabel(ValueError):
    """A record whose label is none of the shape's (or is marked as no label)."""


def _clean(text: Any) -> str:
    return " ".join(str(text).split())


def question(rec: dict, shape: Shape, template: Optional[str] = None, options: Iterable[str] = ()) -> tuple[str, str]:
    """(question, answer word) of one record. Raises KeyError naming a missing column and
    NotALabel for a label outside the shape's words or one it skips."""
    for name in (*shape.fields, shape.label):
        if name not in rec:
            raise KeyError(f"missing column {name!r} (has {sorted(rec)})")
    value = str(rec[shape.label])
    if value in shape.skip:
        raise NotALabel(f"label {value!r} marks a record with no agreed label")
    if shape.words and value not in shape.words:
        raise NotALabel(f"label {value!r} is not one of {sorted(shape.words)}")
    opts = ", ".join(options) or ", ".join(dict.fromkeys(shape.words.values()))
    text = (template or shape.template).format(**{f: _clean(rec[f]) for f in shape.fields}, options=opts)
    return text, shape.word(value)


def shape_with(shape: Shape, labels: Optional[dict[str, str]] = None) -> Shape:
    """``shape`` with its label words replaced (``--labels``: e.g. Chinese label words)."""
    return shape if not labels else Shape(shape.fields, shape.label, dict(labels), shape.template, shape.skip)


def convert(records: Iterable[dict], set_name: str, shape: Shape, template: Optional[str] = None) -> tuple[
        list[dict[str, str]], list[dict[str, Any]], dict[str, int]]:
    """A set's records as (SFT records, prompt records, counts): SFT ``{"prompt", "response"}``
    with the answer word after a space; prompts ``{"prompt", "answer", "set"}``. Records with a
    missing column or no label are counted and left out."""
    records = list(records)
    options: list[str] = list(dict.fromkeys(shape.words.values())) if shape.words else sorted(
        {shape.word(r[shape.label]) for r in records if shape.label in r and str(r[shape.label]) not in shape.skip})
    sft, prompts, counts = [], [], {"read": 0, "kept": 0, "missing_column": 0, "no_label": 0}
    for rec in records:
        counts["read"] += 1
        try:
            text, answer = question(rec, shape, template, options)
        except KeyError:
            counts["missing_column"] += 1
            continue
        except NotALabel:
            counts["no_label"] += 1
            continue
        counts["kept"] += 1
        sft.append({"prompt": text, "response": " " + answer})
        prompts.append({"prompt": text, "answer": answer, "set": set_name})
    return sft, prompts, counts


_WORD = re.compile(r"[^\W_]+", re.UNICODE)


@dataclass(frozen=True)
class LabelMatch:
    score: float  # 1.0: the response's first word is the record's answer


def first_word(text: str) -> str:
    found = _WORD.search(text.lower())
    return found.group(0) if found else ""


def label_match(response: str, columns: dict) -> LabelMatch:
    """The judge: the first word of the response (case and punctuation ignored) against the
    record's ``answer`` (a label word)."""
    want = first_word(str(columns.get("answer", "")))
    return LabelMatch(float(bool(want) and first_word(response) == want))


def by_set(scores: list[float], columns: list[dict]) -> dict[str, float]:
    """Accuracy per ``set`` column (records without one count as ``all``)."""
    groups: dict[str, list[float]] = {}
    for s, c in zip(scores, columns):
        groups.setdefault(str(c.get("set", "all")), []).append(s)
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}


# -- the generated task ---------------------------------------------------------------------
NAMES = ("ann", "ben", "cal", "dee", "eve", "fay", "gus", "hal", "ida", "jon", "kim", "lee")
ITEMS = ("apples", "pens", "books", "cups", "hats", "keys", "toys", "maps")
PLACES = ("market", "shop", "fair", "station")
TOPICS = {
    "news_sports": ("team", "match", "goal", "coach", "league", "player"),
    "news_tech": ("robot", "chip", "software", "phone", "network", "laptop"),
    "news_finance": ("bank", "market", "price", "stock", "budget", "tax"),
    "news_travel": ("hotel", "flight", "beach", "museum", "trip", "train"),
}
VERBS = ("clean", "fix", "sell", "paint", "move", "find")
THINGS = ("car", "bike", "desk", "door", "lamp", "roof")
NOISE = 0.35  # SFT demonstrations with a wrong label: the SFT policy answers right ~2 times in 3
HELD = 4  # every 4th name, subject, topic word and thing is held out


def _split(values: tuple[str, ...], split: str) -> tuple[str, ...]:
    held = tuple(values[HELD - 1::HELD])
    return {"train": tuple(v for v in values if v not in held), "heldout": held, "all": values}[split]


def _eprstmt(rng: random.Random, split: str) -> dict:
    pos = rng.random() < 0.5
    w = POSITIVE if pos else NEGATIVE
    subject = rng.choice(_split(tuple(SUBJECTS), split))
    text = f"the {subject} was {rng.choice(w)} and {rng.choice(w)}. {rng.choice(POS_CLOSERS if pos else NEG_CLOSERS)}."
    return {"sentence": text, "label": "Positive" if pos else "Negative"}


def _tnews(rng: random.Random, split: str) -> dict:
    desc = rng.choice(sorted(TOPICS))
    words = _split(TOPICS[desc], split)
    a, b = rng.choice(words), rng.choice(words)
    return {"sentence": f"new {a} news: the {b} story of the week.", "label_desc": desc}


def _ocnli(rng: random.Random, split: str) -> dict:
    name, item, place = rng.choice(_split(NAMES, split)), rng.choice(ITEMS), rng.choice(PLACES)
    n = rng.randint(2, 9)
    label = rng.choice(("entailment", "neutral", "contradiction"))
    s2 = {"entailment": f"{name} bought {item}.", "neutral": f"{name} likes the {place}.",
          "contradiction": f"{name} bought no {item}."}[label]
    return {"sentence1": f"{name} bought {n} {item} at the {place}.", "sentence2": s2, "label": label}


def _bustm(rng: random.Random, split: str) -> dict:
    verb, thing = rng.choice(VERBS), rng.choice(_split(THINGS, split))
    same = rng.random() < 0.5
    other_verb = verb if same else rng.choice([v for v in VERBS if v != verb])
    return {"sentence1": f"how do i {verb} my {thing}?", "sentence2": f"what is the way to {other_verb} my {thing}?",
            "label": "1" if same else "0"}


_MAKERS = {"eprstmt": _eprstmt, "tnews": _tnews, "ocnli": _ocnli, "bustm": _bustm}


def generated_sets(n: int, seed: int = 0, split: str = "train") -> dict[str, list[dict]]:
    """``n`` records in each of the four FewCLUE shapes."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be train, heldout or all, got {split!r}")
    rng = random.Random(f"objective-{split}-{seed}")
    return {name: [make(rng, split) for _ in range(n)] for name, make in _MAKERS.items()}


def _generated(n: int, seed: int, split: str) -> tuple[list[dict], list[dict]]:
    per_set = max(1, n // len(_MAKERS))
    sft, prompts = [], []
    for name, records in generated_sets(per_set, seed, split).items():
        s, p, _ = convert(records, name, SHAPES[name])
        sft += s
        prompts += p
    order = random.Random(f"objective-order-{split}-{seed}")
    idx = list(range(len(prompts)))
    order.shuffle(idx)
    return [sft[i] for i in idx], [prompts[i] for i in idx]


def sft_records(n: int, seed: int = 0, noise: float = NOISE, split: str = "all") -> list[dict[str, str]]:
    """Questions over all names and words, answered by a demonstrator wrong ``noise`` of the
    time (another of the set's words): the SFT policy learns the format and answers right about
    two times in three, what PPO with a reward that knows the answer can raise. ``noise=0``:
    a clean labelled training set (``split="train"``: without the held-out words)."""
    rng = random.Random(f"objective-sft-{seed}")
    sft, prompts = _generated(n, seed, split)
    out = []
    for s, p in zip(sft, prompts):
        words = _words_of(p["set"])
        answer = p["answer"] if rng.random() >= noise else rng.choice([w for w in words if w != p["answer"]])
        out.append({"prompt": s["prompt"], "response": " " + answer})
    return out


def _words_of(set_name: str) -> list[str]:
    shape = SHAPES[set_name]
    return list(dict.fromkeys(shape.words.values())) if shape.words else [shape.word(d) for d in sorted(TOPICS)]


def prompts(n: int, seed: int = 0, split: str = "train") -> list[tuple[str, dict]]:
    """(question, columns ``answer`` and ``set``) for PPO and the held-out judge."""
    return [(p["prompt"], {"answer": p["answer"], "set": p["set"]}) for p in _generated(n, seed, split)[1]]


def preference_pairs(n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """The right label word chosen over a wrong one (margin 1)."""
    rng = random.Random(f"objective-pairs-{split}-{seed}")
    out = []
    for text, cols in prompts(n, seed, split):
        wrong = rng.choice([w for w in _words_of(cols["set"]) if w != cols["answer"]])
        out.append({"prompt": text, "chosen": " " + cols["answer"], "rejected": " " + wrong, "margin": 1.0})
    return out


def corpus(n: int = 4000, seed: int = 0) -> list[str]:
    """Text for the tiny tokenizer (``model.tiny_corpus: objective``)."""
    sft, _ = _generated(n, seed, "all")
    return [s["prompt"] + s["response"] for s in sft] + [
        f"{w}" for name in _MAKERS for w in _words_of(name)]
