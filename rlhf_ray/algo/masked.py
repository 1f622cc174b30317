"""Masked reductions shared by the RL maths.

Masks are float tensors, 1 for response tokens and 0 for prompt/padding. Masked-out
positions are *selected away* (``torch.where``), not multiplied by zero, so a -inf or
NaN sitting under padding cannot leak into a result.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.bool(), x, torch.zeros_like(x)).sum()


def masked_mean(x: torch.Tensor, mask: torch.Tensor, normalizer: Optional[float] = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1.

    An all-zero mask gives 0 (not NaN): a minibatch with no response tokens contributes
    no loss and no gradient. ``normalizer`` replaces the local token count: a data-parallel
    learner divides by the token count of the whole minibatch over all ranks, so every
    token weighs the same however the rows were split (a per-rank mean that DDP then
    averages would weigh a short shard's tokens more).
    """
    denom = mask.sum().clamp(min=1.0) if normalizer is None else max(float(normalizer), 1.0)
    return masked_sum(x, mask) / denom


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    n = mask.sum()
    if n < 2:
        raise ValueError(f"variance needs at least 2 unmasked elements, mask has {int(n.item())}")
    mean = masked_mean(x, mask)
    sq = masked_sum((x - mean) ** 2, mask)
    return sq / (n - 1) if unbiased else sq / n


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise ``x`` over the masked positions: ``(x - mean) / sqrt(var + eps)``.

    With ``shift_mean=False`` the mean is added back (only the scale changes), as is done
    for rewards whose sign carries meaning. Masked-out positions come back as 0.

    Args:
        x: Shape (batch, time).
        mask: Shape (batch, time); needs at least 2 ones.

    Raises:
        ValueError: fewer than 2 unmasked elements (variance undefined).
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, torch.zeros_like(out))


LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


@dataclass(frozen=True)
class Aggregation:
    """How a per-token loss becomes one number, with the minibatch's totals over all ranks so
    that data-parallel shards add up to the minibatch's value:

    - ``token_mean``: sum over tokens / ``tokens`` (every token weighs the same);
    - ``seq_mean_token_mean``: each row's token mean, summed / ``rows`` (every response
      weighs the same, GSPO's choice);
    - ``seq_mean_token_sum_norm``: sum over tokens / (``rows`` * ``horizon``) (Dr. GRPO: no
      division by a response's own length, which favours long wrong answers).
    """

    mode: str = "token_mean"
    tokens: Optional[float] = None  # None: the mask's own count
    rows: Optional[float] = None
    horizon: int = 1  # the longest response allowed (rollout.max_new_tokens)

    def __post_init__(self) -> None:
        if self.mode not in LOSS_AGGREGATIONS:
            raise ValueError(f"unknown loss aggregation {self.mode!r}; choose one of {list(LOSS_AGGREGATIONS)}")

    def mean(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.mode == "token_mean":
            return masked_mean(x, mask, self.tokens)
        m = mask.bool()
        rows = float(m.any(dim=1).sum()) if self.rows is None else float(self.rows)
        per_row = torch.where(m, x, torch.zeros_like(x)).sum(dim=1)
        if self.mode == "seq_mean_token_mean":
            per_row = per_row / m.sum(dim=1).clamp(min=1).to(x.dtype)
            return per_row.sum() / max(rows, 1.0)
        return per_row.sum() / (max(rows, 1.0) * self.horizon)
