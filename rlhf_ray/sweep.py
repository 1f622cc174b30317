"""`rlhf-ray sweep`: PPO trials as Ray Tune trials that share one generator fleet.

Each trial is a `rlhf-ray train` of its own (a driver process joining the cluster, with its
own learner, reward and reference) attached to the fleet with ``rollout.fleet``: a trial that
crashes takes nothing but itself down, and the fleet releases its adapters. The Tune trial
follows its run's metrics.jsonl and reports every step to Tune; the sweep ends with a table
(judge, KL, reward per trial) in ``<output.dir>/<output.name>/sweep.{json,md}``.
"""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from .config import Config, ConfigError, load_config


def parse_grid(items: Sequence[str]) -> list[list[str]]:
    """``key=[a,b] other=[x,y]`` (or ``key=a``) as the override lists of every combination.

    Raises:
        ConfigError: an item that is not key=value, or an empty list.
    """
    axes: list[list[str]] = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--grid {item!r}: expected key=[v1,v2,...]")
        key, raw = item.split("=", 1)
        try:
            values = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"--grid {item!r}: {e}") from None
        values = values if isinstance(values, list) else [values]
        if not values:
            raise ConfigError(f"--grid {item!r}: no values")
        axes.append([f"{key}={_yaml_value(v)}" for v in values])
    return [list(c) for c in itertools.product(*axes)] if axes else [[]]


def _yaml_value(v: Any) -> str:
    return v if isinstance(v, str) else yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


def trial_specs(cfg_files: list[str], overrides: list[str], grid: Sequence[str],
                trial_files: Sequence[str]) -> list[dict]:
    """The sweep's trials: each its config files and overrides, checked now (a bad trial fails
    the sweep before any actor starts). ``trial_files``: one trial per file, layered over the
    base config; ``grid``: one trial per combination."""
    if grid and trial_files:
        raise ConfigError("give trials either as --grid or as --trials files, not both")
    cfg_files = [str(Path(f).resolve()) for f in cfg_files]  # trials run from Tune's own directories
    trial_files = [str(Path(f).resolve()) for f in trial_files]
    specs = ([{"files": [*cfg_files, f], "overrides": list(overrides), "label": Path(f).stem} for f in trial_files]
             if trial_files else
             [{"files": list(cfg_files), "overrides": [*overrides, *combo], "label": " ".join(combo) or "base"}
              for combo in parse_grid(grid)])
    for i, s in enumerate(specs):
        s["name"] = f"trial-{i}"
        load_config(s["files"], s["overrides"])  # raises ConfigError naming the file and key
    return specs


def rehearsed_specs(specs: list[dict], out_dir: Path) -> list[dict]:
    """A rehearsed sweep's trials: each trial's config rehearsed here, once, and written to
    ``<out_dir>/<trial>.yaml`` for its `rlhf-ray train` (which then needs no --rehearse, so the
    trials and the fleet serve one tiny stand-in model: the one under ``output.dir``)."""
    from .config import dump_config
    from .rehearse import rehearsal_config

    out = []
    for s in specs:
        path = out_dir / f"{s['name']}.yaml"
        path.write_text(dump_config(rehearsal_config(load_config(s["files"], s["overrides"]))))
        out.append({**s, "files": [str(path)], "overrides": []})
    return out


def train_command(spec: dict, out_dir: str, address: str, fleet: Optional[str]) -> list[str]:
    """The `rlhf-ray train` of one trial (``fleet`` None: with engines of its own)."""
    return [sys.executable, "-m", "rlhf_ray.cli", "train", "--quiet", "--overwrite",
            *[a for f in spec["files"] for a in ("--config", f)], *spec["overrides"],
            *([f"rollout.fleet={fleet}"] if fleet else []), f"output.dir={out_dir}", f"output.name={spec['name']}",
            f"cluster.address={address}"]


def start_trial(spec: dict, out_dir: str, address: str, fleet: Optional[str], cwd: str) -> subprocess.Popen:
    """The trial's driver process, its output in ``<out_dir>/<trial>.log`` and pid beside it."""
    Path(out_dir, spec["name"]).mkdir(parents=True, exist_ok=True)
    logf = open(Path(out_dir) / f"{spec['name']}.log", "w")
    proc = subprocess.Popen(train_command(spec, out_dir, address, fleet), stdout=logf, stderr=subprocess.STDOUT,
                            cwd=cwd, env={**os.environ, "RAY_ADDRESS": address})
    logf.close()  # the child holds its own descriptor
    (Path(out_dir) / f"{spec['name']}.pid").write_text(str(proc.pid))
    return proc


def _trial(config: dict) -> None:
    """A Tune trial: run `rlhf-ray train` for one spec, report its steps as they land."""
    from ray import tune

    spec = config["spec"]
    metrics = Path(config["out_dir"]) / spec["name"] / "metrics.jsonl"
    log_path = Path(config["out_dir"]) / f"{spec['name']}.log"
    proc = start_trial(spec, config["out_dir"], config["address"], config["fleet"], config["cwd"])
    seen = 0
    while True:
        rc = proc.poll()
        lines = metrics.read_text().splitlines() if metrics.is_file() else []
        for line in lines[seen:]:
            if line.strip():
                tune.report(_tune_metrics(json.loads(line)))
        seen = max(seen, len(lines))
        if rc is not None:
            break
        time.sleep(1.0)
    if rc != 0:
        raise RuntimeError(f"{spec['name']} ({spec['label']}) exited with {rc}: {why_failed(log_path)}")


