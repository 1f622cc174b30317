"""The two test tiers. ``integration``: the test starts Ray or vLLM (in this process or in a
subprocess); it gets the session's Ray head before any other fixture. Every other test is
fast-tier (`make test-fast`): while it and its fixtures run, starting Ray or importing vLLM
fails it, here and in any Python subprocess it starts (through PYTHONPATH and sitecustomize)."""
import os
import sys
from pathlib import Path

import pytest

GUARD_DIR = Path(__file__).resolve().parent / "_guard"
sys.path.insert(0, str(GUARD_DIR))
import rlhf_ray_tier_guard  # noqa: E402


def pytest_collection_modifyitems(items):
    for item in items:
        # First among the session fixtures: a fixture that uses Ray then attaches to this head.
        if item.get_closest_marker("integration") and "ray_head" not in item.fixturenames:
            item.fixturenames.insert(0, "ray_head")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if item.get_closest_marker("integration"):
        yield
        return
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(GUARD_DIR)] + ([saved] if saved else []))
    rlhf_ray_tier_guard.install(item.nodeid)
    try:
        yield
    finally:
        rlhf_ray_tier_guard.uninstall()
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
