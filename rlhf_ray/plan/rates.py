"""Rate model: how long one synchronous PPO step takes on a GPU layout, from memory bandwidth
(decode) and FLOPs (prefill, reward model, learner), and which generator/learner split of the
GPUs gives the most samples per second. Arithmetic only; every figure it rests on is a named
assumption below, printed under the table. Nothing here is measured (no GPU has been lent to
this project): take the table as a ranking of splits, not as a promise of samples/s.

One step is generate -> score -> old/reference log-probs -> train -> publish, each stage
waiting for the one before (the synchronous loop), so

    step time = generate + reward + learner + publish,   samples/s = rows / step time

with rows = ppo.prompts_per_step x rollout.samples_per_prompt. Every prompt is taken to be
``data.max_prompt_tokens`` long and every response to run to ``rollout.max_new_tokens``
(upper bounds: shorter ones only make the step faster). A forward pass over T tokens costs
2 x params x T FLOPs; counting every parameter (the input embedding is a lookup, not a matmul)
overstates it by ~2% at Llama-2-7B, ~7% at Llama-3.1-8B, and attention's own FLOPs (~8% at
7B and 2k tokens) are left out, the two roughly cancelling.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from ..config import Config
from .memory import DTYPE_BYTES, publish_bytes
from .shapes import ModelShape

# --- The hardware: NVIDIA GeForce RTX 3090 spec-sheet figures --------------------------------
# 19.5 Gbps GDDR6X on a 384-bit bus = 936 GB/s (NVIDIA's spec; nvidia-smi reports 936.1 GB/s).
RTX3090_BYTES_PER_S = 936e9
# Dense BF16 tensor-core peak with FP32 accumulate, what torch's bf16 matmul uses. The GA102
# whitepaper (Appendix A) gives the RTX 3090 142 TFLOPS dense FP16 with FP16 accumulate (284
# with sparsity) and half of that, 71, with FP32 accumulate (BF16 likewise): GeForce Ampere runs
# FP32-accumulate tensor math at half rate (82 SMs x 4 tensor cores x 128 FMA x 2 x 1.695 GHz
# = 142 T; the A40, the same die as a data-centre card, lists BF16 with FP32 accumulate at the
# full 149.7). 35.6 TFLOPS is the card's non-tensor FP32 (and TF32 tensor) peak, not BF16's.
RTX3090_BF16_FLOPS = 71e12

# --- How much of the peak is reached: assumptions, not measurements --------------------------
# Decode streams the weights and the KV cache once per step; well-tuned kernels (vLLM, CUDA
# graphs) reach roughly 60-70% of DRAM bandwidth at small batch.
DECODE_BANDWIDTH_FRACTION = 0.65
# Serving a LoRA adapter slows vLLM's decode ~1.3x against the bare base (vLLM's published
# figure for 7B at r=8 on an A100, quoted in DESIGN.md section 5).
LORA_DECODE_OVERHEAD = 1.3
# Forward-only passes over long prompts (vLLM prefill, reward-model scoring) are large matmuls:
# ~50% of peak assumed.
FORWARD_MFU = 0.50
# Learner forward + backward with gradient checkpointing and micro-batch 1: ~35-45% model FLOPs
# utilisation is what dense training typically reports; 40% assumed (its forward-only passes too).
TRAIN_MFU = 0.40
# vLLM's default cap on sequences in one batch for the offline LLM class on GPUs under 70 GiB.
VLLM_MAX_NUM_SEQS = 256
# Publishing: the adapter crosses a 10 GbE link (1.25 GB/s; within one node it is faster) and each
# engine loads it; TRL reports ~0.2 s for a whole 0.6B weight sync, so 0.5 s is a generous bound.
LINK_BYTES_PER_S = 1.25e9
PUBLISH_FIXED_S = 0.5


@dataclass(frozen=True)
class Assumptions:
    """The figures a rate estimate rests on; the defaults are the constants above."""

    bytes_per_s: float = RTX3090_BYTES_PER_S  # one GPU's memory bandwidth
    flops: float = RTX3090_BF16_FLOPS  # one GPU's dense 16-bit tensor peak
    decode_fraction: float = DECODE_BANDWIDTH_FRACTION
    lora_decode_overhead: float = LORA_DECODE_OVERHEAD
    forward_mfu: float = FORWARD_MFU
    train_mfu: float = TRAIN_MFU
    max_num_seqs: int = VLLM_MAX_NUM_SEQS
    link_bytes_per_s: float = LINK_BYTES_PER_S
    publish_fixed_s: float = PUBLISH_FIXED_S

    def lines(self) -> list[str]:
        return [
            f"GPU: {self.bytes_per_s / 1e9:.0f} GB/s memory bandwidth, {self.flops / 1e12:.0f} TFLOPS dense bf16 "
            "(RTX 3090 spec sheet; FP32 accumulate)",
            f"decode reaches {self.decode_fraction:.0%} of bandwidth, x{self.lora_decode_overhead:g} for serving LoRA; "
            f"at most {self.max_num_seqs} sequences in flight (vLLM's default), fewer if the KV cache holds fewer",
            f"prefill and reward scoring reach {self.forward_mfu:.0%} of peak FLOPs; the learner {self.train_mfu:.0%}",
            f"publish: {self.publish_fixed_s:g} s + adapter bytes at {self.link_bytes_per_s / 1e9:g} GB/s",
            "every prompt is data.max_prompt_tokens long and every response runs to rollout.max_new_tokens",
            "assumptions, not measurements: the table ranks splits; its samples/s are not promises",
        ]


# --- Generators --------------------------------------------------------------------------------

def decode_step_s(weight_bytes: float, in_flight: int, context_tokens: float, kv_bytes_per_token: float,
                  a: Assumptions) -> float:
    """One decode step of a batch of ``in_flight`` sequences: the weights are read once and
    each sequence's KV cache of ``context_tokens`` tokens once."""
    read = weight_bytes + in_flight * context_tokens * kv_bytes_per_token
    return a.lora_decode_overhead * read / (a.bytes_per_s * a.decode_fraction)


