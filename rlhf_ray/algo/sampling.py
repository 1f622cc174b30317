"""The distribution a generator actually samples from, as the learner must model it.

vLLM samples from ``softmax(truncate(logits / temperature))`` where top-k keeps the k largest
logits (ties kept) and top-p (nucleus) then drops the least likely tokens whose cumulative
probability, summed from the least likely up, stays within ``1 - top_p`` (the most likely token
is always kept). With ``logprobs_mode=processed_logprobs`` its reported log-probs are of that
renormalised distribution, so the PPO ratio, the KL and the entropy must use the same one.
"""
from __future__ import annotations

from typing import Optional

import torch


def truncation_mask(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0,
                    keep: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """Which tokens survive top-k then top-p, vLLM's rule. None when nothing is truncated.

    Args:
        logits: Shape (..., vocab), already divided by the temperature.
        top_k: keep the k largest (0 = off).
        top_p: nucleus mass in (0, 1] (1 = off).
        keep: Shape (...), int64: a token to keep whatever its rank. The learner passes the
            sampled token: its logits differ from the engine's by ~1e-7, and a token at the
            nucleus boundary must not become impossible (log-prob -inf) on the learner's side.

    Returns:
        Bool tensor of the logits' shape, True = kept; or None.
    """
    vocab = logits.shape[-1]
    use_k = 0 < top_k < vocab
    if not use_k and top_p >= 1.0:
        return None
    z = logits.float()
    kept = torch.ones_like(z, dtype=torch.bool)
    if use_k:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
        kept = z >= kth
    if top_p < 1.0:
        masked = torch.where(kept, z, torch.full_like(z, float("-inf")))
        sorted_z, order = masked.sort(dim=-1, descending=False)
        cum = sorted_z.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum <= 1.0 - top_p
        drop_sorted[..., -1] = False  # the most likely token always stays
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        kept = kept & ~drop
    if keep is not None:
        kept = kept.scatter(-1, keep.unsqueeze(-1), True)
    return kept


def sampling_logits(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                    keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The logits of the distribution sampled from, in fp32: divided by the temperature, and
    -inf outside top-k then top-p (``keep``: see :func:`truncation_mask`). Their softmax is what
    a generator samples from and what the learner's log-probs are of."""
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    kept = truncation_mask(z, top_k, top_p, keep=keep)
    if kept is not None:
        z = torch.where(kept, z, torch.full_like(z, float("-inf")))
    return z


def sampled_token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Log-prob of each label under the sampling distribution, and optionally its entropy.

    Args:
        logits: Shape (..., vocab), raw model logits (any float dtype; computed in fp32).
        labels: Shape (...), int64.

    Returns:
        (logprobs, entropy or None), each shape (...).
    """
    z = sampling_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p, keep=labels)
    lse = torch.logsumexp(z, dim=-1)
    logprobs = z.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - lse
    entropy = None
    if with_entropy:
        probs = torch.softmax(z, dim=-1)
        # Truncated tokens (z = -inf, p = 0) contribute nothing; z is made finite there *before*
        # the product, since the backward of p * z would compute 0 * -inf = nan.
        finite_z = torch.where(torch.isfinite(z), z, torch.zeros_like(z))
        entropy = lse - (probs * finite_z).sum(dim=-1)
    return logprobs, entropy
