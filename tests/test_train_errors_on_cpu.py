"""Bad input to `rlhf-ray train` fails with a clear message before any actor starts."""

import pytest

from test_cli_on_cpu import TINY, rlhf_ray


@pytest.fixture
def ppo_args(tmp_path, tiny_model_dir, untrained_rm):
    return ["--config", TINY, f"model.path={tiny_model_dir}", "ppo.base=model", f"reward.path={untrained_rm}",
            f"output.dir={tmp_path}"]


def test_empty_prompt_set(tmp_path, ppo_args):
    empty = tmp_path / "prompts.jsonl"
    empty.write_text("")
    r = rlhf_ray("train", *ppo_args, f"data.prompts_path={empty}")
    assert r.returncode == 1 and "data.prompts_path" in r.stderr and "the file is empty" in r.stderr


def test_prompt_longer_than_context(tmp_path, ppo_args):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "the film was good"}\n' + '{"prompt": "%s"}\n' % ("the film was good " * 80))
    r = rlhf_ray("train", *ppo_args, f"data.prompts_path={prompts}", "data.max_prompt_tokens=1000")
    assert r.returncode == 1
    assert "prompt 1" in r.stderr and "context" in r.stderr


def test_malformed_prompt_record_stops_with_its_line(tmp_path, ppo_args):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "the film was"}\n{"prompt": 3}\n')
    r = rlhf_ray("train", *ppo_args, f"data.prompts_path={prompts}", "data.on_bad_record=error")
    assert r.returncode == 1 and f"{prompts}:2: 'prompt' is not text" in r.stderr


def test_unreachable_ray_address(ppo_args):
    r = rlhf_ray("train", *ppo_args, "cluster.address=127.0.0.1:9")
    assert r.returncode == 1 and "cannot reach the Ray head at '127.0.0.1:9'" in r.stderr


def test_train_before_sft_and_rm_says_what_to_run(tmp_path, tiny_model_dir, untrained_rm):
    r = rlhf_ray("train", "--config", TINY, f"model.path={tiny_model_dir}", f"output.dir={tmp_path}",
                 f"reward.path={untrained_rm}")
    assert r.returncode == 1 and "no SFT model at" in r.stderr and "rlhf-ray sft" in r.stderr
    r = rlhf_ray("train", "--config", TINY, f"model.path={tiny_model_dir}", f"output.dir={tmp_path}",
                 "ppo.base=model")
    assert r.returncode == 1 and "no trained reward model at" in r.stderr and "rlhf-ray train-rm" in r.stderr


def test_lora_rank_above_engine_max():
    r = rlhf_ray("train", "--config", TINY, "lora.rank=32", "rollout.max_lora_rank=16")
    assert r.returncode == 2 and "lora.rank" in r.stderr and "max_lora_rank=16" in r.stderr


@pytest.mark.integration
def test_gpu_asked_for_on_a_cluster_without_one(ppo_args, ray_head):
    """Before any actor starts: the roles that want GPUs, against what the cluster has (the
    session's head, joined as a job joins a cluster)."""
    r = rlhf_ray("train", *ppo_args, "learner.use_gpu=true", "rollout.num_gpus=1",
                 env={"RAY_ADDRESS": ray_head.address})
    assert r.returncode == 1, r.stderr[-2000:]
    assert "the run asks for 4 GPUs (rollout.num_gpus=1 x 2, learner.use_gpu=true x 2)" in r.stderr
    assert "the Ray cluster has 0" in r.stderr


@pytest.mark.integration
def test_too_few_logical_cpus_fails_in_seconds(ppo_args):
    """Tried as a new user would: a 1-CPU head and the default roles used to wait until
    cluster.call_timeout_s and then fail naming no cause. A head of its own (cluster.num_cpus=1),
    started by the subprocess as a run without a cluster starts one."""
    import time

    t = time.monotonic()
    r = rlhf_ray("train", *ppo_args, "cluster.num_cpus=1")
    assert r.returncode == 1, r.stderr[-2000:]
    assert ("the run asks for 2.25 logical CPUs (rollout.num_cpus=0.5 x 2, reward.num_cpus=0.25, "
            "learner.num_cpus_per_worker=0.5 x 2) but the Ray cluster has 1") in r.stderr
    assert time.monotonic() - t < 120


def test_role_without_cuda_names_itself():
    """Ray can declare logical GPUs on a machine without CUDA; a role given one says so."""
    from rlhf_ray.devices import role_device

    assert str(role_device("reward", 0, "reward.num_gpus=0")) == "cpu"
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match=r"reward: reward.num_gpus=1 but CUDA is not available"):
            role_device("reward", 1, "reward.num_gpus=1")


@pytest.mark.integration
def test_run_checks_every_stage_before_sft(tmp_path, ray_head):
    """`run` used to train SFT and the reward model and only then find that the PPO roles do not
    fit the cluster; now every stage's resources are checked before the first starts."""
    r = rlhf_ray("run", "--config", TINY, f"output.dir={tmp_path}", "output.name=r", "learner.num_cpus_per_worker=8",
                 env={"RAY_ADDRESS": ray_head.address})
    assert r.returncode == 1, r.stderr[-2000:]
    assert "learner.num_cpus_per_worker=8 x 2" in r.stderr and "but the Ray cluster has 8" in r.stderr
    assert not (tmp_path / "r" / "sft_model").exists() and "sft:" not in r.stdout


def test_an_earlier_run_is_not_replaced_unless_asked(tmp_path, ppo_args):
    """A rerun with the same output.name used to delete the earlier run's checkpoints; now it is
    refused in seconds (before Ray starts: this is a fast test), naming --resume and --overwrite."""
    run = tmp_path / "tiny_cpu"
    (run / "adapter").mkdir(parents=True)
    (run / "checkpoints" / "step-000004").mkdir(parents=True)
    (run / "checkpoints" / "step-000004" / "state.json").write_text("{}")  # what marks one complete
    for cmd in ("train", "run"):
        r = rlhf_ray(cmd, *ppo_args)
        assert r.returncode == 1, r.stderr[-2000:]
        assert (f"{run} holds an earlier run (1 checkpoint(s) and its adapter): `rlhf-ray train --resume` continues it, "
                "--overwrite replaces it, or set another output.name") in r.stderr
    assert (run / "adapter").is_dir() and (run / "checkpoints" / "step-000004").is_dir()
