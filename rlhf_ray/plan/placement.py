"""The plan of a run: every actor's bytes and GPU share, placed onto nodes x GPUs."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..config import Config
from .memory import DTYPE_BYTES, kv_cache_sequences, learner_bytes
from .shapes import ModelShape

GIB = 2**30
# What a CUDA process holds before any tensor (context, cuBLAS/NCCL workspaces): a stated
# assumption, not a measurement of this project (no GPU has been lent to it).
CUDA_CONTEXT_BYTES = int(0.75 * GIB)
# vLLM profiles its own peak (activations, sampler, CUDA graphs) before sizing the KV cache;
# the plan assumes this much on top of the weights.
ENGINE_RESERVE_BYTES = int(1.5 * GIB)


@dataclass
class ActorPlan:
    name: str
    role: str
    gpus: float  # share of one GPU (0 = CPU only)
    bytes: int
    parts: dict[str, int]
    note: str = ""


@dataclass
class GPUSlot:
    node: int
    index: int
    memory: int
    share: float = 0.0
    used: int = 0
    actors: list[str] = field(default_factory=list)


@dataclass
class Plan:
    actors: list[ActorPlan]
    slots: list[GPUSlot]
    problems: list[str]
    kv_sequences: Optional[float] = None
    stages: list[ActorPlan] = field(default_factory=list)  # one worker of each GPU stage before PPO


def stage_plans(cfg: Config, shape: ModelShape, *, gpu_memory: int) -> tuple[list[ActorPlan], list[str]]:
    """One Ray Train worker of the SFT and reward-model stages that run on GPUs, each on its own
    card (the stages run one at a time, before PPO), and the problems of any that does not fit."""
    from ..models.methods import MethodSpec
    from .memory import stage_bytes

    out, problems = [], []
    for name, sc, pair in (("sft", cfg.sft, False), ("rm", cfg.rm, True)):
        if not sc.use_gpu:
            continue
        spec = MethodSpec.from_config(cfg, sc.method)
        parts = stage_bytes(shape, dtype=cfg.model.dtype, spec=spec, micro_batch=sc.micro_batch_size or sc.batch_size,
                            seq_len=sc.max_seq_len, checkpointing=sc.gradient_checkpointing,
                            sequences_per_row=2 if pair else 1, vocab_logits=not pair)
        parts["cuda_context"] = CUDA_CONTEXT_BYTES
        a = ActorPlan(f"{name}-worker", name, 1.0, sum(parts.values()), parts,
                      f"method={sc.method}, {shape.method_params(spec):,} trainable")
        out.append(a)
        if a.bytes > gpu_memory:
            problems.append(f"{a.name} needs {a.bytes / GIB:.1f} GiB, {(a.bytes - gpu_memory) / GIB:.1f} GiB more than "
                            f"one GPU ({_largest(a)}): set {name}.gradient_checkpointing=true, {name}.method=lora (or another method), a "
                            f"smaller {name}.micro_batch_size or {name}.max_seq_len, or model.dtype=bfloat16")
    return out, problems


class PlanError(ValueError):
    """A configuration that does not fit; the message names the actor, the shortfall and a fix."""


def actor_plans(cfg: Config, shape: ModelShape, rm_shape: ModelShape, *, gpu_memory: int, seq_len: int,
                response_tokens: int) -> tuple[list[ActorPlan], float]:
    """Every actor of the run with its bytes; returns (actors, KV-cache sequences per generator)."""
    from ..algo.estimators import ESTIMATORS
    from ..models.methods import MethodSpec

    dtype, lc, r = cfg.model.dtype, cfg.learner, cfg.rollout
    b = DTYPE_BYTES[dtype]
    out = []
    lb = learner_bytes(shape, dtype=dtype, lora_rank=cfg.lora.rank, targets=list(cfg.lora.target_modules),
                       critic=ESTIMATORS[cfg.ppo.estimator].needs_critic, micro_batch=lc.micro_batch_size,
                       seq_len=seq_len, response_tokens=response_tokens, chunk_tokens=lc.logprob_chunk_tokens,
                       checkpointing=lc.gradient_checkpointing, truncation=r.top_p < 1 or r.top_k > 0,
                       trainable=None if lc.method in ("lora", "full") else shape.method_params(
                           MethodSpec.from_config(cfg, lc.method)), full=lc.method == "full")
    parts = {"weights": lb.weights, "adapter": lb.adapter, "gradients": lb.gradients, "optimizer": lb.optimizer,
             "value_head": lb.value_head, "activations": lb.activations, "recompute": lb.recompute,
             "logits": lb.logits,
             "cuda_context": CUDA_CONTEXT_BYTES if lc.use_gpu else 0}
    for i in range(lc.num_workers):
        out.append(ActorPlan(f"learner-{i}", "learner", 1.0 if lc.use_gpu else 0.0, sum(parts.values()), parts,
                             "reference = adapter off (0 extra)" if cfg.reference.mode == "shared_base" else ""))
    weights = shape.total_params * b
    if r.kv_cache_mib is not None:
        kv = r.kv_cache_mib * 2**20
    elif r.num_gpus > 0:
        from ..actors.engine import gpu_share_utilization  # what the engine will ask vLLM for

        kv = max(0, int((r.gpu_memory_utilization or gpu_share_utilization(r.num_gpus)) * gpu_memory) - weights - ENGINE_RESERVE_BYTES
                 - CUDA_CONTEXT_BYTES)
    else:
        from ..actors.engine import CPU_KV_CACHE_MIB

        kv = CPU_KV_CACHE_MIB * 2**20
    max_len = r.max_model_len or seq_len
    seqs = kv_cache_sequences(kv, shape, dtype, max_len, block_size=16 if r.num_gpus > 0 else 128)
    lora_slots = 4 * shape.lora_params * (r.max_loras + 1)  # fp32 adapter tensors the engine keeps
    gparts = {"weights": weights, "kv_cache": kv, "lora": lora_slots,
              "engine_reserve": ENGINE_RESERVE_BYTES if r.num_gpus > 0 else 0,
              "cuda_context": CUDA_CONTEXT_BYTES if r.num_gpus > 0 else 0}
    for i in range(r.num_engines):
        out.append(ActorPlan(f"rollout-{i}", "rollout", r.num_gpus, sum(gparts.values()), gparts,
                             f"KV cache holds {seqs:.1f} sequences of {max_len} tokens"))
    rparts = {"weights": rm_shape.total_params * b,
              "activations": cfg.reward.batch_size * seq_len * (2 * b * rm_shape.hidden + 3 * b * rm_shape.intermediate),
              "cuda_context": CUDA_CONTEXT_BYTES if cfg.reward.num_gpus > 0 else 0}
    out.append(ActorPlan("reward", "reward", cfg.reward.num_gpus, sum(rparts.values()), rparts,
                         "weights as a causal LM (a score head is smaller); inference working set is a rough bound"))
    if cfg.reference.mode == "separate":
        fparts = {"weights": weights, "logits": lb.logits,
                  "cuda_context": CUDA_CONTEXT_BYTES if cfg.reference.num_gpus > 0 else 0}
        out.append(ActorPlan("reference", "reference", cfg.reference.num_gpus, sum(fparts.values()), fparts))
    return out, seqs


def place(actors: list[ActorPlan], *, nodes: int, gpus_per_node: int, gpu_memory: int) -> tuple[list[GPUSlot], list[str]]:
    """First fit, largest share then largest bytes first, filling node 0 before node 1 (the
    order Ray's PACK strategy uses). Among equal shares the learner ranks go first, so the DDP
    group fills one node where it can and its gradient all-reduce stays on that node's PCIe.
    Returns the slots and the problems (actors that fit nowhere)."""
    slots = [GPUSlot(n, g, gpu_memory) for n in range(nodes) for g in range(gpus_per_node)]
    problems = []
    for a in sorted((a for a in actors if a.gpus > 0), key=lambda a: (-a.gpus, a.role != "learner", -a.bytes)):
        if a.bytes > gpu_memory:
            problems.append(f"{a.name} needs {a.bytes / GIB:.1f} GiB, {(a.bytes - gpu_memory) / GIB:.1f} GiB more than "
                            f"one GPU's {gpu_memory / GIB:.1f} GiB ({_largest(a)}); {_fix(a)}")
            continue
        slot = next((s for s in slots if s.share + a.gpus <= 1.0 + 1e-9 and s.used + a.bytes <= s.memory), None)
        if slot is None:
            problems.append(f"{a.name} ({a.gpus:g} GPU, {a.bytes / GIB:.1f} GiB) fits on no GPU left of "
                            f"{len(slots)}: add GPUs, or fewer rollout actors / learner workers")
            continue
        slot.share += a.gpus
        slot.used += a.bytes
        slot.actors.append(a.name)
    return slots, problems


def _largest(a: ActorPlan) -> str:
    k, v = max(a.parts.items(), key=lambda kv: kv[1])
    return f"largest part: {k} {v / GIB:.1f} GiB"


def _fix(a: ActorPlan) -> str:
    if a.role == "learner":
        return ("set learner.gradient_checkpointing=true, a smaller learner.micro_batch_size or "
                "learner.logprob_chunk_tokens, or model.dtype=bfloat16")
    if a.role == "rollout":
        return "lower rollout.kv_cache_mib or rollout.gpu_memory_utilization, or use model.dtype=bfloat16"
    return f"use model.dtype=bfloat16 or a smaller {a.role}.batch_size"


def make_plan(cfg: Config, shape: ModelShape, rm_shape: ModelShape, *, nodes: int, gpus_per_node: int,
              gpu_memory: int, seq_len: int, response_tokens: int) -> Plan:
    actors, seqs = actor_plans(cfg, shape, rm_shape, gpu_memory=gpu_memory, seq_len=seq_len,
                               response_tokens=response_tokens)
    slots, problems = place(actors, nodes=nodes, gpus_per_node=gpus_per_node, gpu_memory=gpu_memory)
    for a in actors:
        if a.role == "rollout" and seqs < 1:
            problems.append(f"{a.name}: its KV cache holds {seqs:.2f} sequences of {cfg.rollout.max_model_len or seq_len} "
                            "tokens, less than one: raise rollout.kv_cache_mib / gpu_memory_utilization or shorten "
                            "rollout.max_new_tokens / data.max_prompt_tokens")
            break
    stages, stage_problems = stage_plans(cfg, shape, gpu_memory=gpu_memory)
    return Plan(actors, slots, problems + stage_problems, seqs, stages)


def _table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render(plan: Plan, shape: ModelShape, gpu_memory: int) -> str:
    lines = [f"model: {shape.total_params:,} parameters; LoRA: {shape.lora_params:,} trainable "
             f"({shape.lora_targets} modules); KV cache {shape.kv_bytes_per_token(2):,} bytes/token in 16-bit", ""]
    rows = [[a.name, f"{a.gpus:g}", f"{a.bytes / GIB:.2f}",
             ", ".join(f"{k} {v / GIB:.2f}" for k, v in a.parts.items() if v), a.note] for a in plan.actors]
    lines += [_table(["actor", "GPUs", "GiB", "parts (GiB)", "note"], rows), ""]
    used = [s for s in plan.slots if s.actors]
    if used or plan.slots:
        lines += [_table(["GPU", "actors", "share", "planned GiB", f"free of {gpu_memory / GIB:.0f} GiB"],
                         [[f"node {s.node} gpu {s.index}", ", ".join(s.actors) or "-", f"{s.share:g}",
                           f"{s.used / GIB:.2f}", f"{(s.memory - s.used) / GIB:.2f}"] for s in plan.slots]), ""]
    if plan.stages:
        lines += ["stages before PPO, one worker per GPU:",
                  _table(["worker", "GiB", "parts (GiB)", "note"],
                         [[a.name, f"{a.bytes / GIB:.2f}", ", ".join(f"{k} {v / GIB:.2f}" for k, v in a.parts.items() if v),
                           a.note] for a in plan.stages]), ""]
    lines += ["does not fit:\n  " + "\n  ".join(plan.problems) if plan.problems else "fits: every actor has a place."]
    return "\n".join(lines)
