"""fleet: four PPO runs (a sweep over ppo.kl_coef) sharing one fleet of two generators, against
the same four runs each with an engine of its own, side by side and one after another, on one
machine's cores. Every mode starts its runs the same way (a `rlhf-ray train` driver each, as a
sweep's trials do), and the modes alternate over ``--repeats`` (medians reported). Each mode's
wall time includes every engine start (the shared fleet's too) and each run's own start-up:
aggregate samples/s = samples trained on / wall. Steady samples/s leaves start-up out: the samples of every step after a run's first, over the time during which
at least one run was stepping (the union of the runs' first-to-last step spans). The per-run
rewards and KL on fixed seeds show what sharing changes in what a run learns (only float
order: a batch mixing runs' requests computes the same sampled tokens' log-probs in other
shapes).

What bounds the steady ratio on a machine whose cores are all busy: sharing saves only
generation work (a bigger batch costs less per sample; fewer engines contend for the cores), so
with generation a fraction g of a lone run's step the steady gain stays below 1 / (1 - g); the
benchmark measures g from the runs made one after another and reports that bound."""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import table

KL = [0.05, 0.1, 0.2, 0.4]


def _overrides(cfg, steps: int) -> list[str]:
    return [f"model.tiny_dir={cfg.model.tiny_dir}", f"model.path={cfg.model.path}" if cfg.model.path else "",
            "ppo.base=model", "reward.rule=letter_e", f"ppo.steps={steps}", "learner.num_workers=1",
            "output.trackers=[jsonl]", "rollout.max_staleness=0", "eval.num_prompts=4"]


def _records(out: Path, specs) -> list[list[dict]]:
    runs = []
    for s in specs:
        m = out / s["name"] / "metrics.jsonl"
        runs.append([json.loads(x) for x in m.read_text().splitlines() if x.strip()] if m.is_file() else [])
    return runs


def steady(runs: list[list[dict]]) -> dict[str, float]:
    """Samples of every step after each run's first, over the union of the runs' spans from
    their first step's end to their last one's (start-up and the first step left out)."""
    spans = sorted((r[0]["ended_at"], r[-1]["ended_at"]) for r in runs if len(r) > 1)
    covered, end = 0.0, float("-inf")
    for a, b in spans:
        covered += max(0.0, b - max(a, end))
        end = max(end, b)
    n = sum(x["samples"] for r in runs for x in r[1:])
    return {"steady_s": covered, "steady_samples": n, "steady_samples_per_s": n / covered if covered else 0.0}


def generation_share(runs: list[list[dict]]) -> float:
    """The generate stage's share of a lone run's step time (steps after the first)."""
    steps = [x for r in runs for x in r[1:]]
    return sum(x["time_s"]["generate"] for x in steps) / max(1e-9, sum(x["time_s"]["total"] for x in steps))


def _mode(tmp: Path, mode: str, rep: int, specs: list[dict], address: str, fleet_cfg=None) -> dict:
    """One mode's four runs, started the same way in every mode (a driver process each): with
    ``fleet_cfg`` attached to a fleet started (and stopped) inside the timed span."""
    import os

    from rlhf_ray.shared_fleet import start_fleet, stop_fleet
    from rlhf_ray.sweep import start_trial, trial_row

    out = tmp / f"{mode.replace(' ', '_').replace(',', '')}-{rep}"
    out.mkdir()
    print(f"fleet: {mode}, repeat {rep + 1} ...", flush=True)
    t = time.perf_counter()
    fleet = None
    if fleet_cfg is not None:
        fleet = start_fleet(fleet_cfg)["name"]
    try:
        if mode == "separate, one after another":
            codes = [start_trial(s, str(out), address, None, os.getcwd()).wait() for s in specs]
        else:
            procs = [start_trial(s, str(out), address, fleet, os.getcwd()) for s in specs]
            codes = [p.wait() for p in procs]
    finally:
        if fleet is not None:
            stop_fleet(fleet)
    wall = time.perf_counter() - t
    if any(codes):
        bad = [s["name"] for s, rc in zip(specs, codes) if rc]
        raise RuntimeError(f"fleet bench: {mode}: {bad} failed (logs in {out})")
    records = _records(out, specs)
    n = sum(x["samples"] for r in records for x in r)
    rows = [trial_row(s, out / s["name"], None) for s in specs]
    return {"wall_s": wall, "samples": n, "samples_per_s": n / wall, "runs": rows, **steady(records),
            **({"generation_share": generation_share(records)} if mode == "separate, one after another" else {})}


