"""step, memory and scaling: measured on real PPO steps of `PPOTrainer` (vLLM generators,
reward actor, Ray Train learner). The base is the run's SFT model when it exists (else
model.path / the tiny model) and the reward model the run's trained one (else an untrained
score head: timings do not depend on what the head has learned)."""
from __future__ import annotations

import dataclasses
import statistics
from contextlib import contextmanager
from typing import Any, Iterator, Optional

from .common import table

STAGES = ["generate", "reward", "reference", "advantages", "train", "publish"]
TARGET_OVERHEAD = 0.15


def bench_config(cfg, **rollout):
    """The config's run measured in a directory of its own (``<output.name>_bench``, replaced
    each time), on the run's SFT model and reward model where they exist, so a benchmark never
    touches the run it measures."""
    from rlhf_ray.stages import reward_path, rm_dir, sft_dir

    cfg = dataclasses.replace(cfg, sft=dataclasses.replace(cfg.sft, output_dir=str(sft_dir(cfg))),
                              rm=dataclasses.replace(cfg.rm, output_dir=str(rm_dir(cfg))),
                              output=dataclasses.replace(cfg.output, name=f"{cfg.output.name}_bench"))
    ppo = cfg.ppo if (sft_dir(cfg) / "config.json").is_file() else dataclasses.replace(cfg.ppo, base="model")
    reward = cfg.reward
    try:
        reward_path(cfg)
    except FileNotFoundError:
        from rlhf_ray.models import resolve_model_path
        from rlhf_ray.models.reward import build_reward_model

        untrained = build_reward_model(resolve_model_path(cfg.model),
                                       cfg.output.run_dir.resolve() / "_bench_untrained_rm", seed=cfg.model.seed)
        reward = dataclasses.replace(cfg.reward, path=str(untrained))
    return dataclasses.replace(cfg, ppo=ppo, reward=reward,
                               rollout=dataclasses.replace(cfg.rollout, **rollout) if rollout else cfg.rollout,
                               eval=dataclasses.replace(cfg.eval, judge="none"))


def _steps(trainer, n: int) -> list[dict]:
    return [trainer.step() for _ in range(n)]


@contextmanager
def _trainer(cfg, given=None, **rollout) -> Iterator[Any]:
    """The trainer to measure: ``given``, a live one left running (the test suite's shared
    trainer), or a new one on ``bench_config(cfg, **rollout)``, closed at the end."""
    if given is not None:
        yield given
        return
    from rlhf_ray.trainer import PPOTrainer

    with PPOTrainer(bench_config(cfg, **rollout), progress=False, overwrite=True) as tr:
        yield tr


def run_step(cfg, args, trainer: Optional[Any] = None) -> tuple[dict[str, Any], dict[str, Any], str]:
    with _trainer(cfg, trainer) as tr:
        cfg = tr.cfg
        records = _steps(tr, args.steps + 1)[1:]  # step 0 pays first-call costs
    wall = {s: statistics.mean(r["time_s"][s] for r in records) for s in STAGES + ["idle", "total"]}
    compute = {s: statistics.mean(r["compute_s"][s] for r in records) for s in STAGES}
    overhead = statistics.mean(r["overhead_frac"] for r in records)
    results = {"steps": len(records), "wall_s_mean": wall, "compute_s_mean": compute,
               "overhead_frac_mean": overhead, "overhead_frac_per_step": [r["overhead_frac"] for r in records],
               "samples_per_s": statistics.mean(r["samples_per_s"] for r in records),
               "targets": {"orchestration_overhead": {"value": overhead, "goal": f"<= {TARGET_OVERHEAD}",
                                                      "met": overhead <= TARGET_OVERHEAD}}}
    rows = [[s, round(wall[s], 4), round(compute[s], 4), round(wall[s] - compute[s], 4)] for s in STAGES]
    rows.append(["idle (driver)", round(wall["idle"], 4), 0.0, round(wall["idle"], 4)])
    rows.append(["step", round(wall["total"], 4), round(sum(compute.values()), 4),
                 round(wall["total"] - sum(compute.values()), 4)])
    text = table(["stage", "wall s", "compute s", "orchestration s"], rows)
    text += (f"\norchestration overhead {100 * overhead:.1f}% of the step (target <= {100 * TARGET_OVERHEAD:.0f}%): "
             f"{'met' if overhead <= TARGET_OVERHEAD else 'NOT met'}; {results['samples_per_s']:.1f} samples/s")
    return {"steps_measured": len(records), "batch_size": cfg.ppo.prompts_per_step}, results, text


def run_memory(cfg, args, trainer: Optional[Any] = None) -> tuple[dict[str, Any], dict[str, Any], str]:
    """Each actor's measured peak beside the planner's estimate for it, then the planner's
    three checks (plan_check.py)."""
    from . import plan_check

    with _trainer(cfg, trainer) as tr:
        cfg = tr.cfg
        records = _steps(tr, max(2, args.steps))
        model_dir, reward_dir, max_len = tr.model_path, tr.reward_path, tr.max_model_len
    mem = records[-1]["memory"]
    plan = plan_check.actor_estimates(cfg, model_dir, reward_dir, max_len)
    rows = []
    for name, m in sorted(mem.items()):
        est = plan.get(name, {}).get("bytes")
        cuda = m.get("cuda_max_allocated_bytes")
        rows.append([name, m["role"], round(m["rss_bytes"] / 2**20, 1), round(m["peak_rss_bytes"] / 2**20, 1),
                     round(est / 2**20, 1) if est else "-",
                     round(cuda / 2**20, 1) if cuda is not None else "-",
                     round(cuda / est, 2) if cuda is not None and est else "-"])
        m["planned_bytes"] = est
    total = sum(m["peak_rss_bytes"] for m in mem.values())
    checks = {"static_bytes": plan_check.static_bytes(cfg, model_dir),
              "activations": plan_check.activations(cfg),
              "kv_cache": plan_check.kv_capacity(cfg, model_dir, max_len)} if args.plan_checks else {}
    results = {"per_actor": mem, "sum_of_peaks_bytes": total, "planner": plan, "planner_checks": checks,
               "note": "RSS of each actor's process tree (a vLLM engine's worker processes included), "
                       "sampled every 0.25 s during real PPO steps; peaks shorter than that can be missed. "
                       "On CPU the RSS also holds the Python/torch/vLLM runtime (hundreds of MiB), which the "
                       "plan, made for GPU memory, leaves out: the CUDA peak / plan ratio is the one to read "
                       "when a GPU is present."}
    text = table(["actor", "role", "RSS MiB", "peak RSS MiB", "plan MiB", "CUDA max alloc MiB", "CUDA / plan"], rows)
    text += f"\nsum of peaks: {total / 2**30:.2f} GiB"
    if not checks:
        return {"steps": len(records), "plan_checks": False}, results, text
    a, k, st = checks["activations"], checks["kv_cache"], checks["static_bytes"]
    text += (f"\nplanner checks: static bytes "
             f"{'equal' if st['equal'] else 'DIFFER'} ({st['measured_bytes']}); activations planned/saved "
             f"{a['no_checkpointing']['ratio']:.3f} (no checkpointing), {a['checkpointing']['ratio']:.3f} "
             f"(checkpointing) on a {a['params'] / 1e6:.0f} M bf16 Llama, {a['rows']} x {a['seq_len']} tokens "
             f"(goal within 15%); KV cache {k['planned_sequences']:.4f} sequences planned vs vLLM's "
             f"{k['vllm_max_concurrency']:.4f} ({'equal' if k['equal'] else 'DIFFER'})")
    return {"steps": len(records)}, results, text


def run_scaling(cfg, args, trainer: Optional[Any] = None) -> tuple[dict[str, Any], dict[str, Any], str]:
    import os

    cores = len(os.sched_getaffinity(0))
    sizes = list(range(1, max(2, args.max_actors) + 1))
    out = {}
    with _trainer(cfg, trainer, num_engines=1) as tr:
        cfg = tr.cfg
        while len(tr.generators) > sizes[0]:
            tr.remove_rollout_actor()
        tr.step()  # warm-up
        for n in sizes:
            while len(tr.generators) < n:
                tr.add_rollout_actor()
            tr.step()  # the new actor's first call
            recs = _steps(tr, args.steps)
            out[n] = {"samples_per_s": statistics.mean(r["samples_per_s"] for r in recs),
                      "generate_tokens_per_s": statistics.mean(r["generate_tokens_per_s"] for r in recs),
                      "generate_s": statistics.mean(r["time_s"]["generate"] for r in recs),
                      "step_s": statistics.mean(r["time_s"]["total"] for r in recs)}
    base = out[sizes[0]]["samples_per_s"]
    rows = [[n, round(v["samples_per_s"], 2), round(v["samples_per_s"] / base, 2),
             round(v["generate_tokens_per_s"], 1), round(v["generate_s"], 3), round(v["step_s"], 3)]
            for n, v in out.items()]
    why = (f"{cores} CPU cores are shared by every role: each vLLM engine, the reward actor and the learner "
           "ranks run one thread each, so a second engine only helps while a core is idle during generation; "
           "the learner and reward stages do not shrink with more generators.")
    results = {"cores": cores, "by_rollout_actors": out, "learner_workers": cfg.learner.num_workers,
               "explanation": why}
    text = table(["rollout actors", "samples/s", "speed-up", "generate tok/s", "generate s", "step s"], rows)
    return {"sizes": sizes, "steps_per_size": args.steps}, results, text + "\n" + why
