"""Masked reductions shared by the RL maths.

Masks are float tensors, 1 for response tokens and 0 for prompt/padding. Masked-out
positions are *selected away* (``torch.where``), not multiplied by zero, so a -inf or
NaN sitting under padding cannot leak into a result.
"""
from __future__ import annotations

import torch


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.bool(), x, torch.zeros_like(x)).sum()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1.

    An all-zero mask gives 0 (not NaN): a minibatch with no response tokens contributes
    no loss and no gradient.
    """
    return masked_sum(x, mask) / mask.sum().clamp(min=1.0)


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
