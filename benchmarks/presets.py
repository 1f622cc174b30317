"""presets: every preset of configs/presets/ on the default task, at two group sizes and two
staleness values, each a whole PPO run (held-out judge before and after, held-out KL) on the
base run's SFT model and reward model (`make run` writes them to runs/tiny_cpu).

A cell holds the sample budget per step at ``SAMPLES_PER_STEP`` (prompts = that / group size)
and two minibatches per epoch, so every cell makes the same optimizer steps on the same number
of samples; only the algorithm, the group and the staleness differ. ``ppo`` is the base config
itself (one sample per prompt). ``--seeds 1,2,3`` repeats the cells for the seed spread.

A partial grid (``--presets``, ``--samples``, ``--staleness``) adds its cells to the ones
already in the results file; each cell carries its own date and commit.
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import ROOT, git_commit, table

PRESETS = ROOT / "configs" / "presets"
NAMES = ["grpo", "dr_grpo", "rloo", "gspo", "reinforce_pp"]
SAMPLES_PER_STEP = 32
GOAL_PP = 25.0  # judge gain, percentage points, at a held-out KL within ppo.kl_target


def base_run(cfg, bench: str) -> Path:
    """The config's run directory, which must hold the SFT model and reward model the runs start from."""
    run = cfg.output.run_dir.resolve()
    for part in ("sft_model", "reward_model"):
        if not (run / part / "config.json").is_file():
            raise FileNotFoundError(f"bench {bench}: no {part} in {run}; run `make run` (or `rlhf-ray run`) "
                                    "with this config first")
    return run


def on_base_run(run: Path) -> list[str]:
    """Overrides that start a run from ``run``'s SFT model and reward model, wherever it writes."""
    return [f"sft.output_dir={run / 'sft_model'}", f"rm.output_dir={run / 'reward_model'}"]


def cell_overrides(base: Path, n: int, seed: int, name: str, out: Path) -> list[str]:
    prompts = SAMPLES_PER_STEP // n
    return [*on_base_run(base), f"rollout.samples_per_prompt={n}", f"ppo.prompts_per_step={prompts}",
            f"learner.minibatch_prompts={prompts // 2}",
            # The held-out prompts stay the same (data.seed): the spread is sampling and initialisation.
            f"rollout.seed={seed}", f"model.seed={seed}",
            f"output.dir={out}", f"output.name={name}", "output.trackers=[jsonl]"]


def run_cell(base_yaml: str, layers: list[str], overrides: list[str]) -> dict[str, Any]:
    from rlhf_ray.config import load_config
    from rlhf_ray.guard import DivergenceError
    from rlhf_ray.trainer import PPOTrainer

    cfg = load_config([base_yaml, *layers], overrides)
    t0 = time.perf_counter()
    out: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "commit": git_commit(), "stopped": None}
    with PPOTrainer(cfg, progress=False, overwrite=True) as tr:
        try:
            tr.run()
        except DivergenceError as e:
            out["stopped"] = str(e)
        before, after = tr.evals.get("before", {}), tr.evals.get("after")
        out["rollbacks"] = [{k: r[k] for k in ("at_step", "to_step", "lr")} for r in tr.rollbacks]
        records = tr.all_records or [json.loads(x) for x in (tr.run_dir / "metrics.jsonl").read_text().splitlines()]
    out.update(
        judge_before=before.get("judge_score"), judge_after=after.get("judge_score") if after else None,
        kl_after=after.get("kl_per_seq") if after else None, kl_target=cfg.ppo.kl_target,
        truncation_after=after.get("truncation_rate") if after else None,
        steps=len(records), guard_alarmed_steps=sum(bool(r.get("guard")) for r in records),
        kl_train_max=max((r["kl_per_seq"] for r in records), default=None),
        samples_per_s=statistics.mean(r["samples_per_s"] for r in records[1:]) if len(records) > 1 else None,
        time_s=time.perf_counter() - t0)
    if out["judge_after"] is not None:
        out["gain_pp"] = 100 * (out["judge_after"] - out["judge_before"])
        out["met"] = out["gain_pp"] >= GOAL_PP and (cfg.ppo.kl_target is None or out["kl_after"] <= cfg.ppo.kl_target)
    else:
        out["gain_pp"], out["met"] = None, False
    return out


