"""A shared generator fleet (rlhf_ray/shared_fleet.py) on a GPU cluster: each engine's LoRA
slots and KV cache, and how many runs' learners fit on the GPUs the fleet leaves."""
from __future__ import annotations

import math

from ..config import Config
from .memory import DTYPE_BYTES, kv_cache_sequences
from .shapes import ModelShape


def fleet_plan(cfg: Config, shape: ModelShape, *, gpus: int, gpu_memory: int, max_model_len: int) -> dict:
    """Bytes and counts for a fleet of ``rollout.num_engines`` engines taking
    ``fleet.max_runs`` runs: vLLM keeps ``fleet.max_runs x (fleet.max_staleness + 1)`` LoRA
    slots per engine at ``rollout.max_lora_rank`` in the model's dtype; the KV cache is what
    the engine's memory share leaves after weights and slots (activations not counted), shared
    by every run's requests."""
    from ..actors.engine import gpu_share_utilization
    from ..shared_fleet import lora_slots

    r, f, b = cfg.rollout, cfg.fleet, DTYPE_BYTES[cfg.model.dtype]
    slots = lora_slots(f.max_runs, f.max_staleness)
    slot_bytes = shape.lora_params * r.max_lora_rank // max(1, cfg.lora.rank) * b
    weights = shape.total_params * b
    if r.kv_cache_mib is not None:
        kv = r.kv_cache_mib * 2**20
    else:
        share = min(1.0, r.num_gpus) if r.num_gpus > 0 else 1.0
        kv = max(0, int(gpu_memory * share * (r.gpu_memory_utilization or gpu_share_utilization(share)))
                 - weights - slots * slot_bytes)
    fleet_gpus = r.num_gpus * r.num_engines
    per_run = (cfg.learner.num_workers if cfg.learner.use_gpu else 0) + cfg.reward.num_gpus + \
        (cfg.reference.num_gpus if cfg.reference.mode == "separate" else 0)
    left = gpus - fleet_gpus
    fit = f.max_runs if per_run <= 0 else max(0, math.floor(left / per_run + 1e-9))
    return {"engines": r.num_engines, "fleet_gpus": fleet_gpus, "lora_slots": slots, "slot_bytes": slot_bytes,
            "slots_bytes": slots * slot_bytes, "kv_cache_bytes": kv,
            "kv_sequences": kv_cache_sequences(kv, shape, cfg.model.dtype, max_model_len),
            "gpus_per_run": per_run, "gpus_left": left, "runs_fit": fit, "max_runs": f.max_runs}


def render_fleet(p: dict) -> str:
    gib = 2**30
    lines = [f"shared fleet: {p['engines']} engine(s) on {p['fleet_gpus']:g} GPU(s); per engine {p['lora_slots']} LoRA "
             f"slots x {p['slot_bytes'] / 2**20:.1f} MiB = {p['slots_bytes'] / gib:.2f} GiB, KV cache about "
             f"{p['kv_cache_bytes'] / gib:.1f} GiB ({p['kv_sequences']:.0f} full-length sequences, shared by every run)"]
    if p["gpus_per_run"] > 0:
        lines.append(f"  runs beside it: each needs {p['gpus_per_run']:g} GPU(s) (learner, reward, reference); "
                     f"{p['gpus_left']:g} left -> {p['runs_fit']} run(s) at once (fleet.max_runs={p['max_runs']})")
    else:
        lines.append(f"  runs beside it: their learners use no GPU; fleet.max_runs={p['max_runs']} at once")
    if p["gpus_per_run"] > 0 and p["runs_fit"] < p["max_runs"]:
        lines.append(f"  warning: fleet.max_runs={p['max_runs']} but only {p['runs_fit']} runs' learners fit: "
                     "the others' trials wait (sweep --parallel) or their LoRA slots stay unused")
    return "\n".join(lines)
