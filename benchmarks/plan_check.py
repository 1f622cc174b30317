"""The memory planner held against what torch and vLLM allocate on this machine (part of
`rlhf-ray bench memory`):

(a) static bytes: the planner's weights, adapter, gradients and optimizer state against the
    tensors a real learner holds after one update;
(b) activations: the planner's bytes against what autograd saves for backward
    (``saved_tensors_hooks``) on a mid-size bf16 Llama with grouped-query attention built
    here, with and without gradient checkpointing (goal: within 15%);
(c) KV cache: the planner's sequences against vLLM's own ``kv_cache_max_concurrency`` for
    the same model, cache size and max_model_len.
"""
from __future__ import annotations

import dataclasses
import tempfile
from typing import Any

import torch

# Mid-size: 8 layers, hidden 512, 8 query / 4 KV heads, vocabulary 32,000 (58 M parameters).
MID = {"vocab_size": 32000, "hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8,
       "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 2048}
ACTIVATION_TOLERANCE = 0.15


def _batch(rows: int, prompt: int, response: int, vocab: int):
    from rlhf_ray.batch import TokenBatch

    g = torch.Generator().manual_seed(0)
    seq = prompt + response
    mask = torch.zeros(rows, seq - 1)
    mask[:, prompt - 1:] = 1
    return TokenBatch(torch.randint(3, vocab, (rows, seq), generator=g), torch.ones(rows, seq, dtype=torch.long),
                      mask, torch.zeros(rows, seq - 1))


def _core(cfg, model_dir: str, **learner):
    from rlhf_ray.actors.learner import LearnerCore

    cfg = dataclasses.replace(cfg, learner=dataclasses.replace(cfg.learner, num_workers=1, **learner))
    return cfg, LearnerCore(cfg, model_dir)


def static_bytes(cfg, model_dir: str) -> dict[str, Any]:
    from rlhf_ray.plan import model_shape
    from rlhf_ray.plan.memory import learner_bytes

    cfg, core = _core(cfg, model_dir, minibatch_prompts=4, micro_batch_size=4)
    from transformers import AutoConfig

    b = _batch(4, 6, 10, AutoConfig.from_pretrained(model_dir).vocab_size)
    ev = core.evaluate(b)
    b.old_logprobs, b.old_values = ev["old_logprobs"], ev["old_values"]
    b.advantages, b.returns = b.action_mask.clone(), b.action_mask.clone()
    core.update(b)
    targets = list(cfg.lora.target_modules)
    plan = learner_bytes(model_shape(model_dir, cfg.lora.rank, targets), dtype=cfg.model.dtype,
                         lora_rank=cfg.lora.rank, targets=targets, critic=True, micro_batch=1, seq_len=16,
                         response_tokens=10, chunk_tokens=2048, checkpointing=False, truncation=False)
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    named = list(core.module.named_parameters())
    trainable = [p for _, p in named if p.requires_grad]
    measured = {
        "weights": nbytes(p for _, p in named if not p.requires_grad),
        "adapter": nbytes(p for n, p in named if "lora_" in n),
        # the planner keeps the value head apart; the optimizer holds its moments with the adapter's
        "gradients+value_head_grad": nbytes(p.grad for p in trainable if p.grad is not None),
        "optimizer": nbytes(t for s in core.optimizer.state.values() for t in s.values() if t.dim() > 0),
    }
    planned = {"weights": plan.weights, "adapter": plan.adapter,
               "gradients+value_head_grad": plan.gradients + plan.value_head // 4,
               "optimizer": plan.optimizer + plan.value_head // 2}
    return {"planned_bytes": planned, "measured_bytes": measured,
            "equal": all(planned[k] == measured[k] for k in planned)}


def activations(cfg, rows: int = 2, prompt: int = 64, response: int = 448) -> dict[str, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf_ray.plan import model_shape
    from rlhf_ray.plan.memory import learner_bytes
    from rlhf_ray.telemetry import saved_for_backward_bytes

    out: dict[str, Any] = {"model": MID, "rows": rows, "seq_len": prompt + response, "dtype": "bfloat16"}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**MID, tie_word_embeddings=False)).save_pretrained(tmp)
        base = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=tmp, dtype="bfloat16"))
        shape = model_shape(tmp, cfg.lora.rank, list(cfg.lora.target_modules))
        out["params"] = shape.total_params
        for ckpt in (False, True):
            c, core = _core(base, tmp, gradient_checkpointing=ckpt)
            core.module.train()
            b = _batch(rows, prompt, response, MID["vocab_size"])
            _, measured = saved_for_backward_bytes(lambda: core.module(b.input_ids, b.attention_mask, b.action_mask),
                                                   exclude=list(core.module.parameters()))
            planned = learner_bytes(shape, dtype="bfloat16", lora_rank=c.lora.rank,
                                    targets=list(c.lora.target_modules), critic=True, micro_batch=rows,
                                    seq_len=prompt + response, response_tokens=response, chunk_tokens=2048,
                                    checkpointing=ckpt, truncation=False).activations
            ratio = planned / measured
            out["checkpointing" if ckpt else "no_checkpointing"] = {
                "planned_bytes": planned, "saved_for_backward_bytes": measured, "ratio": ratio,
                "within_15_percent": abs(ratio - 1) <= ACTIVATION_TOLERANCE}
    return out


def kv_capacity(cfg, model_dir: str, max_model_len: int) -> dict[str, Any]:
    from rlhf_ray.actors.engine import build_engine
    from rlhf_ray.plan import model_shape
    from rlhf_ray.plan.memory import kv_cache_sequences

    llm = build_engine(cfg, model_dir, max_model_len=max_model_len)
    try:
        vc = llm.llm_engine.vllm_config
        cache, length = vc.cache_config, vc.model_config.max_model_len
        kv_bytes = cfg.rollout.kv_cache_mib * 2**20
        planned = kv_cache_sequences(kv_bytes, model_shape(model_dir, cfg.lora.rank, list(cfg.lora.target_modules)),
                                     cfg.model.dtype, length, block_size=cache.block_size)
        measured = float(cache.kv_cache_max_concurrency)
    finally:
        del llm
    return {"kv_cache_bytes": kv_bytes, "max_model_len": length, "block_size": cache.block_size,
            "planned_sequences": planned, "vllm_max_concurrency": measured,
            "equal": abs(planned - measured) <= 1e-9 * max(1.0, measured)}


def actor_estimates(cfg, model_dir: str, reward_dir: str, seq_len: int) -> dict[str, dict[str, Any]]:
    """The planner's bytes for every actor of ``cfg`` (what `rlhf-ray plan` prints)."""
    from rlhf_ray.plan import model_shape
    from rlhf_ray.plan.placement import actor_plans

    targets = list(cfg.lora.target_modules)
    actors, _ = actor_plans(cfg, model_shape(model_dir, cfg.lora.rank, targets),
                            model_shape(reward_dir, cfg.lora.rank, targets),
                            gpu_memory=int(cfg.cluster.gpu_memory_gib * 2**30), seq_len=seq_len,
                            response_tokens=cfg.rollout.max_new_tokens)
    return {a.name: {"bytes": a.bytes, "parts": a.parts} for a in actors}
