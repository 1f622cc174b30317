"""`ray job submit` against a head started with `ray start --head` on loopback, as a user
submits to a cluster: submit, wait for SUCCEEDED, read the job's artifacts, stop the head."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# A head of its own, started with `ray start --head` as on a real cluster, so that the job goes
# through the dashboard's job server and its runtime env as a user's job does.
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    # Ray 2.60 turns token auth on for a head that finds a token (~/.ray/auth_token, left by any
    # earlier local ray.init); the job CLI only sends it when told to. Be explicit on both ends.
    env["RAY_AUTH_MODE"] = "token"
    return env


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _processes_of(temp_dir: str) -> list[psutil.Process]:
    """The head's processes (their command lines name its own temp dir) and their children."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in a for a in (p.info["cmdline"] or [])):
                found += [p, *p.children(recursive=True)]
        except psutil.Error:
            pass
    return found


@pytest.fixture(scope="module")
def ray_head():
    """A head of this module's own (its jobs run one after the other): free ports for every service, its own temp dir, run with
    `ray start --block` so that ending that one process ends this head alone. Never
    `ray stop`, which stops every Ray process of the user on the machine."""
    gcs, dash, client, node, objects, env_agent, agent_grpc, agent_http, metrics = _free_ports(9)
    temp = tempfile.mkdtemp(prefix="rr-head-", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
           f"--node-manager-port={node}", f"--object-manager-port={objects}", f"--runtime-env-agent-port={env_agent}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--dashboard-agent-listen-port={agent_http}",
           f"--metrics-export-port={metrics}", f"--temp-dir={temp}", "--num-cpus=4", "--disable-usage-stats"]
    log = open(Path(temp) / "ray_start.log", "w")
    head = subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=5)
                break
            except urllib.error.HTTPError:  # 401 with token auth on: the dashboard is up
                break
            except OSError:
                if head.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the test's Ray head did not come up:\n"
                                       + (Path(temp) / "ray_start.log").read_text()[-3000:])
                time.sleep(1)
        yield address
    finally:
        leftovers = _processes_of(temp)
        head.terminate()  # the head's node handler drains and ends the processes it started ...
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:  # ... in ~30 s; the test has its results, so end them now
            head.kill()
        for p in leftovers + _processes_of(temp):
            try:
                p.kill()
            except psutil.Error:
                pass
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _submit(address: str, working_dir: Path, *entrypoint: str) -> str:
    """Submit a job, wait for its end; returns its logs (the test fails unless it succeeded)."""
    submit = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--no-wait",
         "--working-dir", str(working_dir), "--runtime-env", str(ROOT / "cluster" / "runtime_env.yaml"), "--",
         sys.executable, "-m", "rlhf_ray.cli", *entrypoint],
        env=_env(), capture_output=True, text=True, timeout=300)
    assert submit.returncode == 0, submit.stderr[-3000:]
    job_id = next(tok for line in submit.stdout.splitlines() for tok in line.replace("'", " ").split()
                  if tok.startswith("raysubmit_"))

    def ray_job(*args):
        r = subprocess.run([str(BIN / "ray"), "job", *args, "--address", address],
                           env=_env(), capture_output=True, text=True, timeout=120)
        return r.stdout + r.stderr  # the CLI prints the job's status on stderr

    final = re.compile(rf"job '{job_id}'(:| has)? (succeeded|failed|stopped)", re.IGNORECASE)
    deadline = time.monotonic() + 900
    status, found = "", None
    while found is None and time.monotonic() < deadline:
        status = ray_job("status", job_id)
        found = final.search(status)
        if found is None:
            time.sleep(5)
    logs = ray_job("logs", job_id)
    assert found is not None and found.group(2).lower() == "succeeded", status + logs[-5000:]
    return logs


def test_ray_job_submit_runs_the_whole_pipeline(ray_head, tmp_path, tiny_model_dir):
    """`rlhf-ray run` (SFT, reward model, PPO with the held-out judge, report) as a Ray job,
    at small sizes: what `make run` does, submitted to a cluster."""
    out = tmp_path / "job_runs"
    logs = _submit(ray_head, ROOT, "run", "--config", "configs/tiny_cpu.yaml",
                   f"model.path={tiny_model_dir}", f"output.dir={out}", "output.name=job",
                   "sft.num_examples=200", "sft.epochs=1", "rm.num_pairs=64", "rm.epochs=1", "eval.num_prompts=4",
                   "ppo.steps=2", "ppo.prompts_per_step=8", "learner.minibatch_prompts=4")
    run = out / "job"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["generated_with_version"] for r in records] == [[0], [1]]
    assert all(r["stale_samples"] == 0 for r in records)
    assert "joined" in logs  # it used the cluster, not a head of its own
    ppo = json.loads((run / "ppo.json").read_text())
    assert ppo["base"] == str(run / "sft_model") and ppo["reward_model"] == str(run / "reward_model")
    assert set(ppo["eval"]) == {"before", "after"}
    report = (run / "report.md").read_text()
    assert "reward model: held-out pair accuracy" in report and "whole pipeline wall time" in report
    assert len(list((run / "plots").glob("*.png"))) == 5
    assert "reward model: held-out pair accuracy" in logs
    # The roles' own output is in the run directory, so the tables end the job's output.
    assert logs.rstrip().splitlines()[-1].startswith("tensorboard --logdir"), logs[-3000:]
    assert "(RolloutGenerator pid=" not in logs and "(RayTrainWorker pid=" not in logs
    assert "vllm" in (run / "logs" / "rollout-0.log").read_text().lower()
    assert (run / "logs" / "sft-rank0.log").is_file() and (run / "logs" / "rm-rank0.log").is_file()
    # Every stage's figures in TensorBoard, as its jsonl file has them.
    from test_tracking_on_cpu import _tensorboard_scalars

    for stage, jsonl in (("sft", "sft_metrics.jsonl"), ("rm", "rm_metrics.jsonl"), ("ppo", "metrics.jsonl")):
        lines = [json.loads(x) for x in (run / jsonl).read_text().splitlines()]
        tb, _ = _tensorboard_scalars(run / "tensorboard" / stage)
        steps = [x for x in lines if "loss" in x] if stage != "ppo" else lines
        key = {"sft": "loss", "rm": "loss", "ppo": "reward_mean"}[stage]
        assert [v for _, v in tb[f"{stage}/{key}"]] == pytest.approx([x[key] for x in steps], rel=1e-6), stage
    assert "rm/heldout/accuracy" in tb_keys(run / "tensorboard" / "rm")


