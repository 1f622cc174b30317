"""Session fixtures: the tiny model is built once and vLLM engines start once per session,
because engine start-up and LoRA warm-up cost tens of seconds on 2 cores."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

from rlhf_ray.config import load_config
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
def make_cfg(tiny_cfg, tiny_model_dir, untrained_rm, tmp_path_factory):
    """Tiny config for PPO on the session's (un-fine-tuned) model and untrained reward model,
    a fresh output dir, small batches and a small held-out evaluation, plus overrides."""
    def make(*overrides):
        out = tmp_path_factory.mktemp("out")
        return load_config(ROOT / "configs" / "tiny_cpu.yaml", [
            f"model.tiny_dir={tiny_cfg.model.tiny_dir}", f"output.dir={out}", "ppo.base=model",
            f"reward.path={untrained_rm}", "ppo.batch_size=8", "learner.minibatch_size=4",
            "eval.num_prompts=4", *overrides])
    return make


@pytest.fixture(scope="session")
def sft_model_dir(tiny_cfg, tmp_path_factory):
    """The tiny model fine-tuned on the generated review task (a few seconds): a policy that
    writes task text, so a reward on that text has something to move."""
    from rlhf_ray.stages.sft import run_sft

    cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml", [
        f"model.tiny_dir={tiny_cfg.model.tiny_dir}", f"output.dir={tmp_path_factory.mktemp('sft')}",
        "sft.num_examples=800", "sft.epochs=3"])
    return run_sft(cfg, progress=False)["output"]