def summarise(reps: dict[str, list[dict]]) -> tuple[dict[str, Any], str]:
    """Each mode's medians over its repeats, the shared mode's ratios to each, and the table."""
    import statistics

    repeats = len(reps["shared"])
    results: dict[str, Any] = {"modes": {}}
    for mode, rs in reps.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "samples_per_s", "steady_samples_per_s")}
        results["modes"][mode] = {**med, "samples": rs[0]["samples"], "runs": rs[0]["runs"],
                                  "repeats": [{k: v for k, v in r.items() if k != "runs"} for r in rs]}
    shared = results["modes"]["shared"]
    for m in results["modes"].values():
        m["shared_speedup"] = shared["samples_per_s"] / m["samples_per_s"]
        m["shared_steady_speedup"] = shared["steady_samples_per_s"] / m["steady_samples_per_s"]
        m["shared_speedup_per_repeat"] = [a["samples_per_s"] / b["samples_per_s"]
                                          for a, b in zip(reps["shared"], m["repeats"])]
    results["generation_share_alone"] = statistics.median(r["generation_share"]
                                                          for r in reps["separate, one after another"])
    results["steady_bound"] = 1 / (1 - results["generation_share_alone"])
    sep = results["modes"]["separate, side by side"]["runs"]
    results["max_reward_diff"] = max(abs(a["reward_last"] - b["reward_last"]) for a, b in zip(shared["runs"], sep))
    results["max_kl_diff"] = max(abs(a["kl_per_seq_last"] - b["kl_per_seq_last"]) for a, b in zip(shared["runs"], sep))
    results["max_logprob_gap"] = max(r["logprob_gap_max"] for rs in reps.values() for x in rs for r in x["runs"])
    text = table(["mode", "wall (s)", "samples", "samples/s", "shared is x faster", "per repeat",
                  "steady samples/s", "shared is x faster (steady)"],
                 [[k, f"{m['wall_s']:.0f}", m["samples"], f"{m['samples_per_s']:.2f}", f"{m['shared_speedup']:.2f}",
                   " ".join(f"{x:.2f}" for x in m["shared_speedup_per_repeat"]),
                   f"{m['steady_samples_per_s']:.2f}", f"{m['shared_steady_speedup']:.2f}"]
                  for k, m in results["modes"].items()])
    text += (f"\n\nMedians of {repeats} alternating repeats. Generation is {results['generation_share_alone']:.0%} "
             f"of a lone run's step, so sharing the generators can make the steady rate at most "
             f"{results['steady_bound']:.2f}x faster here.")
    text += "\n\n" + table(["run", "reward last (shared / own engine)", "KL/seq last (shared / own engine)"],
                           [[f"kl_coef={k}", f"{a['reward_last']:.3f} / {b['reward_last']:.3f}",
                             f"{a['kl_per_seq_last']:.3f} / {b['kl_per_seq_last']:.3f}"]
                            for k, a, b in zip(KL, shared["runs"], sep)])
    return results, text


MODES = ("shared", "separate, side by side", "separate, one after another")


def run(cfg, args) -> tuple[dict[str, Any], dict[str, Any], str]:
    import ray

    from rlhf_ray.config import load_config
    from rlhf_ray.launch import start_local_head
    from rlhf_ray.models import resolve_model_path
    from rlhf_ray.sweep import trial_specs

    resolve_model_path(cfg.model)  # the tiny model, built once before any run
    steps, repeats = args.steps, max(1, args.repeats)
    base = [o for o in _overrides(cfg, steps) if o]
    files = [str(Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml")]
    specs = trial_specs(files, base, [f"ppo.kl_coef={KL}".replace(" ", "")], [])
    one = [*base, "rollout.num_engines=1"]
    own = [dict(s, overrides=[*one, *s["overrides"][len(base):]]) for s in specs]
    reps: dict[str, list[dict]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(prefix="rr-fleet-") as tmp:
        fleet_cfg = load_config(files, [*base, f"output.dir={tmp}", "output.name=bench", "fleet.name=bench-fleet",
                                        "rollout.num_engines=2", f"fleet.max_runs={len(KL)}",
                                        "fleet.max_staleness=0", "cluster.num_cpus=16"])
        print(start_local_head(fleet_cfg, num_cpus=16, _temp_dir=tempfile.mkdtemp(prefix="rr-fleet-ray-", dir="/tmp")),
              flush=True)
        address = ray.get_runtime_context().gcs_address
        try:
            for rep in range(repeats):  # the modes alternate, so a slow spell of the machine hits each
                order = MODES if rep % 2 == 0 else MODES[::-1]
                for mode in order:
                    reps[mode].append(_mode(Path(tmp), mode, rep, specs if mode == "shared" else own, address,
                                            fleet_cfg if mode == "shared" else None))
        finally:
            ray.shutdown()
    results, text = summarise(reps)
    params = {"runs": len(KL), "kl_coef": KL, "steps": steps, "repeats": repeats, "fleet_generators": 2,
              "own_engines": 1, "prompts_per_step": cfg.ppo.prompts_per_step}
    return params, results, text
