"""PPO and reward-model losses. Pure functions on tensors."""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from .kl import kl_penalty
from .masked import Aggregation, masked_mean


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[label]`` per position.

    Args:
        logits: Shape (batch, time, vocab).
        labels: Shape (batch, time), int64.

    Returns:
        Shape (batch, time).
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    return torch.gather(logp, -1, labels.unsqueeze(-1)).squeeze(-1)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    normalizer: Optional[float] = None,
    *,
    clip_eps_high: Optional[float] = None,
    ratio_level: str = "token",
    agg: Optional[Aggregation] = None,
    is_weights: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate, averaged over tokens by ``agg`` (default: the token mean with
    ``normalizer``, see ``masked_mean``).

    ``r = exp(logprobs - old_logprobs)``;
    ``L = mean(max(-A * r, -A * clip(r, 1 - eps, 1 + eps_high)))``, ``eps_high`` =
    ``clip_eps_high`` or ``clip_eps`` (DAPO's clip-higher lets unlikely tokens grow further).

    ``ratio_level="sequence"`` (GSPO): every token of a row takes the row's ratio
    ``s = exp(mean_t(logprobs - old_logprobs))`` as value, with the gradient of its own token
    log-prob scaled by ``s`` (``s * exp(lp - sg(lp))``), so the clipping acts on whole responses.

    ``is_weights`` (shape (batch, time), no gradient): each token's term is multiplied by it,
    the truncated importance weight for data sampled by another policy than ``old_logprobs``
    describe (``correction.truncated_is_weights``).

    Args:
        logprobs, old_logprobs, advantages, mask: Shape (batch, time).

    Returns:
        (loss, stats). stats: ``clip_frac`` (share of tokens where the clipped term was
        strictly larger, i.e. the gradient was cut) and ``approx_kl`` (k3 estimate of
        KL(old || new): mean((r - 1) - log r), >= 0).
    """
    agg = agg or Aggregation(tokens=normalizer)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    log_ratio = logprobs - old_logprobs
    if ratio_level == "sequence":
        m = mask.bool()
        seq = (torch.where(m, log_ratio, torch.zeros_like(log_ratio)).sum(dim=1)
               / m.sum(dim=1).clamp(min=1).to(log_ratio.dtype))
        log_ratio = seq.detach().unsqueeze(1) + logprobs - logprobs.detach()
    elif ratio_level != "token":
        raise ValueError(f"ratio_level must be 'token' or 'sequence', got {ratio_level!r}")
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high)
    per_token = torch.maximum(unclipped, clipped)
    if is_weights is not None:
        per_token = per_token * is_weights.detach()
    loss = agg.mean(per_token, mask)
    with torch.no_grad():
        stats = {
            "clip_frac": agg.mean((clipped > unclipped).to(logprobs.dtype), mask),
            "approx_kl": agg.mean((ratio - 1.0) - log_ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    normalizer: Optional[float] = None,
    agg: Optional[Aggregation] = None,
) -> torch.Tensor:
    """Clipped value loss: ``0.5 * mean(max((V - R)^2, (V_clip - R)^2))`` with
    ``V_clip = V_old + clip(V - V_old, -eps, eps)``.

    Args:
        values, old_values, returns, mask: Shape (batch, time).
    """
    v_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (v_clipped - returns) ** 2
    return 0.5 * (agg or Aggregation(tokens=normalizer)).mean(torch.maximum(loss_unclipped, loss_clipped), mask)


def entropy_from_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean entropy ``H = logsumexp(z) - sum(softmax(z) * z)`` of each position's
    categorical distribution.

    Args:
        logits: Shape (batch, time, vocab).
        mask: Shape (batch, time).
    """
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    ent = torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)
    return masked_mean(ent, mask)


def ppo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    values: Optional[torch.Tensor],
    old_values: Optional[torch.Tensor],
    returns: Optional[torch.Tensor],
    mask: torch.Tensor,
    *,
    entropy: Optional[torch.Tensor] = None,
    clip_eps: float,
    value_clip_eps: float,
    vf_coef: float,
    entropy_coef: float,
    normalizer: Optional[float] = None,
    agg: Optional[Aggregation] = None,
    clip_eps_high: Optional[float] = None,
    ratio_level: str = "token",
    ref_logprobs: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    is_weights: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``L = policy_loss + vf_coef * value_loss - entropy_coef * entropy + kl_coef * KL``.

    Args:
        logprobs, old_logprobs, advantages, values, old_values, returns, mask:
            Shape (batch, time). ``values`` None: no critic, no value loss.
        entropy: Shape (batch, time), the policy's per-token entropy (with a graph only
            when ``entropy_coef`` > 0); None = not computed.
        normalizer: token count every mean divides by (see ``masked_mean``); ``agg``
            replaces it with another aggregation (see ``Aggregation``).
        ref_logprobs: Shape (batch, time); with ``kl_coef`` > 0 the KL to the reference is a
            loss term (GRPO style, ``kl_estimator`` k3 by default) instead of a reward shaping.
        is_weights: Shape (batch, time), truncated importance weights on the policy term.

    Returns:
        (loss, parts) with parts ``policy_loss``, ``value_loss``, ``entropy``, ``kl_loss``,
        ``clip_frac``, ``approx_kl`` (all detached).
    """
    agg = agg or Aggregation(tokens=normalizer)
    pg, stats = policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps, clip_eps_high=clip_eps_high,
                            ratio_level=ratio_level, agg=agg, is_weights=is_weights)
    zero = torch.zeros((), dtype=pg.dtype, device=pg.device)
    vl = (value_loss(values, old_values, returns, mask, value_clip_eps, agg=agg)
          if values is not None else zero)
    ent = agg.mean(entropy, mask) if entropy is not None else zero
    kl = zero
    if kl_coef and ref_logprobs is None:
        raise ValueError("a KL loss term (kl_coef > 0) needs ref_logprobs")
    if kl_coef:
        kl = agg.mean(kl_penalty(logprobs, ref_logprobs, kl_estimator), mask)
    loss = pg + vf_coef * vl
    if entropy_coef:
        loss = loss - entropy_coef * ent
    if kl_coef:
        loss = loss + kl_coef * kl
    parts = {"policy_loss": pg.detach(), "value_loss": vl.detach(), "entropy": ent.detach(),
             "kl_loss": kl.detach(), **stats}
    return loss, parts


def pairwise_reward_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: Optional[Union[torch.Tensor, float]] = None,
) -> torch.Tensor:
    """Pairwise ranking loss with optional margin (as in Llama 2's reward models):
    ``mean(-log sigmoid(r_chosen - r_rejected - margin))``.

    Args:
        chosen_rewards, rejected_rewards: Shape (pairs,).
        margin: None, a float, or shape (pairs,); larger for pairs rated further apart.

    Raises:
        ValueError: empty or mismatched inputs.
    """
    if chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(f"shape mismatch: chosen {tuple(chosen_rewards.shape)} vs "
                         f"rejected {tuple(rejected_rewards.shape)}")
    if chosen_rewards.numel() == 0:
        raise ValueError("pairwise_reward_loss needs at least one pair")
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()
