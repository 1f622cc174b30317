"""Reading the data people already have: JSONL files (read line by line, so a bad record is
reported as ``file:line``), JSON arrays, and ``datasets`` directories (``save_to_disk``).

Three shapes are understood:
- SFT: ``prompt`` + ``response`` (or ``completion``), ``text`` alone, or ``messages``
  (a list of ``{"role", "content"}``, the last one the assistant's reply);
- preference pairs: ``prompt`` + ``chosen`` + ``rejected`` (+ optional ``margin``), the
  chosen/rejected dialogue style with the prompt inside both texts (split at the last
  ``\\n\\nAssistant:``), or ``chosen``/``rejected`` as message lists;
- prompts: a ``prompt`` column, or a classification set (sentence/text + label) turned into
  prompts, optionally keeping some labels and the first words only.

A malformed record is skipped and counted (``data.on_bad_record: skip``) or stops the load
(``error``); every count is in the :class:`LoadReport`, nothing is dropped silently.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TypeVar

from ..config import DataConfig

T = TypeVar("T")
ASSISTANT = "\n\nAssistant:"
_ROLES = {"user": "Human", "human": "Human", "assistant": "Assistant", "gpt": "Assistant", "system": "System"}
TEXT_FIELDS = ("prompt", "text", "sentence", "review", "content", "question", "document")


class DataError(ValueError):
    """Unusable data; the message names the file (and line or record) and the problem."""


class BadRecord(ValueError):
    """One record is malformed; the loader adds where it is."""


@dataclass
class LoadReport:
    source: str
    read: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> count
    filtered: Counter = field(default_factory=Counter)  # records left out on purpose (label filter, cap)
    first_problems: list[str] = field(default_factory=list)

    def drop(self, where: str, reason: str) -> None:
        self.dropped[reason.split(" (")[0].split(":")[0]] += 1  # the kind, without the record's details
        if len(self.first_problems) < 5:
            self.first_problems.append(f"{where}: {reason}")

    def summary(self) -> str:
        s = f"{self.source}: read {self.read}, kept {self.kept}"
        for what, counts in (("dropped", self.dropped), ("left out", self.filtered)):
            if counts:
                s += f", {what} {sum(counts.values())}: " + ", ".join(f"{n} {r}" for r, n in counts.most_common())
        return s

    def announce(self, key: str) -> None:
        """Print what was dropped or left out, so nothing goes missing unseen."""
        if self.dropped or self.filtered:
            print(f"{key}: {self.summary()}")
            for problem in self.first_problems:
                print(f"  {problem}")

    def to_dict(self) -> dict:
        return {"source": self.source, "read": self.read, "kept": self.kept, "dropped": dict(self.dropped),
                "filtered": dict(self.filtered), "first_problems": self.first_problems}


# -- raw records ---------------------------------------------------------------------------
def iter_records(path: str | Path, key: str) -> Iterator[tuple[str, Any]]:
    """(where, record) for every record; ``where`` is ``file:line`` or ``dir[record i]``.
    A line that is not JSON comes back as a :class:`BadRecord` in place of the record."""
    p = Path(path)
    if p.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as e:
            raise DataError(f"{key}={str(path)!r}: not a `datasets` directory saved with save_to_disk ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            if not ds:
                raise DataError(f"{key}={str(path)!r}: the `datasets` directory holds no splits")
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        for i, rec in enumerate(ds):
            yield f"{p}[record {i}]", rec
        return
    if not p.is_file():
        raise DataError(f"{key}={str(path)!r} does not exist")
    try:
        if p.stat().st_size == 0:
            raise DataError(f"{key}={str(path)!r}: the file is empty")
        if p.suffix == ".json":
            yield from _json_array(p, key)
            return
        # surrogateescape: a byte that is not UTF-8 becomes U+DC80..U+DCFF instead of an
        # exception that ends the load naming no line; that line is then one bad record.
        # utf-8-sig: some editors start a file with a byte-order mark.
        with p.open(encoding="utf-8-sig", errors="surrogateescape") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    line.encode("utf-8")
                except UnicodeEncodeError as e:
                    byte = ord(line[e.start]) - 0xDC00
                    yield f"{p}:{lineno}", BadRecord(f"not UTF-8 text (byte {byte:#04x} at character {e.start + 1})")
                    continue
                yield f"{p}:{lineno}", _json_record(line)
    except OSError as e:
        raise DataError(f"{key}={str(path)!r}: cannot read ({e.strerror or e})") from None


def _json_record(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        return BadRecord(f"not valid JSON ({e.msg} at column {e.colno})")
    except (ValueError, RecursionError) as e:  # an integer of more than 4300 digits; nesting too deep
        return BadRecord(f"not valid JSON ({_first_line(e)})")


def _json_array(p: Path, key: str) -> Iterator[tuple[str, Any]]:
    data = p.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"{p}:{line}: not UTF-8 text (byte {data[e.start]:#04x})") from None
    if not text.strip():
        raise DataError(f"{key}={str(p)!r}: the file is empty (white space only)")
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{p}:{e.lineno}: not valid JSON ({e.msg})") from None
    except (ValueError, RecursionError) as e:
        raise DataError(f"{p}: not valid JSON ({_first_line(e)})") from None
    if not isinstance(records, list):
        raise DataError(f"{p}: a .json file must hold a list of records (JSONL: use .jsonl)")
    for i, rec in enumerate(records):
        yield f"{p}[record {i}]", rec


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _short(v: Any, n: int = 60) -> str:
    try:
        r = repr(v)
    except ValueError:  # repr of an int beyond 4300 digits raises
        return f"an integer of {v.bit_length()} bits"
    return r if len(r) <= n else r[: n - 3] + "..."


def load(path: str | Path, key: str, parse: Callable[[Any], T], on_bad: str = "skip",
         limit: Optional[int] = None, report: Optional[LoadReport] = None) -> tuple[list[T], LoadReport]:
    """Parse every record of ``path`` with ``parse`` (which raises BadRecord, or returns None
    for a record it leaves out on purpose and counts in ``report.filtered``); ``key`` is the
    config key the path came from, for messages. ``limit`` caps the records kept."""
    report = report or LoadReport(str(path))
    out: list[T] = []
    for where, rec in iter_records(path, key):
        report.read += 1
        if limit is not None and len(out) >= limit:
            report.filtered[f"over the cap of {limit}"] += 1
            continue
        try:
            if isinstance(rec, BadRecord):
                raise rec
            if not isinstance(rec, dict):
                raise BadRecord(f"not a JSON object: {type(rec).__name__}")
            item = parse(rec)
        except BadRecord as e:
            if on_bad == "error":
                raise DataError(f"{where}: {e}") from None
            report.drop(where, str(e))
            continue
        if item is None:  # filtered on purpose by ``parse``; it counted why
            continue
        out.append(item)
    report.kept = len(out)
    if report.read == 0:
        raise DataError(f"{key}={str(path)!r}: holds no records (blank lines only)")
    if not out:
        detail = f"; first problems: {'; '.join(report.first_problems)}" if report.first_problems else ""
        raise DataError(f"{key}={str(path)!r}: no usable records ({report.summary()}){detail}")
    return out, report


# -- fields --------------------------------------------------------------------------------
def _text(rec: dict, name: str, allow_empty: bool = False) -> str:
    if name not in rec:
        raise BadRecord(f"missing key {name!r} (has {sorted(rec)})")
    v = rec[name]
    if not isinstance(v, str):
        raise BadRecord(f"{name!r} is not text: {type(v).__name__}")
    if not allow_empty and not v.strip():
        raise BadRecord(f"empty {name!r}")
    _encodable(v, name)
    return v


def _encodable(v: str, name: str) -> None:
    # JSON's "\ud800" escapes decode to lone surrogates, which the tokenizers reject later
    # with a TypeError that names neither the file nor the record.
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = _short(v[e.start:e.end])
        raise BadRecord(f"{name!r} is not valid Unicode ({bad} at character {e.start + 1})") from None


def render_messages(messages: Any, name: str) -> tuple[str, str]:
    """(prompt, reply) from a message list ending with the assistant's reply, in the
    ``\\n\\nHuman: ...\\n\\nAssistant: ...`` layout of the common dialogue preference sets."""
    if not isinstance(messages, list) or not messages:
        raise BadRecord(f"{name!r} is not a non-empty list of messages")
    lines = []
    for i, m in enumerate(messages):
        if (not isinstance(m, dict) or not isinstance(m.get("content"), str) or not isinstance(m.get("role"), str)
                or m["role"] not in _ROLES):
            raise BadRecord(f"{name}[{i}] is not a {{'role': user|assistant|system, 'content': text}} message")
        _encodable(m["content"], f"{name}[{i}].content")
        lines.append(f"\n\n{_ROLES[m['role']]}: {m['content']}")
    if _ROLES[messages[-1]["role"]] != "Assistant":
        raise BadRecord(f"the last message of {name!r} is not the assistant's reply")
    if not messages[-1]["content"].strip():
        raise BadRecord(f"empty reply in {name!r}")
    return "".join(lines[:-1]) + ASSISTANT, " " + messages[-1]["content"]


def _split_dialogue(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Prompt + two replies from full dialogue texts that share the prompt."""
    cut = chosen.rfind(ASSISTANT)
    if cut >= 0:
        prompt = chosen[:cut + len(ASSISTANT)]
    else:  # no dialogue markers: the shared prefix, back to a word boundary
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        prompt = chosen[:n] if n == len(chosen) or chosen[n].isspace() else chosen[:chosen.rfind(" ", 0, n) + 1]
    if not prompt.strip() or not rejected.startswith(prompt):
        raise BadRecord("no 'prompt' key, and chosen and rejected do not share a prompt")
    return prompt, chosen[len(prompt):], rejected[len(prompt):]


# -- the three shapes -----------------------------------------------------------------------
def parse_sft(rec: dict) -> dict[str, str]:
    """-> {"prompt", "response"}; a ``text``-only record has an empty prompt (loss on all of it)."""
    if "messages" in rec:
        prompt, response = render_messages(rec["messages"], "messages")
    elif "prompt" in rec:
        prompt = _text(rec, "prompt")
        response = _text(rec, "completion" if "completion" in rec else "response")
    elif "text" in rec:
        prompt, response = "", _text(rec, "text")
    else:
        raise BadRecord(f"expected prompt+response, prompt+completion, text or messages (has {sorted(rec)})")
    return {"prompt": prompt, "response": response}


def parse_preference(rec: dict) -> dict[str, Any]:
    """-> {"prompt", "chosen", "rejected", "margin"} (margin None when the record has none)."""
    for k in ("chosen", "rejected"):
        if k not in rec:
            raise BadRecord(f"missing key {k!r} (has {sorted(rec)})")
    if isinstance(rec["chosen"], list):
        prompt, chosen = render_messages(rec["chosen"], "chosen")
        p2, rejected = render_messages(rec["rejected"], "rejected")
        if p2 != prompt:
            raise BadRecord("chosen and rejected conversations differ before the last reply")
    elif "prompt" in rec:
        prompt, chosen, rejected = _text(rec, "prompt"), _text(rec, "chosen"), _text(rec, "rejected")
    else:
        prompt, chosen, rejected = _split_dialogue(_text(rec, "chosen"), _text(rec, "rejected"))
    if not chosen.strip() or not rejected.strip():
        raise BadRecord("empty chosen or rejected reply")
    if chosen == rejected:
        raise BadRecord("chosen and rejected are identical")
    margin = rec.get("margin")
    if margin is not None:
        try:
            ok = not isinstance(margin, bool) and isinstance(margin, (int, float)) and math.isfinite(float(margin))
        except OverflowError:  # an integer beyond a float's range
            ok = False
        if not ok:
            raise BadRecord(f"'margin' is not a finite number: {_short(margin)}")
        margin = float(margin)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "margin": margin}


