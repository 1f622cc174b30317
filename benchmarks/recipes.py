"""recipes: the runs that once went wrong silently, repeated as a user would make them (issue 25).

GRPO at 4 samples per prompt on the default task, with the config's own batch (so 4x the samples
of the tested PPO step), 60 steps, on the base run's SFT model and reward model, at the staleness
settings that drifted or collapsed before the batch arithmetic, the default off-policy correction
and the divergence guard: each run reaches the goal or is stopped (or rolled back) by the guard
with a message; none may end collapsed with exit code 0.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from .common import table
from .presets import GOAL_PP, base_run, on_base_run, run_cell

GROUP = 4
RUNS = {  # name -> (what it is, overrides)
    "s0": ("rollout.max_staleness=0", ["rollout.max_staleness=0"]),
    "s1": ("rollout.max_staleness=1 (ppo.tis_cap null: the correction on at 2.0, the same run as tis_cap=2.0)",
           ["rollout.max_staleness=1"]),
    "s1_notis": ("rollout.max_staleness=1 ppo.tis_cap=0 (no correction: the old default)",
                 ["rollout.max_staleness=1", "ppo.tis_cap=0"]),
    "s1_notis_rollback": ("the same with guard.action=rollback (checkpoint.every=5, keep=3)",
                          ["rollout.max_staleness=1", "ppo.tis_cap=0", "guard.action=rollback", "checkpoint.every=5",
                           "checkpoint.keep=3"]),
}


def run(cfg, args) -> tuple[dict[str, Any], dict[str, Any], str]:
    from rlhf_ray.config import dump_config

    base = base_run(cfg, "recipes")
    done: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="rr-recipes-") as tmp:
        base_yaml = str(Path(tmp) / "base.yaml")
        Path(base_yaml).write_text(dump_config(cfg))
        for name, (what, extra) in RUNS.items():
            print(f"recipes: {name} ...", flush=True)
            overrides = [*on_base_run(base), "ppo.estimator=grpo", f"rollout.samples_per_prompt={GROUP}",
                         f"output.dir={base.parent / 'recipes'}", f"output.name=recipe_{name}",
                         "output.trackers=[jsonl]", *extra]
            done[name] = {"settings": what, **run_cell(base_yaml, [], overrides)}
            c = done[name]
            print(f"recipes: {name}: judge {c['judge_before']} -> {c['judge_after']}, KL {c['kl_after']}, "
                  f"{'stopped: ' + c['stopped'] if c['stopped'] else 'met' if c['met'] else 'not met'}", flush=True)
    params = {"estimator": "grpo", "samples_per_prompt": GROUP, "prompts_per_step": cfg.ppo.prompts_per_step,
              "steps": cfg.ppo.steps, "goal_pp": GOAL_PP, "base_run": str(base)}
    # Met: the goal reached, or the run stopped by the guard (it said so; nothing ended silently).
    targets = {k: {"value": c["gain_pp"],
                   "goal": f"+{GOAL_PP:g} pp at a held-out KL within ppo.kl_target, or stopped by the guard",
                   "met": bool(c["met"] or c["stopped"])} for k, c in done.items()}
    return params, {"runs": done, "targets": targets}, render(done)


def render(done: dict[str, dict]) -> str:
    rows = [[name, c["steps"], "-" if c["judge_before"] is None else f"{100 * c['judge_before']:.1f}%",
             "-" if c["judge_after"] is None else f"{100 * c['judge_after']:.1f}%",
             "-" if c["gain_pp"] is None else f"{c['gain_pp']:+.1f}",
             "-" if c["kl_after"] is None else f"{c['kl_after']:.2f}", c["guard_alarmed_steps"],
             len(c.get("rollbacks") or []), "stopped" if c["stopped"] else ("yes" if c["met"] else "no"),
             f"{c['time_s']:.0f}"] for name, c in done.items()]
    text = table(["run", "steps", "judge before", "after", "pp", "KL after", "alarms", "rollbacks",
                  f"+{GOAL_PP:g} pp in KL", "s"], rows)
    return text + "\n" + "\n".join(f"{name}: {c['settings']}" + (f"; {c['stopped']}" if c["stopped"] else "")
                                   for name, c in done.items())
