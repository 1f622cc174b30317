import dataclasses
from pathlib import Path

import pytest

from rlhf_ray.config import Config, ConfigError, dump_config, load_config
from rlhf_ray import config as C

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
        "model", "lora", "peft", "data", "sft", "rm", "rollout", "reward", "reference", "learner", "ppo", "guard",
        "eval", "cluster", "output", "checkpoint", "fleet"}
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
    ("rollout.num_engines=0", "rollout.num_engines"),
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
    ("learner.minibatch_prompts=3", "learner.minibatch_prompts"),  # not divisible by 2 workers
    ("learner.minibatch_prompts=12", "ppo.prompts_per_step"),  # 32 rows are not whole minibatches of 12
    ("output.save_every=-1", "output.save_every"),
    ("reward.rule=nosuch", "reward.rule"),
    ("ppo.estimator=grpo", "rollout.samples_per_prompt"),  # one sample per prompt: no group to compare
    ("ppo.kl_in=advantage", "ppo.kl_in"),
    ("ppo.loss_agg=mean", "ppo.loss_agg"),
    ("ppo.ratio_level=row", "ppo.ratio_level"),
    ("ppo.clip_eps_high=0", "ppo.clip_eps_high"),
    ("rollout.max_staleness=-1", "rollout.max_staleness"),
    ("ppo.tis_cap=-1", "ppo.tis_cap"),
    ("ppo.tis_level=batch", "ppo.tis_level"),
    ("rollout.allocator=jemalloc", "rollout.allocator"),
    ("data.chat_template=Auto", "data.chat_template"),  # a path that is a case-slip of auto
    ("data.chat_template=' chat.jinja'", "data.chat_template"),
    ("data.chat_template=''", "data.chat_template"),
    ("data.over_long=cut", "data.over_long"),
    ("guard.rollback_lr_factor=1.0", "guard.rollback_lr_factor"),
    ("guard.action=rollback", "checkpoint.every is 0"),  # nothing to roll back to
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


def test_chat_template_and_over_long_keys():
    data = load_config().data
    assert (data.chat_template, data.over_long) == ("auto", "truncate")
    for value in ("none", "auto", "templates/chat.jinja", "~/chat.j2"):  # the file is read by the stages
        assert load_config(TINY, [f"data.chat_template={value}"]).data.chat_template == value
    assert load_config(TINY, ["data.over_long=drop"]).data.over_long == "drop"


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
        load_config(TINY, ["clip_eps"])


@pytest.mark.parametrize("text,message", [
    ("lora: [1, 2]\n", "lora: must be a mapping of lora's keys (rank, alpha, dropout, target_modules), got a list"),
    ("lora: 3\n", "lora: must be a mapping of lora's keys"),
    ("ppo:\n  clip_eps: [0.1]\n", "ppo.clip_eps: must be a single value, got a list"),
    ("lora:\n  target_modules: q_proj\n", "lora.target_modules: must be a list such as [a, b]"),
    ("lora:\n  target_modules: [[q_proj]]\n", "lora.target_modules[0]: must be an item of a list, got a list"),
    ("data:\n  keep_labels: [{a: 1}]\n", "data.keep_labels[0]: must be an item of a list, got a mapping"),
    ("ppo:\n  clip_eps: 2020-01-01\n", "ppo.clip_eps: date values are not supported"),
    ("output:\n  name: '???'\n", "output.name: '???' marks a missing value"),
    ("learner:\n  lr: 1" + "0" * 400 + "\n", "learner.lr: out of range, an integer of 1329 bits"),
    ("ppo:\n  yes: 1\n", "ppo.True: a key must be a name, got bool"),
    ("~: 1\n", "None: a key must be a name"),
    ("nosuch: {}\n", "nosuch: unknown section; the sections are model, lora"),
    ("output:\n  name: ${nosuch.key}\n", "output.name: Interpolation key 'nosuch.key' not found"),
    ("ppo:\n  steps: 1\nppo:\n  steps: 2\n", "key 'ppo' given twice (first on line 1)"),
    ("ppo: " + "[" * 3000 + "\n", "cannot parse YAML: maximum recursion depth"),
    ('output:\n  dir: "runs\\0"\n', "output.dir: must not contain a NUL character"),
])
def test_misshapen_yaml_names_file_and_key(tmp_path, text, message):
    """Each of these leaked an OmegaConf, YAML or Python exception, named no key (a section
    as a list: "Merge error: list is not a subclass of LoraConfig"), doubled it (output.output.name)
    or loaded silently ('???', nested lists, a second `ppo:`)."""
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value), err.value