def decode_tokens_per_s(weight_bytes: float, in_flight: int, context_tokens: float, kv_bytes_per_token: float,
                        a: Assumptions) -> float:
    """Tokens per second of one engine decoding ``in_flight`` sequences together."""
    return in_flight / decode_step_s(weight_bytes, in_flight, context_tokens, kv_bytes_per_token, a)


def in_flight(sequences: int, kv_sequences: float, a: Assumptions) -> int:
    """Sequences one engine decodes together: capped by the sequences it was dealt, by how many
    whole sequences its KV cache holds, and by vLLM's max_num_seqs (at least 1)."""
    return max(1, min(sequences, math.floor(kv_sequences), a.max_num_seqs))


def generate_s(*, params: int, weight_bytes: float, kv_bytes_per_token: float, prompts: int, samples_per_prompt: int,
               prompt_tokens: int, new_tokens: int, kv_sequences: float, a: Assumptions) -> float:
    """One engine's time for ``prompts`` prompts x ``samples_per_prompt`` samples.

    Prefill, FLOP-bound: 2 x params x prompt_tokens per prompt (a prompt's samples share its
    prefix). Decode, bandwidth-bound: the sequences go through in waves of ``in_flight``; each
    wave takes ``new_tokens`` steps, each step reading the weights once, and each sequence reads
    its KV cache once per step, prompt_tokens + new_tokens / 2 tokens on average over its steps.
    """
    seqs = prompts * samples_per_prompt
    batch = in_flight(seqs, kv_sequences, a)
    waves = math.ceil(seqs / batch)
    prefill = 2 * params * prompt_tokens * prompts / (a.flops * a.forward_mfu)
    read = waves * weight_bytes + seqs * (prompt_tokens + new_tokens / 2) * kv_bytes_per_token
    decode = new_tokens * a.lora_decode_overhead * read / (a.bytes_per_s * a.decode_fraction)
    return prefill + decode


# --- Reward model and learner ------------------------------------------------------------------

def reward_s(*, rm_params: int, rows: int, tokens: int, a: Assumptions) -> float:
    """The reward model scores every row (prompt + response, ``tokens`` long) with one forward
    pass, 2 x rm_params x tokens FLOPs, on its one GPU."""
    return rows * 2 * rm_params * tokens / (a.flops * a.forward_mfu)


