"""The PPO driver: rollout -> score -> reference/values -> advantages -> update -> publish.

The driver does the light advantage maths (``rlhf_ray.algo``); the roles do model work.
In this synchronous loop every sample of step k comes from adapter version k: version 0
(the LoRA at init, an identity) is published before the first rollout and version k+1
right after update k, before the next rollout starts.
"""
from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any, Optional

import torch

from . import algo
from .batch import Samples, TokenBatch, pad_samples
from .config import Config, dump_config
from .launch import LearnerGroup, RoleFailed, call, connect, spawn
from .telemetry import MetricsWriter, StageTimer


class PPOTrainer:
    def __init__(self, cfg: Config, *, progress: bool = True):
        from .data.prompts import load_prompt_texts, tokenize_prompts
        from .models import load_tokenizer, resolve_model_path
        from .models.reward import build_reward_model

        self.cfg, self.progress = cfg, progress
        self.run_dir = cfg.output.run_dir.resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(dump_config(cfg))

        # Everything that can be checked locally is checked before any actor starts.
        self.model_path = resolve_model_path(cfg.model)
        self.tokenizer = load_tokenizer(self.model_path)
        max_len = min(self.tokenizer.model_max_length, _context_length(self.model_path))
        self.prompt_texts = load_prompt_texts(cfg.data)
        self.prompt_ids = tokenize_prompts(
            self.prompt_texts, self.tokenizer, max_prompt_tokens=cfg.data.max_prompt_tokens,
            max_new_tokens=cfg.rollout.max_new_tokens, max_model_len=max_len,
            source=cfg.data.prompts_path or "generated prompts")
        self.reward_path = cfg.reward.path or str(build_reward_model(
            self.model_path, Path(cfg.model.tiny_dir).resolve().parent / "_untrained_reward_model",
            seed=cfg.model.seed))

        self.how_connected = connect(cfg)
        from .actors.reference import ReferencePolicy
        from .actors.reward import RewardScorer

        t = time.perf_counter()
        self.generators: list[Any] = []
        self._next_gen_id = 0
        pending = [self._spawn_generator() for _ in range(cfg.rollout.num_actors)]
        self.reward = spawn(RewardScorer, cfg, self.reward_path,
                            num_cpus=cfg.reward.num_cpus, num_gpus=cfg.reward.num_gpus)
        self.reference = (spawn(ReferencePolicy, cfg, self.model_path, num_cpus=cfg.reference.num_cpus,
                                num_gpus=cfg.reference.num_gpus) if cfg.reference.mode == "actor" else None)
        self.learner = LearnerGroup(cfg, self.model_path, self.run_dir / "ray_train")
        self.version = 0
        self.latest_adapter = self.learner.initial_adapter_ref
        for g in pending:
            self._attach(g)
        call("reward", self.reward.memory_stats.remote(), self._timeout)
        if self.reference is not None:
            call("reference", self.reference.memory_stats.remote(), self._timeout)
        self.startup_s = time.perf_counter() - t
        self.metrics = MetricsWriter(self.run_dir / "metrics.jsonl")
        self.kl_ctl = (algo.AdaptiveKLController(cfg.ppo.kl_coef, cfg.ppo.kl_target, cfg.ppo.kl_horizon)
                       if cfg.ppo.kl_target else algo.FixedKLController(cfg.ppo.kl_coef))
        self._order: list[int] = []
        self._rng = random.Random(cfg.data.seed)
        self.step_index = 0

    @property
    def _timeout(self) -> float:
        return self.cfg.cluster.call_timeout_s

    # -- rollout fleet ---------------------------------------------------------------
    def _spawn_generator(self):
        from .actors.rollout import RolloutGenerator

        name = f"rollout-{self._next_gen_id}"
        self._next_gen_id += 1
        return name, spawn(RolloutGenerator, self.cfg, self.model_path, name,
                           num_cpus=self.cfg.rollout.num_cpus, num_gpus=self.cfg.rollout.num_gpus)

    def _attach(self, gen) -> None:
        """A generator joins the fleet only once it serves the latest adapter."""
        name, handle = gen
        call(name, handle.load_adapter.remote(self.latest_adapter), self._timeout)
        self.generators.append(gen)

    def add_rollout_actor(self) -> str:
        gen = self._spawn_generator()
        self._attach(gen)
        return gen[0]

    def remove_rollout_actor(self) -> str:
        import ray

        if len(self.generators) <= 1:
            raise ValueError("cannot remove the last rollout actor")
        name, handle = self.generators.pop()
        ray.kill(handle)
        return name

    # -- one step --------------------------------------------------------------------
    def _next_prompts(self) -> list[int]:
        out = []
        while len(out) < self.cfg.ppo.batch_size:
            if not self._order:
                self._order = list(range(len(self.prompt_ids)))
                self._rng.shuffle(self._order)
            out.append(self._order.pop())
        return out

    def _generate(self, idx: list[int]) -> Samples:
        n = len(self.generators)
        chunks = [idx[i::n] for i in range(n)]
        refs = [(name, h.generate.remote([self.prompt_ids[j] for j in c]))
                for (name, h), c in zip(self.generators, chunks) if c]
        samples = Samples()
        for (name, ref), c in zip(refs, [c for c in chunks if c]):
            part = call(name, ref, self._timeout)
            part.prompts = [self.prompt_texts[j] for j in c]
            samples.extend(part)
        return samples

    def step(self) -> dict[str, Any]:
        import ray

        cfg = self.cfg
        timer = StageTimer()
        with timer.stage("generate"):
            samples = self._generate(self._next_prompts())
        stale = sum(v != self.version for v in samples.versions)
        batch = pad_samples(samples, self.tokenizer.pad_token_id)
        batch_ref = ray.put(batch)
        with timer.stage("reward"):
            scores = torch.tensor(call("reward", self.reward.score.remote(samples.prompts, samples.responses),
                                       self._timeout))
        with timer.stage("reference"):
            ref_ref = self.reference.logprobs.remote(batch_ref) if self.reference is not None else None
            evaluated = self.learner.evaluate(batch_ref)
            batch.old_logprobs = torch.cat([e["old_logprobs"] for e in evaluated])
            batch.old_values = torch.cat([e["old_values"] for e in evaluated])
            batch.ref_logprobs = (call("reference", ref_ref, self._timeout) if ref_ref is not None
                                  else torch.cat([e["ref_logprobs"] for e in evaluated]))
        with timer.stage("advantages"):
            mask = batch.action_mask
            rewards, kl = algo.kl_shaped_rewards(scores, batch.old_logprobs, batch.ref_logprobs, mask,
                                                 self.kl_ctl.value, cfg.ppo.kl_estimator)
            adv, batch.returns = algo.gae(rewards, batch.old_values, mask, cfg.ppo.gamma, cfg.ppo.lam)
            batch.advantages = algo.whiten(adv, mask) if cfg.ppo.whiten_advantages else adv
        with timer.stage("train"):
            updated = self.learner.update(ray.put(batch), self.version + 1)
        with timer.stage("publish"):
            self.latest_adapter = updated[0]["adapter"][0]
            swaps = call("rollout", [h.load_adapter.remote(self.latest_adapter) for _, h in self.generators],
                         self._timeout)
            self.version += 1
        times = timer.finish()

        kl_per_seq = (kl * mask).sum(dim=1)
        kl_coef = self.kl_ctl.value
        self.kl_ctl.update(float(kl_per_seq.mean()), len(samples))
        stats = [u["stats"] for u in updated]
        n_tokens = samples.num_response_tokens
        record = {
            "step": self.step_index,
            "generated_with_version": sorted(set(samples.versions)),
            "published_version": self.version,
            "stale_samples": stale,
            "samples": len(samples),
            "response_tokens": n_tokens,
            "rollout_actors": len(self.generators),
            "time_s": times,
            "tokens_per_s": n_tokens / times["total"],
            "samples_per_s": len(samples) / times["total"],
            "generate_tokens_per_s": n_tokens / max(times["generate"], 1e-9),
            "reward_mean": float(scores.mean()),
            "reward_std": float(scores.std()) if len(scores) > 1 else 0.0,
            "kl_per_token": float(algo.masked_mean(kl, mask)),
            "kl_per_seq": float(kl_per_seq.mean()),
            "kl_coef": kl_coef,
            # vLLM's behaviour log-probs vs the learner's for the same tokens and version: a stale or
            # mis-scaled adapter shows up here first.
            "logprob_gap": float(algo.masked_mean((batch.behaviour_logprobs - batch.old_logprobs).abs(), mask)),
            "policy_ref_gap": float(algo.masked_mean((batch.old_logprobs - batch.ref_logprobs).abs(), mask)),
            "response_len_mean": n_tokens / len(samples),
            "learner": {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]
                        if k not in ("memory", "param_checksum")},
            "param_checksums": [s["param_checksum"] for s in stats],
            "adapter_swap_s_max": max(s["swap_s"] for s in swaps),
            "memory": self._memory(stats),
        }
        self.metrics.write(record)
        self.step_index += 1
        return record

    def _memory(self, learner_stats: list[dict]) -> dict[str, dict]:
        refs = [(name, h.memory_stats.remote()) for name, h in self.generators]
        refs.append(("reward", self.reward.memory_stats.remote()))
        if self.reference is not None:
            refs.append(("reference", self.reference.memory_stats.remote()))
        out = {s["memory"]["name"]: s["memory"] for s in learner_stats}
        for name, ref in refs:
            out[name] = call(name, ref, self._timeout)
        return out

    def run(self, steps: Optional[int] = None) -> list[dict[str, Any]]:
        from tqdm import tqdm

        records = []
        bar = tqdm(range(steps or self.cfg.ppo.steps), desc="ppo", unit="step", disable=not self.progress)
        for _ in bar:
            rec = self.step()
            records.append(rec)
            bar.set_postfix(reward=f"{rec['reward_mean']:.3f}", kl=f"{rec['kl_per_seq']:.3f}",
                            tok_s=f"{rec['tokens_per_s']:.0f}", v=rec["published_version"])
        return records

    def close(self) -> None:
        import ray

        try:
            self.learner.stop()
        finally:
            for _, h in self.generators:
                try:
                    ray.get(h.shutdown.remote(), timeout=30)
                except Exception:
                    pass
                ray.kill(h)
            self.metrics.close()

    def __enter__(self) -> "PPOTrainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _context_length(model_path: str) -> int:
    from transformers import AutoConfig

    return int(getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", 2048))


__all__ = ["PPOTrainer", "RoleFailed", "TokenBatch"]
