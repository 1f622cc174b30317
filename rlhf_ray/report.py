"""The run report: ``report.md`` with the targets and each stage's figures, and PNG plots of
the PPO metrics, from what the stages left in the run directory (``sft.json``, ``rm.json``,
``ppo.json``, ``pipeline.json``, ``metrics.jsonl``)."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any, Optional

RM_ACCURACY_TARGET = 0.90
JUDGE_GAIN_TARGET_PP = 25.0
PIPELINE_TIME_TARGET_S = 600.0
SMALL_HELDOUT = 50  # held-out pairs/examples/prompts below which a held-out figure says little

PLOTS = {  # file name -> (title, how to read it off a metrics.jsonl record)
    "reward": ("reward-model score (mean per step)", lambda r: r["reward_mean"]),
    "kl": ("KL to reference (nats per response)", lambda r: r["kl_per_seq"]),
    "entropy": ("policy entropy (nats per token)", lambda r: r["learner"].get("entropy")),
    "clip_frac": ("clipped fraction of ratios", lambda r: r["learner"].get("clip_frac")),
    "samples_per_s": ("samples / s (whole step)", lambda r: r["samples_per_s"]),
}


def _load(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.is_file() else None


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_plots(records: list[dict], out_dir: Path, kl_target: Optional[float] = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    steps = [r["step"] for r in records]
    for name, (title, get) in PLOTS.items():
        ys = [get(r) for r in records]
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
        ax.plot(steps, ys, marker="o", markersize=3)
        if name == "kl" and kl_target:
            ax.axhline(kl_target, color="grey", linestyle="--", label=f"ppo.kl_target={kl_target}")
            ax.legend()
        ax.set_title(title)
        ax.set_xlabel("PPO step")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def heldout_note(n: Optional[int], what: str) -> str:
    """What to print beside a held-out figure measured over ``n`` ``what`` (pairs, examples,
    prompts): a warning when they are too few to mean much, else nothing (also when unknown, or
    none: then there is no figure)."""
    if not n or n >= SMALL_HELDOUT:
        return ""
    return f" (only {n} held-out {what}: too few to mean much)"


def targets(sft: Optional[dict], rm: Optional[dict], ppo: Optional[dict],
            pipeline: Optional[dict]) -> list[dict[str, Any]]:
    """One row per target of the default run: what, value, goal, met (None = not measured).
    The fixed goals (pair accuracy, judge gain, wall time) are the built-in task's; on a user's
    task the rows give the figures alone, with each reward component before and after."""
    rows = []
    builtin = (ppo or {}).get("builtin_task", True)

    def goal(text: str, met: bool) -> dict:
        return {"goal": text, "met": met} if builtin else {"goal": "(built-in task only)", "met": None}

    if rm and rm.get("kind") == "classifier":
        acc = rm["heldout_after"]["accuracy"]
        rows.append({"target": "reward classifier: held-out accuracy",
                     "value": f"{acc:.3f}" + heldout_note(rm["heldout_after"].get("examples"), "texts"),
                     **goal(f">= {RM_ACCURACY_TARGET:.2f}", acc >= RM_ACCURACY_TARGET)})
    elif rm:
        acc = rm["heldout_after"]["accuracy"]
        rows.append({"target": "reward model: held-out pair accuracy",
                     "value": f"{acc:.3f}" + heldout_note(rm["heldout_after"].get("pairs"), "pairs"),
                     **goal(f">= {RM_ACCURACY_TARGET:.2f}", acc >= RM_ACCURACY_TARGET)})
    ev = (ppo or {}).get("eval", {})
    before, after = ev.get("before"), ev.get("after")
    if before and after and "judge_score" in after:
        gain = 100 * (after["judge_score"] - before["judge_score"])
        rows.append({"target": f"judge ({after['judge']}) on held-out prompts, after - before PPO",
                     "value": f"{gain:+.1f} pp ({100 * before['judge_score']:.1f}% -> "
                              f"{100 * after['judge_score']:.1f}%)" + heldout_note(after.get("prompts"), "prompts"),
                     **goal(f">= +{JUDGE_GAIN_TARGET_PP:.0f} pp", gain >= JUDGE_GAIN_TARGET_PP)})
    if before and after and not builtin:
        for name in ppo.get("reward_components", []):
            key = f"reward/{name}"
            if key in before and key in after:
                rows.append({"target": f"reward component {name} (held-out mean), before -> after",
                             "value": f"{before[key]:.3f} -> {after[key]:.3f}", "goal": "-", "met": None})
    if after:
        kl_target = ppo.get("kl_target")
        rows.append({"target": "KL to reference after PPO (held-out, nats per response)",
                     "value": f"{after['kl_per_seq']:.2f}",
                     "goal": f"<= ppo.kl_target = {kl_target}" if kl_target else "(no ppo.kl_target set)",
                     "met": after["kl_per_seq"] <= kl_target if kl_target else None})
    if pipeline:
        t = pipeline["time_s"]["total"]
        rows.append({"target": "whole pipeline wall time (model, SFT, RM, PPO, evaluation)",
                     "value": f"{t:.0f} s", **goal(f"<= {PIPELINE_TIME_TARGET_S:.0f} s", t <= PIPELINE_TIME_TARGET_S)})
    return rows


def _met(m: Optional[bool]) -> str:
    return "n/a" if m is None else ("yes" if m else "**no**")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _eval_rows(ev: dict) -> list[list[Any]]:
    rows = []
    for key in ("before", "after"):
        e = ev.get(key)
        if e:
            rows.append([e["label"], e["adapter_version"], e["samples"],
                         f"{100 * e['judge_score']:.1f}%" if "judge_score" in e else "-",
                         f"{100 * e['in_vocabulary_rate']:.1f}%" if "in_vocabulary_rate" in e else "-",
                         f"{e['reward_mean']:.3f}", f"{e['kl_per_seq']:.3f}", f"{e['response_len_mean']:.1f}",
                         f"{100 * e.get('truncation_rate', float('nan')):.1f}%"])
    return rows


# What the columns of the per-set and ROUGE tables are.
_JUDGED_COLUMNS = ("SFT columns: greedy decoding on the SFT stage's model; PPO columns: samples from the engines at "
                   "the rollout's temperature.")


def _judged(sft: Optional[dict], ppo: Optional[dict], key: str) -> list[tuple[str, dict]]:
    """The judge's figures before and after SFT and PPO, those that hold ``key``."""
    ev = (ppo or {}).get("eval", {})
    cols = [("before SFT", (sft or {}).get("judge_before")), ("after SFT", (sft or {}).get("judge_after")),
            ("before PPO", ev.get("before")), ("after PPO", ev.get("after"))]
    return [(name, e) for name, e in cols if e and e.get(key)]


