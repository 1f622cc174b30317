"""Reading the data people already have: JSONL files (read line by line, so a bad record is
reported as ``file:line``), JSON arrays, and ``datasets`` directories (``save_to_disk``).

Three shapes are understood:
- SFT: ``prompt`` + ``response`` (or ``completion``), ``text`` alone, or ``messages``
  (a list of ``{"role", "content"}``, the last one the assistant's reply);
- preference pairs: ``prompt`` + ``chosen`` + ``rejected`` (+ optional ``margin``), the
  chosen/rejected dialogue style with the prompt inside both texts (split at the last
  ``\\n\\nAssistant:``), or ``chosen``/``rejected`` as message lists;
- prompts: a ``prompt`` column (text, or a list of messages), ``messages``, or a classification
  set (sentence/text + label) turned into prompts, optionally keeping some labels and the first
  words only.

Message lists are rendered by a :class:`Renderer` (``data.chat_template``): the tokenizer's chat
template, or the plain ``\n\nHuman: ...\n\nAssistant:`` layout. A path that is neither a
local file nor a directory is read as a ``datasets`` hub name (``org/name[/folder][@config][:split]``).

A malformed record is skipped and counted (``data.on_bad_record: skip``) or stops the load
(``error``); every count is in the :class:`LoadReport`, nothing is dropped silently.
"""
from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TypeVar

from ..config import ConfigError, DataConfig, first_line

T = TypeVar("T")
log = logging.getLogger(__name__)
ASSISTANT = "\n\nAssistant:"
_ROLES = {"user": "Human", "human": "Human", "assistant": "Assistant", "gpt": "Assistant", "system": "System"}
_TEMPLATE_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}
TEXT_FIELDS = ("prompt", "messages", "text", "sentence", "review", "content", "question", "document")


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
        """Say what was dropped (a warning: records are lost) or left out, cut or capped (on
        purpose: info), so nothing goes missing unseen."""
        level = logging.WARNING if self.dropped else logging.INFO
        log.log(level, "%s: %s", key, self.summary())  # how much was used, always
        for problem in self.first_problems:
            log.log(level, "  %s", problem)

    def to_dict(self) -> dict:
        return {"source": self.source, "read": self.read, "kept": self.kept, "dropped": dict(self.dropped),
                "filtered": dict(self.filtered), "first_problems": self.first_problems}


# -- raw records ---------------------------------------------------------------------------
def iter_records(path: str | Path, key: str) -> Iterator[tuple[str, Any]]:
    """(where, record) for every record; ``where`` is ``file:line`` or ``dir[record i]``.
    A line that is not JSON comes back as a :class:`BadRecord` in place of the record."""
    p = Path(path)
    if p.is_dir() or (not p.is_file() and is_hub_name(str(path))):
        # A `datasets` directory, or a hub dataset: the same records either way.
        ds = _saved_dataset(p, key) if p.is_dir() else _hub_dataset(str(path), key)
        for i, rec in enumerate(ds):
            yield f"{p if p.is_dir() else path}[record {i}]", rec
        return
    if not p.is_file():
        raise DataError(f"{key}={str(path)!r} does not exist")
    try:
        if p.stat().st_size == 0:
            raise DataError(f"{key}={str(path)!r}: the file is empty")
        if p.suffix == ".json" and not _json_lines(p):
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


