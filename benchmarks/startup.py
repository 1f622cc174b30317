"""startup: the PPO trainer's start-up (a fresh local Ray head, placement, reward model, Ray
Train learner, vLLM generators serving adapter version 0), broken down by part, with the CPU
seconds every process spent on it, for the engine layouts side by side in one run:

- ``separate``: vLLM's default, the engine core and its worker in two child processes of each
  generator (``rollout.engine_in_process=false``), the system malloc;
- ``in-process``: both in the generator's own process (the CPU default);
- ``in-process+tcmalloc``: the same with tcmalloc preloaded (``rollout.allocator=auto``, where
  the machine has it; skipped where it does not).

Variants alternate over ``--repeats`` rounds. On a small machine start-up is CPU-bound (every
role's process imports torch), so the CPU seconds say more than the wall time about what a
bigger machine, which runs the parts in parallel, would wait for."""
from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Any

from .common import table
from .ppo_step import bench_config

TARGET_S = 35.0  # half of the 60-70 s the issue measured


def _cpu_by_role(since: float) -> dict[str, float]:
    """CPU seconds (user + system) of the processes created since ``since`` (epoch seconds),
    summed by process name (Ray names actor processes ``ray::<Class>``)."""
    import psutil

    out: dict[str, float] = {}
    for p in psutil.process_iter(["name", "create_time", "cpu_times"]):
        info = p.info
        if info["create_time"] is None or info["create_time"] < since or info["cpu_times"] is None:
            continue
        name = (info["name"] or "?").split(".")[0]  # ray::_QueueActor.get -> ray::_QueueActor
        out[name] = out.get(name, 0.0) + info["cpu_times"].user + info["cpu_times"].system
    return out


def _one(cfg) -> dict[str, Any]:
    import psutil
    import ray

    from rlhf_ray.trainer import PPOTrainer

    since = time.time() - 0.5
    me = psutil.Process()
    cpu0 = sum(me.cpu_times()[:2])
    t = time.perf_counter()
    with PPOTrainer(cfg, progress=False, overwrite=True) as tr:
        wall = time.perf_counter() - t
        cpu = _cpu_by_role(since)
        cpu["driver"] = sum(me.cpu_times()[:2]) - cpu0
        out = {"startup_s": wall, "parts": tr.startup_parts, "cpu_s_by_process": cpu,
               "cpu_s_total": sum(cpu.values())}
    if tr.how_connected.startswith("started"):
        ray.shutdown()  # the next variant starts its own head, as a run does (a joined cluster stays)
    return out


def run(cfg, args) -> tuple[dict[str, Any], dict[str, Any], str]:
    from rlhf_ray.actors.engine import tcmalloc_path

    cfg = bench_config(cfg)
    variants = {"separate": dict(engine_in_process=False, allocator="system"),
                "in-process": dict(engine_in_process=True, allocator="system")}
    if tcmalloc_path() is not None:
        variants["in-process+tcmalloc"] = dict(engine_in_process=True, allocator="tcmalloc")
    if args.variants:
        wanted = args.variants.split(",")
        unknown = [v for v in wanted if v not in variants]
        if unknown:
            raise ValueError(f"--variants: unknown {unknown}; this machine has {list(variants)}")
        variants = {v: variants[v] for v in wanted}
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(args.repeats):
        for name, rollout in variants.items():
            runs[name].append(_one(dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, **rollout))))

    summary = {}
    for name, rs in runs.items():
        parts = [k for k in rs[0]["parts"] if k not in ("total", "built_in")]
        summary[name] = {
            "startup_s_median": statistics.median(r["startup_s"] for r in rs),
            "parts_s_median": {k: statistics.median(r["parts"][k] for r in rs) for k in parts},
            "engine_built_in_s_median": statistics.median(v for r in rs for v in r["parts"]["built_in"].values()),
            "cpu_s_median": statistics.median(r["cpu_s_total"] for r in rs),
        }
    first, best = list(variants)[0], list(variants)[-1]
    ratio = summary[best]["startup_s_median"] / summary[first]["startup_s_median"]
    results = {"runs": runs, "summary": summary, "ratio_last_to_first": ratio,
               "targets": {"startup": {"value": summary[best]["startup_s_median"], "goal": f"<= {TARGET_S} s",
                                       "met": summary[best]["startup_s_median"] <= TARGET_S}}}

    parts = list(summary[first]["parts_s_median"])
    rows = [[name, round(s["startup_s_median"], 1), *(round(s["parts_s_median"][k], 1) for k in parts),
             round(s["engine_built_in_s_median"], 1), round(s["cpu_s_median"], 1)] for name, s in summary.items()]
    text = table(["engines", "start-up s", *parts, "engine build s", "CPU s"], rows)
    # Where the CPU went, in the best variant's last run: what a many-core machine runs in parallel.
    cpu = runs[best][-1]["cpu_s_by_process"]
    top = sorted(cpu.items(), key=lambda kv: -kv[1])[:12]
    text += "\n\n" + table([f"process ({best})", "CPU s"], [[k, round(v, 1)] for k, v in top])
    text += (f"\n\nmedians of {args.repeats}; {best} / {first} start-up = {ratio:.2f}; target <= {TARGET_S:g} s: "
             f"{'met' if results['targets']['startup']['met'] else 'NOT met'}")
    params = {"repeats": args.repeats, "variants": variants, "cores": len(os.sched_getaffinity(0))}
    return params, results, text