def why_failed(log_path: Path) -> str:
    """The CLI's own one-line error from a trial's log (progress bars and Ray's notices left out)."""
    lines = [x.split("\r")[-1].strip() for x in log_path.read_text(errors="replace").splitlines()]
    mine = [x[x.index("rlhf-ray "):] for x in lines if "rlhf-ray " in x and ": " in x]
    return mine[-1] if mine else " | ".join([x for x in lines if x and "(raylet)" not in x][-3:])


def _tune_metrics(record: dict) -> dict:
    keep = ("step", "reward_mean", "kl_per_seq", "stale_samples", "logprob_gap", "samples_per_s",
            "fleet_queue_wait_s", "published_version")
    return {k: record[k] for k in keep if isinstance(record.get(k), (int, float))}


def run_sweep(cfg: Config, cfg_files: list[str], overrides: list[str], specs: list[dict], *,
              parallel: Optional[int] = None) -> dict:
    """Run ``specs`` as Tune trials against the fleet ``rollout.fleet`` (one is started for the
    sweep, named after it, and stopped at its end when none is given). Returns the summary."""
    import ray
    from ray import tune

    from .launch import connect
    from .shared_fleet import fleet_status, start_fleet, stop_fleet

    from .stages import policy_base

    out_dir = cfg.output.run_dir.resolve()
    if cfg.rollout.fleet is None:
        policy_base(cfg)  # a missing SFT model fails before a head or fleet starts
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.cluster.rehearse:
        specs = rehearsed_specs(specs, out_dir)
    how = connect(cfg)
    own_fleet = cfg.rollout.fleet is None
    fleet = cfg.rollout.fleet or f"sweep-{cfg.output.name}"
    if own_fleet:
        import dataclasses

        start_fleet(dataclasses.replace(cfg, fleet=dataclasses.replace(cfg.fleet, name=fleet,
                                                                       max_runs=max(cfg.fleet.max_runs, parallel or len(specs)))))
    t0 = time.perf_counter()
    try:
        address = ray.get_runtime_context().gcs_address
        tuner = tune.Tuner(
            tune.with_resources(_trial, {"cpu": 0.01}),
            param_space={"spec": tune.grid_search(specs), "fleet": fleet, "out_dir": str(out_dir),
                         "address": address, "cwd": os.getcwd()},
            tune_config=tune.TuneConfig(max_concurrent_trials=parallel or len(specs)),
            run_config=tune.RunConfig(name="tune", storage_path=str(out_dir), verbose=0))
        results = tuner.fit()
        wall = time.perf_counter() - t0
        fleet_seen = fleet_status(fleet)
    finally:
        if own_fleet:
            stop_fleet(fleet)
    rows = []
    for res in results:
        spec = res.config["spec"]
        rows.append(trial_row(spec, out_dir / spec["name"], res.error))
    summary = {"fleet": fleet, "fleet_started_by_sweep": own_fleet, "ray": how, "wall_s": wall,
               "trials": rows, "fleet_after": {k: fleet_seen[k] for k in ("slots_used", "lora_slots", "ended")}}
    (out_dir / "sweep.json").write_text(json.dumps(summary, indent=2, default=str))
    (out_dir / "sweep.md").write_text(format_summary(summary) + "\n")
    return summary


def trial_row(spec: dict, run_dir: Path, error: Optional[BaseException]) -> dict:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()] \
        if (run_dir / "metrics.jsonl").is_file() else []
    summary_path = run_dir / "ppo.json"
    summ = json.loads(summary_path.read_text()) if summary_path.is_file() and error is None else {}
    ev = (summ.get("eval") or {}).get("after") or {}
    return {"trial": spec["name"], "label": spec["label"], "status": "error" if error else "ok",
            "error": _error_line(error) if error else None, "steps": len(records),
            "reward_first": records[0]["reward_mean"] if records else None,
            "reward_last": records[-1]["reward_mean"] if records else None,
            "kl_per_seq_last": records[-1]["kl_per_seq"] if records else None,
            "judge_after": ev.get("judge_score"),
            "stale_samples": sum(r["stale_samples"] for r in records),
            "max_staleness_seen": max((int(k) for r in records for k in r.get("staleness", {})), default=0),
            "logprob_gap_max": max((r["logprob_gap"] for r in records), default=None),
            "queue_wait_mean_s": (sum(r.get("fleet_queue_wait_s", 0.0) for r in records) / len(records)
                                  if records else None),
            "samples_per_s": summ.get("samples_per_s"), "run_dir": str(run_dir)}


def _error_line(error: BaseException) -> str:
    """The trial's own message, not the lines Ray wraps it in."""
    lines = [x.strip() for x in str(error).splitlines() if x.strip()]
    mine = [x for x in lines if " exited with " in x]
    return (mine[-1] if mine else lines[-1] if lines else repr(error))[:400]


def format_summary(s: dict) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = [f"sweep on fleet {s['fleet']} ({len(s['trials'])} trials, {s['wall_s']:.0f} s)", "",
             "| trial | overrides | status | steps | reward first -> last | KL/seq | judge | stale | log-prob gap | "
             "wait (s) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in s["trials"]:
        lines.append(f"| {r['trial']} | {r['label']} | {r['status']} | {r['steps']} | {f(r['reward_first'], '.3f')} -> "
                     f"{f(r['reward_last'], '.3f')} | {f(r['kl_per_seq_last'], '.3f')} | {f(r['judge_after'], '.3f')} | "
                     f"{r['stale_samples']} | {f(r['logprob_gap_max'], '.1e')} | {f(r['queue_wait_mean_s'], '.3f')} |")
    for r in s["trials"]:
        if r["error"]:
            lines.append(f"\n{r['trial']} failed: {r['error']}")
    return "\n".join(lines)
