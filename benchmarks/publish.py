"""publish: what one published version costs per method (learner.method lora | ssf | repadapter |
full), side by side in one run: a few PPO steps each on the config's model (one engine, one
learner worker; the config's model itself as the base and a rule reward: no SFT or reward-model
stage), the bytes of a version as the generators receive it, and the generator's swap
time (LoRA: a new adapter registered; the others: vLLM's in-place reload of the merged layers
and a prefix-cache reset), median over the steps after the first.

The targets are SSF's and RepAdapter's merged layers (q/k/v/o, and the fused parts they pull in);
the planner's `publish_bytes` makes the same count for any model (at 7B: docs/methods.md).
"""
from __future__ import annotations

import statistics
import tempfile
from typing import Any

from .common import table, with_overrides

METHODS = ["lora", "ssf", "repadapter", "full"]
STEPS = 4


def run(cfg, args) -> tuple[dict[str, Any], dict[str, Any], str]:
    import ray

    from rlhf_ray.plan import model_shape
    from rlhf_ray.plan.memory import publish_bytes
    from rlhf_ray.stages import policy_base
    from rlhf_ray.trainer import PPOTrainer

    methods = args.methods.split(",") if getattr(args, "methods", None) else METHODS
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="rr-publish-") as tmp:
        for m in methods:
            print(f"publish: {m} ...", flush=True)
            c = with_overrides(cfg, f"learner.method={m}", "rollout.num_engines=1", "learner.num_workers=1",
                               f"ppo.steps={STEPS}", "ppo.base=model", "reward.rule=letter_e", f"output.dir={tmp}",
                               f"output.name=publish_{m}", "output.trackers=[jsonl]", "rollout.max_staleness=0",
                               *(["reference.mode=separate"] if m == "full" else []))
            with PPOTrainer(c, progress=False, overwrite=True) as tr:
                records = tr.run(evaluate=False)
                version = ray.get(tr.latest_adapter)
            swaps = [r["adapter_swap_s_max"] for r in records[1:]]
            shape = model_shape(policy_base(c), c.lora.rank, list(c.lora.target_modules))
            out[m] = {"bytes": version.num_bytes, "planned_bytes": publish_bytes(c, shape),
                      "swap_s_median": statistics.median(swaps), "swap_s": swaps,
                      "step_s_median": statistics.median(r["time_s"]["total"] for r in records[1:]),
                      "logprob_gap_max": max(r["logprob_gap"] for r in records),
                      "stale_samples": sum(r["stale_samples"] for r in records)}
    lora = out.get("lora")
    if lora:
        for r in out.values():
            r["bytes_vs_lora"] = r["bytes"] / lora["bytes"]
            r["swap_vs_lora"] = r["swap_s_median"] / lora["swap_s_median"]
    targets = {f"{m}: planner's bytes = measured": {"value": r["bytes"], "goal": f"{r['planned_bytes']} bytes",
                                                     "met": r["bytes"] == r["planned_bytes"]} for m, r in out.items()}
    targets.update({f"{m}: 0 stale samples, log-prob gap < 1e-4": {
        "value": r["logprob_gap_max"], "goal": "< 1e-4 with 0 stale",
        "met": r["stale_samples"] == 0 and r["logprob_gap_max"] < 1e-4} for m, r in out.items()})
    params = {"methods": methods, "steps": STEPS, "targets": list(cfg.peft.target_modules or cfg.lora.target_modules)}
    rows = [[m, f"{r['bytes']:,}", f"{r.get('bytes_vs_lora', float('nan')):.1f}x",
             f"{1000 * r['swap_s_median']:.1f}", f"{r.get('swap_vs_lora', float('nan')):.1f}x",
             f"{r['step_s_median']:.2f}", f"{r['logprob_gap_max']:.1e}", r["stale_samples"]] for m, r in out.items()]
    text = table(["method", "bytes per version", "vs LoRA", "swap ms (median)", "vs LoRA", "step s", "gap max",
                  "stale"], rows)
    return params, {"methods": out, "targets": targets}, text
