"""Reward components and how they combine: a reward model, a built-in rule, a user's Python
functions (``reward.functions``) and a remote scorer (``reward.url``). Each gives one score per
response, or None (no score: it counts as 0 in the sum and is counted apart); the reward is
their weighted sum. The reward role (``actors/reward.py``) holds them; this module has no Ray.

A function is called with whole batches, as keyword lists: ``prompts``, ``responses`` and every
other column of the prompt records (``answer``, ``label``, ...), and returns a list with one
float (or None) per response. It may take ``**kwargs`` or name only the columns it reads.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import math
import sys
import threading
import time
import types
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

Score = Optional[float]
RESERVED = ("prompts", "responses")  # the arguments every function gets; columns of these names are not passed


class RewardError(ValueError):
    """A reward component failed (raised, hung, answered badly); the message names the component,
    the step and the record. Reported as itself, never retried: the same inputs fail again."""

    report_as_is = True


@dataclass(frozen=True)
class Component:
    """One part of the reward: ``kind`` is model, rule, function or remote."""

    name: str
    kind: str
    weight: float
    target: str  # the model directory, rule name, ``file.py:fn``/``module:fn`` or URL


# -- user functions -----------------------------------------------------------------------------
def split_target(target: str) -> tuple[str, str]:
    """(file or module, function name) of ``path/to/file.py:fn`` or ``package.module:fn``."""
    where, sep, fn = target.rpartition(":")
    if not sep or not where or not fn.isidentifier():
        raise ValueError(f"{target!r} is not 'file.py:function' or 'package.module:function'")
    return where, fn


def read_source(target: str, key: str) -> Optional[str]:
    """The text of a function's file (None for a module), read where the run starts: actors on
    other nodes get the text, so the file need not exist there."""
    where, _ = split_target(target)
    if not where.endswith(".py"):
        return None
    p = Path(where).expanduser()
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{key}={target!r}: no file {where!r} (relative paths start at {Path.cwd()})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{key}={target!r}: cannot read {where!r} ({getattr(e, 'strerror', None) or e})") from None


def load_function(target: str, key: str, source: Optional[str] = None) -> Callable:
    """The function ``target`` names; a file's ``source`` (see :func:`read_source`) is run as a
    module of its own, with the file's folder importable when it exists here. ValueError names
    ``key`` and what is wrong."""
    where, fn_name = split_target(target)
    if where.endswith(".py"):
        source = read_source(target, key) if source is None else source
        path = Path(where).expanduser().resolve()
        module = types.ModuleType(f"rlhf_ray_reward_{path.stem}")
        module.__file__ = str(path)
        if path.parent.is_dir() and str(path.parent) not in sys.path:
            sys.path.append(str(path.parent))  # a helper module beside the file
        try:
            exec(compile(source, str(path), "exec"), module.__dict__)
        except Exception as e:
            raise ValueError(f"{key}={target!r}: the file raised {type(e).__name__} when loaded: {e}") from None
    else:
        try:
            module = importlib.import_module(where)
        except Exception as e:  # ImportError, or the module's own error
            raise ValueError(f"{key}={target!r}: cannot import {where!r} ({type(e).__name__}: {e})") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        found = sorted(n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_"))
        raise ValueError(f"{key}={target!r}: no function {fn_name!r} in {where} (it has {found})")
    return fn


def check_arguments(fn: Callable, name: str, columns: Sequence[str]) -> None:
    """A function's parameters against what it will be given; ValueError names the missing ones."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return  # a builtin or C function: it is called and judged by what it does
    given = {*RESERVED, *columns}
    missing = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
               and p.default is p.empty and p.name not in given]
    if missing:
        raise ValueError(f"reward function {name!r} needs {missing}, which the prompt records do not have "
                         f"(it is given prompts, responses and the columns {sorted(columns)})")


def _arguments(fn: Callable, prompts: list[str], responses: list[str], columns: list[dict]) -> dict[str, list]:
    names = sorted({k for c in columns for k in c if k not in RESERVED})
    kwargs: dict[str, list] = {"prompts": prompts, "responses": responses,
                               **{k: [c.get(k) for c in columns] for k in names}}
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return kwargs
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return kwargs
    accepted = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {k: v for k, v in kwargs.items() if k in accepted}


