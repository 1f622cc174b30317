"""The divergence guard on hand-made step records: each sign alarms past its limit and only
then, the baselines come from the first steps, and patience counts alarmed steps in a row."""
import dataclasses

import pytest

from rlhf_ray.config import ConfigError, GuardConfig, load_config
from rlhf_ray.guard import DivergenceGuard


def _rec(reward=0.0, kl=1.0, cut=0.0, mismatch=0.0, capped=0.0, std=0.5):
    return {"reward_mean": reward, "reward_std": std, "kl_per_seq": kl, "truncation_rate": cut,
            "rollout_correction": {"mismatch_k3": mismatch, "is_capped_frac": capped}}


def _guard(**kw):
    return DivergenceGuard(dataclasses.replace(GuardConfig(), **kw), kl_target=5.0, tis_on=True)


def test_a_healthy_run_raises_no_alarm():
    g = _guard()
    for i in range(30):
        assert g.check(_rec(reward=0.01 * i + (0.05 if i % 2 else -0.05), kl=4.0, cut=0.1)) == []
    assert (g.in_row, g.total) == (0, 0)


@pytest.mark.parametrize("bad, words", [
    (dict(kl=16.0), "KL per response 16 > 15 (3 x ppo.kl_target)"),
    (dict(cut=0.45), "45% of responses cut at rollout.max_new_tokens, up from 10%"),
    (dict(mismatch=0.9), "log-prob mismatch (k3 per token) 0.9 > guard.mismatch_max=0.2"),
    (dict(capped=0.5), "50% of tokens' importance weights over ppo.tis_cap"),
])
def test_each_sign_alarms_past_its_limit_and_patience_counts_steps_in_a_row(bad, words):
    g = _guard(patience=2)
    for _ in range(4):
        assert g.check(_rec(cut=0.1)) == []
    alarms = g.check(_rec(**{"cut": 0.1, **bad}))
    assert len(alarms) == 1 and words in alarms[0] and not g.tripped
    assert g.check(_rec(**{"cut": 0.1, **bad})) and g.tripped and g.in_row == 2
    assert g.check(_rec(cut=0.1)) == [] and g.in_row == 0 and g.total == 2


def test_kl_limit_is_absolute_when_set_and_off_without_a_target():
    assert _guard(kl_max=50.0).check(_rec(kl=40.0)) == []
    assert "guard.kl_max" in _guard(kl_max=30.0).check(_rec(kl=40.0))[0]
    g = DivergenceGuard(GuardConfig(), kl_target=None, tis_on=False)
    assert g.check(_rec(kl=1e4, capped=1.0)) == []  # no target, no kl_max; TIS off: no cap to be over


def test_a_falling_reward_alarms_against_its_best_moving_mean():
    g = _guard(reward_window=3, reward_drop=1.0)
    rewards = [0.0, 0.1, 0.2, 0.3, 0.4, 0.4, 0.3]  # best 3-step mean 0.367; std 0.5 allows a 0.5 fall
    assert all(g.check(_rec(reward=r)) == [] for r in rewards)
    out = [g.check(_rec(reward=r)) for r in (-0.4, -0.5, -0.6)]
    assert out[0] == [] and "below its best" in out[2][0] and g.in_row >= 1


def test_cut_responses_are_no_sign_when_they_are_scored_like_any_other():
    g = DivergenceGuard(GuardConfig(), kl_target=5.0, tis_on=False, watch_truncation=False)
    assert all(g.check(_rec(cut=c)) == [] for c in (0.0, 0.0, 0.0, 1.0, 1.0))


def test_baselines_come_from_the_warm_up_steps_only():
    g = _guard(warmup=2)
    assert g.check(_rec(cut=0.9)) == [] and g.check(_rec(cut=0.9)) == []  # a long-winded start is the baseline
    assert g.check(_rec(cut=0.95)) == []
    assert g.check(_rec(cut=0.05)) == []  # falling is never an alarm


def test_guard_keys_are_checked():
    with pytest.raises(ConfigError, match="guard.action"):
        load_config(None, ["guard.action=halt"])
    with pytest.raises(ConfigError, match="guard.patience"):
        load_config(None, ["guard.patience=0"])
