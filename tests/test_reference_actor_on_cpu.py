"""reference.mode=separate: the frozen base in its own Ray actor gives the same reference
log-probs as the learner's base with the adapter disabled, and a crashed one is restarted.
On the session's shared trainer (conftest.py), which runs its reference in an actor."""
import pytest
import ray

pytestmark = pytest.mark.integration


def test_reference_actor_matches_policy_before_any_update(fresh_trainer):
    tr = fresh_trainer
    assert tr.cfg.reference.mode == "separate" and tr.reference is not None
    r0, r1 = tr.run(steps=2)
    # A crash: Ray starts the actor again (cluster.max_role_restarts) and the call is retried.
    ray.kill(tr.reference, no_restart=False)
    r2 = tr.step()
    # Version 0 is the identity adapter: policy == reference, so the KL is ~0 ...
    assert r0["policy_ref_gap"] < 1e-5 and abs(r0["kl_per_seq"]) < 1e-4
    # ... and after one update they differ.
    assert r1["policy_ref_gap"] > 1e-4
    assert "reference" in r1["memory"] and r1["memory"]["reference"]["peak_rss_bytes"] > 0
    assert r2["samples"] == r1["samples"] and r2["nonfinite"] == [] and r2["policy_ref_gap"] > 1e-4
    assert r2["memory"]["reference"]["pid"] != r1["memory"]["reference"]["pid"]  # a new process answered