def run_with_timeout(fn: Callable[[], Any], timeout_s: float) -> Any:
    """``fn()`` in a daemon thread; TimeoutError past ``timeout_s`` (the thread cannot be
    stopped, so the run ends: a reward that hangs once hangs again)."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:  # handed to the caller's thread
            out["error"] = e

    t = threading.Thread(target=target, daemon=True, name="reward-function")
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise TimeoutError(f"no answer within reward.timeout_s={timeout_s:g}")
    if "error" in out:
        raise out["error"]
    return out.get("value")


def checked_scores(value: Any, n: int, what: str) -> list[Score]:
    """``value`` as n scores (float or None); ValueError says how it is wrong."""
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__len__"):
        raise ValueError(f"{what} returned {type(value).__name__}, not a list of {n} scores")
    value = list(value)
    if len(value) != n:
        raise ValueError(f"{what} returned {len(value)} scores for {n} responses")
    out: list[Score] = []
    for i, v in enumerate(value):
        if v is None:
            out.append(None)
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{what} returned {v!r} for response {i}: not a number or None") from None
        if isinstance(v, bool) or not math.isfinite(f):
            raise ValueError(f"{what} returned {v!r} for response {i}: not a finite number or None")
        out.append(f)
    return out


def call_function(fn: Callable, name: str, prompts: list[str], responses: list[str], columns: list[dict],
                  *, timeout_s: float, step: int, where: list[str]) -> list[Score]:
    """One batch through a user's function. A failure is a RewardError naming the function,
    the step and (found by calling it again one record at a time) the first record it fails on."""
    what = f"reward function {name!r}"

    def once(i: Optional[int] = None) -> list[Score]:
        rows = range(len(prompts)) if i is None else [i]
        kwargs = _arguments(fn, [prompts[j] for j in rows], [responses[j] for j in rows], [columns[j] for j in rows])
        return checked_scores(run_with_timeout(lambda: fn(**kwargs), timeout_s), len(rows), what)

    try:
        return once()
    except TimeoutError as e:  # not retried per record: each would wait the whole timeout again
        raise RewardError(f"{what} at step {step}: {e} for a batch of {len(prompts)} "
                          f"(from {where[0]} on)") from None
    except Exception as e:
        first = _first_failing(once, len(prompts), timeout_s)
        record = f" on {where[first]} (prompt {prompts[first][:60]!r})" if first is not None else ""
        raise RewardError(f"{what} at step {step}{record}: {type(e).__name__}: {e}") from None


def _first_failing(once: Callable[[int], Any], n: int, timeout_s: float) -> Optional[int]:
    for i in range(min(n, 64)):  # a batch fails as a whole sometimes; then no record is named
        try:
            once(i)
        except Exception:
            return i
    return None


# -- a remote scorer ---------------------------------------------------------------------------
def post_scores(url: str, prompts: list[str], responses: list[str], columns: list[dict], *, timeout_s: float,
                retries: int, step: int, backoff_s: float = 0.5) -> list[Score]:
    """POST ``{"prompts", "responses", "columns": {name: list}}`` to ``url``; the answer is
    ``{"scores": [...]}`` or a bare list. Connection errors, timeouts and 5xx answers are tried
    again ``retries`` times with doubling waits; then, or at a 4xx, a RewardError with the
    status and the start of the body."""
    names = sorted({k for c in columns for k in c})
    body = json.dumps({"prompts": prompts, "responses": responses,
                       "columns": {k: [c.get(k) for c in columns] for k in names}}).encode()
    last = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1))
        req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                answer = json.loads(resp.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            text = e.read().decode("utf-8", "replace")[:200]
            last = f"HTTP {e.code} {e.reason}: {text!r}"
            if e.code < 500:
                break  # the request itself is wrong: sending it again changes nothing
            continue
        except OSError as e:  # URLError, a refused connection, a socket timeout
            reason = getattr(e, "reason", e)
            last = f"no answer within reward.timeout_s={timeout_s:g}" if "timed out" in str(reason) else str(reason)
            continue
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RewardError(f"reward.url={url} at step {step}: the answer is not JSON ({e})") from None
        scores = answer.get("scores") if isinstance(answer, dict) else answer
        try:
            return checked_scores(scores, len(prompts), f"reward.url={url}")
        except ValueError as e:
            raise RewardError(f"{e} at step {step}") from None
    raise RewardError(f"reward.url={url} at step {step}: failed after {attempt + 1} attempt(s); last: {last}")


# -- combining ------------------------------------------------------------------------------
def combine(parts: dict[str, list[Score]], weights: dict[str, float]) -> list[float]:
    """The weighted sum of the components per response; a None counts as 0."""
    n = len(next(iter(parts.values())))
    return [sum(weights[name] * (s[i] or 0.0) for name, s in parts.items()) for i in range(n)]


def component_metrics(parts: dict[str, list[Score]]) -> dict[str, float]:
    """``reward/<name>``: the mean over the responses it scored; ``reward/<name>/unscored``:
    how many it returned None for (only when some were)."""
    out: dict[str, float] = {}
    for name, scores in parts.items():
        given = [s for s in scores if s is not None]
        if given:
            out[f"reward/{name}"] = sum(given) / len(given)
        if len(given) < len(scores):
            out[f"reward/{name}/unscored"] = float(len(scores) - len(given))
    return out


def check_reward_functions(cfg, columns: list[dict]) -> dict[str, str]:
    """Load every ``reward.functions`` entry here, before any actor starts, and check its
    parameters against the prompt records' columns. Returns each function file's text, which
    the reward actors run (they may be on nodes without the file). ConfigError on a problem."""
    from .config import ConfigError

    names = sorted({k for c in columns for k in c})
    sources: dict[str, str] = {}
    for i, f in enumerate(cfg.reward.functions):
        key = f"reward.functions[{i}].path"
        try:
            source = read_source(f.path, key)
            fn = load_function(f.path, key, source)
            check_arguments(fn, f.label, names)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if source is not None:
            sources[f.path] = source
    return sources
