"""engines: the transformers rollout engine (rollout.engine=transformers) against vLLM on the
config's decoder model, side by side in this process on the same cores: tokens/s of each
serving the same LoRA version to the same prompts and seeds (rounds alternate, the first warms
both up), and each one's log-prob gap to the learner (the processed log-probs of the sampled
tokens against the learner's), sampling at T 0.7 / top-p 0.9 whatever the config says.

vLLM is the engine for decoder models; the transformers engine exists for what vLLM does not
serve (encoder-decoder policies such as T5). The ratio says what using it on a decoder model costs.
"""
from __future__ import annotations

import statistics
import time
from typing import Any

from .common import table, with_overrides

GAP_TARGET = 1e-4


def run(cfg, args) -> tuple[dict[str, Any], dict[str, Any], str]:
    import os

    import torch

    from rlhf_ray.actors.hf_rollout import TransformersGenerator
    from rlhf_ray.actors.learner import LearnerCore
    from rlhf_ray.actors.rollout import RolloutGenerator
    from rlhf_ray.batch import pad_samples
    from rlhf_ray.launch import ROLE_ENV
    from rlhf_ray.models import load_tokenizer, resolve_model_path

    from .rollout import prompt_ids

    cfg = with_overrides(cfg, "learner.num_workers=1", "learner.method=lora", "rollout.temperature=0.7",
                         "rollout.top_p=0.9")
    model_path = resolve_model_path(cfg.model)
    if cfg.model.tiny_arch != "llama" and cfg.model.path is None:
        raise ValueError("bench engines compares on a decoder model: give it a decoder config (configs/tiny_cpu.yaml)")
    tok = load_tokenizer(model_path)
    prompts = prompt_ids(cfg, model_path, args.num_prompts)
    seeds = list(range(len(prompts)))
    n = cfg.rollout.samples_per_prompt
    os.environ.update(ROLE_ENV)  # the actors' thread settings
    torch.set_num_threads(1)
    core = LearnerCore(cfg, model_path)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in core.module.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    adapter = core.adapter(1)
    engines = {"vllm": RolloutGenerator(cfg, model_path, "bench-vllm"),
               "transformers": TransformersGenerator(cfg, model_path, "bench-transformers")}
    for e in engines.values():
        e.load_adapter(adapter)
    rates: dict[str, list[float]] = {k: [] for k in engines}
    gaps: dict[str, dict[str, float]] = {}
    for rep in range(args.repeats + 1):
        for name, e in engines.items():
            t = time.perf_counter()
            s = e.generate(prompts, seeds=seeds, n=n)
            dt = time.perf_counter() - t
            if rep:
                rates[name].append(s.num_response_tokens / dt)
            if rep == 0:
                batch = pad_samples(s, tok.pad_token_id)
                old = core.evaluate(batch)["old_logprobs"]
                diff = (old - batch.behaviour_logprobs).abs() * batch.action_mask
                gaps[name] = {"max": float(diff.max()), "mean": float(diff.sum() / batch.action_mask.sum()),
                              "response_len_mean": s.num_response_tokens / len(s)}
    engines["vllm"].shutdown()
    med = {k: statistics.median(v) for k, v in rates.items()}
    ratio = med["transformers"] / med["vllm"]
    targets = {f"{k}: log-prob gap to the learner < {GAP_TARGET:g}": {
        "value": v["max"], "goal": f"< {GAP_TARGET:g}", "met": v["max"] < GAP_TARGET} for k, v in gaps.items()}
    results = {"tokens_per_s_runs": rates, "tokens_per_s_median": med, "transformers_over_vllm": ratio,
               "logprob_gap": gaps, "targets": targets}
    params = {"num_prompts": len(prompts), "samples_per_prompt": n, "repeats": args.repeats,
              "temperature": cfg.rollout.temperature, "top_p": cfg.rollout.top_p,
              "max_new_tokens": cfg.rollout.max_new_tokens, "batch_rows": cfg.rollout.batch_rows}
    text = table(["engine", "tokens/s (median)", "vs vLLM", "gap max", "gap mean", "tokens/response"],
                 [[k, f"{med[k]:.0f}", f"{med[k] / med['vllm']:.2f}x", f"{gaps[k]['max']:.1e}",
                   f"{gaps[k]['mean']:.1e}", f"{gaps[k]['response_len_mean']:.1f}"] for k in engines])
    text += (f"\n{len(prompts)} prompts x {n} samples, T {cfg.rollout.temperature:g} top-p {cfg.rollout.top_p:g}, "
             f"up to {cfg.rollout.max_new_tokens} tokens; one process, one thread each; median of {args.repeats} rounds.")
    return params, results, text