def _by_set_table(sft: Optional[dict], ppo: Optional[dict]) -> str:
    """Accuracy per set before and after SFT and PPO, where the evaluation has sets."""
    cols = _judged(sft, ppo, "judge_by_set")
    if not cols:
        return ""
    sets = sorted({k for _, e in cols for k in e["judge_by_set"]})
    rows = [[s] + [f"{100 * e['judge_by_set'][s]:.1f}%" if s in e["judge_by_set"] else "-" for _, e in cols]
            for s in sets]
    rows.append(["mean over sets"] + [f"{100 * e['judge_sets_mean']:.1f}%" for _, e in cols])
    return _table(["set"] + [name for name, _ in cols], rows)


def render(run_dir: Path, name: str) -> str:
    sft, rm, ppo = (_load(run_dir / f"{s}.json") for s in ("sft", "rm", "ppo"))
    pipeline = _load(run_dir / "pipeline.json")
    records = read_metrics(run_dir / "metrics.jsonl")
    out = [f"# rlhf-ray run `{name}`", "",
           f"{os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}"
           + (f", finished {pipeline['finished']}" if pipeline else ""), ""]
    rows = targets(sft, rm, ppo, pipeline)
    if rows:
        out += ["## Targets", "", _table(["target", "value", "goal", "met"],
                                         [[r["target"], r["value"], r["goal"], _met(r["met"])] for r in rows]), ""]
        missed = [r["target"] for r in rows if r["met"] is False]
        out += [f"Missed: {'; '.join(missed)}." if missed else "Every measured target was met.", ""]
    out += ["## Stages", ""]
    stage_rows = []
    if sft:
        stage_rows.append(["SFT", f"{sft['time_s']:.1f}",
                           f"{sft.get('method', sft.get('mode'))}, {sft['train_examples']} examples, {sft['steps']} steps; held-out loss "
                           f"{sft['heldout_loss_before'] or float('nan'):.3f} -> {sft['heldout_loss_after'] or float('nan'):.3f}"
                           f"{heldout_note(sft.get('heldout_examples'), 'examples')}"])
    if rm and rm.get("kind") == "classifier":
        b, a = rm["heldout_before"], rm["heldout_after"]
        stage_rows.append(["reward classifier", f"{rm['time_s']:.1f}",
                           f"classes {rm['labels']}, {rm['train_examples']} texts, {rm['steps']} steps; held-out "
                           f"accuracy {b['accuracy']:.3f} -> {a['accuracy']:.3f}"
                           f"{heldout_note(a.get('examples'), 'texts')}"])
    elif rm:
        b, a = rm["heldout_before"], rm["heldout_after"]
        stage_rows.append(["reward model", f"{rm['time_s']:.1f}",
                           f"{rm.get('method', rm.get('mode'))}, {rm['train_pairs']} pairs, {rm['steps']} steps, margin "
                           f"{'on' if rm['use_margin'] else 'off'}; held-out accuracy {b['accuracy']:.3f} -> "
                           f"{a['accuracy']:.3f}{heldout_note(a.get('pairs'), 'pairs')}, reward gap "
                           f"{a['reward_gap']:.2f} (raw scale)"])
    if ppo:
        stage_rows.append(["PPO", f"{ppo.get('time_s', float('nan')):.1f}",
                           f"{ppo['steps']} steps, {ppo['rollout_actors']} {_engine(ppo)} rollout actors, "
                           f"{ppo['learner_workers']} Ray Train workers; start-up {ppo['startup_s']:.1f} s, "
                           f"{ppo['samples_per_s'] or 0:.1f} samples/s after step 0; reward "
                           f"{ppo['reward_first']:.2f} -> {ppo['reward_last']:.2f}; stale samples "
                           f"{ppo['stale_samples']}; max log-prob gap {_engine(ppo)} vs learner {ppo['logprob_gap_max']:.1e}; "
                           f"responses cut at the limit {100 * (ppo.get('truncation_rate_mean') or 0):.1f}% "
                           f"(ppo.truncated={ppo.get('truncated', '?')}); adapter {ppo.get('adapter')}"])
    out += [_table(["stage", "time (s)", "figures"], stage_rows), ""]
    if ppo and ppo.get("eval"):
        e = ppo["eval"].get("after") or ppo["eval"].get("before") or {}
        note = heldout_note(e.get("prompts"), "prompts")
        out += ["## Held-out evaluation", "",
                "The judge is rule-based (the task's target property), independent of the reward model. "
                "KL is the mean over samples of sum(log pi - log pi_ref) over the response."
                + (f" Judge figures{note}." if note else ""), "",
                _table(["when", "adapter", "samples", "judge", "in-vocabulary", "RM reward", "KL/seq",
                        "tokens/response", "cut at limit"], _eval_rows(ppo["eval"])), ""]
        for key in ("before", "after"):
            e = ppo["eval"].get(key)
            if e:
                out += [f"Samples {e['label']}:", ""]
                out += [f"- `{x['prompt']}` -> `{x['response'].strip()}` (reward {x['reward']:.2f}"
                        + (f", judge {x['judge']:.0f}" if "judge" in x else "") + ")" for x in e["examples"][:5]]
                out += [""]
    rouge = _parts_table(sft, ppo)
    if rouge:
        out += ["## ROUGE", "",
                "Against each held-out prompt's reference summary (`rouge-score`, stemmed; F-measures). "
                + _JUDGED_COLUMNS, "", rouge, ""]
    by_set = _by_set_table(sft, ppo)
    if by_set:
        out += ["## Accuracy per set", "",
                "The judge per evaluation set (the `set` column) and the mean over sets. " + _JUDGED_COLUMNS,
                "", by_set, ""]
    if records:
        out += ["## PPO per step", "", "![reward](plots/reward.png) ![kl](plots/kl.png) "
                "![entropy](plots/entropy.png) ![clip_frac](plots/clip_frac.png) "
                "![samples/s](plots/samples_per_s.png)", "",
                _table(["step", "reward", "KL/seq", "kl_coef", "entropy", "clip frac", "cut at limit", "samples/s",
                        "step s"],
                       [[r["step"], f"{r['reward_mean']:.3f}", f"{r['kl_per_seq']:.3f}", f"{r['kl_coef']:.4f}",
                         f"{r['learner'].get('entropy', float('nan')):.3f}",
                         f"{r['learner'].get('clip_frac', float('nan')):.3f}",
                         f"{100 * r.get('truncation_rate', float('nan')):.0f}%", f"{r['samples_per_s']:.1f}",
                         f"{r['time_s']['total']:.2f}"] for r in records]), ""]
    return "\n".join(out)


