"""Off-policy correction for samples a generator made with another policy than the learner's:
the engine's numerics (a sync run) or an older adapter version (asynchronous rollouts).

The PPO ratio stays ``pi_theta / pi_old`` with ``pi_old`` the learner's own recomputation
for the data; the gap between ``pi_old`` and the behaviour policy that really sampled the
tokens is corrected by a truncated importance weight (TIS), ``min(pi_old / pi_behaviour, cap)``.
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable

import torch

from .masked import masked_mean

IS_LEVELS = ("token", "sequence")
# exp() of a log-ratio beyond this overflows float32; the weight is capped far below it anyway.
_MAX_LOG_RATIO = 80.0


def truncated_is_weights(old_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, mask: torch.Tensor,
                         cap: float, level: str = "token") -> torch.Tensor:
    """``min(exp(old - behaviour), cap)`` per token, or per response (``level="sequence"``:
    the exponent is the response's summed log-ratio, every token of the row takes it).
    Detached (a weight, not a path for gradients); 0 where ``mask`` is 0.

    Args:
        old_logprobs, behaviour_logprobs, mask: Shape (batch, time).
        cap: > 0, the truncation (TIS's C).
    """
    if cap <= 0:
        raise ValueError(f"the importance-weight cap must be > 0, got {cap!r}")
    m = mask.bool()
    log_ratio = torch.where(m, old_logprobs - behaviour_logprobs, torch.zeros_like(old_logprobs)).detach()
    if level == "sequence":
        log_ratio = log_ratio.sum(dim=1, keepdim=True).expand_as(old_logprobs)
    elif level != "token":
        raise ValueError(f"level must be one of {IS_LEVELS}, got {level!r}")
    w = torch.exp(log_ratio.clamp(max=_MAX_LOG_RATIO)).clamp(max=cap)
    return torch.where(m, w, torch.zeros_like(w))


def correction_stats(old_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, mask: torch.Tensor,
                     cap: float, level: str = "token") -> dict[str, float]:
    """How far the behaviour policy was from the learner's: the importance weights before the
    cap (mean, max, share of tokens the cap cut) and the mismatch KL(behaviour || old),
    estimated on the behaviour policy's own samples: ``mismatch_kl`` the k1 estimate
    ``mean(behaviour - old)``, ``mismatch_k3`` the always-positive k3 one."""
    m = mask.bool()
    if not m.any():
        return {"is_weight_mean": 1.0, "is_weight_max": 1.0, "is_capped_frac": 0.0,
                "mismatch_kl": 0.0, "mismatch_k3": 0.0}
    raw = truncated_is_weights(old_logprobs, behaviour_logprobs, mask, float("inf"), level)
    d = old_logprobs - behaviour_logprobs  # log(old / behaviour)
    return {
        "is_weight_mean": float(masked_mean(raw, mask)),
        "is_weight_max": float(raw[m].max()),
        "is_capped_frac": float(masked_mean((raw > cap).float(), mask)),
        "mismatch_kl": float(masked_mean(-d, mask)),
        "mismatch_k3": float(masked_mean(torch.expm1(d.clamp(max=_MAX_LOG_RATIO)) - d, mask)),
    }


def staleness_histogram(versions: Iterable[int], current: int) -> dict[int, int]:
    """Samples per staleness ``current - version`` (0 = made by the adapter being trained)."""
    return dict(sorted(Counter(current - v for v in versions).items()))
