"""The divergence guard: the signs a run is going wrong, read from each PPO step's record.

A run that diverges rarely fails: its reward model keeps scoring, its steps keep finishing and it
ends with exit code 0, collapsed. The signs show first in the step records: the KL per response
far past ``ppo.kl_target``, responses suddenly cut at the length limit, the generators' log-probs
far from the learner's (stale or broken samples), most importance weights over their cap, the
reward falling well below its best. Each is an *alarm* naming the figure, its limit and the step;
``guard.patience`` alarmed steps in a row trigger ``guard.action``: ``warn`` goes on, ``stop``
ends the run with the last good checkpoint and adapter named (the trainer does that part).

Pure: no Ray, no torch; the trainer feeds it records.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Optional

from .config import GuardConfig


class DivergenceError(ValueError):
    """The run was stopped by the guard (a ValueError, so the CLI reports it in one line)."""


class DivergenceGuard:
    def __init__(self, gc: GuardConfig, kl_target: Optional[float], tis_on: bool, watch_truncation: bool = True):
        """``watch_truncation``: False when a cut response is scored like any other
        (``ppo.truncated=score``): running to the limit is then a way to earn reward, not a sign."""
        self.gc, self.watch_truncation = gc, watch_truncation
        self.kl_limit = gc.kl_max if gc.kl_max is not None else (gc.kl_factor * kl_target if kl_target else None)
        self.kl_source = "guard.kl_max" if gc.kl_max is not None else f"{gc.kl_factor:g} x ppo.kl_target"
        self.tis_on = tis_on
        self.seen = 0
        self.in_row = 0
        self.total = 0
        self.truncation_base: Optional[float] = None
        self.reward_std: Optional[float] = None
        self._warm: list[dict[str, Any]] = []
        self._window: deque[float] = deque(maxlen=gc.reward_window)
        self.best_reward: Optional[float] = None

    def check(self, record: dict[str, Any]) -> list[str]:
        """The alarms of one step's record (empty: a healthy step); counts alarmed steps in a row."""
        gc, alarms = self.gc, []
        self.seen += 1
        kl = record.get("kl_per_seq")
        if self.kl_limit is not None and kl is not None and kl > self.kl_limit:
            alarms.append(f"KL per response {kl:.3g} > {self.kl_limit:.3g} ({self.kl_source})")
        corr = record.get("rollout_correction") or {}
        mismatch = corr.get("mismatch_k3")
        if mismatch is not None and mismatch > gc.mismatch_max:
            alarms.append(f"generator/learner log-prob mismatch (k3 per token) {mismatch:.3g} > guard.mismatch_max="
                          f"{gc.mismatch_max:g}")
        capped = corr.get("is_capped_frac")
        if self.tis_on and capped is not None and capped > gc.capped_max:
            alarms.append(f"{100 * capped:.0f}% of tokens' importance weights over ppo.tis_cap > guard.capped_max="
                          f"{gc.capped_max:g}")
        if self.seen <= gc.warmup:  # the first steps set the baselines the next two signs compare with
            self._warm.append(record)
            if self.seen == gc.warmup:
                self._set_baselines()
        else:
            if self.truncation_base is None:  # guard.warmup=0: no warm-up steps, baselines from nothing
                self._set_baselines()
            cut = record.get("truncation_rate")
            if self.watch_truncation and cut is not None and cut - self.truncation_base > gc.truncation_rise:
                alarms.append(f"{100 * cut:.0f}% of responses cut at rollout.max_new_tokens, up from "
                              f"{100 * self.truncation_base:.0f}% (more than guard.truncation_rise={gc.truncation_rise:g})")
        reward = record.get("reward_mean")
        if reward is not None:
            self._window.append(float(reward))
            if len(self._window) == self._window.maxlen:
                mean = sum(self._window) / len(self._window)
                drop = (self.best_reward - mean) if self.best_reward is not None else 0.0
                if self.reward_std and drop > gc.reward_drop * self.reward_std:
                    alarms.append(f"reward's mean over {len(self._window)} steps {mean:.3g}, {drop:.3g} below its best "
                                  f"{self.best_reward:.3g} (more than guard.reward_drop={gc.reward_drop:g} x the first "
                                  f"steps' reward std {self.reward_std:.3g})")
                self.best_reward = mean if self.best_reward is None else max(self.best_reward, mean)
        self.in_row = self.in_row + 1 if alarms else 0
        self.total += bool(alarms)
        return alarms

    def _set_baselines(self) -> None:
        warm = self._warm or [{}]
        cuts = [r.get("truncation_rate", 0.0) for r in warm]
        self.truncation_base = sum(cuts) / len(cuts)
        stds = [r["reward_std"] for r in warm if r.get("reward_std")]
        self.reward_std = sum(stds) / len(stds) if stds else None

    @property
    def tripped(self) -> bool:
        """Enough alarmed steps in a row for guard.action."""
        return self.in_row >= self.gc.patience
