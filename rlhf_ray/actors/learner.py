"""Learner role: PPO updates of the LoRA adapter (+ value head), data-parallel via Ray Train.

``LearnerCore`` holds one worker's model and does the model work (plain class, usable
without Ray). ``train_loop`` is the Ray Train worker loop: it serves requests from the
driver (evaluate a batch, update on it, stop) read from a per-rank queue, so the driver
keeps the PPO step in one place while ``TorchTrainer`` owns the process group (gloo on
CPU, NCCL on GPU) and DDP averages the gradients.

Memory: every forward runs on ``learner.micro_batch_size`` rows with gradients accumulated
up to the minibatch, logits exist only for ``learner.logprob_chunk_tokens`` response tokens
at a time (see ``models.policy``), the frozen base stays in ``model.dtype`` and only the
adapter and value head (fp32) have gradients and optimizer state.
"""
from __future__ import annotations

import contextlib
import copy
import time
import uuid
import traceback
from typing import Any, Optional

import torch

from ..algo import ESTIMATORS, masked_mean, ppo_loss
from ..algo.masked import Aggregation
from ..batch import TokenBatch, to_action_width
from ..config import Config
from ..devices import data_parallel, train_device
from ..sync import AdapterVersion, extract_adapter, extract_method
from ..telemetry import MemorySampler


