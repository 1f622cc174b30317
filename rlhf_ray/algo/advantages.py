"""Advantage estimation."""
from __future__ import annotations

import torch


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the masked (response) tokens.

    For response tokens t < t' (t' the next response token of the same row)::

        delta_t = r_t + gamma * V_{t'} - V_t
        A_t     = delta_t + gamma * lam * A_{t'}

    with ``V`` and ``A`` after the last response token taken as 0. Masked-out positions
    are skipped (they neither receive nor pass on advantage), so prompt tokens and
    padding anywhere in the row are handled. ``returns = advantages + values``.

    Args:
        rewards, values, mask: Shape (batch, time).

    Returns:
        (advantages, returns), each shape (batch, time); advantages are 0 where mask is 0.
    """
    if not (rewards.shape == values.shape == mask.shape):
        raise ValueError(f"shape mismatch: rewards {tuple(rewards.shape)}, values "
                         f"{tuple(values.shape)}, mask {tuple(mask.shape)}")
    m = mask.to(values.dtype)
    batch, time = rewards.shape
    advantages = torch.zeros_like(values)
    next_value = torch.zeros(batch, dtype=values.dtype, device=values.device)
    next_adv = torch.zeros_like(next_value)
    for t in reversed(range(time)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * next_adv
        mt = m[:, t]
        advantages[:, t] = adv_t * mt
        # Only a response token becomes "the next token" for the ones before it.
        next_value = mt * values[:, t] + (1 - mt) * next_value
        next_adv = mt * adv_t + (1 - mt) * next_adv
    returns = advantages + values
    return advantages.detach(), returns.detach()
