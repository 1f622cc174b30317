"""The PPO loop on a real local Ray: 2 vLLM-CPU rollout actors, a reward actor and a
2-worker Ray Train learner (gloo DDP). One trainer serves the whole module; its last test
resumes the run from a checkpoint in a second trainer."""
import json
import os
import signal

import psutil
import pytest
import ray
import torch

from rlhf_ray.checkpoint import list_checkpoints, load_checkpoint
from rlhf_ray.fleet import request_seed
from rlhf_ray.launch import RoleFailed
from rlhf_ray.trainer import PPOTrainer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trainer(make_cfg):
    # A large learning rate makes consecutive adapter versions clearly different, so a
    # generator serving a stale version could not hide inside the log-prob tolerance.
    cfg = make_cfg("rollout.num_engines=2", "learner.num_workers=2", "learner.lr=0.02", "learner.epochs=2",
                   "checkpoint.every=2", "checkpoint.keep=100", "cluster.max_role_restarts=2")
    tr = PPOTrainer(cfg, progress=False)
    yield tr
    tr.close()


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


def test_trackers_and_the_ray_dashboard_get_the_step_figures(trainer, records):
    """TensorBoard (on by default) holds each step's figures as metrics.jsonl has them, the
    held-out evaluation under eval/, and the driver's gauges reach the node's Prometheus endpoint."""
    import time
    import urllib.request

    from test_tracking_on_cpu import _tensorboard_scalars

    tb, _ = _tensorboard_scalars(trainer.run_dir / "tensorboard" / "ppo")
    lines = [json.loads(x) for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    for key in ("reward_mean", "kl_per_seq", "samples_per_s", "logprob_gap"):
        assert [s for s, _ in tb[f"ppo/{key}"]][-len(lines):] == [r["step"] for r in lines], key
        assert [v for _, v in tb[f"ppo/{key}"]][-len(lines):] == pytest.approx([r[key] for r in lines], rel=1e-6)
    assert tb["ppo/time_s/generate"][-1][1] == pytest.approx(lines[-1]["time_s"]["generate"], rel=1e-6)
    judge = dict(tb["eval/judge_score"])
    assert judge[0] == pytest.approx(trainer.evals["before"]["judge_score"])
    assert judge[len(records)] == pytest.approx(trainer.evals["after"]["judge_score"])

    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])
    want = f'run="{trainer.cfg.output.name}"'
    deadline, text = time.monotonic() + 90, ""
    while time.monotonic() < deadline:  # Ray exports on an interval (seconds)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        found = [line for line in text.splitlines() if line.startswith("ray_rlhf_adapter_version") and want in line]
        if found and float(found[0].rsplit(" ", 1)[1]) == trainer.version:
            break
        time.sleep(3)
    else:
        raise AssertionError("ray_rlhf_adapter_version not exported: "
                             + "\n".join(x for x in text.splitlines() if "rlhf" in x)[:2000])
    assert any(line.startswith("ray_rlhf_samples_per_s") and want in line for line in text.splitlines())


def test_every_role_writes_its_output_to_the_run_directory(trainer, records):
    """Engines, reward and learner ranks log to <run>/logs, not to the driver's screen."""
    logs = trainer.run_dir / "logs"
    for name in ("rollout-0", "rollout-1", "reward", "learner-rank0", "learner-rank1"):
        assert (logs / f"{name}.log").is_file(), sorted(p.name for p in logs.iterdir())
    assert "vllm" in (logs / "rollout-0.log").read_text().lower()  # the engine's own messages
    assert (logs / "ray").is_symlink() and any((logs / "ray").glob("raylet*"))


def test_startup_is_broken_down_and_engines_run_in_process(trainer):
    from rlhf_ray.actors.engine import tcmalloc_path

    parts = trainer.startup_parts
    assert {"checks", "ray", "placement", "spawn", "learner", "engines", "roles", "total"} <= set(parts)
    waited = sum(v for k, v in parts.items() if k not in ("total", "built_in"))
    assert abs(waited - parts["total"]) < 1e-6 and parts["total"] <= trainer.startup_s
    assert set(parts["built_in"]) == {"rollout-0", "rollout-1"} and all(v > 0 for v in parts["built_in"].values())
    for name, m in trainer.fleet.memory().items():
        # On CPU the engine's core and worker live in the generator's process: no child processes.
        assert list(m["rss_by_process"]) == [f"self-{m['pid']}"], (name, m["rss_by_process"])
        maps = {x.path for x in psutil.Process(m["pid"]).memory_maps()}
        # rollout.allocator=auto preloads tcmalloc into the generators where the machine has it.
        assert any("tcmalloc" in x for x in maps) == (tcmalloc_path() is not None), name


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