def test_non_utf8_config_names_its_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"ppo:\n  steps: 3\noutput:\n  name: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin1\.yaml: line 4: not UTF-8 text \(byte 0xe9\)"):
        load_config(path)


@pytest.mark.parametrize("override,message", [
    ("lora=3", "override 'lora=3': lora: must be a mapping of lora's keys"),
    ("lora=[1,2]", "override 'lora=[1,2]': lora: must be a mapping"),
    ("lora=null", "override 'lora=null': lora: must be a mapping of lora's keys (rank, alpha, dropout, "
                  "target_modules), got null"),
    ("=3", "override '=3': '' is not a dotted key"),
    ("ppo..steps=3", "'ppo..steps' is not a dotted key"),
    ("ppo.clip_eps=[1", "override 'ppo.clip_eps=[1': ppo.clip_eps: cannot parse the value"),
    ("ppo.clip_eps=" + "9" * 400, "ppo.clip_eps: out of range"),
    ("ppo.steps=" + "9" * 5000, "ppo.steps: cannot parse the value"),
    ("lora.target_modules.5=x", "lora.target_modules: must be a list such as [a, b] (set it whole)"),
    ("rollout.max_lora_rank=20", "rollout.max_lora_rank: must be one of [1, 8, 16, 32, 64, 128, 256, 320, 512]"),
    ("data.seed=-1", "data.seed: must be in [0, 2**31)"),
    ("rollout.seed=4294967296", "rollout.seed: must be in [0, 2**31)"),
    ("output.name=..", "output.name: must be a non-empty name without '/' (and not . or ..)"),
    ("lora.target_modules=[q_proj, '']", "lora.target_modules: every entry must be a module name"),
])
def test_misshapen_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [override])
    assert str(err.value).startswith(str(TINY)) and message in str(err.value), err.value


def test_null_section_means_its_defaults(tmp_path):
    path = tmp_path / "commented.yaml"
    path.write_text("lora:\n  # rank: 4\nppo:\n  steps: 3\n")
    cfg = load_config(path)
    assert cfg.lora == Config().lora and cfg.ppo.steps == 3


def test_off_policy_correction_is_on_by_itself_for_asynchronous_runs():
    assert load_config(TINY, []).tis_cap is None  # synchronous: every sample is the learner's policy
    assert load_config(TINY, ["rollout.max_staleness=1"]).tis_cap == 2.0
    assert load_config(TINY, ["rollout.max_staleness=1", "ppo.tis_cap=3"]).tis_cap == 3.0
    assert load_config(TINY, ["rollout.max_staleness=1", "ppo.tis_cap=0"]).tis_cap is None  # off when asked
    assert load_config(TINY, ["ppo.tis_cap=1.5"]).tis_cap == 1.5


