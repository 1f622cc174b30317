"""soak: a long tiny PPO run that publishes an adapter every step. Whatever a step leaves
behind (actor memory, objects in Ray's store, LoRA slots in the engines, adapter directories on
the RAM disk) shows up as growth between an early step and the last one."""
from __future__ import annotations

from typing import Any, Optional

from .common import table

TOLERANCE = 0.10  # RSS and object-store bytes: the last probe within 10% of the early one


def store_used_bytes(settle_s: float = 1.0, reads: int = 5) -> Optional[int]:
    """Bytes held in Ray's object store over the cluster (as `ray memory --stats-only` reports):
    the least of a few reads over ``settle_s``. Ray frees a step's last objects asynchronously,
    so one read right after a step can count a batch that is already garbage (+17% in one
    8-step test); a leak stays in every read."""
    import gc
    import time

    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    gc.collect()  # the driver's own dropped references
    seen = []
    try:
        for k in range(reads):
            if k:
                time.sleep(settle_s / (reads - 1))
            reply = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address))
            seen.append(int(reply.store_stats.object_store_bytes_used))
    except Exception:  # an older raylet or no access: the RSS figures still stand
        return min(seen) if seen else None
    return min(seen)


def probe(trainer, record: dict[str, Any]) -> dict[str, Any]:
    return {"step": record["step"], "rss_bytes": {k: m["rss_bytes"] for k, m in record["memory"].items()},
            # A generator's tree is the actor, vLLM's engine core and its worker: which one grows.
            "rss_by_process": {k: m["rss_by_process"] for k, m in record["memory"].items() if "rss_by_process" in m},
            "store_used_bytes": store_used_bytes(), "generators": trainer.fleet.adapter_state()}


def measure(trainer, steps: int, early: int) -> dict[str, Any]:
    """``steps`` PPO steps; probes after step ``early`` and after the last. Growth ratios and
    whether each stays within TOLERANCE (LoRA slots and directories: exactly flat)."""
    first = last = None
    series: list[dict[str, Any]] = []  # RSS every 10 steps: a leak climbs steadily, a warm-up levels off
    for k in range(steps):
        rec = trainer.step()
        if k + 1 == early:
            first = probe(trainer, rec)
        if (k + 1) % 10 == 0 or k + 1 == steps:
            series.append({"step": k + 1, **{n: m["rss_bytes"] for n, m in rec["memory"].items()}})
    last = probe(trainer, rec)
    growth = {name: last["rss_bytes"][name] / first["rss_bytes"][name] - 1.0
              for name in first["rss_bytes"] if name in last["rss_bytes"]}
    store = None
    if first["store_used_bytes"] is not None and last["store_used_bytes"] is not None:
        # Relative to at least 1 MiB: an almost empty store doubling by a few KiB is not a leak.
        store = (last["store_used_bytes"] - first["store_used_bytes"]) / max(first["store_used_bytes"], 2**20)
    flat_adapters = all(g["loaded_loras"] == 1 and g["adapter_dirs"] == 1 for p in (first, last)
                        for g in p["generators"].values())
    worst = max(growth.values())
    return {"steps": steps, "early_step": early, "first": first, "last": last, "rss_growth": growth,
            "rss_series": series,
            "store_growth": store, "versions_published": last["generators"] and max(
                g["version"] for g in last["generators"].values()),
            "targets": {"rss_flat": {"value": worst, "goal": f"<= {TOLERANCE}", "met": worst <= TOLERANCE},
                        "store_flat": {"value": store, "goal": f"<= {TOLERANCE}",
                                       "met": store is not None and store <= TOLERANCE},
                        "adapters_flat": {"value": flat_adapters, "goal": "1 LoRA slot and 1 directory per engine",
                                          "met": flat_adapters}}}


def run(cfg, args) -> tuple[dict[str, Any], dict[str, Any], str]:
    import dataclasses

    from rlhf_ray.trainer import PPOTrainer

    from .ppo_step import bench_config

    cfg = bench_config(cfg)
    cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, every=0))
    early = min(10, max(1, args.steps // 2))
    with PPOTrainer(cfg, progress=False, overwrite=True) as tr:
        res = measure(tr, args.steps, early)
    rows = [[name, round(res["first"]["rss_bytes"][name] / 2**20, 1),
             round(res["last"]["rss_bytes"][name] / 2**20, 1), f"{100 * g:+.1f}%"]
            for name, g in sorted(res["rss_growth"].items())]
    s0, s1 = res["first"]["store_used_bytes"], res["last"]["store_used_bytes"]
    if s0 is not None and s1 is not None:
        rows.append(["object store (used)", round(s0 / 2**20, 2), round(s1 / 2**20, 2), f"{100 * res['store_growth']:+.1f}%"])
    text = table(["actor", f"RSS MiB at step {early}", f"at step {args.steps}", "growth"], rows)
    names = sorted(res["rss_growth"])
    every = max(1, len(res["rss_series"]) // 10)
    text += "\n\nRSS MiB over the run\n" + table(
        ["step", *names], [[p["step"], *(round(p[n] / 2**20) for n in names)]
                           for p in res["rss_series"][::every] + res["rss_series"][-1:]])
    procs = [[f"{actor} {proc.rsplit('-', 1)[0]}", round(b0 / 2**20, 1),
              round(res["last"]["rss_by_process"][actor][proc] / 2**20, 1),
              f"{100 * (res['last']['rss_by_process'][actor][proc] / b0 - 1):+.1f}%"]
             for actor, by in sorted(res["first"].get("rss_by_process", {}).items()) for proc, b0 in by.items()
             if proc in res["last"].get("rss_by_process", {}).get(actor, {})]
    if procs:
        text += "\n\nGenerators by process\n" + table(["process", f"RSS MiB at step {early}", f"at step {args.steps}",
                                                          "growth"], procs)
    gens = res["last"]["generators"]
    text += (f"\n{res['versions_published']} adapter versions published; per engine at the end: "
             + ", ".join(f"{n}: {g['loaded_loras']} LoRA slot(s), {g['adapter_dirs']} dir(s)" for n, g in gens.items())
             + "\n" + "; ".join(f"{k}: {'met' if t['met'] else 'NOT met'}" for k, t in res["targets"].items()))
    return {"steps": args.steps, "early_step": early, "batch_size": cfg.ppo.prompts_per_step}, res, text