def test_local_head_dashboard_is_local_and_ray_asks_for_a_token(trainer, ray_head, tmp_path):
    """A local head as a run starts it (launch.start_local_head, which started the session's head
    this trainer attached to): its dashboard (which takes job submissions) listens on 127.0.0.1
    only, and a process without the auth token cannot join it."""
    import subprocess
    import sys

    info = ray._private.worker.global_worker.node.address_info
    assert info["webui_url"].split(":")[0] == "127.0.0.1"
    assert trainer.how_connected == "already connected" and "token authentication" in ray_head.how
    join = [sys.executable, "-c", f"import ray; ray.init(address={info['gcs_address']!r}); print('JOINED')"]
    insider = subprocess.run(join, capture_output=True, text=True, timeout=300)  # has the token
    assert "JOINED" in insider.stdout, insider.stderr[-2000:]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(HOME=str(tmp_path), RAY_ADDRESS="")  # no ~/.ray/auth_token there
    outsider = subprocess.run(join, env=env, capture_output=True, text=True, timeout=300)
    assert outsider.returncode != 0 and "JOINED" not in outsider.stdout


def test_checkpoints_hold_what_the_next_step_needs(trainer, records):
    found = [p.name for p in list_checkpoints(trainer.run_dir)]
    assert found[:2] == ["step-000002", "step-000004"]
    ck = load_checkpoint(trainer.run_dir / "checkpoints" / "step-000004")
    assert ck.adapter.version == 4 and ck.state["metrics_lines"] == 4 and ck.state["eval_before"]
    assert ck.value_head and ck.learner["optimizer"]["state"]  # Adam's moments, per trainable tensor
    # The adaptive KL controller's value as it had moved (verl and OpenRLHF lose it on resume).
    assert ck.state["kl_coef"] != trainer.cfg.ppo.kl_coef


def test_short_soak_keeps_memory_and_adapters_flat(trainer, records):
    """`rlhf-ray bench soak` in short: a publish every step leaves nothing behind."""
    from benchmarks.soak import measure

    res = measure(trainer, steps=8, early=2)
    print(f"RSS growth step 2 -> 8: {res['rss_growth']}; object store: {res['store_growth']}")
    assert res["targets"]["adapters_flat"]["met"], res["last"]["generators"]
    assert res["store_growth"] is not None and res["store_growth"] <= 0.10
    assert max(res["rss_growth"].values()) <= 0.10, res["rss_growth"]


def test_generator_killed_mid_step_is_replaced_and_its_share_redone(trainer, records):
    """Killed after the requests are dispatched and before any reply: a new generator loads the
    latest adapter and generates the lost share again; with per-request seeds the samples are
    the ones an undisturbed fleet makes, none lost, none twice."""
    fleet = trainer.fleet
    # Enough work that the victim cannot have answered before the kill lands.
    ids, texts = trainer.prompt_ids[:12], trainer.prompt_texts[:12]
    seeds = [request_seed(11, 99, j) for j in range(12)]
    clean = fleet.generate(ids, texts, n=2, seeds=seeds)
    victim, handle = fleet.members[0]
    fleet.after_dispatch = lambda: ray.kill(handle)
    try:
        got = fleet.generate(ids, texts, n=2, seeds=seeds)
    finally:
        fleet.after_dispatch = None
    assert fleet.replaced and fleet.replaced[-1][0] == victim
    assert victim not in [name for name, _ in fleet.members] and len(fleet.members) == 2
    assert got.prompt_index == clean.prompt_index == [j for j in range(12) for _ in range(2)]
    assert got.response_ids == clean.response_ids
    assert got.versions == clean.versions == [trainer.version] * 24
    rec = trainer.step()
    assert rec["stale_samples"] == 0 and rec["samples"] == 8 and rec["logprob_gap"] < 1e-4
    assert rec["rollout_replaced"] == 1


