"""Learner role: PPO updates of the LoRA adapter + value head, data-parallel via Ray Train.

``LearnerCore`` holds one worker's model and does the model work (plain class, usable
without Ray). ``train_loop`` is the Ray Train worker loop: it serves requests from the
driver (evaluate a batch, update on it, stop) read from a per-rank queue, so the driver
keeps the PPO step in one place while ``TorchTrainer`` owns the process group (gloo on
CPU, NCCL on GPU) and DDP averages the gradients.
"""
from __future__ import annotations

import time
import traceback
from typing import Any, Optional

import torch

from ..algo import logprobs_from_logits, masked_mean, ppo_loss
from ..batch import TokenBatch
from ..config import Config
from ..sync import AdapterVersion, extract_adapter
from ..telemetry import MemorySampler


class LearnerCore:
    role = "learner"

    def __init__(self, cfg: Config, model_path: str, rank: int = 0, world: int = 1):
        from ..models import add_lora, load_causal_lm
        from ..models.policy import PolicyWithValue

        self.cfg, self.rank, self.world = cfg, rank, world
        self.memory = MemorySampler()
        # Same seed on every rank: identical LoRA init (DDP also broadcasts rank 0's).
        torch.manual_seed(cfg.model.seed)
        peft_model = add_lora(load_causal_lm(model_path, cfg.model.dtype), cfg.lora)
        self.module = PolicyWithValue(peft_model, temperature=cfg.rollout.temperature)
        self.model: torch.nn.Module = self.module  # replaced by the DDP wrapper under Ray Train
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.learner.lr)
        self._gen = torch.Generator().manual_seed(cfg.model.seed + rank)

    # -- requests -----------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, batch: TokenBatch) -> dict[str, Optional[torch.Tensor]]:
        """Policy log-probs and values of the batch before the update, and reference
        log-probs with the adapter disabled when ``reference.mode=shared_base``."""
        self.module.eval()
        logits, values = self.module(batch.input_ids, batch.attention_mask)
        mask = batch.action_mask.bool()
        zero = torch.zeros_like(values)
        out: dict[str, Optional[torch.Tensor]] = {
            "old_logprobs": torch.where(mask, logprobs_from_logits(logits, batch.input_ids[:, 1:]), zero),
            "old_values": torch.where(mask, values, zero),
            "ref_logprobs": None,
        }
        if self.cfg.reference.mode == "shared_base":
            from ..models.policy import sequence_logprobs

            with self.module.policy.disable_adapter():
                ref = sequence_logprobs(self.module.policy, batch.input_ids, batch.attention_mask,
                                        self.cfg.rollout.temperature)
            out["ref_logprobs"] = torch.where(mask, ref, zero)
        return out

    def update(self, batch: TokenBatch) -> dict[str, float]:
        """``learner.epochs`` passes of minibatch PPO updates over this rank's shard."""
        cfg, lc = self.cfg.ppo, self.cfg.learner
        self.module.train()
        n = len(batch)
        mb = max(1, lc.minibatch_size // self.world)
        sums: dict[str, float] = {}
        count = 0
        shift = torch.zeros(())
        for epoch in range(lc.epochs):
            perm = torch.randperm(n, generator=self._gen)
            for i in range(0, n, mb):
                m = batch.select(perm[i:i + mb])
                logits, values = self.model(m.input_ids, m.attention_mask)
                logprobs = logprobs_from_logits(logits, m.input_ids[:, 1:])
                loss, parts = ppo_loss(
                    logprobs, m.old_logprobs, m.advantages, values, m.old_values, m.returns, logits,
                    m.action_mask, clip_eps=cfg.clip_eps, value_clip_eps=cfg.value_clip_eps,
                    vf_coef=cfg.vf_coef, entropy_coef=cfg.entropy_coef)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(self.params, lc.max_grad_norm)
                self.optimizer.step()
                if epoch == lc.epochs - 1:
                    # How far this update moved the policy from the version that generated the
                    # data: a stale generator would show a log-prob gap of about this size.
                    shift = shift + masked_mean((logprobs.detach() - m.old_logprobs).abs(), m.action_mask) * len(m)
                for k, v in {**parts, "loss": loss.detach(), "grad_norm": grad_norm}.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                count += 1
        stats = {k: v / max(count, 1) for k, v in sums.items()}
        stats["optimizer_steps"] = count
        stats["logprob_shift"] = float(shift) / n
        stats["param_checksum"] = self.param_checksum()
        return stats

    def adapter(self, version: int) -> AdapterVersion:
        return extract_adapter(self.module.policy, version)

    def param_checksum(self) -> float:
        """Sum of all trainable weights: equal on every rank iff DDP kept them in sync."""
        with torch.no_grad():
            return float(sum(p.double().sum() for p in self.params))

    def memory_stats(self) -> dict:
        return {"role": self.role, "name": f"learner-{self.rank}", **self.memory.stats()}


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker loop. Messages in: ("evaluate"|"update", [batch_ref], version)
    or ("stop",). Messages out: (kind, rank, payload), payload of an "updated" message from
    rank 0 carrying a [ref] to the new ``AdapterVersion`` in the object store."""
    import ray
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    inbox, outbox = config["inboxes"][rank], config["outbox"]
    timeout = config["timeout_s"]
    try:
        torch.set_num_threads(config.get("torch_threads", 1))
        core = LearnerCore(config["cfg"], config["model_path"], rank, world)
        core.model = ray.train.torch.prepare_model(core.module) if world > 1 else core.module
        outbox.put(("ready", rank, [ray.put(core.adapter(0))] if rank == 0 else None))
        while True:
            msg = inbox.get(timeout=timeout)
            kind = msg[0]
            if kind == "stop":
                break
            if kind == "memory":
                outbox.put(("memory", rank, core.memory_stats()))
                continue
            batch = ray.get(msg[1][0]).shard(rank, world)
            t = time.perf_counter()
            if kind == "evaluate":
                out = core.evaluate(batch)
                out["compute_s"] = time.perf_counter() - t
                outbox.put(("evaluated", rank, out))
            elif kind == "update":
                stats = core.update(batch)
                stats["compute_s"] = time.perf_counter() - t
                stats["memory"] = core.memory_stats()
                adapter_ref = [ray.put(core.adapter(msg[2]))] if rank == 0 else None
                outbox.put(("updated", rank, {"stats": stats, "adapter": adapter_ref}))
            else:
                raise ValueError(f"unknown learner request {kind!r}")
    except Exception:
        outbox.put(("error", rank, traceback.format_exc()))
        raise