def prompt_parser(cfg: DataConfig, report: LoadReport) -> Callable[[dict], Optional[str]]:
    """A parser for prompt records: ``prompt``, or a classification set's text column (+ label)."""
    keep = None if cfg.keep_labels is None else {str(x) for x in cfg.keep_labels}

    def parse(rec: dict) -> Optional[str]:
        name = cfg.text_field or next((k for k in TEXT_FIELDS if k in rec), None)
        if name is None:
            raise BadRecord(f"no text column: expected one of {list(TEXT_FIELDS)} or data.text_field "
                            f"(has {sorted(rec)})")
        text = _text(rec, name).strip()
        if keep is not None:
            if cfg.label_field not in rec:
                raise BadRecord(f"missing label key {cfg.label_field!r} (data.keep_labels is set)")
            if str(rec[cfg.label_field]) not in keep:
                report.filtered["label not in data.keep_labels"] += 1
                return None
        if cfg.prompt_words is not None:
            text = " ".join(text.split()[: cfg.prompt_words])
        return text

    return parse


def load_sft(path: str, key: str, on_bad: str, limit: Optional[int] = None):
    return load(path, key, parse_sft, on_bad, limit)


def load_preferences(path: str, key: str, on_bad: str, limit: Optional[int] = None):
    return load(path, key, parse_preference, on_bad, limit)


def load_prompts(cfg: DataConfig, path: str, key: str = "data.prompts_path",
                 limit: Optional[int] = None) -> tuple[list[str], LoadReport]:
    report = LoadReport(str(path))
    return load(path, key, prompt_parser(cfg, report), cfg.on_bad_record, limit, report)
