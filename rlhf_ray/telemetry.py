"""Per-actor memory and per-step metrics."""
from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import psutil


def tree_rss(pid: Optional[int] = None) -> int:
    """RSS in bytes of a process and all its children (a vLLM engine lives in child processes)."""
    return sum(rss_by_process(pid).values())


def _by_process(pid: Optional[int], value: Callable[[psutil.Process], Optional[int]]) -> dict[str, int]:
    """``value`` of a process and each of its children (None: left out), keyed ``<name>-<pid>``
    (the process itself ``self-<pid>``: a Ray worker's name changes with the task it runs)."""
    out: dict[str, int] = {}
    try:
        proc = psutil.Process(pid or os.getpid())
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return out
    for p in procs:
        try:
            v = value(p)
            if v is not None:
                out[f"{'self' if p is proc else p.name()}-{p.pid}"] = v
        except psutil.NoSuchProcess:
            pass
    return out


def rss_by_process(pid: Optional[int] = None) -> dict[str, int]:
    """RSS in bytes of a process and each of its children (:func:`_by_process`)."""
    return _by_process(pid, lambda p: p.memory_info().rss)


def gpu_bytes_by_process(pid: Optional[int] = None, running=None) -> dict[str, int]:
    """GPU memory in bytes of a process and each of its children that holds any, keyed like
    :func:`rss_by_process`: on a GPU a vLLM engine's memory is in its core's child process,
    where the actor's own CUDA counters never see it. ``running``: (pid, bytes) of every
    process on the cards, by default from NVML ({} without it)."""
    if running is None:
        running = _nvml_running()
    used: dict[int, int] = {}
    for p, b in running:
        used[p] = used.get(p, 0) + (b or 0)
    return _by_process(pid, lambda p: used.get(p.pid))


def _nvml_running() -> list[tuple[int, int]]:
    try:
        import pynvml

        pynvml.nvmlInit()
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            out += [(p.pid, p.usedGpuMemory) for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h)]
        return out
    except Exception:  # no NVML (a CPU machine), or no permission: telemetry never breaks a step
        return []


def where() -> dict[str, Any]:
    """The node and the GPUs Ray assigned to this process (logical ids: a rehearsal on a
    CPU-only cluster reports the placement the GPU run would get)."""
    try:
        import ray

        if not ray.is_initialized():
            return {}
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}
    except Exception:  # telemetry must never break a step
        return {}


class MemorySampler:
    """Tracks the peak RSS of this process tree by sampling it on a daemon thread.

    The peak is of samples (every ``interval_s``), so a spike shorter than that can be missed;
    it is sampled once more on every ``peak()`` call.
    """

    def __init__(self, interval_s: float = 0.25):
        self._peak = tree_rss()
        self._interval = interval_s
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True, name="rss-sampler").start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._peak = max(self._peak, tree_rss())

    def peak(self) -> int:
        self._peak = max(self._peak, tree_rss())
        return self._peak

    def stats(self) -> dict[str, Any]:
        out = {"pid": os.getpid(), "rss_bytes": tree_rss(), "peak_rss_bytes": self.peak(), **where()}
        try:
            import torch

            # Only where this process already uses CUDA: querying would otherwise create a context
            # (~0.3-0.5 GB) in a process, such as a vLLM actor's parent, that has none.
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
                free, total = torch.cuda.mem_get_info()
                out["cuda_used_bytes"] = total - free
        except Exception:  # telemetry must never break a step
            pass
        return out

    def close(self) -> None:
        self._stop.set()


class StageTimer:
    """Wall time per named stage of one step."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._t0 = time.perf_counter()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t

    def finish(self) -> dict[str, float]:
        """Stage times plus ``total`` and ``idle`` (total minus the named stages)."""
        total = time.perf_counter() - self._t0
        out = dict(self.seconds)
        out["idle"] = max(0.0, total - sum(self.seconds.values()))
        out["total"] = total
        return out


class MetricsWriter:
    """One JSON object per line in ``<run_dir>/metrics.jsonl``."""

    def __init__(self, path: Path, append: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("a" if append else "w")

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def saved_for_backward_bytes(fn, exclude: Iterable = ()) -> tuple[Any, int]:
    """(fn(), bytes autograd keeps for backward while ``fn`` builds its graph): every tensor
    saved by an op, counted once per storage; tensors sharing storage with ``exclude`` (the
    model's parameters, which exist anyway) are left out."""
    import torch

    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip and t.device.type != "meta":
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())