def learner_flops_per_sample(*, params: int, tokens: int, epochs: int, checkpointing: bool, shared_base: bool) -> float:
    """FLOPs the learner group spends on one sample of T = ``tokens`` tokens, P = ``params``:

        old log-probs and values, one forward:                      2PT
        reference log-probs, the same base with the adapter off:    2PT  (reference.mode=shared_base)
        per PPO epoch, training:
            forward                                                 2PT
            backward: input gradients only (the base is frozen, so
            no weight gradients; LoRA's are negligible)             2PT
            recompute of the forward (gradient checkpointing)       2PT
        total: 4PT + epochs x 6PT (4PT per epoch without checkpointing; 2PT less with a
        reference actor, which does that pass on its own GPU)
    """
    per_epoch = (6 if checkpointing else 4) * params * tokens
    return (4 if shared_base else 2) * params * tokens + epochs * per_epoch


def learner_s(*, flops_per_sample: float, rows: int, workers: int, a: Assumptions) -> float:
    """The rows are shared evenly by ``workers`` data-parallel ranks. The all-reduce of the
    LoRA gradients (~64 MiB fp32 at r=16 on 7B, a few optimizer steps per PPO step) costs tens
    of milliseconds over PCIe and is left out."""
    return rows * flops_per_sample / (workers * a.flops * a.train_mfu)


def publish_s(adapter_bytes: int, a: Assumptions) -> float:
    """Learner rank 0 sends the LoRA tensors (fp32) to every engine, which loads them."""
    return a.publish_fixed_s + adapter_bytes / a.link_bytes_per_s


# --- One step, and the split ---------------------------------------------------------------------

@dataclass(frozen=True)
class StepEstimate:
    generators: int
    learners: int
    rows: int
    decode_tokens_per_s: float  # one engine, at the batch it runs
    generate_s: float
    reward_s: float
    learner_s: float
    publish_s: float

    @property
    def step_s(self) -> float:
        return self.generate_s + self.reward_s + self.learner_s + self.publish_s

    @property
    def samples_per_s(self) -> float:
        return self.rows / self.step_s


def estimate_step(cfg: Config, shape: ModelShape, rm_shape: ModelShape, *, generators: int, learners: int,
                  kv_sequences: float, a: Assumptions = Assumptions()) -> StepEstimate:
    """Step time of ``cfg`` with ``generators`` engines and ``learners`` learner ranks."""
    r, lc = cfg.rollout, cfg.learner
    prompt_tokens, new_tokens = cfg.data.max_prompt_tokens, r.max_new_tokens
    tokens = prompt_tokens + new_tokens
    rows = cfg.ppo.prompts_per_step * r.samples_per_prompt
    weights = shape.total_params * DTYPE_BYTES[cfg.model.dtype]
    kv = shape.kv_bytes_per_token(DTYPE_BYTES[cfg.model.dtype])
    prompts = math.ceil(cfg.ppo.prompts_per_step / generators)  # dealt round-robin: the busiest engine sets the pace
    gen = generate_s(params=shape.total_params, weight_bytes=weights, kv_bytes_per_token=kv, prompts=prompts,
                     samples_per_prompt=r.samples_per_prompt, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                     kv_sequences=kv_sequences, a=a)
    batch = in_flight(prompts * r.samples_per_prompt, kv_sequences, a)
    shared = cfg.reference.mode == "shared_base"
    per_sample = learner_flops_per_sample(params=shape.total_params, tokens=tokens, epochs=lc.epochs,
                                          checkpointing=lc.gradient_checkpointing, shared_base=shared)
    learn = learner_s(flops_per_sample=per_sample, rows=rows, workers=learners, a=a)
    if not shared:  # the reference actor's forward runs beside the learners' old log-probs: the slower one counts
        old = learner_s(flops_per_sample=2 * shape.total_params * tokens, rows=rows, workers=learners, a=a)
        ref = rows * 2 * shape.total_params * tokens / (a.flops * a.forward_mfu)
        learn += max(0.0, ref - old)
    return StepEstimate(
        generators=generators, learners=learners, rows=rows,
        decode_tokens_per_s=decode_tokens_per_s(weights, batch, prompt_tokens + new_tokens / 2, kv, a),
        generate_s=gen, reward_s=reward_s(rm_params=rm_shape.total_params, rows=rows, tokens=tokens, a=a),
        learner_s=learn, publish_s=publish_s(publish_bytes(cfg, shape), a))


