"""Reference-policy role (reference.mode=separate): the frozen base model in its own process.

With reference.mode=shared_base the learner computes the same log-probs from its own base
with the adapter disabled, and no second copy of the model exists.
"""
from __future__ import annotations

import torch

from ..batch import TokenBatch, to_action_width
from ..config import Config
from ..devices import role_device
from ..logs import redirect_output
from ..telemetry import MemorySampler


class ReferencePolicy:
    role = "reference"

    def __init__(self, cfg: Config, model_path: str):
        from ..models.seq2seq import load_policy_lm
        from ..models.policy import Sampling

        redirect_output(self.role)  # before vLLM / transformers print anything
        torch.set_num_threads(1)
        self.cfg = cfg
        self.device = role_device(self.role, cfg.reference.num_gpus, f"reference.num_gpus={cfg.reference.num_gpus:g}",
                                  rehearse=cfg.cluster.rehearse)
        self.memory = MemorySampler()
        self.model = load_policy_lm(model_path, cfg.model.dtype, device=self.device).eval()
        self.sampling = Sampling.from_config(cfg.rollout).untruncated()

    def logprobs(self, batch: TokenBatch) -> torch.Tensor:
        """Shape (batch, seq - 1) on the CPU, 0 outside the response; computed in micro-batches
        of ``learner.micro_batch_size`` rows, the learner's own memory bound."""
        from ..models.policy import sequence_logprobs

        width = batch.action_mask.shape[1]
        return torch.cat([to_action_width(sequence_logprobs(self.model, m.input_ids, m.attention_mask, m.action_mask,
                                                            self.sampling, self.cfg.learner.logprob_chunk_tokens), width)
                          for m in batch.micro_batches(self.cfg.learner.micro_batch_size, self.device)])

    def memory_stats(self) -> dict:
        return {"role": self.role, "name": "reference", **self.memory.stats()}