def cells(args) -> list[tuple[str, str, list[str], int, int, int]]:
    """(key, preset, layer files, samples per prompt, staleness, seed) of the asked grid."""
    names = args.presets.split(",") if args.presets else ["ppo"] + NAMES
    samples = [int(x) for x in args.samples.split(",")]
    stale = [int(x) for x in args.staleness.split(",")]
    out = []
    for seed in [int(x) for x in str(args.seeds).split(",")]:
        for name in names:
            if name != "ppo" and not (PRESETS / f"{name}.yaml").is_file():
                raise ValueError(f"--presets: no configs/presets/{name}.yaml (have: {', '.join(NAMES)})")
            for n in ([1] if name == "ppo" else samples):
                for s in stale:
                    layers = ([] if name == "ppo" else [str(PRESETS / f"{name}.yaml")]) + (
                        [str(PRESETS / "async.yaml")] if s else [])
                    out.append((f"{name}/n{n}/s{s}/seed{seed}", name, layers, n, s, seed))
    return out


def run(cfg, args) -> tuple[dict[str, Any], dict[str, Any], str]:
    from rlhf_ray.config import dump_config

    base = base_run(cfg, "presets")
    previous = Path(args.out or ROOT / "benchmarks" / "results") / "presets.json"
    done = json.loads(previous.read_text())["results"]["cells"] if previous.is_file() else {}
    with tempfile.TemporaryDirectory(prefix="rr-presets-") as tmp:
        base_yaml = str(Path(tmp) / "base.yaml")
        Path(base_yaml).write_text(dump_config(cfg))
        for key, name, layers, n, s, seed in cells(args):
            label = key.replace("/", "_")
            print(f"presets: {key} ...", flush=True)
            done[key] = {"preset": name, "samples_per_prompt": n, "staleness": s, "seed": seed,
                         **run_cell(base_yaml, layers, cell_overrides(base, n, seed, label, base.parent / "presets"))}
            c = done[key]
            print(f"presets: {key}: judge {c['judge_before']} -> {c['judge_after']}, KL {c['kl_after']}, "
                  f"{'stopped: ' + c['stopped'] if c['stopped'] else 'met' if c['met'] else 'not met'}", flush=True)
    params = {"samples_per_step": SAMPLES_PER_STEP, "goal_pp": GOAL_PP, "base_run": str(base)}
    targets = {k: {"value": c["gain_pp"], "goal": f"+{GOAL_PP:g} pp at a held-out KL within ppo.kl_target",
                   "met": bool(c["met"])} for k, c in sorted(done.items())}
    return params, {"cells": done, "spread": spread(done), "targets": targets}, render(done)


def spread_lines(done: dict[str, dict]) -> str:
    return "\n".join(f"seed spread {k}: {s['seeds']} seeds, gain {s['gain_pp_mean']:+.1f} pp +- {s['gain_pp_std']:.1f} "
                     f"(std), held-out KL {s['kl_after_mean']:.2f} on average" for k, s in spread(done).items())


def spread(done: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Per (preset, n, s) with more than one seed: mean and std of the judge gain and the KL."""
    groups: dict[str, list[dict]] = {}
    for key, c in done.items():
        groups.setdefault(key.rsplit("/", 1)[0], []).append(c)
    out = {}
    for k, cs in groups.items():
        gains = [c["gain_pp"] for c in cs if c.get("gain_pp") is not None]
        if len(gains) > 1:
            out[k] = {"seeds": len(gains), "gain_pp_mean": statistics.mean(gains), "gain_pp_std": statistics.stdev(gains),
                      "kl_after_mean": statistics.mean(c["kl_after"] for c in cs if c.get("kl_after") is not None)}
    return out


def render(done: dict[str, dict]) -> str:
    rows = []
    for key, c in sorted(done.items()):
        rows.append([c["preset"], c["samples_per_prompt"], c["staleness"], c["seed"],
                     "-" if c["judge_before"] is None else f"{100 * c['judge_before']:.1f}%",
                     "-" if c["judge_after"] is None else f"{100 * c['judge_after']:.1f}%",
                     "-" if c["gain_pp"] is None else f"{c['gain_pp']:+.1f}",
                     "-" if c["kl_after"] is None else f"{c['kl_after']:.2f}", c["kl_target"],
                     c["guard_alarmed_steps"], "stopped" if c["stopped"] else ("yes" if c["met"] else "no"),
                     f"{c['time_s']:.0f}", (c.get("commit") or "?")[:12]])
    text = table(["preset", "n", "S", "seed", "judge before", "after", "pp", "KL after", "KL target", "alarms",
                  f"+{GOAL_PP:g} pp in KL", "s", "commit"], rows)
    lines = spread_lines(done)
    return text + ("\n" + lines if lines else "") + (
        "\nEach cell: 32 samples per step (prompts = 32 / n), 60 steps, two minibatches per epoch; s: wall time of "
        "the cell (start-up and both evaluations included; cells run while other work used the cores are slower).")
