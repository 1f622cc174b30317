"""The PPO step loop: take a step's experience, update the learner, publish the adapter,
record, save. The fleet (``fleet.py``) and the experience pipeline (``experience.py``) each
have their own home; this file wires the roles together and keeps the loop.

With ``rollout.max_staleness`` 0 (the default) the loop is synchronous: every sample of step k
comes from adapter version k: version 0 (the LoRA at init, an identity) is published before
the first rollout and version k+1 right after update k, before the next rollout starts.

With ``max_staleness`` S > 0 the rollouts of the next S steps are already on the generators
while a step trains: a step's rollout is sent when the step S before it starts, after that
step's publish, so it is made by an adapter at most S versions older than the one it trains
(older samples, possible only after failures, are dropped and counted). A publish does not
wait: each generator loads the new version after the requests already sent to it, so a
generation in flight finishes on the version it started with.
"""
from __future__ import annotations

import json
import random
import logging
import shutil
import time
from collections import deque
from pathlib import Path
from typing import Any, Optional

import torch

from . import algo
from .batch import pad_samples
from .checkpoint import (Checkpoint, check_compatible, checkpoint_name, discard_checkpoints, fingerprint,
                         load_checkpoint, refuse_to_replace, metrics_prefix, random_state_from_json, random_state_to_json, save_checkpoint)
from .config import Config, dump_config
from .experience import Experience, ExperienceMaker
from .data.objective import by_set
from .guard import DivergenceError, DivergenceGuard
from .fleet import PendingRollout, RolloutFleet, request_seed
from .launch import LearnerGroup, LearnerRestarted, RoleFailed, RolePlacement, call, connect, preflight, spawn
from .logs import close_run_log, link_ray_logs, log_to_run_dir
from .actors.reward import reward_components
from .rewards import check_reward_functions, component_metrics
from .telemetry import MetricsWriter, StageTimer
from .tracking import RayGauges, Trackers

log = logging.getLogger(__name__)

EVAL_STEP = -1  # the seed "step" of held-out evaluations: never one of the training steps


class NumericError(ValueError):
    """More than ``ppo.max_bad_steps`` steps in a row had NaN or inf in their data or gradients
    (a ValueError, so the CLI reports it in one line like other bad values)."""


class BadSteps:
    """Steps whose update was skipped for NaN or inf: each is warned about and counted, and
    more than ``limit`` in a row stop the run (the last checkpoint is from before them)."""

    def __init__(self, limit: int):
        self.limit, self.in_row, self.total = limit, 0, 0

    def observe(self, bad: list[str], step: int, last_checkpoint: Optional[Path]) -> None:
        """``bad``: what held NaN or inf at ``step`` (empty: a good step)."""
        if not bad:
            self.in_row = 0
            return
        self.in_row += 1
        self.total += 1
        what = ", ".join(bad)
        log.warning("PPO step %d: NaN or inf in %s; %s (%d bad step(s) in a row)", step, what,
                    "rest of the update dropped" if "gradients" in bad else "update skipped", self.in_row)
        if self.in_row > self.limit:
            last = last_checkpoint or "none written (checkpoint.every is 0)"
            raise NumericError(f"{self.in_row} PPO steps in a row had NaN or inf ({what}), more than "
                               f"ppo.max_bad_steps={self.limit}; last checkpoint: {last}")


def builtin_task(cfg: Config) -> bool:
    """The embedded default task, which the report's fixed targets (judge gain, wall time) are for."""
    return (cfg.data.task == "reviews" and cfg.data.prompts_path is None and cfg.eval.prompts_path is None
            and cfg.eval.judge == "positive_sentiment" and cfg.model.path is None)


