"""Methods added to every vLLM worker process (``worker_extension_cls``), called by name through
``LLM.collective_rpc``: the rollout actor can only reach its engine's worker this way, because
the worker is a separate process on both the CPU and the GPU backends."""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os

import psutil

_libc = None


def _malloc_trim():
    """glibc's ``malloc_trim`` (None elsewhere: musl and macOS have no such call)."""
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        lib = ctypes.CDLL(name) if name else None
        _libc = lib if lib is not None and hasattr(lib, "malloc_trim") else False
    return _libc.malloc_trim if _libc else None


class WorkerHostMemory:
    def release_host_memory(self) -> int:
        """Give freed heap pages back to the OS; returns the bytes of RSS this released.

        Each new LoRA version the engine serves leaves freed but unreturned host memory in
        the worker process (glibc keeps it in its arenas): about 0.35 MiB per version with
        the tiny model on CPU, +11.7% RSS over 300 published versions. A trim after every
        swap costs milliseconds and keeps that memory from accumulating."""
        trim = _malloc_trim()
        before = psutil.Process(os.getpid()).memory_info().rss
        gc.collect()
        if trim is not None:
            trim(0)
        return before - psutil.Process(os.getpid()).memory_info().rss
