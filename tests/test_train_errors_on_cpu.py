"""Bad input to `rlhf-ray train` fails with a clear message before any actor starts."""
import os

import pytest

from test_cli_on_cpu import TINY, rlhf_ray


def test_empty_prompt_set(tmp_path, tiny_model_dir):
    empty = tmp_path / "prompts.jsonl"
    empty.write_text("")
    r = rlhf_ray("train", "--config", TINY, f"model.path={tiny_model_dir}", f"data.prompts_path={empty}",
                 f"output.dir={tmp_path}")
    assert r.returncode == 1 and "the file is empty" in r.stderr


def test_prompt_longer_than_context(tmp_path, tiny_model_dir):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "the film was good"}\n' + '{"prompt": "%s"}\n' % ("the film was good " * 80))
    r = rlhf_ray("train", "--config", TINY, f"model.path={tiny_model_dir}", f"data.prompts_path={prompts}",
                 "data.max_prompt_tokens=1000", f"output.dir={tmp_path}")
    assert r.returncode == 1
    assert "prompt 1" in r.stderr and "context" in r.stderr


def test_unreachable_ray_address(tmp_path, tiny_model_dir):
    r = rlhf_ray("train", "--config", TINY, f"model.path={tiny_model_dir}", f"output.dir={tmp_path}",
                 "cluster.address=127.0.0.1:9")
    assert r.returncode == 1 and "cannot reach the Ray head at '127.0.0.1:9'" in r.stderr


def test_lora_rank_above_engine_max():
    r = rlhf_ray("train", "--config", TINY, "lora.rank=32", "rollout.max_lora_rank=16")
    assert r.returncode == 2 and "lora.rank" in r.stderr and "max_lora_rank=16" in r.stderr
