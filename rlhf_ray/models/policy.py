"""The learner's model (base + PEFT LoRA + optional value head) and the memory-safe
log-prob computation shared by the learner and the reference role.

Memory at 7B scale is dominated by full-vocabulary logits, not weights: 8 rows x 1,024
tokens x 32,000 words is 0.98 GiB per fp32 copy. So logits are only ever formed for the
*response* tokens, ``chunk_tokens`` at a time, and under autograd each chunk is recomputed
in backward (``torch.utils.checkpoint``), so only the last hidden states are kept.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..algo import sampled_token_logprobs


@dataclass(frozen=True)
class Sampling:
    """The distribution the generators sample from (see ``rlhf_ray.algo.sampling``)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    @classmethod
    def from_config(cls, rollout) -> "Sampling":
        return cls(rollout.temperature, rollout.top_k, rollout.top_p)

    def untruncated(self) -> "Sampling":
        """The same temperature over the whole vocabulary: the reference policy's distribution.
        The KL penalty is then KL(pi_sampled || pi_ref), finite however pi moves; truncating
        the reference too would make every token outside its nucleus an infinite penalty."""
        return Sampling(self.temperature)


def last_hidden(causal_lm, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                action_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The decoder's last hidden state, shape (batch, seq, hidden): no KV cache, no per-layer
    hidden states kept, no logits (``causal_lm`` is a transformers CausalLM, with or without
    PEFT layers injected). An encoder-decoder model (``action_mask`` says where each row's
    response starts) gives its decoder's states in the same layout (``models.seq2seq``)."""
    if getattr(causal_lm.config, "is_encoder_decoder", False):
        if action_mask is None:
            raise ValueError("an encoder-decoder policy needs the action mask to split prompt and response")
        from .seq2seq import aligned_hidden

        return aligned_hidden(causal_lm, input_ids, attention_mask, action_mask)
    decoder = causal_lm.get_decoder()
    return decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def _chunk_stats(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, sampling: Sampling,
                 with_entropy: bool, grad_entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    logits = hidden @ weight.t()
    if with_entropy and not grad_entropy:
        lp, _ = sampled_token_logprobs(logits, labels, temperature=sampling.temperature,
                                       top_k=sampling.top_k, top_p=sampling.top_p)
        with torch.no_grad():
            _, ent = sampled_token_logprobs(logits.detach(), labels, temperature=sampling.temperature,
                                            top_k=sampling.top_k, top_p=sampling.top_p, with_entropy=True)
        return lp, ent
    lp, ent = sampled_token_logprobs(logits, labels, temperature=sampling.temperature, top_k=sampling.top_k,
                                     top_p=sampling.top_p, with_entropy=with_entropy)
    return lp, (ent if ent is not None else torch.zeros_like(lp))


def response_logprobs(
    hidden: torch.Tensor,
    lm_head: nn.Module,
    input_ids: torch.Tensor,
    action_mask: torch.Tensor,
    sampling: Sampling,
    *,
    chunk_tokens: int = 2048,
    with_entropy: bool = False,
    grad_entropy: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Log-probs (and entropies) of the sampled response tokens under ``sampling``.

    Args:
        hidden: Shape (batch, seq, hidden), the decoder's last hidden state.
        input_ids: Shape (batch, seq).
        action_mask: Shape (batch, seq - 1), 1 where token t + 1 is a response token.
        grad_entropy: build a graph for the entropy (only when its loss coefficient is > 0).

    Returns:
        (logprobs, entropy or None), shape (batch, seq - 1), 0 outside the mask.
    """
    if getattr(lm_head, "bias", None) is not None:
        raise ValueError("an output layer with a bias is not supported")
    where = action_mask.bool()
    h = hidden[:, :-1][where]  # (tokens, hidden): only the positions that predict a response token
    labels = input_ids[:, 1:][where]
    lps, ents = [], []
    for i in range(0, h.shape[0], chunk_tokens):
        args = (h[i:i + chunk_tokens], lm_head.weight, labels[i:i + chunk_tokens], sampling, with_entropy, grad_entropy)
        if torch.is_grad_enabled():
            lp, ent = checkpoint(_chunk_stats, *args, use_reentrant=False)
        else:
            lp, ent = _chunk_stats(*args)
        lps.append(lp)
        ents.append(ent)
    shape = action_mask.shape
    zeros = torch.zeros(shape, dtype=torch.float32, device=hidden.device)
    if not lps:
        # No response token here (a micro-batch of rows left out by ppo.truncated=mask): still a
        # graph back to the adapter, with zero gradients, so backward() works without a value
        # head and every DDP rank joins the all-reduce.
        zeros = zeros + hidden[:, :0].sum()
    logprobs = zeros.index_put((where,), torch.cat(lps)) if lps else zeros
    entropy = None
    if with_entropy:
        entropy = zeros.index_put((where,), torch.cat(ents)) if ents else zeros
    return logprobs, entropy


@torch.no_grad()
def sequence_logprobs(causal_lm, input_ids: torch.Tensor, attention_mask: torch.Tensor, action_mask: torch.Tensor,
                      sampling: Sampling, chunk_tokens: int = 2048) -> torch.Tensor:
    """Response-token log-probs of a frozen model. Shape (batch, seq - 1), 0 outside the mask."""
    hidden = last_hidden(causal_lm, input_ids, attention_mask, action_mask)
    lp, _ = response_logprobs(hidden, causal_lm.get_output_embeddings(), input_ids, action_mask, sampling,
                              chunk_tokens=chunk_tokens)
    return lp


class PolicyWithValue(nn.Module):
    """``forward`` returns, at action positions (batch, seq - 1): log-probs of the sampled
    tokens under the sampling distribution, values (None without a critic; the value at
    action index t is V of the state token t + 1 is generated from) and entropies."""

    def __init__(self, peft_model, sampling: Sampling = Sampling(), *, critic: bool = True,
                 chunk_tokens: int = 2048):
        super().__init__()
        self.policy = peft_model
        self.sampling = sampling
        self.chunk_tokens = chunk_tokens
        self.value_head: Optional[nn.Linear] = None
        if critic:
            hidden = peft_model.get_base_model().config.hidden_size
            # fp32 whatever the base's dtype: a trained head in bf16 loses small updates.
            self.value_head = nn.Linear(hidden, 1, dtype=torch.float32)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    @property
    def causal_lm(self):
        return self.policy.get_base_model()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, action_mask: torch.Tensor,
                with_entropy: bool = False, grad_entropy: bool = False):
        lm = self.causal_lm
        hidden = last_hidden(lm, input_ids, attention_mask, action_mask)
        logprobs, entropy = response_logprobs(hidden, lm.get_output_embeddings(), input_ids, action_mask,
                                              self.sampling, chunk_tokens=self.chunk_tokens,
                                              with_entropy=with_entropy, grad_entropy=grad_entropy)
        values = None
        if self.value_head is not None:
            values = self.value_head(hidden[:, :-1].float()).squeeze(-1)
            values = torch.where(action_mask.bool(), values, torch.zeros_like(values))
        return logprobs, values, entropy

    @torch.no_grad()
    def reference_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           action_mask: torch.Tensor) -> torch.Tensor:
        """The base with the adapter switched off: the reference policy without a second copy."""
        with self.policy.disable_adapter():
            return sequence_logprobs(self.causal_lm, input_ids, attention_mask, action_mask,
                                     self.sampling.untruncated(), self.chunk_tokens)


def disable_dropout(module: nn.Module) -> None:
    """PPO's first ratio must be exactly 1: old log-probs come from a pass without dropout, so
    the update's passes must not drop either (lora.dropout still applies to the SFT and reward
    stages). Dropout modules are put in eval mode; the rest stays in train mode, which keeps
    gradient checkpointing active."""
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
