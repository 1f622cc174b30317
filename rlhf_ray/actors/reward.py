"""Reward-model role: scores prompt + response text in batches."""
from __future__ import annotations

import time

import torch

from ..config import Config
from ..devices import role_device
from ..logs import redirect_output
from ..telemetry import MemorySampler


class RewardScorer:
    role = "reward"

    def __init__(self, cfg: Config, reward_path: str):
        from ..models.reward import load_reward_model
        from ..stages.rm import load_normalizer

        redirect_output(self.role)  # before vLLM / transformers print anything
        torch.set_num_threads(1)
        self.cfg = cfg
        self.device = role_device(self.role, cfg.reward.num_gpus, f"reward.num_gpus={cfg.reward.num_gpus:g}",
                                  rehearse=cfg.cluster.rehearse)
        self.memory = MemorySampler()
        self.rule = None
        if cfg.reward.rule is not None:
            from ..rules import RULES

            self.rule = RULES[cfg.reward.rule]
            return
        self.model, self.tokenizer = load_reward_model(reward_path, cfg.model.dtype, device=self.device)
        self.tokenizer.padding_side = "right"
        # Unit-scale rewards (train-rm's statistics), so ppo.kl_coef means the same for any RM.
        norm = load_normalizer(reward_path) or {"mean": 0.0, "std": 1.0}
        self.shift, self.scale = norm["mean"], norm["std"]

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        from ..stages.rm import reward_text

        if self.rule is not None:
            return [float(self.rule(p, r)) for p, r in zip(prompts, responses)]
        texts = [reward_text(p, r) for p, r in zip(prompts, responses)]
        scores: list[float] = []
        bs = self.cfg.reward.batch_size
        for i in range(0, len(texts), bs):
            enc = self.tokenizer(texts[i:i + bs], return_tensors="pt", padding=True, truncation=True).to(self.device)
            scores += ((self.model(**enc).logits[:, 0].float().cpu() - self.shift) / self.scale).tolist()
        return scores

    def score_timed(self, prompts: list[str], responses: list[str]) -> tuple[list[float], float]:
        """(scores, seconds spent scoring inside this actor)."""
        t = time.perf_counter()
        scores = self.score(prompts, responses)
        return scores, time.perf_counter() - t

    def memory_stats(self) -> dict:
        return {"role": self.role, "name": "reward", **self.memory.stats()}
