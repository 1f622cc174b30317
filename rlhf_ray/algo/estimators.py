"""Advantage estimators as a registry: every estimator takes the same arguments and returns
(advantages, returns), so the experience pipeline picks one by name (``ppo.estimator``)
without special cases. Critic-free estimators (GRPO, RLOO, ...) register with
``needs_critic=False``: the learner then builds no value head and runs no value loss, and
their ``returns`` are only reported, never regressed on.

The group estimators compare the samples of one prompt (``groups``: the prompt each row was
sampled for, ``rollout.samples_per_prompt`` rows each). A row whose mask is all zero (a
response left out by ``ppo.truncated=mask``) takes no part in its group's statistics and gets
0; a prompt with a single row left has nothing to compare against and gets 0 as well.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .advantages import gae
from .masked import whiten


@dataclass(frozen=True)
class Estimator:
    fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    needs_critic: bool
    needs_groups: bool = False  # compares a prompt's samples: rollout.samples_per_prompt >= 2
    loss_agg: str = "token_mean"  # how the loss averages over tokens unless ppo.loss_agg says otherwise


def sequence_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of the per-token rewards over each row's masked tokens: the score plus the row's
    KL shaping, when the KL is in the reward. Shape (batch,)."""
    return torch.where(mask.bool(), rewards, torch.zeros_like(rewards)).sum(dim=1)


def group_stats(x: torch.Tensor, groups: torch.Tensor, valid: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: the mean, the unbiased std (0 for a single row) and the count of its group's
    valid rows. Args: x, groups, valid: Shape (batch,)."""
    _, inv = torch.unique(groups, return_inverse=True)
    k = int(inv.max()) + 1 if inv.numel() else 0
    v = valid.to(x.dtype)
    count = torch.zeros(k, dtype=x.dtype).index_add_(0, inv, v)
    total = torch.zeros(k, dtype=x.dtype).index_add_(0, inv, x * v)
    mean = total / count.clamp(min=1.0)
    sq = torch.zeros(k, dtype=x.dtype).index_add_(0, inv, (x - mean[inv]) ** 2 * v)
    std = torch.sqrt(sq / (count - 1.0).clamp(min=1.0))
    return mean[inv], std[inv], count[inv]


def _broadcast(per_row: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = per_row.unsqueeze(1).expand_as(mask)
    return torch.where(mask.bool(), out, torch.zeros_like(out))


def _grouped(rewards: torch.Tensor, mask: torch.Tensor, groups: Optional[torch.Tensor], name: str):
    """(R per row, whether the row has a group to be compared with, group mean, std, count)."""
    if groups is None:
        raise ValueError(f"estimator {name!r} compares the samples of a prompt and needs groups "
                         "(the prompt index of every row)")
    if groups.shape != mask.shape[:1]:
        raise ValueError(f"groups has shape {tuple(groups.shape)}, expected ({mask.shape[0]},)")
    r = sequence_rewards(rewards, mask)
    valid = mask.bool().any(dim=1)
    mean, std, count = group_stats(r, groups, valid)
    return r, valid & (count > 1), mean, std, count


def _gae(rewards, values, mask, *, gamma: float, lam: float, groups=None, whiten_advantages: bool = True,
         group_std: bool = True):
    """GAE over the per-token (KL-shaped) rewards with the critic's values; advantages whitened
    over the batch's response tokens when ``whiten_advantages``."""
    adv, returns = gae(rewards, values, mask, gamma, lam)
    return (whiten(adv, mask) if whiten_advantages else adv), returns


def _grpo(rewards, values, mask, *, groups=None, group_std: bool = True, eps: float = 1e-6, **_):
    """GRPO: ``A_i = (R_i - mean_g R) / (std_g R + eps)`` on every token of row i (without the
    std division when ``group_std`` is false), R the row's summed reward."""
    r, compared, mean, std, _ = _grouped(rewards, mask, groups, "grpo")
    adv = (r - mean) / (std + eps) if group_std else r - mean
    out = _broadcast(torch.where(compared, adv, torch.zeros_like(adv)), mask)
    return out, out


def _dr_grpo(rewards, values, mask, *, groups=None, **_):
    """Dr. GRPO: the group mean as baseline, no std division; its loss sums tokens over a
    fixed length instead of dividing by each response's length (``loss_agg``)."""
    return _grpo(rewards, values, mask, groups=groups, group_std=False)


def _rloo(rewards, values, mask, *, groups=None, **_):
    """RLOO: ``A_i = R_i - mean_{j != i} R_j`` over the other valid rows of the prompt."""
    r, compared, mean, _, count = _grouped(rewards, mask, groups, "rloo")
    others = (mean * count - r) / (count - 1.0).clamp(min=1.0)
    out = _broadcast(torch.where(compared, r - others, torch.zeros_like(r)), mask)
    return out, out


def _reinforce_pp(rewards, values, mask, *, gamma: float = 1.0, groups=None, **_):
    """REINFORCE++: per-token discounted returns of the (KL-shaped) rewards, whitened over the
    batch's tokens; the returns are the advantages before whitening."""
    # GAE with zero values and lam = 1 is exactly the discounted return over the masked tokens.
    returns, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma, 1.0)
    return whiten(returns, mask), returns


def _reinforce_pp_baseline(rewards, values, mask, *, groups=None, **_):
    """REINFORCE++ with a group baseline: ``R_i - mean_g R`` on every token, then whitened over
    the batch's tokens."""
    r, compared, mean, _, _ = _grouped(rewards, mask, groups, "reinforce_pp_baseline")
    centred = _broadcast(torch.where(compared, r - mean, torch.zeros_like(r)), mask)
    return whiten(centred, mask), centred


ESTIMATORS: dict[str, Estimator] = {
    "gae": Estimator(_gae, needs_critic=True),
    "grpo": Estimator(_grpo, needs_critic=False, needs_groups=True),
    "dr_grpo": Estimator(_dr_grpo, needs_critic=False, needs_groups=True, loss_agg="seq_mean_token_sum_norm"),
    "rloo": Estimator(_rloo, needs_critic=False, needs_groups=True),
    "reinforce_pp": Estimator(_reinforce_pp, needs_critic=False),
    "reinforce_pp_baseline": Estimator(_reinforce_pp_baseline, needs_critic=False, needs_groups=True),
}


def estimate_advantages(name: str, rewards: torch.Tensor, values: Optional[torch.Tensor], mask: torch.Tensor,
                        **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Args: rewards, values, mask: Shape (batch, time); groups: Shape (batch,), the prompt
    each row was sampled for. Returns (advantages, returns), each (batch, time)."""
    try:
        est = ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown advantage estimator {name!r}; choose one of {sorted(ESTIMATORS)}") from None
    if est.needs_critic and values is None:
        raise ValueError(f"estimator {name!r} needs the critic's values")
    return est.fn(rewards, values, mask, **kwargs)
