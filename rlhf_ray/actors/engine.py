"""Constructing a vLLM engine from the run config (shared by the rollout actor,
benchmarks and tests, so every engine is configured the same way)."""
from __future__ import annotations

from ..config import Config


def engine_kwargs(cfg: Config, model_path: str) -> dict:
    """Keyword arguments for ``vllm.LLM``.

    On the CPU backend ``gpu_memory_utilization`` is a fraction of host RAM and the default
    asks for most of it; an explicit KV cache size lets several engines share a machine with
    the learner. LoRA limits come from the config (vLLM defaults: rank 16, one adapter).
    """
    r = cfg.rollout
    return dict(
        model=model_path,
        dtype=cfg.model.dtype,
        enable_lora=True,
        max_lora_rank=r.max_lora_rank,
        max_loras=r.max_loras,
        gpu_memory_utilization=r.gpu_memory_utilization,
        kv_cache_memory_bytes=r.kv_cache_mib * 2**20,
        seed=r.seed,
        enforce_eager=True,
    )


def build_engine(cfg: Config, model_path: str, **overrides):
    from vllm import LLM

    kwargs = engine_kwargs(cfg, model_path)
    kwargs.update(overrides)
    return LLM(**kwargs)
