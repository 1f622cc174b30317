"""Session fixtures: one Ray head, the tiny model, one SFT run and an untrained reward model per
session, and a warm trainer per module, because each costs tens of seconds on 2 cores; and the two test tiers (see
``tier_guard``): tests marked ``integration`` get the session's Ray head, the others must not
start Ray or vLLM."""
import os
import shutil
import socket
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

from rlhf_ray.config import load_config
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

pytest_plugins = ["durations", "tier_guard"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_head(tiny_cfg):
    """One local Ray head for every test that can share it: free ports (the GCS and the other
    services take ports the OS gives; the dashboard one found here), its own temp dir, started
    and stopped by this fixture alone (``ray.shutdown()`` of the driver that started it).
    Trainers and stages attach to it (launch.connect: "already connected") and leave it running;
    tests that need a cluster of their own (job submit, the two-node rehearsal, a head with
    other settings) start one and say why. ``how``: what the head said it did (its auth)."""
    import types

    import ray

    from rlhf_ray.launch import start_local_head

    if ray.is_initialized():
        raise RuntimeError("Ray was started before the session head: a fixture that uses Ray must "
                           "depend on ray_head (or its test be marked integration)")
    temp = tempfile.mkdtemp(prefix="rr-test-", dir="/tmp")  # short: Ray's socket paths stay < 108 chars
    # 8 logical CPUs: bookkeeping for a module's trainer (2.25) beside an extra learner group.
    how = start_local_head(tiny_cfg, num_cpus=8, _temp_dir=temp, dashboard_port=_free_port())
    try:
        yield types.SimpleNamespace(how=how, temp_dir=temp,
                                    address=ray.get_runtime_context().gcs_address)
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_cfg(tmp_path_factory):
    """The shipped tiny config, with its model and outputs moved under the test's tmp dir."""
    base = tmp_path_factory.mktemp("run")
    return load_config(ROOT / "configs" / "tiny_cpu.yaml", [
        f"model.tiny_dir={base / 'tiny_model'}",
        f"output.dir={base / 'runs'}",
    ])


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_cfg):
    from rlhf_ray.models import resolve_model_path

    return resolve_model_path(tiny_cfg.model)


@pytest.fixture(scope="session")
def untrained_rm(tiny_model_dir, tmp_path_factory):
    """A reward model with a fresh score head on the tiny base: arbitrary but deterministic
    scores, enough for tests of the PPO machinery (the RM stage has tests of its own)."""
    from rlhf_ray.models.reward import build_reward_model

    return str(build_reward_model(tiny_model_dir, tmp_path_factory.mktemp("rm") / "untrained_rm"))


@pytest.fixture(scope="session")
def vllm_engine(tiny_cfg, tiny_model_dir):
    from rlhf_ray.actors.engine import build_engine

    # The rollout actors' log-prob mode: of the distribution sampled from (temperature, top-k/p).
    llm = build_engine(tiny_cfg, tiny_model_dir, logprobs_mode="processed_logprobs")
    yield llm
    del llm


@pytest.fixture(scope="session")
def make_cfg(ray_head, tiny_cfg, tiny_model_dir, untrained_rm, tmp_path_factory):
    """Tiny config for PPO on the session's (un-fine-tuned) model and untrained reward model,
    a fresh output dir, small batches and a small held-out evaluation, plus overrides."""
    def make(*overrides):
        out = tmp_path_factory.mktemp("out")
        return load_config(ROOT / "configs" / "tiny_cpu.yaml", [
            f"model.tiny_dir={tiny_cfg.model.tiny_dir}", f"output.dir={out}", "ppo.base=model",
            f"reward.path={untrained_rm}", "ppo.prompts_per_step=8", "learner.minibatch_prompts=4",
            "eval.num_prompts=4", *overrides])
    return make


@pytest.fixture(scope="session")
def sft_run(ray_head, tiny_cfg, tmp_path_factory):
    """The SFT stage run once per session: (config, summary). The tiny model fine-tuned on the
    generated review task, which test_stages_on_cpu.py checks and trains its reward model on
    (the rm.* sizes are that test's)."""
    from rlhf_ray.stages.sft import run_sft

    cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml", [
        f"model.tiny_dir={tiny_cfg.model.tiny_dir}", f"output.dir={tmp_path_factory.mktemp('sft')}",
        "sft.num_examples=800", "sft.epochs=3", "rm.num_pairs=256", "rm.epochs=2"])
    return cfg, run_sft(cfg, progress=False)


@pytest.fixture(scope="session")
def sft_model_dir(sft_run):
    """A policy that writes task text, so a reward on that text has something to move."""
    return sft_run[1]["output"]


@pytest.fixture(scope="module")
def shared_trainer(make_cfg):
    """One PPOTrainer per module for the tests that only run a few steps on the default settings and
    inspect them (the synchronous loop written out, the reference actor, the step, memory and
    scaling benchmarks): 2 generators, 1 learner worker, the reference in an actor of its own, the
    untrained reward model. Its engines and learner start once a module; every user gets it through
    ``fresh_trainer``. Not session-wide: an idle trainer's actors held the CPU and slowed every
    later module (the two-node rehearsal 143 s -> 320 s, and 120 s to stop at the end)."""
    from rlhf_ray.trainer import PPOTrainer

    cfg = make_cfg("rollout.num_engines=2", "learner.num_workers=1", "reference.mode=separate",
                   "rollout.max_staleness=0", "checkpoint.keep=100", "output.name=shared")
    tr = PPOTrainer(cfg, progress=False)
    try:
        tr.first_checkpoint = tr.save_checkpoint()  # step 0, adapter version 0
        yield tr
    finally:
        tr.close()


@pytest.fixture
def fresh_trainer(shared_trainer):
    """The shared trainer as new: back at its step-0 checkpoint (adapter version 0, the identity;
    optimizer and RNGs as they started; what a resume does, on the live actors), with its two
    generators, whatever the test before did."""
    tr = shared_trainer
    while len(tr.generators) > 2:
        tr.remove_rollout_actor()
    while len(tr.generators) < 2:
        tr.add_rollout_actor()
    tr.restore_checkpoint(tr.first_checkpoint)
    assert (tr.step_index, tr.version) == (0, 0)
    return tr
