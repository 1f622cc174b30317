"""What a response cut at the length limit earns (``ppo.truncated``)."""
from __future__ import annotations

import torch

TRUNCATION_MODES = ("score", "penalty", "mask")


def apply_truncation(scores: torch.Tensor, finished: torch.Tensor, mode: str,
                     penalty: float = -1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards and which rows train, given which responses ended by themselves.

    ``score``: every row keeps its score (a reward model that cannot see the cut then pays
    for running to the limit). ``penalty``: a cut row's score is replaced by ``penalty``.
    ``mask``: a cut row gets no reward and no loss (it is left out of the update).

    Args:
        scores: Shape (batch,). finished: Shape (batch,), bool.

    Returns:
        (scores, trains): shape (batch,) each; ``trains`` bool.
    """
    if mode not in TRUNCATION_MODES:
        raise ValueError(f"unknown truncation mode {mode!r}; choose one of {TRUNCATION_MODES}")
    finished = finished.bool()
    if mode == "score":
        return scores, torch.ones_like(finished)
    if mode == "penalty":
        return torch.where(finished, scores, torch.full_like(scores, penalty)), torch.ones_like(finished)
    return torch.where(finished, scores, torch.zeros_like(scores)), finished