def write_report(run_dir: Path, name: str) -> Path:
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    ppo = _load(run_dir / "ppo.json") or {}
    if records:
        write_plots(records, run_dir / "plots", ppo.get("kl_target"))
    path = run_dir / "report.md"
    path.write_text(render(run_dir, name))
    return path


def targets_table(run_dir: Path) -> str:
    """The targets as a plain-text table for the terminal."""
    run_dir = Path(run_dir)
    rows = targets(*(_load(run_dir / f"{s}.json") for s in ("sft", "rm", "ppo", "pipeline")))
    if not rows:
        return ""
    w = max(len(r["target"]) for r in rows)
    v = max(len(r["value"]) for r in rows)
    g = max(len(r["goal"]) for r in rows)
    lines = [f"{'target':<{w}}  {'value':<{v}}  {'goal':<{g}}  met"]
    lines += [f"{r['target']:<{w}}  {r['value']:<{v}}  {r['goal']:<{g}}  {_met(r['met']).strip('*')}" for r in rows]
    return "\n".join(lines)


def _engine(ppo: dict) -> str:
    return {"vllm": "vLLM", "transformers": "transformers"}.get(ppo.get("rollout_engine", "vllm"), "vLLM")


def _parts_table(sft: Optional[dict], ppo: Optional[dict]) -> str:
    """The judge's several figures (ROUGE-1/2/L/Lsum) before and after SFT and PPO, where it has them."""
    cols = _judged(sft, ppo, "judge_parts")
    if not cols:
        return ""
    keys = list(cols[0][1]["judge_parts"])
    return _table(["figure"] + [name for name, _ in cols],
                  [[k] + [f"{e['judge_parts'].get(k, float('nan')):.4f}" for _, e in cols] for k in keys])