class PPOTrainer:
    def __init__(self, cfg: Config, *, progress: bool = True, resume: Optional[Path] = None, overwrite: bool = False):
        """``resume``: a run or checkpoint directory to continue from (see ``checkpoint.py``);
        without it, a run directory holding an earlier run is refused unless ``overwrite``."""
        from .data.prompts import prompt_records
        from .data.task import JUDGES
        from .models import load_tokenizer
        from .models.checks import check_inputs, check_writable
        from .stages import policy_base, reward_path

        self.cfg, self.progress = cfg, progress
        self._t0 = time.perf_counter()
        # Start-up by part, in the order the driver waits for them; the engines and the reward
        # model build while the learner starts, so "engines" and "roles" are only what is left
        # of their build once the learner is ready (their own build times: startup_parts["built_in"]).
        clock = StageTimer()
        check_writable("output.dir", cfg.output.dir)
        self.run_dir = cfg.output.run_dir.resolve()
        if resume is None and not overwrite:
            refuse_to_replace(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log_to_run_dir(self.run_dir)

        # Everything that can be checked locally is checked before any actor starts.
        self.model_path = policy_base(cfg)
        self.reward_path = reward_path(cfg)
        self.tokenizer = load_tokenizer(self.model_path)
        check_inputs(cfg, self.model_path, self.tokenizer, key="ppo.base", reward_path=self.reward_path)
        from .actors.hf_rollout import engine_kind

        self.engine = engine_kind(cfg, self.model_path)  # vLLM asked to serve an encoder-decoder policy: refused here
        self._context = min(self.tokenizer.model_max_length, _context_length(self.model_path))
        # Rendered with data.chat_template, fitted to data.max_prompt_tokens (data.over_long).
        lengths = {"max_new_tokens": cfg.rollout.max_new_tokens, "max_model_len": self._context}
        self.prompts = prompt_records(cfg.data, cfg.data.prompts_path, self.tokenizer, cap=cfg.data.max_prompts,
                                      **lengths)
        self.prompt_texts, self.prompt_ids = self.prompts.texts, self.prompts.ids
        self.judge = JUDGES.get(cfg.eval.judge)
        self.eval_prompts = prompt_records(cfg.data, cfg.eval.prompts_path, self.tokenizer, key="eval.prompts_path",
                                           num=cfg.eval.num_prompts, cap=cfg.eval.max_prompts, split="heldout",
                                           **lengths)
        self.eval_texts, self.eval_ids = self.eval_prompts.texts, self.eval_prompts.ids
        # The user's reward functions load here first: a missing file, function or column fails now.
        self.reward_sources = check_reward_functions(cfg, self.prompts.columns + self.eval_prompts.columns)
        # The engines hold KV cache for the longest sequence this run can make, not the model's context.
        self.max_model_len = max(len(p) for p in self.prompt_ids + self.eval_ids) + cfg.rollout.max_new_tokens
        self.fingerprint = fingerprint(cfg, self.model_path)
        self.engine_path = self.model_path
        if cfg.learner.method == "ssf":
            # The engines need bias parameters for SSF's shift to land in: the base with an identity
            # SSF merged in (the same outputs, zero biases in the SSF layers' groups).
            from .models.methods import MethodSpec, ssf_engine_base

            self.engine_path = str(ssf_engine_base(self.model_path, MethodSpec.from_config(cfg, "ssf"),
                                                   self.run_dir / "engine_base", cfg.model.dtype))
        self.resumed_from: Optional[Checkpoint] = None
        if resume is not None:
            self.resumed_from = load_checkpoint(resume)
            check_compatible(self.resumed_from, self.fingerprint)
        # This run's checkpoints only: a new run here drops an earlier run's, a resumed one those
        # after its checkpoint (the future it abandons), so "newest" and pruning mean this run's.
        dropped = discard_checkpoints(self.run_dir, after=self.resumed_from.step if self.resumed_from else -1)
        if resume is None and (self.run_dir / "adapter").is_dir():  # --overwrite
            shutil.rmtree(self.run_dir / "adapter")
            dropped.append(self.run_dir / "adapter")
        if dropped:
            log.warning("removed %d checkpoint(s) or adapter(s) of an earlier run in %s (%s)", len(dropped),
                        self.run_dir, ", ".join(p.name for p in dropped))
        (self.run_dir / "config.yaml").write_text(dump_config(cfg))  # after the checks: a refused resume keeps it
        clock.seconds["checks"] = time.perf_counter() - self._t0

        import ray

        with clock.stage("ray"):
            self.how_connected = connect(cfg)
            link_ray_logs(self.run_dir)
            preflight(cfg)
        from .actors.reference import ReferencePolicy
        from .actors.reward import RewardScorer

        self._roles: list[tuple[str, Any]] = []
        self.fleet = None
        self.learner = None
        try:
            # metrics.jsonl (below) is the jsonl tracker here: a restart from a checkpoint rewrites it.
            self.trackers = Trackers(cfg, "ppo", self.run_dir,
                                     from_step=self.resumed_from.step if self.resumed_from else None)
            # The roles' group is reserved before the learner's, so Ray Train's workers take
            # the GPUs it leaves (see RolePlacement).
            with clock.stage("placement"):
                self.placement = RolePlacement(cfg, self._timeout)
            if cfg.rollout.fleet:  # a shared fleet's engines, beside other runs' adapters
                from .shared_fleet import FleetClient

                self.fleet = FleetClient(cfg, self.engine_path, max_model_len=self.max_model_len,
                                         timeout_s=self._timeout, run=cfg.output.name)
            else:
                self.fleet = RolloutFleet(cfg, self.engine_path, max_model_len=self.max_model_len,
                                          timeout_s=self._timeout, placement=self.placement, engine=self.engine)
            with clock.stage("spawn"):
                self.fleet.launch()
                # Reward and reference calls are pure functions of their inputs: Ray restarts a dead
                # one and re-runs the call (cluster.max_role_restarts times, then the run stops).
                restarts = cfg.cluster.max_role_restarts
                k = cfg.reward.num_actors
                self.rewards = [(name, spawn(RewardScorer, cfg, self.reward_path, self.reward_sources,
                                             num_cpus=cfg.reward.num_cpus, num_gpus=cfg.reward.num_gpus,
                                             placement=self.placement.options(name), restarts=restarts))
                                for name in (["reward"] if k == 1 else [f"reward-{i}" for i in range(k)])]
                self.reward = self.rewards[0][1]
                self._roles += self.rewards
                self.reference = None
                if cfg.reference.mode == "separate":
                    self.reference = spawn(ReferencePolicy, cfg, self.model_path, num_cpus=cfg.reference.num_cpus,
                                           num_gpus=cfg.reference.num_gpus,
                                           placement=self.placement.options("reference"), restarts=restarts)
                    self._roles.append(("reference", self.reference))
            # The guard's rollbacks lower the learning rate for the rest of the run, a resumed one too.
            state = self.resumed_from.state if self.resumed_from is not None else {}
            self.lr_scale = float(state.get("lr_scale", 1.0))
            self.rollbacks: list[dict[str, Any]] = list(state.get("guard_rollbacks", []))
            with clock.stage("learner"):
                self.learner = LearnerGroup(cfg, self.model_path, self.run_dir / "ray_train")
                self.version = 0
                # The learner's own first head, so that a checkpoint before the first update restores.
                self.value_head: dict[str, torch.Tensor] = dict(self.learner.initial_value_head)
                first_adapter = _own(self.learner.initial_adapter_ref)
                if self.resumed_from is not None:
                    # The generators serve the checkpoint's adapter before the first rollout.
                    first_adapter = self._restore_learner(self.resumed_from)
            with clock.stage("engines"):
                self.fleet.start(first_adapter)
            with clock.stage("roles"):
                # The reward (and reference) actor; a role that failed to build says so here, naming itself, not in step 0.
                for name, handle in self._roles:
                    call(name, handle.__ray_ready__.remote(), cfg.cluster.start_timeout_s,
                         timeout_key="cluster.start_timeout_s")
            self.layout = self._where()
        except BaseException:
            self.close()
            raise
        self.startup_parts: dict[str, Any] = clock.finish()
        self.startup_parts["built_in"] = self.fleet.build_seconds()
        self.startup_s = time.perf_counter() - self._t0
        self.maker = ExperienceMaker(cfg, self.fleet, self.rewards, self.reference, self.learner,
                                     self.tokenizer.pad_token_id, self._timeout)
        self.kl_ctl = (algo.AdaptiveKLController(cfg.ppo.kl_coef, cfg.ppo.kl_target, cfg.ppo.kl_horizon)
                       if cfg.ppo.kl_target else algo.FixedKLController(cfg.ppo.kl_coef))
        self._order: list[int] = []
        self._rng = random.Random(cfg.data.seed)
        # Rollouts sent and not yet trained on, oldest first: (step, prompt indices, requests).
        self._pending: deque[tuple[int, list[int], PendingRollout]] = deque()
        self._resume_pending: list[tuple[int, list[int]]] = []  # a checkpoint's, sent again on resume
        self._stop_at: Optional[int] = None  # run(): no rollout is sent for a step past its last
        self.step_index = 0
        self.bad_steps = BadSteps(cfg.ppo.max_bad_steps)
        self.all_records: list[dict[str, Any]] = []  # every step of the run, a resumed one's earlier steps too
        self.evals: dict[str, dict[str, Any]] = {}
        self.summary: dict[str, Any] = {}
        self.adapter_dir: Optional[Path] = None
        self.checkpoint_dir: Optional[Path] = None
        self.good_checkpoint: Optional[Path] = self.resumed_from.path if self.resumed_from else None
        self.previous_records: list[dict[str, Any]] = []  # the steps before a resume
        if self.resumed_from is not None:
            self._restore_driver(self.resumed_from.state)
        self._restart_guard()
        self.metrics = MetricsWriter(self.run_dir / "metrics.jsonl", append=self.resumed_from is not None)
        self.gauges = RayGauges(cfg.output.name)

    @property
    def _timeout(self) -> float:
        return self.cfg.cluster.call_timeout_s

    @property
    def generators(self) -> list[tuple[str, Any]]:
        return self.fleet.members

    @property
    def latest_adapter(self):
        """The object-store ref of the adapter every generator serves (the fleet's)."""
        return self.fleet.latest_adapter

    def add_rollout_actor(self) -> str:
        return self.fleet.add()

    def remove_rollout_actor(self) -> str:
        return self.fleet.remove()

    # -- checkpoints -----------------------------------------------------------------
    def _driver_state(self) -> dict[str, Any]:
        return {"step": self.step_index, "version": self.version, "kl_coef": self.kl_ctl.value,
                "order": list(self._order), "rng": random_state_to_json(self._rng.getstate()),
                "metrics_lines": self.step_index, "bad_steps_in_row": self.bad_steps.in_row,
                "bad_steps_total": self.bad_steps.total, "eval_before": self.evals.get("before"),
                "lr_scale": self.lr_scale, "guard_rollbacks": self.rollbacks,
                # Prompts already taken from the order for rollouts in flight (max_staleness > 0):
                # a resume generates them again, with the checkpoint's adapter.
                "pending": [[step, idx] for step, idx, _ in self._pending] + [list(p) for p in self._resume_pending],
                "fingerprint": self.fingerprint, "model_path": self.model_path}

    def _restore_driver(self, state: dict[str, Any]) -> None:
        self.step_index, self.kl_ctl.value = int(state["step"]), float(state["kl_coef"])
        self._order, self._rng = list(state["order"]), random.Random()
        self._drop_pending()
        self._resume_pending = [(int(step), [int(j) for j in idx]) for step, idx in state.get("pending", [])]
        self._rng.setstate(random_state_from_json(state["rng"]))
        self.bad_steps.in_row, self.bad_steps.total = int(state["bad_steps_in_row"]), int(state["bad_steps_total"])
        # The evaluations of the steps given up are gone with them.
        self.evals = {"before": state["eval_before"]} if state.get("eval_before") else {}
        self.previous_records = metrics_prefix(self.run_dir / "metrics.jsonl", int(state["metrics_lines"]))

    def save_checkpoint(self) -> Path:
        """``<run>/checkpoints/step-NNNNNN``, atomically; the oldest beyond ``checkpoint.keep`` go."""
        import ray

        self.checkpoint_dir = save_checkpoint(self.run_dir, self._driver_state(), ray.get(self.latest_adapter),
                                              self.value_head, self.learner.training_state(), self.cfg.checkpoint.keep)
        return self.checkpoint_dir

    # -- one step --------------------------------------------------------------------
    def _next_prompts(self) -> list[int]:
        out = []
        while len(out) < self.cfg.ppo.prompts_per_step:
            if not self._order:
                self._order = list(range(len(self.prompt_ids)))
                self._rng.shuffle(self._order)
            out.append(self._order.pop())
        return out

    def evaluate(self, label: str = "") -> dict[str, Any]:
        """The current adapter on the held-out prompts: the judge's score (the rule-based scorer
        of the task, not the reward model), the reward model's mean, and the KL to the
        reference (sum over the response of log pi - log pi_ref, on samples from pi)."""
        k = self.cfg.eval.samples_per_prompt
        t = time.perf_counter()
        seeds = [request_seed(self.cfg.rollout.seed, EVAL_STEP, i) for i in range(len(self.eval_ids))]
        samples = self.fleet.generate(self.eval_ids, self.eval_texts, n=k, seeds=seeds,
                                      columns=self.eval_prompts.columns, where=self.eval_prompts.where)
        batch = pad_samples(samples, self.tokenizer.pad_token_id)
        old, _, ref, _ = self.maker.old_and_reference(batch)
        kl_seq = ((old - ref) * batch.action_mask).sum(dim=1)
        scores, parts, _ = self.maker.score(samples, EVAL_STEP)
        out: dict[str, Any] = {
            "label": label, "adapter_version": self.version, "prompts": len(self.eval_texts),
            "samples": len(samples), "reward_mean": float(scores.mean()),
            "kl_per_seq": float(kl_seq.mean()), "kl_per_seq_std": float(kl_seq.std()) if len(kl_seq) > 1 else 0.0,
            "response_len_mean": samples.num_response_tokens / len(samples),
            "truncation_rate": samples.truncation_rate,
            **component_metrics(parts),
        }
        verdicts = [self.judge(r, c) for r, c in zip(samples.responses, samples.columns)] if self.judge else None
        if verdicts is not None:
            out["judge"] = self.cfg.eval.judge
            out["judge_score"] = sum(v.score for v in verdicts) / len(verdicts)
            if hasattr(verdicts[0], "in_vocabulary"):
                out["in_vocabulary_rate"] = sum(v.in_vocabulary for v in verdicts) / len(verdicts)
            from .judging import judge_parts

            out.update(judge_parts(verdicts))  # ROUGE-1/2/L/Lsum
            if any("set" in c for c in samples.columns):  # several evaluation sets (objective questions)
                per_set = by_set([v.score for v in verdicts], samples.columns)
                out["judge_by_set"], out["judge_sets_mean"] = per_set, sum(per_set.values()) / len(per_set)
        out["examples"] = [{"prompt": p, "response": r, "reward": float(s),
                            **({"judge": verdicts[i].score} if verdicts else {})}
                           for i, (p, r, s) in enumerate(zip(samples.prompts, samples.responses, scores))][::k][:8]
        out["time_s"] = time.perf_counter() - t
        return out

    def step(self) -> dict[str, Any]:
        """One PPO step. When Ray Train had to restart the learner's workers, the run first goes
        back to the last checkpoint, so the step made is the one after it (its record says which)."""
        restarted: Optional[LearnerRestarted] = None
        while True:  # ends: Ray Train stops restarting after cluster.max_role_restarts (RoleFailed)
            try:
                if restarted is not None:
                    self._back_to_checkpoint(restarted)
                    restarted = None
                return self._step()
            except LearnerRestarted as e:
                restarted = e

    def _restore_learner(self, ck: Checkpoint):
        """Every learner rank loads ``ck``; the driver takes its adapter version and value head.
        Returns the object-store ref of the adapter for the generators."""
        import ray

        # The run's learning rate, not the one in the checkpoint's optimizer state: a resume with a
        # lower learner.lr, or a restart after a guard rollback, trains at the rate now in force.
        replies = self.learner.restore(ray.put({"adapter": ck.adapter, "value_head": ck.value_head,
                                                "learner": ck.learner, "lr": self.cfg.learner.lr * self.lr_scale}),
                                       ck.adapter.version)
        self.version, self.value_head = ck.adapter.version, ck.value_head
        merged = replies[0].get("adapter") if replies and isinstance(replies[0], dict) else None
        return _own(merged[0]) if merged else ray.put(ck.adapter)

    def _back_to_checkpoint(self, why: LearnerRestarted) -> None:
        path = self.checkpoint_dir or (self.resumed_from.path if self.resumed_from else None)
        if path is None:
            raise RoleFailed("learner", f"{why}, but there is no checkpoint to continue from "
                             "(set checkpoint.every)") from why
        ck = self.restore_checkpoint(path)
        log.warning("%s; continuing from %s (step %d)", why, ck.path, ck.step)

    def restore_checkpoint(self, path: Path) -> Checkpoint:
        """Go back to a checkpoint of this run with the live actors (no new engines or learner):
        learner weights, optimizer and RNGs, the driver's step, order and KL coefficient, the
        metrics and trackers cut back to its step, and every generator serving its adapter."""
        ck = load_checkpoint(path)
        check_compatible(ck, self.fingerprint)
        adapter_ref = self._restore_learner(ck)
        self.metrics.close()
        self._restore_driver(ck.state)
        self.metrics = MetricsWriter(self.run_dir / "metrics.jsonl", append=True)
        self.trackers.rewind(ck.step)
        self.fleet.publish(adapter_ref)
        self._restart_guard()
        self.checkpoint_dir = self.good_checkpoint = ck.path
        return ck

    def _fill_pipeline(self) -> None:
        """Rollouts sent for this step and the next ``rollout.max_staleness``: a step's rollout
        is sent once, when it first fits in the window, and uses the adapter published by then."""
        cfg = self.cfg
        while len(self._pending) < cfg.rollout.max_staleness + 1:
            step = self.step_index + len(self._pending)
            if self._pending and self._stop_at is not None and step >= self._stop_at:
                break  # past the run's last step: nothing would train on it
            idx = self._resume_pending.pop(0)[1] if self._resume_pending else self._next_prompts()
            seeds = [request_seed(cfg.rollout.seed, step, j) for j in range(len(idx))]
            sent = self.fleet.dispatch([self.prompt_ids[j] for j in idx], [self.prompt_texts[j] for j in idx],
                                       n=cfg.rollout.samples_per_prompt, seeds=seeds,
                                       columns=[self.prompts.columns[j] for j in idx],
                                       where=[self.prompts.where[j] for j in idx])
            self._pending.append((step, idx, sent))

    def _drop_pending(self) -> None:
        """Forget the rollouts in flight (their prompts are not trained on). Requests still
        queued on a generator are cancelled; one already running finishes unread."""
        import ray

        while self._pending:
            for _, ref, _ in self._pending.popleft()[2].parts:
                try:
                    ray.cancel(ref)
                except Exception:  # already done or its actor gone: nothing to stop
                    pass

    def _rollout(self, timer: StageTimer) -> tuple[Any, int]:
        """This step's samples, less any more than ``rollout.max_staleness`` versions old
        (returned with their count). If none is left, the step's prompts are generated again
        on the current adapter."""
        cfg = self.cfg
        self._fill_pipeline()
        step, idx, sent = self._pending.popleft()
        with timer.stage("generate"):
            samples = self.fleet.collect(sent)
            keep = [i for i, v in enumerate(samples.versions) if v >= self.version - cfg.rollout.max_staleness]
            if not keep:
                self.fleet.settle()
                samples = self.fleet.generate(sent.prompt_ids, sent.prompt_texts, n=sent.n, seeds=sent.seeds,
                                              columns=sent.columns, where=sent.where)
                return samples, len(samples)
        return (samples if len(keep) == len(samples) else samples.reordered(keep)), len(samples) - len(keep)

    def _step(self) -> dict[str, Any]:
        import ray

        cfg = self.cfg
        timer = StageTimer()
        samples, dropped = self._rollout(timer)
        kl_coef = self.kl_ctl.value
        exp = self.maker.make(samples, kl_coef, timer, step=self.step_index)
        samples = exp.samples
        trained_on = self.version  # the adapter this step's update starts from
        # What a healthy record vouches for: the adapter that generated its samples (with
        # max_staleness 0 exactly this one), not the update this step is about to make.
        start = (self.version, self.latest_adapter, dict(self.value_head))
        stale = sum(v != trained_on for v in samples.versions)
        updated = None
        bad = nonfinite_parts(exp)
        with timer.stage("train"):
            if exp.trainable_tokens >= 2 and not bad:
                updated = self.learner.update(ray.put(exp.batch), self.version + 1, kl_coef)
                if any(u["stats"]["nonfinite_grad"] for u in updated):
                    bad.append("gradients")  # the learner put its state back: nothing to publish
        with timer.stage("publish"):
            swaps = []
            if updated is not None and not bad:
                self.value_head = updated[0]["value_head"]
                # Asynchronous: the generators load it after the rollouts already sent to them.
                swaps = self.fleet.publish(_own(updated[0]["adapter"][0]), wait=cfg.rollout.max_staleness == 0)
                self.version += 1
        times = timer.finish()
        if not bad:  # a NaN KL would poison the adaptive coefficient for the rest of the run
            self.kl_ctl.update(float((exp.kl * exp.response_mask).sum(dim=1).mean()), len(samples))
        record = self._record(exp, times, updated, swaps, stale, kl_coef)
        if hasattr(self.fleet, "take_stats"):  # a shared fleet: this run's wait behind the others
            record.update(self.fleet.take_stats())
        record.update(staleness={str(k): n for k, n in algo.staleness_histogram(samples.versions, trained_on).items()},
                      dropped_stale=dropped, rollout_correction=exp.correction)
        record.update(nonfinite=bad, bad_steps_total=self.bad_steps.total + bool(bad),
                      update_skipped=record["update_skipped"] or bool(bad))
        alarms = self.guard.check(record) if cfg.guard.action != "off" else []
        record.update(guard=alarms, guard_alarmed_steps=self.guard.total)
        self.metrics.write(record)
        self.trackers.log(record, record["step"])
        self.gauges.set(record)
        self.step_index += 1
        self.bad_steps.observe(bad, self.step_index - 1, self.checkpoint_dir)
        self._watch(alarms, record["step"], start)
        if cfg.output.save_every and self.step_index % cfg.output.save_every == 0 and not alarms:
            self.save_policy()
        # A step the guard doubts writes no checkpoint, so the newest one is from before the trouble.
        if cfg.checkpoint.every and self.step_index % cfg.checkpoint.every == 0 and not bad and not alarms:
            self.save_checkpoint()
        return record

    def _restart_guard(self) -> None:
        """The guard as it was after the steps kept (a resume or a return to a checkpoint): its
        baselines and moving means from their records; the adapter served now is the healthy one."""
        cfg = self.cfg
        self.guard = DivergenceGuard(cfg.guard, cfg.ppo.kl_target, cfg.tis_cap is not None,
                                     watch_truncation=cfg.ppo.truncated != "score")
        for r in self.previous_records:
            self.guard.check(r)
        # (version, adapter ref, value head) the guard last found healthy: what a stopped run keeps.
        self._good: Optional[tuple[int, Any, dict]] = (
            (self.version, self.latest_adapter, dict(self.value_head)) if self.step_index else None)

    def _watch(self, alarms: list[str], step: int, start: tuple[int, Any, dict]) -> None:
        """Warn of each alarm; past guard.patience alarmed steps in a row, stop the run (keeping
        the last healthy adapter as ``<run>/adapter``) or, with guard.action=rollback, go back
        to the last good checkpoint. A healthy step ``step`` vouches for the adapter its samples
        came from, so for the checkpoint written just before it (``step-<step>``); a checkpoint
        is written after a step, with that step's update, which no record has judged yet."""
        gc = self.cfg.guard
        if not alarms:
            self._good = start
            if self.checkpoint_dir is not None and self.checkpoint_dir.name == checkpoint_name(step):
                self.good_checkpoint = self.checkpoint_dir
            return
        log.warning("PPO step %d may be diverging (%d step(s) in a row, guard.action=%s after guard.patience=%d): %s",
                    step, self.guard.in_row, gc.action, gc.patience, "; ".join(alarms))
        if gc.action not in ("stop", "rollback") or not self.guard.tripped:
            return
        good = self.good_checkpoint if self.good_checkpoint is not None and self.good_checkpoint.is_dir() else None
        if gc.action == "rollback" and len(self.rollbacks) < gc.max_rollbacks and good is not None:
            self._roll_back(step, alarms, good)
            return
        kept = "no healthy step yet: no adapter kept"
        if self._good is not None:
            version, ref, head = self._good
            self.save_policy(ref, head)
            kept = (f"adapter version {version} (the newest whose samples the guard found healthy) saved to "
                    f"{self.adapter_dir}")
        last = good or "none (checkpoint.every is 0, or no checkpoint was followed by a healthy step)"
        tried = ""
        if gc.action == "rollback":
            tried = (f" after {len(self.rollbacks)} rollback(s) (guard.max_rollbacks={gc.max_rollbacks}), learning "
                     f"rate now {self.cfg.learner.lr * self.lr_scale:.3g}" if self.rollbacks else
                     " with no good checkpoint to roll back to")
        raise DivergenceError(
            f"stopped at PPO step {step}{tried}: {self.guard.in_row} steps in a row past the guard's limits "
            f"(guard.patience={gc.patience}): {'; '.join(alarms)}. Last good checkpoint: {last}; {kept}. "
            f"Lower learner.lr, raise ppo.kl_coef or lower rollout.max_staleness, and resume with --resume "
            f"{good or 'DIR'}; guard.action=warn lets it run on, guard.action=rollback goes back by itself")

    def _roll_back(self, step: int, alarms: list[str], good: Path) -> None:
        """guard.action=rollback: back to the last good checkpoint with the learning rate times
        guard.rollback_lr_factor; the steps since are redone (the same prompts, in the same order)."""
        gc = self.cfg.guard
        scale, rollbacks = self.lr_scale * gc.rollback_lr_factor, self.rollbacks
        event = {"at_step": step, "alarms": alarms, "lr": self.cfg.learner.lr * scale}
        self.lr_scale = scale  # before the restore: the learner takes the lowered rate with the checkpoint
        ck = self.restore_checkpoint(good)
        discard_checkpoints(self.run_dir, ck.step)  # the abandoned steps': a --resume must not pick them
        event["to_step"] = ck.step
        self.rollbacks = rollbacks + [event]  # the checkpoint's driver state predates this rollback
        log.warning("PPO step %d: rolled back to %s (step %d) with learner.lr %.3g (rollback %d of "
                    "guard.max_rollbacks=%d); the steps since are redone", step, ck.path, ck.step, event["lr"],
                    len(self.rollbacks), gc.max_rollbacks)

    def _record(self, exp: Experience, times: dict, updated: Optional[list], swaps: list, stale: int,
                kl_coef: float) -> dict[str, Any]:
        samples, batch, mask = exp.samples, exp.batch, exp.response_mask
        stats = [u["stats"] for u in updated] if updated else []
        # Time spent computing inside the roles (the slowest of parallel parts) and in the driver's
        # maths; the rest of the step is orchestration: Ray calls, serialisation, waiting.
        compute = {**exp.compute_s, "advantages": times["advantages"],
                   "train": max((s["compute_s"] for s in stats), default=0.0),
                   "publish": max((s["swap_s"] for s in swaps), default=0.0)}
        kl_per_seq = (exp.kl * mask).sum(dim=1)
        n_tokens = samples.num_response_tokens
        return {
            "step": self.step_index,
            "generated_with_version": sorted(set(samples.versions)),
            "published_version": self.version,
            "stale_samples": stale,
            "samples": len(samples),
            "response_tokens": n_tokens,
            "rollout_actors": len(self.fleet.members),
            "rollout_replaced": len(self.fleet.replaced),
            "learner_restarts": self.learner.restarts,
            "time_s": times,
            "compute_s": compute,
            "overhead_frac": max(0.0, times["total"] - sum(compute.values())) / times["total"],
            "tokens_per_s": n_tokens / times["total"],
            "samples_per_s": len(samples) / times["total"],
            "ended_at": time.time(),  # wall clock: lines runs up side by side (a sweep, a shared fleet)
            "generate_tokens_per_s": n_tokens / max(times["generate"], 1e-9),
            "reward_mean": float(exp.scores.mean()),
            "reward_std": float(exp.scores.std()) if len(exp.scores) > 1 else 0.0,
            "shaped_reward_mean": float(exp.rewards.mean()),
            **component_metrics(exp.components),
            "truncation_rate": samples.truncation_rate,
            "trained_samples": int((batch.action_mask.sum(dim=1) > 0).sum()),
            "update_skipped": updated is None,
            "kl_per_token": float(algo.masked_mean(exp.kl, mask)),
            "kl_per_seq": float(kl_per_seq.mean()),
            "kl_coef": kl_coef,
            # vLLM's behaviour log-probs vs the learner's for the same tokens and version: a stale or
            # mis-scaled adapter shows up here first.
            "logprob_gap": float(algo.masked_mean((batch.behaviour_logprobs - batch.old_logprobs).abs(), mask)),
            "policy_ref_gap": float(algo.masked_mean((batch.old_logprobs - batch.ref_logprobs).abs(), mask)),
            "response_len_mean": n_tokens / len(samples),
            "learner": {k: sum(s[k] for s in stats) / len(stats) for k in (stats[0] if stats else {})
                        if k not in ("memory", "param_checksum")},
            "param_checksums": [s["param_checksum"] for s in stats],
            "adapter_swap_s_max": max((s["swap_s"] for s in swaps), default=0.0),
            "engine_host_released_bytes": sum(s.get("host_released_bytes", 0) for s in swaps),
            "memory": self._memory(stats),
        }

    def _where(self) -> dict[str, dict]:
        """Where every actor landed: node and the GPUs Ray assigned it (logical ids, so a
        rehearsal shows the GPU run's layout); written to ``<run>/placement.json``."""
        stats = {s["name"]: s for s in self.learner.memory()}
        stats.update(self._memory([]))
        layout = {name: {k: s[k] for k in ("node_id", "node_ip", "gpu_ids") if k in s} for name, s in stats.items()}
        (self.run_dir / "placement.json").write_text(json.dumps(layout, indent=2))
        return layout

    def _memory(self, learner_stats: list[dict]) -> dict[str, dict]:
        out = {s["memory"]["name"]: s["memory"] for s in learner_stats}
        out.update(self.fleet.memory())
        for role, handle in self._roles:
            out[role] = call(role, handle.memory_stats.remote(), self._timeout)
        return out

    def save_policy(self, adapter_ref=None, value_head: Optional[dict] = None) -> Path:
        """``<run>/adapter``: the adapter (default: the current one) as a PEFT directory plus its
        value head, replaced atomically."""
        import ray

        from .sync import save_policy

        ref, head = (self.latest_adapter, self.value_head) if adapter_ref is None else (adapter_ref, value_head)
        self.adapter_dir = save_policy(ray.get(ref), head, self.run_dir / "adapter")
        return self.adapter_dir

    def run(self, steps: Optional[int] = None, evaluate: bool = True) -> list[dict[str, Any]]:
        """PPO steps with a progress bar; with ``evaluate``, the held-out evaluation before and
        after, and ``ppo.json`` (the run's summary) in the run directory. The adapter is saved
        at the end (and every ``output.save_every`` steps)."""
        from tqdm import tqdm

        if evaluate and "before" not in self.evals:  # a resumed run keeps its first evaluation
            self.evals["before"] = self.evaluate("before PPO")
            self.trackers.log(self.evals["before"], self.step_index, prefix="eval")
        first = self.step_index
        target = first + steps if steps is not None else self.cfg.ppo.steps
        records = list(self.previous_records)
        bar = tqdm(total=max(0, target - first), desc="ppo", unit="step", disable=not self.progress)
        self._stop_at = target
        if self.cfg.guard.action == "rollback" and self.step_index == 0 and self.cfg.checkpoint.every:
            self.save_checkpoint()  # the adapter before any update: a good point to roll back to
        while self.step_index < target:
            rec = self.step()
            # After a learner restart the run went back to a checkpoint: the steps since are redone.
            records = [r for r in records if r["step"] < rec["step"]] + [rec]
            bar.n = max(0, self.step_index - first)
            bar.set_postfix(reward=f"{rec['reward_mean']:.3f}", kl=f"{rec['kl_per_seq']:.3f}",
                            tok_s=f"{rec['tokens_per_s']:.0f}", v=rec["published_version"])
        bar.close()
        self._stop_at = None
        self.all_records = records
        self.save_policy()
        if evaluate:
            self.evals["after"] = self.evaluate("after PPO")
            self.trackers.log(self.evals["after"], self.step_index, prefix="eval")
        self.summary = self._summarise(records)
        (self.run_dir / "ppo.json").write_text(json.dumps(self.summary, indent=2))
        return [r for r in records if r["step"] >= first]

    def _summarise(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        # Step 0 pays the learner's and engines' first-call costs; rates are from the rest.
        steady = records[1:] or records
        total = sum(r["time_s"]["total"] for r in steady)
        return {
            "stage": "ppo", "time_s": time.perf_counter() - self._t0, "base": self.model_path, "reward_model": self.reward_path,
            "rollout_actors": len(self.fleet.members), "rollout_engine": self.engine, "rollout_fleet": self.cfg.rollout.fleet,
            "learner_workers": self.cfg.learner.num_workers, "reference_mode": self.cfg.reference.mode, "startup_s": self.startup_s,
            "startup_parts": self.startup_parts, "steps": len(records),
            "rehearsal": self.cfg.cluster.rehearse, "placement": self.layout,
            "samples_per_s": sum(r["samples"] for r in steady) / total if total else None,
            "tokens_per_s": sum(r["response_tokens"] for r in steady) / total if total else None,
            "step_s_mean": total / len(steady) if steady else None,
            "reward_first": records[0]["reward_mean"] if records else None,
            "reward_last": records[-1]["reward_mean"] if records else None,
            "kl_per_seq_last": records[-1]["kl_per_seq"] if records else None,
            "kl_target": self.cfg.ppo.kl_target, "kl_coef_last": self.kl_ctl.value,
            "builtin_task": builtin_task(self.cfg),
            "reward_components": [c.name for c in reward_components(self.cfg, self.reward_path)],
            "stale_samples": sum(r["stale_samples"] for r in records),
            "logprob_gap_max": max((r["logprob_gap"] for r in records), default=None),
            "truncated": self.cfg.ppo.truncated,
            "truncation_rate_mean": (sum(r["truncation_rate"] for r in records) / len(records)) if records else None,
            "adapter": str(self.adapter_dir) if self.adapter_dir else None,
            "checkpoint": str(self.checkpoint_dir) if self.checkpoint_dir else None,
            "resumed_from": str(self.resumed_from.path) if self.resumed_from else None,
            "bad_steps": self.bad_steps.total,
            "guard_alarmed_steps": self.guard.total, "guard_rollbacks": self.rollbacks,
            "lr_last": self.cfg.learner.lr * self.lr_scale,
            "rollout_replaced": len(self.fleet.replaced), "learner_restarts": self.learner.restarts,
            "eval": self.evals,
        }

    def close(self, failed: bool = False) -> None:
        """End every actor this trainer started: learner workers, generators (and their
        RAM-disk directories), reward and reference; close the trackers (``failed``: the run
        ended with an error, which wandb and MLflow record)."""
        import ray

        try:
            if getattr(self, "learner", None) is not None:
                self.learner.stop()
        finally:
            if self.fleet is not None:
                self.fleet.close()
            for _, handle in self._roles:
                try:
                    ray.kill(handle)
                except Exception:
                    pass
            self._roles = []
            if getattr(self, "placement", None) is not None:
                self.placement.close()
            if getattr(self, "metrics", None) is not None:
                self.metrics.close()
            if getattr(self, "trackers", None) is not None:
                self.trackers.close(failed)
            close_run_log()

    def __enter__(self) -> "PPOTrainer":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(failed=exc_type is not None)


def startup_line(total_s: float, parts: dict[str, Any]) -> str:
    """``start-up 52.1 s (ray 6.0, learner 30.1, engines 12.0, ...; engines built in 25.3/26.1 s)``."""
    waited = ", ".join(f"{k} {v:.1f}" for k, v in parts.items() if k not in ("total", "built_in"))
    built = "/".join(f"{v:.1f}" for v in parts.get("built_in", {}).values())
    return f"start-up {total_s:.1f} s ({waited}" + (f"; engines built in {built} s)" if built else ")")


def _own(ref):
    """The driver's own copy of an object a role put in the store: an object lives only as long
    as the process that put it, and the learner's rank 0 may die and be restarted."""
    import ray

    return ray.put(ray.get(ref))


def nonfinite_parts(exp: Experience) -> list[str]:
    """Which of a step's inputs to the update hold NaN or inf (the tokens that train only)."""
    b, mask = exp.batch, exp.batch.action_mask.bool()
    parts = {"rewards": exp.rewards, "advantages": b.advantages, "returns": b.returns, "old_logprobs": b.old_logprobs}
    return [name for name, t in parts.items()
            if t is not None and not bool(torch.isfinite(t if t.dim() == 1 else t[mask]).all())]


def _context_length(model_path: str) -> int:
    from transformers import AutoConfig

    return int(getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", 2048))


__all__ = ["NumericError", "PPOTrainer", "RoleFailed"]