def tb_keys(log_dir):
    from test_tracking_on_cpu import _tensorboard_scalars

    return set(_tensorboard_scalars(log_dir)[0])


# A user's reward function: the exact answer scores 1. It also checks that the record's columns
# are those of the prompt it is given (the question's numbers make the answer), which fails if
# the columns reached another prompt's samples, as an asynchronous step could make them.
USER_REWARD = """
import re


def score(prompts, responses, answer):
    out = []
    for prompt, response, want in zip(prompts, responses, answer):
        a, b = map(int, re.findall(r"\\d+", prompt)[:2])
        expect = a + b if "more" in prompt else a - b
        if int(want.split("####")[1]) != expect:
            raise ValueError(f"the answer column {want!r} is not that of the prompt {prompt!r}")
        got = re.findall(r"-?\\d+", response.split("####")[-1])
        out.append(1.0 if got and int(got[-1]) == expect else 0.0)
    return out
"""


def test_ray_job_submit_runs_the_t5_pipeline(ray_head, tmp_path):
    """configs/tiny_t5_cpu.yaml as a Ray job: the tiny T5 built inside the job, SFT with ROUGE,
    the classifier reward, PPO on transformers engines, the report's ROUGE table."""
    out = tmp_path / "job_runs"
    _submit(ray_head, ROOT, "run", "--config", "configs/tiny_t5_cpu.yaml", f"model.tiny_dir={tmp_path / 't5'}",
            f"output.dir={out}", "output.name=t5", "sft.num_examples=200", "sft.epochs=1", "rm.num_pairs=100",
            "rm.epochs=1", "eval.num_prompts=4", "ppo.steps=2", "ppo.prompts_per_step=8",
            "learner.minibatch_prompts=4", "output.trackers=[jsonl]")
    run = out / "t5"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["stale_samples"] for r in records] == [0, 0] and max(r["logprob_gap"] for r in records) < 1e-4
    ppo = json.loads((run / "ppo.json").read_text())
    assert ppo["rollout_engine"] == "transformers" and set(ppo["eval"]["after"]["judge_parts"]) == {
        "rouge1", "rouge2", "rougeL", "rougeLsum"}
    assert json.loads((run / "rm.json").read_text())["kind"] == "classifier"
    report = (run / "report.md").read_text()
    assert "## ROUGE" in report and "reward classifier" in report and "transformers rollout actors" in report


def test_a_users_own_task_from_another_directory(ray_head, tmp_path):
    """A user's question/answer JSONL and reward function in a directory of their own, trained
    GRPO-style through `ray job submit` with no edit to the package, asynchronously (columns
    travel with samples a version ahead); the reward component reaches metrics and TensorBoard."""
    from rlhf_ray.data.math_task import math_problems

    task = tmp_path / "my_task"
    task.mkdir()
    for name, split, n in (("qa.jsonl", "train", 200), ("qa_test.jsonl", "heldout", 8)):
        (task / name).write_text("".join(json.dumps(p) + "\n" for p in math_problems(n, 1, split)))
    (task / "check_answer.py").write_text(USER_REWARD)
    out = tmp_path / "runs"
    logs = _submit(ray_head, task, "run", "--config", str(ROOT / "configs" / "tiny_cpu_math.yaml"),
                   f"model.tiny_dir={tmp_path / 'tiny_math'}", f"output.dir={out}", "output.name=mine",
                   "sft.data_path=qa.jsonl", "data.prompts_path=qa.jsonl", "eval.prompts_path=qa_test.jsonl",
                   "reward.functions=[{path: check_answer.py:score, name: correct}]",
                   "sft.epochs=1", "ppo.steps=3", "ppo.prompts_per_step=4", "learner.minibatch_prompts=2",
                   "rollout.max_staleness=1", "ppo.tis_cap=2.0")
    run = out / "mine"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(0.0 <= r["reward/correct"] <= 1.0 for r in records)
    assert [r["reward_mean"] for r in records] == [r["reward/correct"] for r in records]  # the only component
    assert max(r["stale_samples"] for r in records) > 0  # asynchronous: samples a version behind were scored
    assert not (run / "reward_model").exists()  # a function alone: no reward model trained or loaded
    ppo = json.loads((run / "ppo.json").read_text())
    assert ppo["reward_model"] is None and ppo["eval"]["after"]["judge"] == "exact_match"
    assert "reward/correct" in ppo["eval"]["after"]
    # The user's file is read whole (no cap unless data.max_prompts is set), and the log says so.
    assert "data.prompts_path: qa.jsonl: read 200, kept 200" in (run / "logs" / "driver.log").read_text()
    tb = tb_keys(run / "tensorboard" / "ppo")
    assert "ppo/reward/correct" in tb, sorted(tb)[:20]
