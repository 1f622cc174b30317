import dataclasses
from pathlib import Path

import pytest

from rlhf_ray.config import Config, ConfigError, dump_config, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_cpu.yaml"


def test_every_shipped_config_loads():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert isinstance(cfg, Config), path


def test_tiny_config_sections_and_overrides():
    cfg = load_config(TINY, ["ppo.clip_eps=0.1", "lora.target_modules=[q_proj,v_proj]", "cluster.address=auto"])
    assert cfg.ppo.clip_eps == 0.1
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.cluster.address == "auto"
    assert {f.name for f in dataclasses.fields(cfg)} == {
        "model", "lora", "data", "sft", "rm", "rollout", "reward", "reference", "learner", "ppo", "eval",
        "cluster", "output"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.ppo.clip_eps = 0.3  # type: ignore[misc]


def test_defaults_without_file_and_roundtrip(tmp_path):
    cfg = load_config()
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(dump_config(cfg))
    assert load_config(dumped) == cfg


@pytest.mark.parametrize("override,key", [
    ("ppo.clip_eps=0", "ppo.clip_eps"),
    ("ppo.clip_eps=-0.1", "ppo.clip_eps"),
    ("ppo.gamma=1.5", "ppo.gamma"),
    ("ppo.lam=-0.01", "ppo.lam"),
    ("learner.lr=0", "learner.lr"),
    ("lora.rank=0", "lora.rank"),
    ("rollout.num_actors=0", "rollout.num_actors"),
    ("learner.num_workers=0", "learner.num_workers"),
    ("ppo.kl_estimator=k7", "ppo.kl_estimator"),
    ("reference.mode=copy", "reference.mode"),
    ("lora.rank=64", "lora.rank"),  # above rollout.max_lora_rank
    ("ppo.clip_eps=nan", "ppo.clip_eps"),
    ("rollout.repetition_penalty=1.1", "rollout.repetition_penalty"),  # the learner cannot model it
    ("rollout.top_k=-1", "rollout.top_k"),
    ("rollout.samples_per_prompt=0", "rollout.samples_per_prompt"),
    ("rollout.kv_cache_mib=0", "rollout.kv_cache_mib"),
    ("ppo.truncated=drop", "ppo.truncated"),
    ("ppo.estimator=magic", "ppo.estimator"),
    ("learner.micro_batch_size=0", "learner.micro_batch_size"),
    ("learner.minibatch_size=3", "learner.minibatch_size"),  # not divisible by 2 workers
    ("learner.minibatch_size=12", "ppo.batch_size"),  # 32 rows are not whole minibatches of 12
    ("output.save_every=-1", "output.save_every"),
    ("reward.rule=nosuch", "reward.rule"),
])
def test_out_of_range_names_file_and_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [override])
    msg = str(err.value)
    assert str(TINY) in msg and key in msg, msg


@pytest.mark.parametrize("override,key", [
    ("ppo.clipeps=0.1", "ppo.clipeps"),
    ("learner.lr=fast", "learner.lr"),
    ("learner.num_workers=1.5", "learner.num_workers"),
    ("nosuch.key=1", "nosuch"),
])
def test_unknown_key_and_wrong_type(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [override])
    assert key in str(err.value) and str(TINY) in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    typo = tmp_path / "typo.yaml"
    typo.write_text("ppo:\n  gama: 0.9\n")
    with pytest.raises(ConfigError, match=r"typo\.yaml: ppo\.gama"):
        load_config(typo)
    broken = tmp_path / "broken.yaml"
    broken.write_text("ppo: [1, 2\n")
    with pytest.raises(ConfigError, match=r"(?s)broken\.yaml: cannot parse YAML.*line"):
        load_config(broken)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        load_config(TINY, ["ppo.clip_eps"])