def _saved_dataset(p: Path, key: str):
    """The ``train`` split (or the only one) of a directory written by ``save_to_disk``."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as e:
        raise DataError(f"{key}={str(p)!r}: not a `datasets` directory saved with save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if not ds:
            raise DataError(f"{key}={str(p)!r}: the `datasets` directory holds no splits")
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    return ds


def is_hub_name(path: str) -> bool:
    """``org/name``, optionally ``/folder`` (a subset kept in a folder, e.g.
    ``Anthropic/hh-rlhf/harmless-base``), ``@config`` and ``:split``: not a path people write
    for a local file (``./x``, ``/x``, ``~/x``, ``x.jsonl``)."""
    return (re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)*(@[\w.-]+)?(:[\w\[\]:%+.-]+)?", path) is not None
            and not path.split(":")[0].split("@")[0].endswith((".json", ".jsonl")))


def hub_parts(path: str) -> tuple[str, Optional[str], Optional[str], str]:
    """(repo, folder or None, config or None, split) of a hub name; split defaults to train."""
    name, _, split = path.partition(":")
    name, _, config = name.partition("@")
    repo, _, folder = name.partition("/")
    if folder:
        second, _, folder = folder.partition("/")
        repo = f"{repo}/{second}"
    return repo, folder or None, config or None, split or "train"


def _hub_dataset(path: str, key: str):
    """A split of a ``datasets`` hub dataset (see ``is_hub_name``), from the local cache or
    downloaded; a failure is one line saying how to use a local copy instead."""
    import datasets

    repo, folder, config, split = hub_parts(path)
    extra = {k: v for k, v in (("name", config), ("data_dir", folder)) if v}
    try:
        return datasets.load_dataset(repo, split=split, **extra)
    except Exception as e:  # not found, offline, gated, a bad split: one line for all of them
        why = ("offline: HF_DATASETS_OFFLINE or HF_HUB_OFFLINE is set, and it is not in the local cache"
               if datasets.config.HF_HUB_OFFLINE else first_line(e))
        args = "".join(f", {k}='{v}'" for k, v in extra.items())
        raise DataError(
            f"{key}={path!r}: not a local file or directory, and the `datasets` hub cannot provide it ({why}); "
            f"save it where the hub is reachable (`python -c \"import datasets; datasets.load_dataset('{repo}'{args}, "
            f"split='{split}').save_to_disk('DIR')\"`) and set {key}=DIR") from None


def _json_lines(p: Path) -> bool:
    """Whether a ``.json`` file holds JSON lines (one object per line, as the CLUE and FewCLUE
    files do) rather than one JSON list: its first line is a whole JSON object."""
    with p.open(encoding="utf-8-sig", errors="replace") as f:
        first = next((line for line in f if line.strip()), "")
    if not first.lstrip().startswith("{"):
        return False
    try:
        return isinstance(json.loads(first), dict)
    except ValueError:
        return False


def _json_record(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        return BadRecord(f"not valid JSON ({e.msg} at column {e.colno})")
    except (ValueError, RecursionError) as e:  # an integer of more than 4300 digits; nesting too deep
        return BadRecord(f"not valid JSON ({first_line(e)})")


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
        raise DataError(f"{p}: not valid JSON ({first_line(e)})") from None
    if not isinstance(records, list):
        raise DataError(f"{p}: a .json file must hold a list of records, or one record per line (JSONL)")
    for i, rec in enumerate(records):
        yield f"{p}[record {i}]", rec


def _short(v: Any, n: int = 60) -> str:
    try:
        r = repr(v)
    except ValueError:  # repr of an int beyond 4300 digits raises
        return f"an integer of {v.bit_length()} bits"
    return r if len(r) <= n else r[: n - 3] + "..."


def load(path: str | Path, key: str, parse: Callable[[Any], T], on_bad: str = "skip",
         limit: Optional[int] = None, report: Optional[LoadReport] = None,
         wheres: Optional[list[str]] = None) -> tuple[list[T], LoadReport]:
    """Parse every record of ``path`` with ``parse`` (which raises BadRecord, or returns None
    for a record it leaves out on purpose and counts in ``report.filtered``); ``key`` is the
    config key the path came from, for messages. ``limit`` caps the records kept (the user's
    cap: nothing is capped by default); ``wheres`` gets each kept record's ``file:line``."""
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
        if wheres is not None:
            wheres.append(where)
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


def _messages(messages: Any, name: str) -> list[dict[str, str]]:
    """The messages with their roles as chat templates name them (user, assistant, system)."""
    if not isinstance(messages, list) or not messages:
        raise BadRecord(f"{name!r} is not a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        if (not isinstance(m, dict) or not isinstance(m.get("content"), str) or not isinstance(m.get("role"), str)
                or m["role"] not in _ROLES):
            raise BadRecord(f"{name}[{i}] is not a {{'role': user|assistant|system, 'content': text}} message")
        _encodable(m["content"], f"{name}[{i}].content")
        out.append({"role": _TEMPLATE_ROLES[m["role"]], "content": m["content"]})
    return out


