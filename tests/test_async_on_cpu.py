"""Asynchronous rollouts (rollout.max_staleness): with S=0 the pipelined loop is the
synchronous algorithm to the last bit, and with S=2 every trained sample is at most two
adapter versions old, judged from the version each sample carries."""
import pytest
import ray
import torch

from rlhf_ray.fleet import request_seed
from rlhf_ray.telemetry import StageTimer
from rlhf_ray.trainer import PPOTrainer, _own

pytestmark = pytest.mark.integration

BASE = ("rollout.num_actors=2", "learner.num_workers=1")


def _adapter(tr) -> dict[str, torch.Tensor]:
    return dict(ray.get(tr.latest_adapter).tensors)


def test_staleness_zero_is_the_synchronous_loop(fresh_trainer):
    tr = fresh_trainer  # rollout.max_staleness=0, 2 generators, 1 learner worker
    first = tr.step()
    start = tr.save_checkpoint()  # after step 0, to run the same three steps twice
    recs = [first] + [tr.step() for _ in range(3)]
    assert [r["staleness"] for r in recs] == [{"0": 8}] * 4 and [r["dropped_stale"] for r in recs] == [0] * 4
    assert not tr._pending  # nothing is sent ahead
    piped = _adapter(tr)

    # The same steps written out as the synchronous algorithm: generate, make, update, publish.
    tr.restore_checkpoint(start)
    for _ in range(3):
        idx = tr._next_prompts()
        seeds = [request_seed(tr.cfg.rollout.seed, tr.step_index, j) for j in range(len(idx))]
        samples = tr.fleet.generate([tr.prompt_ids[j] for j in idx], [tr.prompt_texts[j] for j in idx],
                                    n=tr.cfg.rollout.samples_per_prompt, seeds=seeds)
        kl_coef = tr.kl_ctl.value
        exp = tr.maker.make(samples, kl_coef, StageTimer())
        updated = tr.learner.update(ray.put(exp.batch), tr.version + 1, kl_coef)
        tr.fleet.publish(_own(updated[0]["adapter"][0]))
        tr.version += 1
        tr.kl_ctl.update(float((exp.kl * exp.response_mask).sum(dim=1).mean()), len(samples))
        tr.step_index += 1
    by_hand = _adapter(tr)
    assert piped.keys() == by_hand.keys()
    assert all(torch.equal(piped[k], by_hand[k]) for k in piped)


def test_bounded_staleness_from_per_sample_versions(make_cfg):
    cfg = make_cfg(*BASE, "rollout.max_staleness=2", "ppo.tis_cap=2.0")
    seen: list[list[int]] = []
    with PPOTrainer(cfg, progress=False) as tr:
        collect = tr.fleet.collect

        def spy(sent):  # every sample's own version, as the generators reported it
            samples = collect(sent)
            seen.append(list(samples.versions))
            return samples

        tr.fleet.collect = spy
        recs = tr.run(steps=5, evaluate=False)
        assert not tr._pending  # no rollout was sent for a step past the run's last
    assert [r["samples"] for r in recs] == [8] * 5 and [r["dropped_stale"] for r in recs] == [0] * 5
    # Step k trains on version k; its rollout was sent when step k-2 started, after version k-2
    # was published (before step 2, version 0 is all there is).
    for k, versions in enumerate(seen):
        assert all(k - 2 <= v <= k for v in versions)
        assert set(versions) == {max(0, k - 2)}
        assert recs[k]["staleness"] == {str(k - max(0, k - 2)): 8}
    # The generators' log-probs were of an older policy than the learner's recomputation.
    assert recs[0]["rollout_correction"]["mismatch_k3"] < 1e-6 and recs[0]["logprob_gap"] < 1e-5
    assert all(r["logprob_gap"] > 1e-5 for r in recs[2:])
    assert all(r["rollout_correction"]["is_weight_max"] > 1.0 for r in recs[2:])
    assert all(r["update_skipped"] is False and r["nonfinite"] == [] for r in recs)
