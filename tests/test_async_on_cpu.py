"""Asynchronous rollouts (rollout.max_staleness): with S=0 the pipelined loop is the
synchronous algorithm to the last bit, with S=2 every trained sample is at most two adapter
versions old, judged from the version each sample carries, and going back to a checkpoint with
rollouts in flight trains every prompt once. And the divergence guard stopping a run."""
import json

import pytest
import ray
import torch

from rlhf_ray.fleet import request_seed
from rlhf_ray.telemetry import StageTimer
from rlhf_ray.trainer import PPOTrainer, _own

pytestmark = pytest.mark.integration

BASE = ("rollout.num_engines=2", "learner.num_workers=1")


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
    cfg = make_cfg(*BASE, "rollout.max_staleness=2", "checkpoint.every=2", "checkpoint.keep=10")
    assert cfg.tis_cap == 2.0  # the off-policy correction is on by itself when rollouts run ahead
    trained: list[tuple[int, list[int]]] = []  # (step, the prompt indices it trains on)
    with PPOTrainer(cfg, progress=False) as tr:
        rollout = tr._rollout

        def spy_rollout(timer):
            tr._fill_pipeline()  # what _rollout does first; a second call adds nothing
            trained.append((tr.step_index, list(tr._pending[0][1])))
            return rollout(timer)

        tr._rollout = spy_rollout
        recs = tr.run(steps=5, evaluate=False)
        assert not tr._pending  # no rollout was sent for a step past the run's last
        first_pass = list(trained)

        # Back to the step-2 checkpoint with steps 3 and 4 in flight (what a learner restart does):
        # the prompts in flight are generated again, with the checkpoint's adapter, and every
        # prompt of the data order is trained on once: none skipped, none repeated.
        trained.clear()
        tr.restore_checkpoint(tr.run_dir / "checkpoints" / "step-000002")
        again = tr.run(steps=3, evaluate=False)
    assert trained == first_pass[2:]
    taken = [j for _, idx in first_pass for j in idx]
    assert len(taken) == len(set(taken)) == 5 * 8
    assert [r["generated_with_version"] for r in again] == [[2], [2], [2]]  # all three sent after the restore
    assert [r["staleness"] for r in again] == [{"0": 8}, {"1": 8}, {"2": 8}]

    assert [r["samples"] for r in recs] == [8] * 5 and [r["dropped_stale"] for r in recs] == [0] * 5
    # Step k trains on version k; its rollout was sent when step k-2 started, after version k-2
    # was published (before step 2, version 0 is all there is): every sample's own version.
    for k, r in enumerate(recs):
        assert r["generated_with_version"] == [max(0, k - 2)]
        assert r["staleness"] == {str(k - max(0, k - 2)): 8}
    # The generators' log-probs were of an older policy than the learner's recomputation.
    assert recs[0]["rollout_correction"]["mismatch_k3"] < 1e-6 and recs[0]["logprob_gap"] < 1e-5
    assert all(r["logprob_gap"] > 1e-5 for r in recs[2:])
    assert all(r["rollout_correction"]["is_weight_max"] > 1.0 for r in recs[2:])
    assert all(r["update_skipped"] is False and r["nonfinite"] == [] for r in recs)


def test_a_diverging_run_is_stopped_with_its_last_good_checkpoint_and_adapter(make_cfg, sft_model_dir, caplog):
    """A learning rate far too high, on purpose (the SFT policy, a rule reward): the guard warns
    with the figures and the step, writes no checkpoint while alarmed, and stops the run naming
    what is kept."""
    from rlhf_ray.guard import DivergenceError

    cfg = make_cfg(*BASE, f"model.path={sft_model_dir}", "reward.rule=sentiment", "learner.lr=0.5", "learner.max_grad_norm=1000", "ppo.kl_target=1.0", "ppo.kl_coef=0.001",
                   "guard.patience=2", "guard.warmup=1", "checkpoint.every=1", "checkpoint.keep=20",
                   "ppo.steps=12", "output.name=diverging")
    with PPOTrainer(cfg, progress=False) as tr:
        with pytest.raises(DivergenceError, match=r"stopped at PPO step (\d+): 2 steps in a row past the guard's "
                                                  r"limits \(guard.patience=2\): .*Last good checkpoint: .*step-0") as err:
            tr.save_checkpoint()  # step 0's: this divergence shows from step 1, sampled with step 0's update
            tr.run(evaluate=False)
        records = [json.loads(x) for x in (tr.run_dir / "metrics.jsonl").read_text().splitlines()]
        last = records[-1]["step"]
        good = [r["step"] for r in records if not r["guard"]]
        assert len(records) < 12 and records[-1]["guard"] and records[-2]["guard"]  # stopped early, on alarms
        assert any("may be diverging" in r.message and f"PPO step {records[-2]['step']}" in r.message
                   for r in caplog.records)
        # Checkpoints only after healthy steps. A healthy step vouches for the adapter that generated
        # its samples (S=0: version = step), so the good checkpoint and the adapter kept are the newest
        # healthy step's own, not the update it then made (the first step that went wrong sampled that).
        kept = sorted(p.name for p in (tr.run_dir / "checkpoints").iterdir())
        assert kept[-1] == f"step-{max(good) + 1:06d}" and all(int(k[5:]) <= last for k in kept)
        assert f"Last good checkpoint: {tr.run_dir / 'checkpoints' / f'step-{max(good):06d}'};" in str(err.value)
        saved = json.loads((tr.run_dir / "adapter" / "rlhf_ray_adapter.json").read_text())["version"]
        assert saved == max(good) < tr.version


def test_guard_rollback_returns_to_the_last_good_checkpoint_with_a_lower_learning_rate(make_cfg, sft_model_dir,
                                                                                       caplog):
    """The same deliberate divergence with guard.action=rollback: the run goes back to its newest
    (healthy) checkpoint, redoes the steps since at learner.lr x guard.rollback_lr_factor, and
    finishes; the rollback is in the summary and the steps' records carry the lowered rate."""
    cfg = make_cfg(*BASE, f"model.path={sft_model_dir}", "reward.rule=sentiment", "learner.lr=0.5",
                   "learner.max_grad_norm=1000", "ppo.kl_target=1.0", "ppo.kl_coef=0.001", "guard.patience=2",
                   "guard.warmup=1", "guard.action=rollback", "guard.rollback_lr_factor=0.002", "guard.max_rollbacks=1",
                   "checkpoint.every=1", "checkpoint.keep=20", "ppo.steps=6", "output.name=rolled_back")
    with PPOTrainer(cfg, progress=False) as tr:
        records = tr.run(evaluate=False)
        (rb,) = tr.summary["guard_rollbacks"]
        assert rb["to_step"] <= rb["at_step"] - 1 and rb["lr"] == pytest.approx(0.001) and rb["alarms"]
        assert any("rolled back to" in r.message and "learner.lr 0.001" in r.message for r in caplog.records)
        # One record per step (the diverged ones were redone); lowered rate from the checkpoint on.
        assert [r["step"] for r in records] == list(range(6))
        assert [r["learner"]["lr"] for r in records] == [0.5] * rb["to_step"] + [pytest.approx(0.001)] * (6 - rb["to_step"])
        assert not any(r["guard"] for r in records[rb["to_step"]:]) and tr.summary["lr_last"] == pytest.approx(0.001)
        saved = json.loads((tr.checkpoint_dir / "state.json").read_text())
        assert saved["lr_scale"] == pytest.approx(0.002) and len(saved["guard_rollbacks"]) == 1