def test_a_minibatch_is_prompts_so_the_group_size_does_not_multiply_the_update():
    one = load_config(TINY, [])
    four = load_config(TINY, ["ppo.estimator=grpo", "rollout.samples_per_prompt=4"])
    steps = [c.learner.epochs * c.ppo.prompts_per_step // c.learner.minibatch_prompts for c in (one, four)]
    assert steps[0] == steps[1] == 4 and (one.minibatch_rows, four.minibatch_rows) == (16, 64)
    with pytest.raises(ConfigError, match="learner.minibatch_prompts: 3 prompts x rollout.samples_per_prompt=1"):
        load_config(TINY, ["learner.minibatch_prompts=3", "ppo.prompts_per_step=30"])
    load_config(TINY, ["learner.minibatch_prompts=3", "ppo.prompts_per_step=30", "rollout.samples_per_prompt=2"])


def test_loss_aggregation_follows_the_estimator_unless_set():
    cfg = load_config(TINY, ["ppo.estimator=dr_grpo", "rollout.samples_per_prompt=4", "ppo.prompts_per_step=8", "learner.minibatch_prompts=4"])
    assert cfg.loss_agg == "seq_mean_token_sum_norm"
    cfg = load_config(TINY, ["ppo.estimator=dr_grpo", "rollout.samples_per_prompt=4", "ppo.prompts_per_step=8", "learner.minibatch_prompts=4",
                             "ppo.loss_agg=token_mean"])
    assert cfg.loss_agg == "token_mean"
    assert load_config(TINY, []).loss_agg == "token_mean"


def test_allocator_preload_follows_the_config_and_the_machine(monkeypatch):
    from rlhf_ray.actors import engine

    monkeypatch.setattr(engine, "tcmalloc_path", lambda: "libtcmalloc_minimal.so.4")
    assert engine.allocator_env(load_config(TINY)) == {"LD_PRELOAD": "libtcmalloc_minimal.so.4"}
    assert engine.allocator_env(load_config(TINY, ["rollout.allocator=system"])) == {}
    assert engine.allocator_env(load_config(TINY, ["rollout.num_gpus=1"])) == {}  # auto: CPU backend only
    monkeypatch.setattr(engine, "tcmalloc_path", lambda: None)  # a machine without it
    assert engine.allocator_env(load_config(TINY)) == {}
    with pytest.raises(ValueError, match="rollout.allocator=tcmalloc.*libtcmalloc-minimal4"):
        engine.allocator_env(load_config(TINY, ["rollout.allocator=tcmalloc"]))


@pytest.mark.parametrize("old,new,value,read", [
    ("rollout.num_actors", "rollout.num_engines", "3", lambda c: c.rollout.num_engines == 3),
    ("ppo.batch_size", "ppo.prompts_per_step", "16", lambda c: c.ppo.prompts_per_step == 16),
    ("learner.minibatch_size", "learner.minibatch_prompts", "8", lambda c: c.learner.minibatch_prompts == 8),
])
def test_a_renamed_key_still_loads_and_warns_once(old, new, value, read, caplog, monkeypatch, tmp_path):
    monkeypatch.setattr(C, "_warned", set())
    with caplog.at_level("WARNING", logger="rlhf_ray.config"):
        assert read(load_config(TINY, [f"{old}={value}"]))
        assert read(load_config(TINY, [f"{old}={value}"]))
    said = [r.getMessage() for r in caplog.records if old in r.getMessage()]
    assert said == [f"{old} is now called {new}; the old name still works"]
    section, key = old.split(".")
    both = tmp_path / "both.yaml"
    both.write_text(f"{section}:\n  {key}: {value}\n  {new.split('.')[1]}: {value}\n")
    with pytest.raises(ConfigError, match=f"{old} and {new} are both given"):
        load_config(both)


def test_the_renamed_reference_mode_still_loads(caplog, monkeypatch):
    monkeypatch.setattr(C, "_warned", set())
    with caplog.at_level("WARNING", logger="rlhf_ray.config"):
        assert load_config(TINY, ["reference.mode=actor"]).reference.mode == "separate"
    assert any("reference.mode=actor is now called reference.mode=separate" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("override,says", [
    ("ppo.clip_epss=0.1", "ppo.clip_epss: unknown key (did you mean 'clip_eps'?)"),
    ("ppo.lr=0.1", "ppo.lr: unknown key (it is sft.lr or rm.lr or learner.lr)"),
    ("ppoo.steps=1", "ppoo: unknown section (did you mean 'ppo'?)"),
    ("ppo.estimator=grop", "got 'grop' (did you mean 'grpo'?)"),
    ("reference.mode=seperate", "got 'seperate' (did you mean 'separate'?)"),
    ("ppo.clip_eps", "give the value after '=' in one word: ppo.clip_eps=VALUE"),
])
def test_errors_suggest_the_name_meant(override, says):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [override])
    assert says in str(e.value)
