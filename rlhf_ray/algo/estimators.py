"""Advantage estimators as a registry: every estimator takes the same arguments and returns
(advantages, returns), so the experience pipeline picks one by name (``ppo.estimator``)
without special cases. Critic-free estimators (GRPO, RLOO, ...) register here with
``needs_critic=False`` and the learner then builds no value head.
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


def _gae(rewards: torch.Tensor, values: Optional[torch.Tensor], mask: torch.Tensor, *, gamma: float,
         lam: float, groups: Optional[torch.Tensor] = None, whiten_advantages: bool = True):
    """GAE over the per-token (KL-shaped) rewards with the critic's values; advantages whitened
    over the batch's response tokens when ``whiten_advantages``. ``groups`` is unused."""
    adv, returns = gae(rewards, values, mask, gamma, lam)
    return (whiten(adv, mask) if whiten_advantages else adv), returns


ESTIMATORS: dict[str, Estimator] = {
    "gae": Estimator(_gae, needs_critic=True),
}


def estimate_advantages(name: str, rewards: torch.Tensor, values: Optional[torch.Tensor], mask: torch.Tensor,
                        **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Args: rewards, values, mask: Shape (batch, time); groups: Shape (batch,), the prompt
    each row was sampled for. Returns (advantages, returns), each (batch, time)."""
    try:
        est = ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown advantage estimator {name!r}; choose one of {sorted(ESTIMATORS)}") from None
    return est.fn(rewards, values, mask, **kwargs)