def test_hung_generator_is_replaced_like_a_dead_one(trainer, records):
    """A generator that stops answering (here: busy in a 10-minute call queued before the step's
    requests) is given up after the call deadline, killed and replaced; its share is made again."""
    import time

    fleet = trainer.fleet
    ids, texts = trainer.prompt_ids[:12], trainer.prompt_texts[:12]
    seeds = [request_seed(12, 99, j) for j in range(12)]
    clean = fleet.generate(ids, texts, n=2, seeds=seeds)
    victim, handle = fleet.members[0]
    handle.__ray_call__.remote(lambda self: time.sleep(600))
    fleet.timeout, deadline = 20.0, fleet.timeout  # a healthy share takes about a second
    try:
        t = time.perf_counter()
        got = fleet.generate(ids, texts, n=2, seeds=seeds)
        took = time.perf_counter() - t
    finally:
        fleet.timeout = deadline
    assert fleet.replaced[-1][0] == victim and "no answer within" in fleet.replaced[-1][2]
    assert victim not in [name for name, _ in fleet.members] and len(fleet.members) == 2
    assert took < 600  # it did not wait for the hung call
    assert got.prompt_index == clean.prompt_index and got.response_ids == clean.response_ids
    assert got.versions == [trainer.version] * 24


def test_reward_actor_restarts_and_the_call_is_retried(trainer, records):
    pid = ray.get(trainer.reward.memory_stats.remote())["pid"]
    ray.kill(trainer.reward, no_restart=False)  # as a crash: Ray starts it again
    rec = trainer.step()
    assert rec["samples"] == 8 and rec["nonfinite"] == [] and rec["reward_std"] > 0
    assert rec["memory"]["reward"]["pid"] != pid  # a new process answered


def test_dead_actor_is_reported_with_its_role(trainer, records):
    """A generator dying after the fleet used both its replacements (cluster.max_role_restarts=2)."""
    name, handle = trainer.generators[-1]
    ray.kill(handle)
    with pytest.raises(RoleFailed, match=f"{name} failed.*max_role_restarts=2"):
        trainer.step()


def test_reward_actor_past_its_restarts_is_reported_and_the_checkpoint_stays_valid(trainer, records):
    from rlhf_ray.batch import Samples

    ray.kill(trainer.reward, no_restart=True)  # as a crash Ray may not restart from
    s = Samples(prompts=["the film was"], responses=[" good"])
    with pytest.raises(RoleFailed, match=r"reward failed: actor died.*max_role_restarts=2 restarts"):
        trainer.maker.score(s)
    last = load_checkpoint(list_checkpoints(trainer.run_dir)[-1])  # every 2 steps, and none of a failed step
    assert last.step == trainer.step_index - trainer.step_index % 2 and last.adapter.version == last.step


def test_resume_matches_an_uninterrupted_run(trainer, records, caplog):
    """Steps 0-3 ran in one go; a second trainer resumed at the step-2 checkpoint makes steps 2-3
    again and ends with the same adapter and optimizer state, to the last bit."""
    run_dir, cfg = trainer.run_dir, trainer.cfg
    uninterrupted = load_checkpoint(run_dir / "checkpoints" / "step-000004")
    trainer.close()
    with PPOTrainer(cfg, progress=False, resume=run_dir / "checkpoints" / "step-000002") as tr:
        assert (tr.step_index, tr.version) == (2, 2)
        assert tr.evals["before"] == uninterrupted.state["eval_before"]
        new = tr.run(steps=2, evaluate=False)
        assert [r["step"] for r in new] == [2, 3]
        assert [r["generated_with_version"] for r in new] == [[2], [3]]  # served the checkpoint's adapter first
        assert [r["reward_mean"] for r in new] == [r["reward_mean"] for r in records[2:4]]
        resumed = load_checkpoint(run_dir / "checkpoints" / "step-000004")

        # A learner worker's process killed: Ray Train restarts the group (FailureConfig) and the
        # run goes back to the step-4 checkpoint; generators and learner then agree again.
        os.kill(tr.learner.memory()[1]["pid"], signal.SIGKILL)
        rec = tr.step()
        assert any("restarted the learner" in r.message and "continuing from" in r.message for r in caplog.records)
        assert (rec["step"], rec["generated_with_version"], rec["learner_restarts"]) == (4, [4], 1)
        assert rec["logprob_gap"] < 1e-4 and rec["stale_samples"] == 0
        assert rec["param_checksums"][0] == rec["param_checksums"][1]
    assert resumed.adapter.tensors.keys() == uninterrupted.adapter.tensors.keys()
    for k, v in uninterrupted.adapter.tensors.items():
        assert torch.equal(resumed.adapter.tensors[k], v), k
    for k, v in uninterrupted.value_head.items():
        assert torch.equal(resumed.value_head[k], v), k
    for i, st in uninterrupted.learner["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(resumed.learner["optimizer"]["state"][i][k], v), (i, k)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1, 2, 3, 4]  # step 4 made after the restart