class LearnerCore:
    role = "learner"

    def __init__(self, cfg: Config, model_path: str, rank: int = 0, world: int = 1,
                 device: Optional[torch.device] = None):
        from ..models import add_lora
        from ..models.policy import PolicyWithValue, Sampling

        self.cfg, self.rank, self.world = cfg, rank, world
        self.device = device or torch.device("cpu")
        self.memory = MemorySampler()
        lc = cfg.learner
        # Same seed on every rank: identical LoRA init (DDP also checks it) and the same
        # minibatch order, so every rank takes its share of the same global minibatch.
        torch.manual_seed(cfg.model.seed)
        from ..models.seq2seq import load_policy_lm

        base = load_policy_lm(model_path, cfg.model.dtype, device=self.device)
        if lc.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if lc.method == "lora":
            peft_model = add_lora(base, cfg.lora, task_type="SEQ_2_SEQ_LM" if base.config.is_encoder_decoder
                                  else "CAUSAL_LM")
        else:  # served as merged weights (sync.extract_method)
            from ..models.methods import MethodPolicy, MethodSpec, apply_method

            peft_model = MethodPolicy(apply_method(base, MethodSpec.from_config(cfg, lc.method)))
        self.module = PolicyWithValue(peft_model, Sampling.from_config(cfg.rollout),
                                      critic=ESTIMATORS[cfg.ppo.estimator].needs_critic,
                                      chunk_tokens=lc.logprob_chunk_tokens).to(self.device)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        for p in self.params:  # adapter and head train in fp32 whatever the base's dtype
            p.data = p.data.float()
        self.model: torch.nn.Module = self.module  # replaced by the DDP wrapper under Ray Train
        self.optimizer = torch.optim.AdamW(self.params, lr=lc.lr)
        self._gen = torch.Generator().manual_seed(cfg.model.seed)

    # -- requests -----------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, batch: TokenBatch) -> dict[str, Optional[torch.Tensor]]:
        """Policy log-probs and values of the batch before the update, and reference
        log-probs with the adapter disabled when ``reference.mode=shared_base``. CPU tensors
        of shape (batch, seq - 1)."""
        self.module.eval()
        width = batch.action_mask.shape[1]
        out: dict[str, list] = {"old_logprobs": [], "old_values": [], "ref_logprobs": []}
        shared = self.cfg.reference.mode == "shared_base"
        for m in batch.micro_batches(self.cfg.learner.inference_rows, self.device):
            lp, values, _ = self.module(m.input_ids, m.attention_mask, m.action_mask)
            out["old_logprobs"].append(to_action_width(lp, width))
            if values is not None:
                out["old_values"].append(to_action_width(values, width))
            if shared:
                ref = self.module.reference_logprobs(m.input_ids, m.attention_mask, m.action_mask)
                out["ref_logprobs"].append(to_action_width(ref, width))
        return {k: (torch.cat(v) if v else None) for k, v in out.items()}

    def update(self, batch: TokenBatch, kl_coef: float = 0.0) -> dict[str, float]:
        """``learner.epochs`` passes of minibatch PPO updates over the whole batch. ``kl_coef``:
        the KL loss term's weight (``ppo.kl_in=loss``; with ``reward`` the KL is in the advantages).

        Every rank gets the whole batch and draws the same minibatch order; each takes every
        ``world``-th row of a minibatch. Token means divide by the minibatch's token count over
        all ranks, and each rank's loss is multiplied by ``world`` because DDP averages the
        gradients: 1 worker and N workers then make the same update on the same data.
        """
        lc = self.cfg.learner
        if self.device.type == "cuda":  # the step's own peak in memory_stats, not the run's so far
            torch.cuda.reset_peak_memory_stats(self.device)
        self.module.train()
        from ..models.policy import disable_dropout

        disable_dropout(self.module)
        n, rows = len(batch), self.cfg.minibatch_rows
        sums: dict[str, float] = {}
        count = 0
        shift, shift_tokens = 0.0, 0.0
        nonfinite = False
        # Taken back if a gradient turns out NaN/inf, so a bad update changes nothing at all
        # (adapter + head + Adam moments: ~200 MB for Llama-2-7B at r=16, on the learner's device).
        before = ([p.detach().clone() for p in self.params], copy.deepcopy(self.optimizer.state_dict()))
        for epoch in range(lc.epochs):
            perm = torch.randperm(n, generator=self._gen)
            for start in range(0, n, rows):
                self.optimizer.zero_grad(set_to_none=True)
                s, t = self.minibatch_backward(batch, perm[start:start + rows], kl_coef, sums)
                if epoch == lc.epochs - 1:
                    shift, shift_tokens = shift + s, shift_tokens + t
                grad_norm = torch.nn.utils.clip_grad_norm_(self.params, lc.max_grad_norm)
                if not torch.isfinite(grad_norm):
                    # NaN/inf anywhere in the minibatch reaches every rank through the all-reduce,
                    # so all ranks stop here together and put back the state from before the
                    # update: the whole update is skipped, the earlier minibatches' steps too.
                    self.optimizer.zero_grad(set_to_none=True)
                    with torch.no_grad():
                        for p, old in zip(self.params, before[0]):
                            p.copy_(old)
                    self.optimizer.load_state_dict(before[1])
                    nonfinite = True
                    break
                sums["grad_norm"] = sums.get("grad_norm", 0.0) + float(grad_norm)
                self.optimizer.step()
                count += 1
            if nonfinite:
                break
        del before
        stats = {k: v / max(count, 1) for k, v in sums.items()}
        stats["nonfinite_grad"] = float(nonfinite)
        stats["optimizer_steps"] = count
        stats["lr"] = float(self.optimizer.param_groups[0]["lr"])  # learner.lr, or lower after a guard rollback
        stats["logprob_shift"] = shift / max(shift_tokens, 1.0)
        stats["param_checksum"] = self.param_checksum()
        return stats

    def minibatch_backward(self, batch: TokenBatch, rows: torch.Tensor, kl_coef: float = 0.0,
                           sums: Optional[dict[str, float]] = None) -> tuple[float, float]:
        """Forward and backward of this rank's share (every ``world``-th row) of one minibatch
        ``rows`` of ``batch``, gradients added to ``.grad``; no optimizer step. The loss parts
        are added to ``sums`` (x ``world``, so that the driver's mean over ranks is the
        minibatch's value). Returns (summed |log-prob - old log-prob| over this share's
        response tokens, their count): how far the update has moved the policy so far.

        Token means divide by the minibatch's token count over all ranks and each rank's loss
        is multiplied by ``world`` because DDP averages the gradients, so the gradient summed
        over ranks / ``world`` is the whole minibatch's gradient in one process.
        """
        cfg, lc = self.cfg.ppo, self.cfg.learner
        sums = {} if sums is None else sums
        total_tokens = float(batch.action_mask[rows].sum())
        agg = Aggregation(self.cfg.loss_agg, tokens=total_tokens,
                          rows=float(batch.action_mask[rows].bool().any(dim=1).sum()),
                          horizon=self.cfg.rollout.max_new_tokens)
        mine = rows[self.rank::self.world]
        micro = [mine[i:i + lc.micro_batch_size] for i in range(0, len(mine), lc.micro_batch_size)]
        shift, shift_tokens = 0.0, 0.0
        for j, mrows in enumerate(micro):
            m = batch.select(mrows).trimmed().to(self.device)
            sync = j == len(micro) - 1 or self.model is self.module
            with (contextlib.nullcontext() if sync else self.model.no_sync()):
                logprobs, values, entropy = self.model(
                    m.input_ids, m.attention_mask, m.action_mask,
                    with_entropy=True, grad_entropy=cfg.entropy_coef > 0)
                loss, parts = ppo_loss(
                    logprobs, m.old_logprobs, m.advantages, values, m.old_values, m.returns,
                    m.action_mask, entropy=entropy, clip_eps=cfg.clip_eps,
                    value_clip_eps=cfg.value_clip_eps, vf_coef=cfg.vf_coef,
                    entropy_coef=cfg.entropy_coef, agg=agg, clip_eps_high=cfg.clip_eps_high,
                    ratio_level=cfg.ratio_level, ref_logprobs=m.ref_logprobs,
                    kl_coef=kl_coef if cfg.kl_in == "loss" else 0.0, kl_estimator=cfg.kl_estimator,
                    is_weights=m.is_weights)
                (loss * self.world).backward()
            for k, v in {**parts, "loss": loss.detach()}.items():
                sums[k] = sums.get(k, 0.0) + float(v) * self.world
            shift += float(masked_mean((logprobs.detach() - m.old_logprobs).abs(), m.action_mask)
                           * m.action_mask.sum())
            shift_tokens += float(m.action_mask.sum())
        return shift, shift_tokens

    def adapter(self, version: int) -> AdapterVersion:
        if self.cfg.learner.method == "lora":
            return extract_adapter(self.module.policy, version)
        from ..models.loading import torch_dtype

        return extract_method(self.module.policy.get_base_model(), version, torch_dtype(self.cfg.model.dtype))

    def value_head_state(self) -> dict[str, torch.Tensor]:
        head = self.module.value_head
        return {} if head is None else {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}

    def training_state(self) -> dict[str, Any]:
        """What a checkpoint needs from the learner besides the adapter and value head: the
        optimizer's moments and step counts, and the RNG that orders the minibatches (the
        same on every rank, so rank 0's stands for all). CPU copies: the live state keeps
        changing in place with every update."""
        return _cpu_copy({"optimizer": self.optimizer.state_dict(), "minibatch_rng": self._gen.get_state(),
                          "torch_rng": torch.get_rng_state()})

    def restore(self, adapter: AdapterVersion, value_head: dict[str, torch.Tensor], state: dict[str, Any],
                lr: Optional[float] = None) -> None:
        """Continue from a checkpoint: adapter and head weights, optimizer state, RNGs; ``lr``
        replaces the learning rate the optimizer state carries (the guard's rollback lowers it)."""
        if self.cfg.learner.method == "lora":
            from peft import set_peft_model_state_dict

            result = set_peft_model_state_dict(self.module.policy, adapter.tensors)
            unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
            if unexpected:
                raise ValueError(f"checkpoint adapter tensors do not fit this model: {unexpected[:3]}")
        else:
            _load_method_tensors(self.module.policy.get_base_model(), adapter, self.cfg.learner.method)
        if self.module.value_head is not None:
            if not value_head:
                raise ValueError("checkpoint has no value head, but ppo.estimator needs a critic")
            self.module.value_head.load_state_dict(value_head)
        self.optimizer.load_state_dict(state["optimizer"])
        if lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        self._gen.set_state(state["minibatch_rng"])
        torch.set_rng_state(state["torch_rng"])

    def param_checksum(self) -> float:
        """Sum of all trainable weights: equal on every rank iff DDP kept them in sync."""
        with torch.no_grad():
            return float(sum(p.double().sum() for p in self.params))

    def memory_stats(self) -> dict:
        return {"role": self.role, "name": f"learner-{self.rank}", **self.memory.stats()}


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker loop. Requests in (one queue per rank, made here): (kind, request_id, [batch_ref],
    version) with kind evaluate|update|memory|state|restore (restore's ref: a checkpoint's
    adapter, value head and learner state), or ("stop",). Replies out: (kind, request_id,
    rank, payload); rank 0's "updated" payload carries a [ref] to the new ``AdapterVersion``
    and the value head. An idle worker waits without a deadline: the driver's "stop", or its
    death (which takes the queues down), ends it."""
    import ray
    import ray.train

    from ray.util.queue import Queue

    from ..logs import redirect_output

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    redirect_output(f"learner-rank{rank}", config.get("log_dir"))
    # Each worker makes its own inbox, announced with "ready": it dies with the worker, so when
    # Ray Train restarts the group no request meant for the old workers reaches the new ones.
    inbox, outbox = Queue(actor_options={"num_cpus": 0}), config["outbox"]
    cfg: Config = config["cfg"]
    request_id = None
    group = None
    try:
        torch.set_num_threads(config.get("torch_threads", 1))
        core = LearnerCore(cfg, config["model_path"], rank, world, device=train_device(
            "learner", cfg.learner.use_gpu, cfg.cluster.rehearse))
        if world > 1:
            core.model = data_parallel(core.module)
        group = _group_id(world, core.device)
        outbox.put(("ready", None, rank, {"inbox": inbox, "group": group,
                                          "adapter": [ray.put(core.adapter(0))] if rank == 0 else None,
                                          "value_head": core.value_head_state() if rank == 0 else None}))
        while True:
            msg = inbox.get(block=True)
            kind = msg[0]
            if kind == "stop":
                break
            request_id = msg[1]
            if kind == "memory":
                outbox.put(("memory", request_id, rank, core.memory_stats()))
                continue
            if kind == "state":
                # Through the object store, on the CPU: Adam's moments are twice the adapter's size.
                outbox.put(("state", request_id, rank, [ray.put(core.training_state())] if rank == 0 else None))
                continue
            batch = ray.get(msg[2][0])
            t = time.perf_counter()
            if kind == "evaluate":
                out = core.evaluate(batch.shard(rank, world))
                out["compute_s"] = time.perf_counter() - t
                outbox.put(("evaluated", request_id, rank, out))
            elif kind == "restore":
                core.restore(batch["adapter"], batch["value_head"], batch["learner"], batch.get("lr"))
                # Merged-weight methods: the generators need the restored version's merged weights,
                # which only the learner can make (a checkpoint keeps the method's own tensors).
                merged = [ray.put(core.adapter(msg[3]))] if rank == 0 and cfg.learner.method != "lora" else None
                outbox.put(("restored", request_id, rank, {"checksum": core.param_checksum(), "adapter": merged}))
            elif kind == "update":
                stats = core.update(batch, **(msg[4] if len(msg) > 4 else {}))
                stats["compute_s"] = time.perf_counter() - t
                stats["memory"] = core.memory_stats()
                payload = {"stats": stats, "adapter": None, "value_head": None}
                if rank == 0:
                    payload["adapter"] = [ray.put(core.adapter(msg[3]))]
                    payload["value_head"] = core.value_head_state()
                outbox.put(("updated", request_id, rank, payload))
            else:
                raise ValueError(f"unknown learner request {kind!r}")
    except Exception as e:
        outbox.put(("error", request_id, rank, {"group": group, "traceback": traceback.format_exc(),
                                                "peer_failure": peer_failure(e)}))
        raise


def _load_method_tensors(model: torch.nn.Module, adapter: AdapterVersion, method: str) -> None:
    """A checkpoint's SSF / RepAdapter tensors (every weight for full) into the live policy."""
    saved = adapter.peft_config.get("rlhf_ray_method")
    if saved != method:
        raise ValueError(f"checkpoint holds a {saved or 'lora'} policy, but learner.method={method}")
    own = {n: p for n, p in model.named_parameters()}
    if method != "full":
        from ..models.methods import is_method_param

        own = {n: p for n, p in own.items() if is_method_param(n)}
    missing, unexpected = set(own) - set(adapter.tensors), set(adapter.tensors) - set(own)
    if method != "full" and (missing or unexpected):
        raise ValueError(f"checkpoint {method} tensors do not fit this model: missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]}")
    with torch.no_grad():
        for n, p in own.items():
            if n in adapter.tensors:
                p.copy_(adapter.tensors[n])


def peer_failure(e: BaseException) -> bool:
    """Whether ``e`` is what a rank sees when another rank or the cluster fails (a collective
    or a Ray call broken): a restarted group can go on. Anything else is this code's own error
    on these inputs, which a restart would only repeat."""
    import torch.distributed as dist
    from ray.exceptions import RayError

    broken = tuple(t for t in (getattr(dist, "DistError", None), RayError, ConnectionError, TimeoutError) if t)
    if isinstance(e, broken):
        return True
    # gloo reports a peer's death as a plain RuntimeError.
    text = str(e).lower()
    return any(s in text for s in ("gloo", "nccl", "connection closed by peer", "connection reset by peer",
                                   "broken pipe", "timed out"))


def _group_id(world: int, device: torch.device) -> str:
    """One id per start of the worker group (rank 0's, shared over the process group): the
    driver never mixes announcements or errors of two groups."""
    gid = [uuid.uuid4().hex]
    if world > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(gid, src=0, device=device if dist.get_backend() == "nccl" else None)
    return gid[0]


def _cpu_copy(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj
