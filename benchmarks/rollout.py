"""rollout: tokens/s of one rollout actor called through Ray vs the same engine configuration
(the same class) called directly in this process, with the adapter active and with the base
model alone. Runs alternate between the two so machine noise hits both alike."""
from __future__ import annotations

import os
import statistics
import time
from typing import Any

from .common import table

TARGET_RATIO = 0.90


def random_adapter(cfg, model_path: str, version: int = 0, seed: int = 0):
    """A non-identity LoRA (PEFT's random init on both factors) as a publishable version."""
    import torch

    from rlhf_ray.models import add_lora, load_causal_lm
    from rlhf_ray.sync import extract_adapter

    torch.manual_seed(seed)
    model = add_lora(load_causal_lm(model_path, cfg.model.dtype), cfg.lora, init_lora_weights=False)
    return model, extract_adapter(model, version)


def prompt_ids(cfg, model_path: str, n: int) -> list[list[int]]:
    from rlhf_ray.data.task import task_prompts
    from rlhf_ray.models import load_tokenizer

    tok = load_tokenizer(model_path)
    return [tok(p.text)["input_ids"] for p in task_prompts(n, cfg.data.seed)]


def run(cfg, args) -> tuple[dict[str, Any], dict[str, Any], str]:
    import ray

    from rlhf_ray.actors.rollout import RolloutGenerator
    from rlhf_ray.launch import ROLE_ENV, call, connect, spawn
    from rlhf_ray.models import resolve_model_path

    model_path = resolve_model_path(cfg.model)
    prompts = prompt_ids(cfg, model_path, args.num_prompts)
    _, adapter = random_adapter(cfg, model_path)
    connect(cfg)
    actor = spawn(RolloutGenerator, cfg, model_path, "bench-actor", num_cpus=cfg.rollout.num_cpus,
                  num_gpus=cfg.rollout.num_gpus)
    os.environ.update(ROLE_ENV)  # the same thread settings as inside the actor
    direct = RolloutGenerator(cfg, model_path, "bench-direct")
    call("rollout", actor.load_adapter.remote(adapter), cfg.cluster.call_timeout_s)
    direct.load_adapter(adapter)

    def actor_gen(use_adapter: bool):
        return call("rollout", actor.generate.remote(prompts, adapter=use_adapter), cfg.cluster.call_timeout_s)

    def direct_gen(use_adapter: bool):
        return direct.generate(prompts, adapter=use_adapter)

    runs: dict[str, list[float]] = {}
    for rep in range(args.repeats + 1):  # the first round warms both up and is not counted
        for use_adapter in (True, False):
            for where, fn in (("actor", actor_gen), ("direct", direct_gen)):
                t = time.perf_counter()
                samples = fn(use_adapter)
                rate = samples.num_response_tokens / (time.perf_counter() - t)
                if rep:
                    runs.setdefault(f"{where}/{'lora' if use_adapter else 'base'}", []).append(rate)
    direct.shutdown()
    call("rollout", actor.shutdown.remote(), 60)
    ray.kill(actor)

    med = {k: statistics.median(v) for k, v in runs.items()}
    results: dict[str, Any] = {"tokens_per_s_runs": runs, "tokens_per_s_median": med, "targets": {}}
    rows = []
    for mode in ("lora", "base"):
        ratio = med[f"actor/{mode}"] / med[f"direct/{mode}"]
        results[f"ratio_{mode}"] = ratio
        results["targets"][f"actor_over_direct_{mode}"] = {"value": ratio, "goal": f">= {TARGET_RATIO}",
                                                          "met": ratio >= TARGET_RATIO}
        rows.append([mode, round(med[f"actor/{mode}"], 1), round(med[f"direct/{mode}"], 1), round(ratio, 3),
                     "yes" if ratio >= TARGET_RATIO else "no"])
    results["lora_cost"] = 1 - med["direct/lora"] / med["direct/base"]
    params = {"prompts": len(prompts), "repeats": args.repeats, "max_new_tokens": cfg.rollout.max_new_tokens}
    text = table(["adapter", "actor tok/s", "direct tok/s", "actor/direct", f">= {TARGET_RATIO}"], rows)
    text += f"\nLoRA active costs {100 * results['lora_cost']:.1f}% of direct tokens/s"
    return params, results, text
