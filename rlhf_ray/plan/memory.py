"""Bytes per actor, from the model's shape and the run's config. Pure arithmetic; the
benchmark `plan-check` and the tests hold each term against what torch and vLLM allocate.

Activation bytes follow what autograd saves for backward in a transformers Llama decoder
layer whose base weights are frozen (a matmul by a frozen weight saves nothing, since the
weight's gradient is never needed) with fp32 LoRA on the attention projections, in bytes
per token and layer, ``b`` the base dtype's size:

- the two RMSNorms: their fp32 input (4h each);
- each LoRA-wrapped projection: its input cast to fp32 for the adapter (4 x in_features) and
  the rank-r intermediate (4r);
- attention (SDPA): q, k, v after rotary and the output (b x (2 q_dim + 2 kv_dim)), the
  log-sum-exp per head (4 heads);
- the SwiGLU MLP: gate input to SiLU, SiLU output and up projection (3 b x intermediate).

Once per token for the whole model: the rotary cos/sin tables (2 b x head_dim), the final
norm's fp32 input (4h) and the value head's fp32 input (4h, with a critic). With gradient
checkpointing only each layer's input survives the forward (b x h per layer), and one layer's
full set exists again while it is recomputed in backward (``recompute``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .shapes import ModelShape

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _lora_inputs(shape: ModelShape, targets: list[str]) -> int:
    """Sum of in_features over the LoRA-wrapped modules of one layer."""
    q_dim, kv_dim = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    width = {"q_proj": shape.hidden, "k_proj": shape.hidden, "v_proj": shape.hidden, "o_proj": q_dim,
             "gate_proj": shape.hidden, "up_proj": shape.hidden, "down_proj": shape.intermediate}
    del kv_dim
    return sum(width.get(t, shape.hidden) for t in targets)


def layer_activation_bytes_per_token(shape: ModelShape, dtype: str, lora_rank: int, targets: list[str]) -> int:
    """What one decoder layer keeps for backward, per token (see the module doc)."""
    b = DTYPE_BYTES[dtype]
    q_dim, kv_dim = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    norms = 2 * 4 * shape.hidden
    lora = 4 * _lora_inputs(shape, targets) + 4 * lora_rank * len(targets)
    attention = b * (2 * q_dim + 2 * kv_dim) + 4 * shape.heads
    mlp = 3 * b * shape.intermediate
    return norms + lora + attention + mlp


@dataclass(frozen=True)
class LearnerBytes:
    weights: int
    adapter: int
    gradients: int
    optimizer: int
    value_head: int
    activations: int  # saved for backward by the forward pass
    recompute: int  # one layer's activations rebuilt in backward (gradient checkpointing)
    logits: int

    @property
    def static(self) -> int:
        return self.weights + self.adapter + self.gradients + self.optimizer + self.value_head

    @property
    def total(self) -> int:
        return self.static + self.activations + self.recompute + self.logits


def learner_bytes(shape: ModelShape, *, dtype: str, lora_rank: int, targets: list[str], critic: bool,
                  micro_batch: int, seq_len: int, response_tokens: int, chunk_tokens: int,
                  checkpointing: bool, truncation: bool, trainable: Optional[int] = None,
                  full: bool = False) -> LearnerBytes:
    """One learner worker: frozen base in ``dtype``; adapter and value head in fp32 with a
    gradient and AdamW's two moments each; activations of one micro-batch; the log-prob
    working set of one chunk of response tokens. ``trainable``: the method's parameters
    (default: LoRA's); ``full``: every weight trains, in fp32 (no frozen copy)."""
    b = DTYPE_BYTES[dtype]
    head = (shape.hidden + 1) if critic else 0
    tokens = micro_batch * seq_len
    per_layer = layer_activation_bytes_per_token(shape, dtype, lora_rank, targets)
    acts = tokens * shape.layers * (b * shape.hidden if checkpointing else per_layer)
    acts += tokens * (2 * b * shape.head_dim + 4 * shape.hidden + (4 * shape.hidden if critic else 0))
    chunk = min(chunk_tokens, micro_batch * response_tokens)
    # logits in the base dtype, their fp32 copy, log-softmax/exp temporaries (2 x fp32); top-p/top-k
    # add the sorted values, their int64 order and the kept mask.
    per_elem = b + 3 * 4 + ((4 + 8 + 1) if truncation else 0)
    n = shape.total_params if full else (shape.lora_params if trainable is None else trainable)
    return LearnerBytes(weights=0 if full else shape.total_params * b, adapter=4 * n, gradients=4 * n, optimizer=8 * n,
                        value_head=16 * head, activations=acts, recompute=tokens * per_layer if checkpointing else 0,
                        logits=chunk * shape.vocab * per_elem)


def publish_bytes(cfg, shape: ModelShape) -> int:
    """What one published version sends to every generator: LoRA's tensors in fp32; for a
    merged-weight method the merged layers it touches, with every part of a fused layer (q/k/v,
    gate/up) and SSF's biases, in the model's dtype; for full fine-tuning every weight."""
    from ..models.methods import FUSED

    method, b = cfg.learner.method, DTYPE_BYTES[cfg.model.dtype]
    if method == "lora":
        return 4 * shape.lora_params
    if method == "full":
        return shape.total_params * b
    targets = {t.rsplit(".", 1)[-1] for t in (cfg.peft.target_modules or cfg.lora.target_modules)}
    sent = set(targets).union(*(FUSED.get(t, ()) for t in targets))
    return sum((fan_in * fan_out + (fan_out if method == "ssf" else 0)) * b
               for leaf, fan_in, fan_out in shape.linears if leaf in sent)


def kv_cache_sequences(kv_cache_bytes: int, shape: ModelShape, dtype: str, max_model_len: int,
                       block_size: int = 16) -> float:
    """How many sequences of ``max_model_len`` tokens vLLM's KV cache holds: whole blocks of
    ``block_size`` tokens, each block K and V of every layer, a sequence taking
    ceil(max_model_len / block_size) blocks (vLLM's own "maximum concurrency")."""
    block_bytes = block_size * shape.kv_bytes_per_token(DTYPE_BYTES[dtype])
    blocks = kv_cache_bytes // block_bytes
    per_seq = -(-max_model_len // block_size)
    return blocks / per_seq


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def stage_bytes(shape: ModelShape, *, dtype: str, spec, micro_batch: int, seq_len: int, checkpointing: bool,
                sequences_per_row: int, vocab_logits: bool) -> dict[str, int]:
    """One worker of the SFT (``vocab_logits``: the language-model loss over every position) or
    reward-model stage (``sequences_per_row`` 2: a pair), by part. ``spec`` (a
    ``models.methods.MethodSpec``): a method (LoRA, DoRA, IA3, SSF, RepAdapter) keeps the base
    frozen and trains its own fp32 tensors with their gradient and AdamW moments; ``full``
    trains every weight, its gradient and both moments in the weights' dtype. Activations as for
    the learner (module doc), the method's inner width standing for LoRA's rank; full fine-tuning
    saves the input of every linear layer, as LoRA on all of them would."""
    b = DTYPE_BYTES[dtype]
    tokens = micro_batch * seq_len * sequences_per_row
    if spec.method != "full":
        inner = {"lora": spec.lora_rank, "dora": spec.lora_rank, "repadapter": spec.repadapter_rank}.get(spec.method, 0)
        per_layer = layer_activation_bytes_per_token(shape, dtype, inner, list(spec.targets))
        weights, trainable = shape.total_params * b, 16 * shape.method_params(spec)
    else:
        per_layer = layer_activation_bytes_per_token(shape, dtype, 0, ALL_LINEAR)
        weights, trainable = shape.total_params * b, 3 * shape.total_params * b
    acts = tokens * shape.layers * (b * shape.hidden if checkpointing else per_layer)
    acts += tokens * (2 * b * shape.head_dim + 4 * shape.hidden)
    # logits in the base dtype, their fp32 copy, log-softmax and its gradient (fp32 each)
    logits = tokens * shape.vocab * (b + 3 * 4) if vocab_logits else 0
    return {"weights": weights, "trainable": trainable, "activations": acts,
            "recompute": tokens * per_layer if checkpointing else 0, "logits": logits}
