"""sync: adapter publish latency, from the learner holding new LoRA tensors to every generator
serving them (extract, object store, write, add_lora, remove the old id), over many publishes
with 1 and 2 generators; then a soak of publishes interleaved with generation in which every
sample is checked by content: its vLLM log-probs must match the version just published (and
not the one before) when recomputed with HF + PEFT here."""
from __future__ import annotations

import time
from typing import Any

import torch

from .common import percentile, table
from .rollout import prompt_ids, random_adapter

TARGET_P50_S = 0.100
FRESH_TOL = 1e-3  # nats per token; fp32 agreement is ~1e-7, one version apart is ~1e-1


def _new_version(model, version: int, gen: torch.Generator):
    """Fresh random LoRA B factors: consecutive versions differ clearly."""
    from rlhf_ray.sync import extract_adapter

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return extract_adapter(model, version)


def _publish(gens, adapter, timeout_s: float) -> float:
    import ray

    from rlhf_ray.launch import call

    t = time.perf_counter()
    ref = ray.put(adapter)
    call("rollout", [g.load_adapter.remote(ref) for g in gens], timeout_s)
    return time.perf_counter() - t


def run(cfg, args) -> tuple[dict[str, Any], dict[str, Any], str]:
    import dataclasses

    import ray

    from rlhf_ray.actors.rollout import RolloutGenerator
    from rlhf_ray.algo import masked_mean
    from rlhf_ray.batch import pad_samples
    from rlhf_ray.launch import call, connect, spawn
    from rlhf_ray.models import load_tokenizer, resolve_model_path
    from rlhf_ray.models.policy import Sampling, sequence_logprobs

    model_path = resolve_model_path(cfg.model)
    # Short samples: the soak is about versions, not throughput.
    cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, max_new_tokens=8))
    timeout = cfg.cluster.call_timeout_s
    model, adapter0 = random_adapter(cfg, model_path)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    connect(cfg)
    gens = [spawn(RolloutGenerator, cfg, model_path, f"bench-sync-{i}", num_cpus=cfg.rollout.num_cpus,
                  num_gpus=cfg.rollout.num_gpus) for i in range(2)]
    version = 0
    _publish(gens, adapter0, timeout)
    results: dict[str, Any] = {"adapter_bytes": adapter0.num_bytes, "latency": {}}
    rows = []
    for n in (1, 2):
        lat = []
        for _ in range(args.publishes):
            version += 1
            t = time.perf_counter()
            adapter = _new_version(model, version, gen)
            lat.append(time.perf_counter() - t + _publish(gens[:n], adapter, timeout))
        p50, p95 = percentile(lat, 50), percentile(lat, 95)
        results["latency"][f"{n}_generators"] = {
            "publishes": len(lat), "p50_s": p50, "p95_s": p95, "max_s": max(lat),
            "effective_mb_per_s": adapter0.num_bytes * n / p50 / 1e6}
        rows.append([n, len(lat), round(1e3 * p50, 1), round(1e3 * p95, 1), round(1e3 * max(lat), 1),
                     round(adapter0.num_bytes * n / p50 / 1e6, 1)])
    worst_p50 = max(v["p50_s"] for v in results["latency"].values())
    results["targets"] = {"p50_latency": {"value": worst_p50, "goal": f"<= {TARGET_P50_S}",
                                          "met": worst_p50 <= TARGET_P50_S}}

    # Soak: publish, then every generator samples; check each sample against the weights here.
    tok = load_tokenizer(model_path)
    prompts = prompt_ids(cfg, model_path, 2 * len(gens))
    stale = checked = 0
    worst_fresh, closest_prev = 0.0, float("inf")
    prev_state = None
    t0 = time.perf_counter()
    for _ in range(args.soak):
        version += 1
        adapter = _new_version(model, version, gen)
        _publish(gens, adapter, timeout)
        parts = call("rollout", [g.generate.remote(prompts[2 * i:2 * i + 2]) for i, g in enumerate(gens)], timeout)
        samples = parts[0]
        for p in parts[1:]:
            samples.extend(p)
        batch = pad_samples(samples, tok.pad_token_id)
        mask = batch.action_mask
        gap = lambda lp: masked_mean((lp - batch.behaviour_logprobs).abs(), mask).item()
        sampling = Sampling.from_config(cfg.rollout)
        fresh = gap(sequence_logprobs(model, batch.input_ids, batch.attention_mask, mask, sampling))
        worst_fresh = max(worst_fresh, fresh)
        stale += int(fresh > FRESH_TOL) * len(samples)
        checked += len(samples)
        if prev_state is not None:  # the same samples under the previous version: must not match
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(model, prev_state)
            closest_prev = min(closest_prev, gap(sequence_logprobs(model, batch.input_ids, batch.attention_mask, mask,
                                                                   sampling)))
            set_peft_model_state_dict(model, adapter.tensors)
        prev_state = adapter.tensors  # extract_adapter already made these copies
        if not all(v == version for v in samples.versions):
            raise AssertionError(f"generators report versions {set(samples.versions)} after publishing {version}")
    results["soak"] = {"publishes": args.soak, "samples_checked": checked, "stale_samples": stale,
                       "max_fresh_gap": worst_fresh, "min_gap_to_previous_version":
                       None if closest_prev == float("inf") else closest_prev,
                       "tolerance": FRESH_TOL, "seconds": time.perf_counter() - t0}
    results["targets"]["soak_stale_samples"] = {"value": stale, "goal": "== 0", "met": stale == 0}
    for g in gens:
        call("rollout", g.shutdown.remote(), 60)
        ray.kill(g)
    params = {"publishes_per_fleet_size": args.publishes, "soak_publishes": args.soak,
              "soak_max_new_tokens": cfg.rollout.max_new_tokens}
    text = table(["generators", "publishes", "p50 ms", "p95 ms", "max ms", "MB/s (p50)"], rows)
    text += (f"\nadapter: {adapter0.num_bytes} bytes; p50 target <= {1e3 * TARGET_P50_S:.0f} ms: "
             f"{'met' if results['targets']['p50_latency']['met'] else 'NOT met'}"
             f"\nsoak: {args.soak} publishes, {checked} samples checked by log-prob content, {stale} stale "
             f"(max gap to the published version {worst_fresh:.1e}; closest to the previous one "
             f"{results['soak']['min_gap_to_previous_version']})")
    return params, results, text
