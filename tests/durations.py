"""A pytest plugin that writes every test's set-up, call and tear-down seconds to
``runs/test-durations.{json,md}`` (``TEST_DURATIONS=path-stem`` moves them), slowest first.
Set-up is where the shared fixtures (Ray head, trainers, engines) are paid for, so the table
shows start-up apart from the steps and checks a test runs."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

_times: dict[str, dict[str, float]] = {}
_outcomes: dict[str, str] = {}
_fixtures: dict[str, dict[str, float]] = {}  # shared (module/session) fixtures: their own set-up and tear-down
_teardown_from: dict[str, float] = {}
_t0 = time.monotonic()


def _fixture_key(fixturedef, request) -> str:
    where = request.node.nodeid.split("::")[0] if fixturedef.scope == "module" else fixturedef.scope
    return f"{fixturedef.argname} ({where})"


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef, request):
    t = time.monotonic()
    yield
    if fixturedef.scope not in ("module", "session"):
        return
    key = _fixture_key(fixturedef, request)
    _fixtures.setdefault(key, {"setup": 0.0, "teardown": 0.0})["setup"] += time.monotonic() - t
    # Finalizers run last-in first-out: this one runs just before the fixture's own tear-down.
    fixturedef.addfinalizer(lambda: _teardown_from.__setitem__(key, time.monotonic()))


def pytest_fixture_post_finalizer(fixturedef, request):
    key = _fixture_key(fixturedef, request)
    if key in _teardown_from:
        _fixtures[key]["teardown"] += time.monotonic() - _teardown_from.pop(key)


def pytest_runtest_logreport(report):
    phases = _times.setdefault(report.nodeid, {"setup": 0.0, "call": 0.0, "teardown": 0.0})
    phases[report.when] += report.duration
    if report.when == "call" or report.outcome != "passed":
        _outcomes[report.nodeid] = report.outcome


def table(times: dict[str, dict[str, float]], limit: int | None = None) -> str:
    rows = sorted(times.items(), key=lambda kv: -sum(kv[1].values()))[:limit]
    lines = ["| test | total s | set-up | call | tear-down |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {sum(v.values()):.1f} | {v['setup']:.1f} | {v['call']:.1f} | {v['teardown']:.1f} |"
              for k, v in rows]
    return "\n".join(lines)


def pytest_sessionfinish(session, exitstatus):
    if not _times or getattr(session.config, "workerinput", None) is not None:
        return
    stem = Path(os.environ.get("TEST_DURATIONS", "runs/test-durations"))
    stem.parent.mkdir(parents=True, exist_ok=True)
    wall = time.monotonic() - _t0
    by_file: dict[str, float] = {}
    for k, v in _times.items():
        by_file[k.split("::")[0]] = by_file.get(k.split("::")[0], 0.0) + sum(v.values())
    doc = {"wall_s": round(wall, 1), "tests": len(_times), "exit_status": int(exitstatus),
           "by_file_s": {k: round(v, 1) for k, v in sorted(by_file.items(), key=lambda kv: -kv[1])},
           "tests_s": {k: {p: round(s, 2) for p, s in v.items()} | {"outcome": _outcomes.get(k, "?")}
                       for k, v in sorted(_times.items(), key=lambda kv: -sum(kv[1].values()))}}
    doc["shared_fixtures_s"] = {k: {p: round(x, 2) for p, x in v.items()}
                                for k, v in sorted(_fixtures.items(), key=lambda kv: -sum(kv[1].values()))}
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    files = "\n".join(f"| {k} | {v:.1f} |" for k, v in doc["by_file_s"].items())
    stem.with_suffix(".md").write_text(
        f"# Test durations\n\n{len(_times)} tests, {wall:.0f} s wall.\n\n| file | s |\n|---|---|\n{files}\n\n"
        f"Shared fixtures (their time is inside the set-up or tear-down of the test that first or last used them):\n\n"
        "| fixture | set-up s | tear-down s |\n|---|---|---|\n"
        + "".join(f"| {k} | {v['setup']:.1f} | {v['teardown']:.1f} |\n" for k, v in doc["shared_fixtures_s"].items())
        + f"\n{table(_times)}\n")
