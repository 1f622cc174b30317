"""Makes a test of the fast tier fail the moment it starts Ray or imports vLLM, in the test
process and in every subprocess it runs (``sitecustomize.py`` beside this file installs the
guard in a Python started with this folder on PYTHONPATH and RLHF_RAY_FAST_TEST set)."""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys

ENV = "RLHF_RAY_FAST_TEST"  # the test's node id


class TierError(RuntimeError):
    pass


def _message(what: str) -> str:
    test = os.environ.get(ENV) or "a test"
    return (f"{test} {what} but is not marked integration: mark it (pytest.mark.integration) "
            "so that `make test-fast` stays free of Ray and vLLM")


def _refuse_init(*args, **kwargs):
    raise TierError(_message("starts or joins Ray (ray.init)"))


class _Finder(importlib.abc.MetaPathFinder):
    """vLLM may not be imported; Ray may (some modules name its types), but not started."""

    def find_spec(self, name, path, target=None):
        if name == "vllm" or name.startswith("vllm."):
            raise TierError(_message(f"imports {name}"))
        if name != "ray":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


_finder = _Finder()
_saved_init = None


def _patch(ray) -> None:
    global _saved_init
    if getattr(ray, "init", None) is not _refuse_init:
        _saved_init, ray.init = ray.init, _refuse_init


def install(test: str) -> None:
    os.environ[ENV] = test
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)
    if sys.modules.get("ray") is not None:
        _patch(sys.modules["ray"])


def uninstall() -> None:
    global _saved_init
    os.environ.pop(ENV, None)
    if _finder in sys.meta_path:
        sys.meta_path.remove(_finder)
    ray = sys.modules.get("ray")
    if ray is not None and _saved_init is not None:
        ray.init = _saved_init
    _saved_init = None