class Renderer:
    """Message lists as text: the tokenizer's chat template (``tokenizer`` set; ``template``
    overrides its own), or, with no tokenizer, the ``\\n\\nHuman: ...\\n\\nAssistant:`` layout of
    the common dialogue preference sets. Build it with :func:`renderer`.

    Rendered text never starts with the BOS token when the tokenizer adds one itself (templates
    often write ``{{ bos_token }}``), so tokenizing it with special tokens gives one BOS, not two."""

    def __init__(self, tokenizer=None, template: Optional[str] = None):
        self.tokenizer, self.template = tokenizer, template
        bos = getattr(tokenizer, "bos_token", None)
        adds_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
        self._bos = bos if adds_bos else None

    def dialogue(self, messages: Any, name: str) -> tuple[str, str]:
        """(prompt, reply) from a conversation ending with the assistant's reply: the messages
        before it with the generation prompt, and the reply's text (no end-of-turn token)."""
        msgs = _messages(messages, name)
        if msgs[-1]["role"] != "assistant":
            raise BadRecord(f"the last message of {name!r} is not the assistant's reply")
        if not msgs[-1]["content"].strip():
            raise BadRecord(f"empty reply in {name!r}")
        if self.tokenizer is None:
            return self._plain(msgs[:-1]), " " + msgs[-1]["content"]
        return self._apply(msgs[:-1], name), msgs[-1]["content"]

    def prompt(self, messages: Any, name: str) -> str:
        """A conversation to be answered: all of it, with the generation prompt."""
        msgs = _messages(messages, name)
        if msgs[-1]["role"] == "assistant":
            raise BadRecord(f"the last message of {name!r} is the assistant's; a prompt ends with the user's turn")
        return self._plain(msgs) if self.tokenizer is None else self._apply(msgs, name)

    @staticmethod
    def _plain(messages: list[dict]) -> str:
        return "".join(f"\n\n{_ROLES[m['role']]}: {m['content']}" for m in messages) + ASSISTANT

    def _apply(self, msgs: list[dict[str, str]], name: str) -> str:
        try:
            text = self.tokenizer.apply_chat_template(msgs, chat_template=self.template, tokenize=False,
                                                      add_generation_prompt=True)
        except Exception as e:  # jinja2's TemplateError (also a template's raise_exception), ValueError
            raise BadRecord(f"the chat template cannot render {name!r} ({first_line(e)})") from None
        if self._bos and text.startswith(self._bos):
            text = text[len(self._bos):]
        return text


PLAIN = Renderer()
_SAMPLE = [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Hi."},
           {"role": "user", "content": "How are you?"}, {"role": "assistant", "content": "Well."}]


def renderer(cfg: DataConfig, tokenizer) -> Renderer:
    """How this run renders message lists (``data.chat_template``). A template file that cannot
    be read or cannot render a short conversation is a ConfigError here, before any actor starts."""
    choice = cfg.chat_template
    if choice == "none" or (choice == "auto" and not getattr(tokenizer, "chat_template", None)):
        return PLAIN
    if choice == "auto":
        return Renderer(tokenizer)
    where = f"data.chat_template={choice!r}"
    try:
        r = Renderer(tokenizer, Path(choice).expanduser().read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}: cannot read the template file ({getattr(e, 'strerror', None) or e})") from None
    try:
        r.dialogue(_SAMPLE, "a user/assistant sample")
    except BadRecord as e:
        raise ConfigError(f"{where}: {e}") from None
    return r


def _dialogue_turn(text: str, name: str) -> tuple[str, str]:
    """(the dialogue up to and with its last ``ASSISTANT`` marker, the reply after it)."""
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        raise BadRecord(f"{name!r} has no {ASSISTANT!r} turn to split the prompt from the reply at")
    prompt, reply = text[:cut + len(ASSISTANT)], text[cut + len(ASSISTANT):]
    if not reply.strip():
        raise BadRecord(f"empty reply at the end of {name!r}")
    return prompt, reply


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
def parse_sft(rec: dict, render: Renderer = PLAIN, dialogue_template: str = "summarize: {dialogue}") -> dict[str, str]:
    """-> {"prompt", "response"}; a ``text``-only record has an empty prompt (loss on all of it);
    ``question`` + ``answer`` (GSM8K's shape) is a prompt and its worked answer; ``dialogue`` +
    ``summary`` (SAMSum's, DialogSum's) is ``dialogue_template`` filled and the summary."""
    if "dialogue" in rec and "summary" in rec and "prompt" not in rec:
        return {"prompt": dialogue_template.format(dialogue=_text(rec, "dialogue").strip()),
                "response": _text(rec, "summary").strip()}
    if "messages" in rec:
        prompt, response = render.dialogue(rec["messages"], "messages")
    elif "question" in rec and "answer" in rec and "prompt" not in rec:
        prompt, response = _text(rec, "question"), " " + _text(rec, "answer").strip()
    elif "chosen" in rec and "prompt" not in rec and isinstance(rec["chosen"], str):
        prompt, response = _dialogue_turn(_text(rec, "chosen"), "chosen")  # a preference set: its chosen reply
    elif "prompt" in rec:
        prompt = _text(rec, "prompt")
        response = _text(rec, "completion" if "completion" in rec else "response")
    elif "text" in rec:
        prompt, response = "", _text(rec, "text")
    else:
        raise BadRecord(f"expected prompt+response, prompt+completion, question+answer, dialogue+summary, text or messages "
                        f"(has {sorted(rec)})")
    return {"prompt": prompt, "response": response}


