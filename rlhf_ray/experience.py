"""The experience pipeline: generate -> score -> old/reference log-probs and values ->
rewards and advantages. One call of :meth:`ExperienceMaker.make` is one step's data; the
driver does the light maths (``rlhf_ray.algo``), the roles the model work."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from . import algo
from .batch import Samples, TokenBatch, pad_samples
from .config import Config
from .fleet import RolloutFleet
from .launch import LearnerGroup, call
from .telemetry import StageTimer


@dataclass
class Experience:
    samples: Samples
    batch: TokenBatch  # action_mask: the tokens that train (rows left out by ppo.truncated=mask are 0)
    response_mask: torch.Tensor  # every response token, shape (batch, seq - 1)
    scores: torch.Tensor  # the reward model's (or rule's) score per sample, shape (batch,)
    rewards: torch.Tensor  # the sequence reward after the truncation policy, shape (batch,)
    kl: torch.Tensor  # per-token KL estimate to the reference, shape (batch, seq - 1)
    compute_s: dict[str, float] = field(default_factory=dict)

    @property
    def trainable_tokens(self) -> int:
        return int(self.batch.action_mask.sum())


class ExperienceMaker:
    def __init__(self, cfg: Config, fleet: RolloutFleet, reward: Any, reference: Optional[Any],
                 learner: LearnerGroup, pad_id: int, timeout_s: float):
        self.cfg, self.fleet, self.reward, self.reference, self.learner = cfg, fleet, reward, reference, learner
        self.pad_id, self.timeout = pad_id, timeout_s

    def score(self, samples: Samples) -> tuple[torch.Tensor, float]:
        scores, compute_s = call("reward", self.reward.score_timed.remote(samples.prompts, samples.responses),
                                 self.timeout, restarts=self.cfg.cluster.max_role_restarts)
        return torch.tensor(scores, dtype=torch.float32), compute_s

    def old_and_reference(self, batch: TokenBatch) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, float]:
        """(policy log-probs, values or None, reference log-probs, compute seconds of the slowest
        rank) of a batch, from the learner ranks (and the reference actor in
        ``reference.mode=actor``). Rows are padded by repetition to a multiple of the learner's
        world size, and cut again."""
        import ray

        n, world = len(batch), self.cfg.learner.num_workers
        padded = batch if n % world == 0 else batch.select(torch.arange(n + (-n) % world) % n)
        batch_ref = ray.put(padded)
        ref_ref = self.reference.logprobs.remote(batch_ref) if self.reference is not None else None
        evaluated = self.learner.evaluate(batch_ref)
        old = torch.cat([e["old_logprobs"] for e in evaluated])[:n]
        values = (torch.cat([e["old_values"] for e in evaluated])[:n]
                  if evaluated[0]["old_values"] is not None else None)
        ref = (call("reference", ref_ref, self.timeout, restarts=self.cfg.cluster.max_role_restarts)
               if ref_ref is not None
               else torch.cat([e["ref_logprobs"] for e in evaluated]))[:n]
        return old, values, ref, max(e["compute_s"] for e in evaluated)

    def make(self, prompt_ids: list[list[int]], prompt_texts: list[str], seeds: list[int], kl_coef: float,
             timer: StageTimer) -> Experience:
        cfg = self.cfg
        with timer.stage("generate"):
            samples = self.fleet.generate(prompt_ids, prompt_texts, n=cfg.rollout.samples_per_prompt, seeds=seeds)
        batch = pad_samples(samples, self.pad_id)
        with timer.stage("reward"):
            scores, reward_s = self.score(samples)
        with timer.stage("reference"):
            batch.old_logprobs, batch.old_values, batch.ref_logprobs, ref_s = self.old_and_reference(batch)
        with timer.stage("advantages"):
            mask = batch.action_mask
            rewards, trains = algo.apply_truncation(scores, torch.tensor(samples.finished), cfg.ppo.truncated,
                                                    cfg.ppo.truncated_penalty)
            # With ppo.kl_in=loss the KL is still measured here (metrics, adaptive coefficient) but
            # the learner applies it, so the rewards carry the score alone.
            token_rewards, kl = algo.kl_shaped_rewards(rewards, batch.old_logprobs, batch.ref_logprobs, mask,
                                                       kl_coef if cfg.ppo.kl_in == "reward" else 0.0,
                                                       cfg.ppo.kl_estimator)
            batch.action_mask = mask * trains.to(mask.dtype).unsqueeze(1)
            if batch.action_mask.sum() >= 2:
                batch.advantages, batch.returns = algo.estimate_advantages(
                    cfg.ppo.estimator, token_rewards, batch.old_values, batch.action_mask, gamma=cfg.ppo.gamma,
                    lam=cfg.ppo.lam, groups=torch.tensor(samples.prompt_index),
                    whiten_advantages=cfg.ppo.whiten_advantages, group_std=cfg.ppo.group_std)
            else:  # nothing trains this step (every response cut, with ppo.truncated=mask)
                batch.advantages = batch.returns = torch.zeros_like(mask)
        return Experience(samples, batch, mask, scores, rewards, kl,
                          {"generate": samples.compute_s, "reward": reward_s, "reference": ref_s})
