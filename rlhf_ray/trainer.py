"""The PPO driver: rollout -> score -> reference/values -> advantages -> update -> publish.

The driver does the light advantage maths (``rlhf_ray.algo``); the roles do model work.
In this synchronous loop every sample of step k comes from adapter version k: version 0
(the LoRA at init, an identity) is published before the first rollout and version k+1
right after update k, before the next rollout starts.
"""
from __future__ import annotations

import json
import random
import time
from typing import Any, Optional

import torch

from . import algo
from .batch import Samples, TokenBatch, pad_samples
from .config import Config, dump_config
from .launch import LearnerGroup, RoleFailed, call, connect, spawn
from .telemetry import MetricsWriter, StageTimer


class PPOTrainer:
    def __init__(self, cfg: Config, *, progress: bool = True):
        from .data.prompts import load_prompt_texts
        from .data.task import JUDGES
        from .models import load_tokenizer
        from .stages import policy_base, reward_path

        self.cfg, self.progress = cfg, progress
        self._t0 = time.perf_counter()
        self.run_dir = cfg.output.run_dir.resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(dump_config(cfg))

        # Everything that can be checked locally is checked before any actor starts.
        self.model_path = policy_base(cfg)
        self.reward_path = reward_path(cfg)
        self.tokenizer = load_tokenizer(self.model_path)
        self._max_len = min(self.tokenizer.model_max_length, _context_length(self.model_path))
        self.prompt_texts = load_prompt_texts(cfg.data, cfg.data.prompts_path)
        self.prompt_ids = self._tokenize(self.prompt_texts, cfg.data.prompts_path or "generated prompts")
        self.judge = JUDGES.get(cfg.eval.judge)
        self.eval_texts = load_prompt_texts(cfg.data, cfg.eval.prompts_path, key="eval.prompts_path",
                                            num=cfg.eval.num_prompts, split="heldout")
        self.eval_ids = self._tokenize(self.eval_texts, cfg.eval.prompts_path or "generated held-out prompts")

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
        self.evals: dict[str, dict[str, Any]] = {}
        self.summary: dict[str, Any] = {}

    @property
    def _timeout(self) -> float:
        return self.cfg.cluster.call_timeout_s

    def _tokenize(self, texts: list[str], source: str) -> list[list[int]]:
        from .data.prompts import tokenize_prompts

        return tokenize_prompts(texts, self.tokenizer, max_prompt_tokens=self.cfg.data.max_prompt_tokens,
                                max_new_tokens=self.cfg.rollout.max_new_tokens, max_model_len=self._max_len,
                                source=source)

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

    def _generate(self, prompt_ids: list[list[int]], prompt_texts: list[str]) -> Samples:
        """One sample per prompt, the prompts dealt round-robin to the generators."""
        n = len(self.generators)
        chunks = [list(range(len(prompt_ids)))[i::n] for i in range(n)]
        refs = [(name, h.generate.remote([prompt_ids[j] for j in c]), c)
                for (name, h), c in zip(self.generators, chunks) if c]
        samples = Samples()
        for name, ref, c in refs:
            part = call(name, ref, self._timeout)
            part.prompts = [prompt_texts[j] for j in c]
            samples.extend(part)
        return samples

    def _old_and_reference(self, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """(policy log-probs, values, reference log-probs, compute seconds of the slowest rank)
        of a batch, from the learner ranks (and the reference actor in ``reference.mode=actor``).
        Rows are padded by repetition to a multiple of the learner's world size, and cut again."""
        import ray

        n, world = len(batch), self.cfg.learner.num_workers
        padded = batch if n % world == 0 else batch.select(torch.arange(n + (-n) % world) % n)
        batch_ref = ray.put(padded)
        ref_ref = self.reference.logprobs.remote(batch_ref) if self.reference is not None else None
        evaluated = self.learner.evaluate(batch_ref)
        old = torch.cat([e["old_logprobs"] for e in evaluated])[:n]
        values = torch.cat([e["old_values"] for e in evaluated])[:n]
        ref = (call("reference", ref_ref, self._timeout) if ref_ref is not None
               else torch.cat([e["ref_logprobs"] for e in evaluated]))[:n]
        return old, values, ref, max(e["compute_s"] for e in evaluated)

    def _score(self, samples: Samples) -> tuple[torch.Tensor, float]:
        scores, compute_s = call("reward", self.reward.score_timed.remote(samples.prompts, samples.responses),
                                 self._timeout)
        return torch.tensor(scores), compute_s

    def evaluate(self, label: str = "") -> dict[str, Any]:
        """The current adapter on the held-out prompts: the judge's score (the rule-based scorer
        of the task, not the reward model), the reward model's mean, and the KL to the
        reference (sum over the response of log pi - log pi_ref, on samples from pi)."""
        k = self.cfg.eval.samples_per_prompt
        ids = [p for p in self.eval_ids for _ in range(k)]
        texts = [t for t in self.eval_texts for _ in range(k)]
        t = time.perf_counter()
        samples = self._generate(ids, texts)
        batch = pad_samples(samples, self.tokenizer.pad_token_id)
        old, _, ref, _ = self._old_and_reference(batch)
        kl_seq = ((old - ref) * batch.action_mask).sum(dim=1)
        scores, _ = self._score(samples)
        out: dict[str, Any] = {
            "label": label, "adapter_version": self.version, "prompts": len(self.eval_texts),
            "samples": len(samples), "reward_mean": float(scores.mean()),
            "kl_per_seq": float(kl_seq.mean()), "kl_per_seq_std": float(kl_seq.std()) if len(kl_seq) > 1 else 0.0,
            "response_len_mean": samples.num_response_tokens / len(samples),
        }
        verdicts = [self.judge(r) for r in samples.responses] if self.judge else None
        if verdicts is not None:
            out["judge"] = self.cfg.eval.judge
            out["judge_score"] = sum(v.score for v in verdicts) / len(verdicts)
            out["in_vocabulary_rate"] = sum(v.in_vocabulary for v in verdicts) / len(verdicts)
        out["examples"] = [{"prompt": p, "response": r, "reward": float(s),
                            **({"judge": verdicts[i].score} if verdicts else {})}
                           for i, (p, r, s) in enumerate(zip(samples.prompts, samples.responses, scores))][::k][:8]
        out["time_s"] = time.perf_counter() - t
        return out

    def step(self) -> dict[str, Any]:
        import ray

        cfg = self.cfg
        timer = StageTimer()
        with timer.stage("generate"):
            idx = self._next_prompts()
            samples = self._generate([self.prompt_ids[j] for j in idx], [self.prompt_texts[j] for j in idx])
        stale = sum(v != self.version for v in samples.versions)
        batch = pad_samples(samples, self.tokenizer.pad_token_id)
        with timer.stage("reward"):
            scores, reward_compute = self._score(samples)
        with timer.stage("reference"):
            batch.old_logprobs, batch.old_values, batch.ref_logprobs, ref_compute = self._old_and_reference(batch)
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
        # Time spent computing inside the roles (the slowest of parallel parts) and in the driver's
        # maths; the rest of the step is orchestration: Ray calls, serialisation, waiting.
        compute = {"generate": samples.compute_s, "reward": reward_compute, "reference": ref_compute,
                   "advantages": times["advantages"], "train": max(u["stats"]["compute_s"] for u in updated),
                   "publish": max(s["swap_s"] for s in swaps)}

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
            "compute_s": compute,
            "overhead_frac": max(0.0, times["total"] - sum(compute.values())) / times["total"],
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

    def run(self, steps: Optional[int] = None, evaluate: bool = True) -> list[dict[str, Any]]:
        """PPO steps with a progress bar; with ``evaluate``, the held-out evaluation before and
        after, and ``ppo.json`` (the run's summary) in the run directory."""
        from tqdm import tqdm

        if evaluate:
            self.evals["before"] = self.evaluate("before PPO")
        records = []
        bar = tqdm(range(steps or self.cfg.ppo.steps), desc="ppo", unit="step", disable=not self.progress)
        for _ in bar:
            rec = self.step()
            records.append(rec)
            bar.set_postfix(reward=f"{rec['reward_mean']:.3f}", kl=f"{rec['kl_per_seq']:.3f}",
                            tok_s=f"{rec['tokens_per_s']:.0f}", v=rec["published_version"])
        if evaluate:
            self.evals["after"] = self.evaluate("after PPO")
        self.summary = self._summarise(records)
        (self.run_dir / "ppo.json").write_text(json.dumps(self.summary, indent=2))
        return records

    def _summarise(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        # Step 0 pays the learner's and engines' first-call costs; rates are from the rest.
        steady = records[1:] or records
        total = sum(r["time_s"]["total"] for r in steady)
        return {
            "stage": "ppo", "time_s": time.perf_counter() - self._t0, "base": self.model_path, "reward_model": self.reward_path,
            "rollout_actors": len(self.generators), "learner_workers": self.cfg.learner.num_workers,
            "reference_mode": self.cfg.reference.mode, "startup_s": self.startup_s, "steps": len(records),
            "samples_per_s": sum(r["samples"] for r in steady) / total if total else None,
            "tokens_per_s": sum(r["response_tokens"] for r in steady) / total if total else None,
            "step_s_mean": total / len(steady) if steady else None,
            "reward_first": records[0]["reward_mean"] if records else None,
            "reward_last": records[-1]["reward_mean"] if records else None,
            "kl_per_seq_last": records[-1]["kl_per_seq"] if records else None,
            "kl_target": self.cfg.ppo.kl_target, "kl_coef_last": self.kl_ctl.value,
            "stale_samples": sum(r["stale_samples"] for r in records),
            "logprob_gap_max": max((r["logprob_gap"] for r in records), default=None),
            "eval": self.evals,
        }

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


__all__ = ["PPOTrainer", "RoleFailed"]
