"""The config reference: every key's type, default, unit and meaning.

One source of truth: the comments beside (or directly above) each field of the dataclasses in
``rlhf_ray/config.py``, read from the source, so a new key documents itself where it is declared.
``rlhf-ray config --explain [SECTION]`` prints it; ``make docs`` writes ``docs/config-reference.md``
(a test fails when that file is out of date or a key has no comment).
"""
from __future__ import annotations

import dataclasses
import inspect
import io
import re
import sys
import tokenize
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from . import config as C

REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "config-reference.md"
_FIELD = re.compile(r"^    (\w+):")
_UNITS = {"_s": "seconds", "_mib": "MiB", "_gib": "GiB", "_tokens": "tokens"}


@dataclass(frozen=True)
class KeyDoc:
    key: str  # dotted, e.g. ppo.clip_eps
    type: str
    default: str
    unit: str
    doc: str


def _comments(cls: type) -> dict[str, str]:
    """Field name -> its comment: the block of ``# ...`` lines right above it, its trailing
    comment, and that comment's continuation lines (``#    ...``, aligned under it)."""
    lines, _ = inspect.getsourcelines(cls)
    trailing: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO("".join(lines)).readline):
        if tok.type == tokenize.COMMENT:
            trailing[tok.start[0] - 1] = tok.string
    out: dict[str, str] = {}
    for i, line in enumerate(lines):
        m = _FIELD.match(line)
        if not m:
            continue
        parts: list[str] = []
        j = i - 1
        while j >= 0 and re.match(r"^    # \S", lines[j]):  # a block comment (not a continuation)
            parts.insert(0, lines[j].strip()[2:])
            j -= 1
        if i in trailing and line.strip() != trailing[i]:
            parts.append(trailing[i].lstrip("#").strip())
            j = i + 1
            while j < len(lines) and re.match(r"^\s*#\s{2,}\S", lines[j]):
                parts.append(lines[j].strip().lstrip("#").strip())
                j += 1
        out[m.group(1)] = " ".join(parts).strip()
    return out


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return f"{_type_name(rest[0])} or null"
    if origin is list:
        return f"list of {_type_name(args[0])}" if args else "list"
    if dataclasses.is_dataclass(tp):
        return "record"
    return getattr(tp, "__name__", str(tp))


def _default(f: dataclasses.Field) -> str:
    v = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, list):
        return "[" + ", ".join(map(str, v)) + "]"
    return str(v) if v != "" else "''"


def _unit(name: str) -> str:
    for suffix, unit in _UNITS.items():
        if name.endswith(suffix):
            return unit
    return ""


def keys(section: Optional[str] = None) -> list[KeyDoc]:
    """Every config key (of ``section`` only, if given), in declaration order."""
    sections = C._sections()
    if section is not None and section not in sections:
        raise C.ConfigError(f"config --explain: {section}: unknown section{C._did_you_mean(section, sections)}; "
                            f"the sections are {', '.join(sections)}")
    out = []
    for name, cls in sections.items():
        if section not in (None, name):
            continue
        out += _section_keys(name, cls)
    return out


def _section_keys(prefix: str, cls: type) -> list[KeyDoc]:
    """The keys of one dataclass, each followed by those of its list-of-records items
    (reward.functions[].path, ...)."""
    hints, notes, out = typing.get_type_hints(cls), _comments(cls), []
    for f in dataclasses.fields(cls):
        out.append(KeyDoc(f"{prefix}.{f.name}", _type_name(hints[f.name]), _default(f), _unit(f.name),
                          notes.get(f.name, "")))
        item = C._record_item(cls, f.name)
        if item is not None:
            out += _section_keys(f"{prefix}.{f.name}[]", item)
    return out


def _summary(cls: type) -> str:
    return " ".join((cls.__doc__ or "").split())


def markdown() -> str:
    """``docs/config-reference.md``."""
    out = ["# Configuration reference", "",
           "Generated from the comments in `rlhf_ray/config.py` by `make docs` "
           "(`rlhf-ray config --explain [SECTION]` prints the same); do not edit by hand.", "",
           "Set a key in a YAML file (`section:` then `key: value`), or on the command line as "
           "`section.key=value` (also `--section.key=value` or `--section.key value`). Several `--config` files "
           "are layered, each over the ones before. `rlhf-ray config` prints the resolved config.", "",
           "## Renamed keys", "",
           "The old names still load, with one warning.", "",
           "| old | new |", "|---|---|"]
    out += [f"| `{old}` | `{new}` |" for old, new in C.RENAMED_KEYS.items()]
    out += [f"| `{k}: {old}` | `{k}: {new}` |" for k, m in C.RENAMED_VALUES.items() for old, new in m.items()]
    out.append("")
    sections = C._sections()
    for name, cls in sections.items():
        out += [f"## {name}", "", _summary(cls), "", "| key | type | default | unit | meaning |", "|---|---|---|---|---|"]
        for k in keys(name):
            doc = k.doc.replace("|", "\\|")
            out.append(f"| `{k.key}` | {k.type} | `{k.default}` | {k.unit} | {doc} |")
        out.append("")
    return "\n".join(out)


def explain(section: Optional[str] = None, width: int = 100) -> str:
    """The reference as plain text for a terminal."""
    import textwrap

    out, current = [], None
    sections = C._sections()
    for k in keys(section):
        name = k.key.split(".")[0]
        if name != current:
            current = name
            out += ["" if out else "", f"[{name}] {_summary(sections[name])}"]
        unit = f", {k.unit}" if k.unit else ""
        out.append(f"  {k.key} = {k.default}  ({k.type}{unit})")
        out += textwrap.wrap(k.doc, width, initial_indent="      ", subsequent_indent="      ")
    if section is None:
        out += ["", "renamed (old names still load, with a warning): "
                + ", ".join(f"{o} -> {n}" for o, n in C.RENAMED_KEYS.items())
                + ", " + ", ".join(f"{k}={o} -> {k}={n}" for k, m in C.RENAMED_VALUES.items() for o, n in m.items())]
    return "\n".join(out).lstrip("\n") + "\n"


if __name__ == "__main__":  # make docs
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else REFERENCE
    target.write_text(markdown())
    print(f"wrote {target}")
