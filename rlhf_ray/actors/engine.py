"""Constructing a vLLM engine from the run config (shared by the rollout actor,
benchmarks and tests, so every engine is configured the same way)."""
from __future__ import annotations

import os
from typing import Optional

from ..config import Config

CPU_KV_CACHE_MIB = 256
CARD_WAIT_S = 120.0  # the most a new engine waits for its card's memory to be released
# Methods the rollout actor calls in its engine's worker process (host-memory release).
WORKER_EXTENSION = "rlhf_ray.actors.engine_ext.WorkerHostMemory"


def engine_kwargs(cfg: Config, model_path: str, *, on_gpu: bool = False, max_model_len: Optional[int] = None,
                  seed: Optional[int] = None) -> dict:
    """Keyword arguments for ``vllm.LLM``.

    The engine is sized from the run: ``max_model_len`` = longest prompt + max_new_tokens
    (else vLLM reserves the model's whole context, 4,096 tokens at 512 KiB each for a 7B
    Llama, and refuses to start on a 24 GB card beside anything else). On a GPU the KV cache
    is what ``gpu_memory_utilization`` leaves after weights and activations, and CUDA graphs
    are on; on the CPU backend ``gpu_memory_utilization`` is a fraction of host RAM, so an
    explicit KV cache lets several engines share a machine with the learner.
    """
    r = cfg.rollout
    lora = cfg.learner.method == "lora"  # else the engine serves merged weights, reloaded in place
    kwargs = dict(
        model=model_path,
        dtype=cfg.model.dtype,
        enable_lora=lora,
        gpu_memory_utilization=r.gpu_memory_utilization or (gpu_share_utilization(r.num_gpus) if on_gpu else 0.1),
        seed=r.seed if seed is None else seed,
        # Merged weights on the CPU: eager always (a compiled graph could keep the weights it traced).
        enforce_eager=True if (not lora and not on_gpu) else (not on_gpu) if r.enforce_eager is None else r.enforce_eager,
        worker_extension_cls=WORKER_EXTENSION,
    )
    if lora:
        # Only the layers the adapter has: otherwise vLLM wraps (and computes LoRA kernels on)
        # every supported layer, gate_up_proj and down_proj too, for an attention-only adapter.
        kwargs.update(max_lora_rank=r.max_lora_rank, max_loras=r.max_loras,
                      lora_target_modules=None if "all-linear" in cfg.lora.target_modules
                      else list(cfg.lora.target_modules))
    if (not on_gpu) if r.engine_in_process is None else r.engine_in_process:
        kwargs["distributed_executor_backend"] = "uni"
    kv_mib = r.kv_cache_mib if r.kv_cache_mib is not None else (None if on_gpu else CPU_KV_CACHE_MIB)
    if kv_mib is not None:
        kwargs["kv_cache_memory_bytes"] = kv_mib * 2**20
    if r.max_model_len or max_model_len:
        kwargs["max_model_len"] = r.max_model_len or max_model_len
    return kwargs


def gpu_share_utilization(num_gpus: float) -> float:
    """vLLM's gpu_memory_utilization for an engine holding ``num_gpus`` of a card: 0.9 of its
    share. vLLM refuses to start unless total x utilisation is free, so two engines at 0.5 GPU
    each cannot both ask for 0.9."""
    return round(0.9 * min(1.0, num_gpus), 3) if num_gpus > 0 else 0.9


def wait_for_card(utilization: float, timeout_s: float, *, free_total=None, sleep=None, poll_s: float = 2.0) -> float:
    """Wait (up to ``timeout_s``, polling) until the card has the ``utilization`` x its memory
    free that vLLM demands at start. A generator replacing a killed one takes its slot while the
    old engine's processes may still be releasing the card. Read through NVML, which creates no
    CUDA context in this process; without NVML (``free_total`` None) nothing is waited for.
    Returns the seconds waited."""
    import logging
    import time

    if free_total is None:
        free_total = _nvml_free_total()
        if free_total is None:
            return 0.0
    sleep = sleep or time.sleep
    waited, warned = 0.0, False
    while True:
        free, total = free_total()
        if free >= utilization * total or waited >= timeout_s:
            return waited
        if not warned:
            logging.getLogger(__name__).warning(
                "the card has %.1f of %.1f GiB free, vLLM needs %.1f (gpu_memory_utilization=%g): waiting up to "
                "%.0f s for an earlier engine to release it", free / 2**30, total / 2**30,
                utilization * total / 2**30, utilization, timeout_s)
            warned = True
        sleep(poll_s)
        waited += poll_s


def _nvml_free_total():
    """(free, total) bytes of this process's first visible card, through NVML; None without NVML."""
    try:
        import pynvml

        pynvml.nvmlInit()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip() or "0"
        handle = (pynvml.nvmlDeviceGetHandleByIndex(int(visible)) if visible.isdigit()
                  else pynvml.nvmlDeviceGetHandleByUUID(visible))
    except Exception:
        return None

    def read():
        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return info.free, info.total
    return read


def tcmalloc_path() -> Optional[str]:
    """The tcmalloc shared library on this machine (gperftools' minimal build first), else None."""
    import ctypes.util

    for name in ("tcmalloc_minimal", "tcmalloc"):
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def allocator_env(cfg: Config) -> dict[str, str]:
    """Environment for a generator's process: ``LD_PRELOAD`` of tcmalloc per ``rollout.allocator``
    (it has to be in place when the process starts, hence through Ray's runtime env).

    Raises:
        ValueError: ``rollout.allocator=tcmalloc`` and no tcmalloc library here.
    """
    r = cfg.rollout
    if r.allocator == "system" or (r.allocator == "auto" and r.num_gpus > 0):
        return {}
    path = tcmalloc_path()
    if path is None:
        if r.allocator == "tcmalloc":
            raise ValueError("rollout.allocator=tcmalloc: no libtcmalloc on this machine (Debian/Ubuntu: "
                             "apt install libtcmalloc-minimal4), or set rollout.allocator=auto")
        return {}
    return {"LD_PRELOAD": path}


def build_engine(cfg: Config, model_path: str, *, on_gpu: bool = False, max_model_len: Optional[int] = None,
                 seed: Optional[int] = None, **overrides):
    import vllm.envs
    from vllm import LLM

    kwargs = engine_kwargs(cfg, model_path, on_gpu=on_gpu, max_model_len=max_model_len, seed=seed)
    kwargs.update(overrides)
    if on_gpu:
        # Long enough for a killed engine's processes to exit; a card that others hold for good
        # is vLLM's error to report, not a half-hour wait.
        wait_for_card(kwargs["gpu_memory_utilization"], min(CARD_WAIT_S, cfg.cluster.start_timeout_s))
    # vLLM reads the process mode from the environment only; an engine built earlier in this
    # process froze its environment reads, hence the cache reset.
    in_process = kwargs.get("distributed_executor_backend") == "uni"
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
    vllm.envs.disable_envs_cache()
    return LLM(**kwargs)
