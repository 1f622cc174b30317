"""Reference-policy role (reference.mode=actor): the frozen base model in its own process.

With reference.mode=shared_base the learner computes the same log-probs from its own base
with the adapter disabled, and no second copy of the model exists.
"""
from __future__ import annotations

import torch

from ..batch import TokenBatch
from ..config import Config
from ..telemetry import MemorySampler


class ReferencePolicy:
    role = "reference"

    def __init__(self, cfg: Config, model_path: str):
        from ..models import load_causal_lm

        torch.set_num_threads(1)
        self.cfg = cfg
        self.memory = MemorySampler()
        self.model = load_causal_lm(model_path, cfg.model.dtype).eval()

    def logprobs(self, batch: TokenBatch) -> torch.Tensor:
        """Shape (batch, seq - 1), 0 outside the response."""
        from ..models.policy import sequence_logprobs

        lp = sequence_logprobs(self.model, batch.input_ids, batch.attention_mask, self.cfg.rollout.temperature)
        return torch.where(batch.action_mask.bool(), lp, torch.zeros_like(lp))

    def memory_stats(self) -> dict:
        return {"role": self.role, "name": "reference", **self.memory.stats()}