def parse_preference(rec: dict, render: Renderer = PLAIN) -> dict[str, Any]:
    """-> {"prompt", "chosen", "rejected", "margin"} (margin None when the record has none)."""
    for k in ("chosen", "rejected"):
        if k not in rec:
            raise BadRecord(f"missing key {k!r} (has {sorted(rec)})")
    if isinstance(rec["chosen"], list):
        prompt, chosen = render.dialogue(rec["chosen"], "chosen")
        p2, rejected = render.dialogue(rec["rejected"], "rejected")
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


def prompt_parser(cfg: DataConfig, report: LoadReport,
                  render: Renderer = PLAIN) -> Callable[[dict], Optional[tuple[str, dict]]]:
    """A parser for prompt records: ``prompt`` or ``messages`` (a message list is rendered whole,
    with the generation prompt), or a classification set's text column (+ label). It gives
    (text, the record's other columns): the columns travel with the prompt to the reward."""
    keep = None if cfg.keep_labels is None else {str(x) for x in cfg.keep_labels}

    def parse(rec: dict) -> Optional[tuple[str, dict]]:
        name = cfg.text_field or next((k for k in TEXT_FIELDS if k in rec), None)
        if name is None and isinstance(rec.get("dialogue"), str):  # SAMSum's shape: the summary stays a column
            return cfg.dialogue_template.format(dialogue=_text(rec, "dialogue").strip()), {
                k: v for k, v in rec.items() if k != "dialogue"}
        if name is None and isinstance(rec.get("chosen"), str):  # a preference set: the dialogue before the reply
            return _dialogue_turn(_text(rec, "chosen"), "chosen")[0], {k: v for k, v in rec.items()}
        if name is None:
            raise BadRecord(f"no text column: expected one of {list(TEXT_FIELDS)} or data.text_field "
                            f"(has {sorted(rec)})")
        conversation = isinstance(rec.get(name), list)
        text = render.prompt(rec[name], name) if conversation else _text(rec, name).strip()
        if keep is not None:
            if cfg.label_field not in rec:
                raise BadRecord(f"missing label key {cfg.label_field!r} (data.keep_labels is set)")
            if str(rec[cfg.label_field]) not in keep:
                report.filtered["label not in data.keep_labels"] += 1
                return None
        if cfg.prompt_words is not None and not conversation:  # a first-N-words cut is for plain texts
            text = " ".join(text.split()[: cfg.prompt_words])
        return text, {k: v for k, v in rec.items() if k != name}

    return parse


def load_sft(path: str, key: str, on_bad: str, limit: Optional[int] = None, render: Renderer = PLAIN,
             dialogue_template: str = "summarize: {dialogue}"):
    return load(path, key, lambda rec: parse_sft(rec, render, dialogue_template), on_bad, limit)


def load_preferences(path: str, key: str, on_bad: str, limit: Optional[int] = None, render: Renderer = PLAIN):
    return load(path, key, lambda rec: parse_preference(rec, render), on_bad, limit)


def load_prompts(cfg: DataConfig, path: str, key: str = "data.prompts_path",
                 limit: Optional[int] = None, render: Renderer = PLAIN) -> tuple[list[str], LoadReport]:
    records, report = load_prompt_records(cfg, path, key, limit, render)
    return [text for text, _ in records], report


def load_prompt_records(cfg: DataConfig, path: str, key: str = "data.prompts_path", limit: Optional[int] = None,
                        render: Renderer = PLAIN, wheres: Optional[list[str]] = None):
    """([(text, other columns)], report) of a prompt file."""
    report = LoadReport(str(path))
    return load(path, key, prompt_parser(cfg, report, render), cfg.on_bad_record, limit, report, wheres)
