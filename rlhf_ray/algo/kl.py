"""KL penalty to the reference policy: estimators, controllers, shaped rewards."""
from __future__ import annotations

from typing import Callable

import torch


def _k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    return logprobs - ref_logprobs


def _k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logprobs - ref_logprobs) ** 2


def _k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    log_ratio = ref_logprobs - logprobs
    return torch.expm1(log_ratio) - log_ratio


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": _k1,
    "k2": _k2,
    "k3": _k3,
}


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from sampled-token log-probs.

    With ``log r = ref_logprobs - logprobs`` (samples drawn from the policy):

    - ``k1``: ``-log r = logprobs - ref_logprobs`` (unbiased, can be negative)
    - ``k2``: ``0.5 * (log r)^2`` (biased, low variance, >= 0)
    - ``k3``: ``(r - 1) - log r`` (unbiased, >= 0)

    Args:
        logprobs, ref_logprobs: Shape (batch, time).

    Returns:
        Shape (batch, time), not masked: the caller applies its mask.
    """
    try:
        fn = KL_ESTIMATORS[kind]
    except KeyError:
        raise ValueError(f"unknown KL estimator {kind!r}; choose one of {sorted(KL_ESTIMATORS)}") from None
    return fn(logprobs, ref_logprobs)


def kl_shaped_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kind: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: ``-kl_coef * KL_t`` on every response token, plus the
    sequence score on the row's last response token.

    Args:
        scores: Shape (batch,), one reward-model score per sequence.
        logprobs, ref_logprobs, mask: Shape (batch, time).

    Returns:
        (rewards, kl), both shape (batch, time) and 0 where mask is 0.

    Raises:
        ValueError: a row with no response token (its score would have nowhere to go).
    """
    m = mask.bool()
    if not bool(m.any(dim=1).all()):
        empty = (~m.any(dim=1)).nonzero().flatten().tolist()
        raise ValueError(f"rows {empty} have no response tokens; cannot place their scores")
    kl = torch.where(m, kl_penalty(logprobs, ref_logprobs, kind), torch.zeros_like(logprobs))
    rewards = -kl_coef * kl
    time = mask.shape[1]
    positions = torch.arange(time, device=mask.device).expand_as(mask)
    last = torch.where(m, positions, torch.full_like(positions, -1)).max(dim=1).values
    rewards[torch.arange(mask.shape[0], device=mask.device), last] += scores.to(rewards.dtype)
    return rewards, kl


class FixedKLController:
    """Constant KL coefficient; same interface as :class:`AdaptiveKLController`."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al., 2019).

    ``e = clip(current_kl / target - 1, -0.2, 0.2)``; ``beta *= 1 + e * n_steps / horizon``.
    The coefficient grows when the policy drifts past the target KL and shrinks below it.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got target={target}, horizon={horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value