def with_split(cfg: Config, generators: int, learners: int) -> Config:
    """``cfg`` with rollout.num_engines and learner.num_workers replaced (validated again)."""
    return dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, num_engines=generators),
                               learner=dataclasses.replace(cfg.learner, num_workers=learners))


def split_table(cfg: Config, shape: ModelShape, rm_shape: ModelShape, *, gpus: int, nodes: int, gpu_memory: int,
                seq_len: int, response_tokens: int, a: Assumptions = Assumptions()) -> list[StepEstimate]:
    """For each generator count g, the most learner ranks l that divide a minibatch's rows
    and fit beside them on ``gpus`` GPUs (with the reward model, and a reference actor if
    configured, where the config puts them), as the memory planner places them. More ranks
    never slow the learner in this model, so a smaller l for the same g is never better. The
    configured split is added if it fits and is not already a row; it is marked by the caller.
    """
    from .placement import make_plan

    def fits(g: int, l: int) -> Optional[float]:
        plan = make_plan(with_split(cfg, g, l), shape, rm_shape, nodes=nodes, gpus_per_node=gpus // nodes,
                         gpu_memory=gpu_memory, seq_len=seq_len, response_tokens=response_tokens)
        return None if plan.problems else plan.kv_sequences

    ranks = [l for l in range(cfg.minibatch_rows, 0, -1) if cfg.minibatch_rows % l == 0]
    rows = []
    configured = (cfg.rollout.num_engines, cfg.learner.num_workers)
    for g in range(1, gpus + 1):
        for l in ranks:
            kv = fits(g, l)
            if kv is not None:
                rows.append(estimate_step(cfg, shape, rm_shape, generators=g, learners=l, kv_sequences=kv, a=a))
                break
    if configured not in {(e.generators, e.learners) for e in rows}:
        kv = fits(*configured)
        if kv is not None:
            rows.append(estimate_step(cfg, shape, rm_shape, generators=configured[0], learners=configured[1],
                                      kv_sequences=kv, a=a))
            rows.sort(key=lambda e: (e.generators, e.learners))
    return rows


def best(rows: list[StepEstimate]) -> StepEstimate:
    """The split with the most samples/s (the first such row on a tie: fewer generators)."""
    return max(rows, key=lambda e: e.samples_per_s)


def render_splits(rows: list[StepEstimate], configured: tuple[int, int], a: Assumptions = Assumptions()) -> str:
    from .placement import _table

    if not rows:
        return "rate model: no generator/learner split fits these GPUs."
    top = best(rows)
    body = []
    for e in rows:
        marks = [m for m, on in (("configured", (e.generators, e.learners) == configured), ("best", e is top)) if on]
        body.append([f"{e.generators}/{e.learners}", f"{e.decode_tokens_per_s:,.0f}", f"{e.generate_s:.1f}",
                     f"{e.reward_s:.1f}", f"{e.learner_s:.1f}", f"{e.publish_s:.2f}", f"{e.step_s:.1f}",
                     f"{e.samples_per_s:.3f}", ", ".join(marks)])
    lines = [f"rate model: generators/learners -> expected seconds per PPO step of {rows[0].rows} samples",
             _table(["split", "decode tok/s/engine", "generate s", "reward s", "learner s", "publish s", "step s",
                     "samples/s", "mark"], body)]
    mine = next((e for e in rows if (e.generators, e.learners) == configured), None)
    if mine is None:
        lines.append(f"suggested split: {top.generators}/{top.learners} (the configured "
                     f"{configured[0]}/{configured[1]} does not fit)")
    elif mine is top:
        lines.append(f"suggested split: {top.generators}/{top.learners}, the configured one")
    else:
        lines.append(f"suggested split: {top.generators}/{top.learners}, {top.samples_per_s / mine.samples_per_s - 1:+.0%} "
                     f"samples/s over the configured {configured[0]}/{configured[1]} (rollout.num_engines, "
                     "learner.num_workers)")
    lines += ["assumptions:"] + [f"  {s}" for s in a.lines()]
    return "\n".join(lines)
