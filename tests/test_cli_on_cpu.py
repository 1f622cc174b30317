"""Smoke tests of every CLI command, as a user runs them (subprocess, tiny settings)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_cpu.yaml")


def rlhf_ray(*args, timeout=300, env=None):
    """The console script as a user runs it. It starts a Ray head of its own where it needs one
    (``env={"RAY_ADDRESS": ...}`` makes it join the session's instead)."""
    exe = Path(sys.executable).with_name("rlhf-ray")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def test_help_lists_commands():
    r = rlhf_ray("--help")
    assert r.returncode == 0
    for cmd in ("config", "build-model", "generate"):
        assert cmd in r.stdout


def test_config_prints_resolved_and_rejects_bad_values():
    r = rlhf_ray("config", "--config", TINY, "ppo.clip_eps=0.3")
    assert r.returncode == 0 and "clip_eps: 0.3" in r.stdout
    bad = rlhf_ray("config", "--config", TINY, "ppo.gamma=2")
    assert bad.returncode == 2
    assert "ppo.gamma" in bad.stderr and "tiny_cpu.yaml" in bad.stderr


def test_build_model_then_generate(tmp_path):
    model_dir = tmp_path / "m"
    r = rlhf_ray("build-model", "--config", TINY, f"model.tiny_dir={model_dir}")
    assert r.returncode == 0, r.stderr
    assert (model_dir / "config.json").is_file() and (model_dir / "tokenizer.json").is_file()


@pytest.mark.integration
def test_generate_prints_samples(tiny_model_dir):
    r = rlhf_ray("generate", "--config", TINY, f"model.path={tiny_model_dir}", "--num", "2",
                 "rollout.max_new_tokens=4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count(" -> ") == 2


def test_configs_layer_and_the_default_is_the_embedded_run(tmp_path):
    """`--config` given twice: the second file over the first (a base, then a preset), then the
    overrides; with no --config, the embedded default run's configs/tiny_cpu.yaml."""
    preset = tmp_path / "preset.yaml"
    preset.write_text("ppo:\n  estimator: grpo\n  steps: 7\nrollout:\n  samples_per_prompt: 4\n")
    r = rlhf_ray("config", "--config", TINY, "--config", str(preset), "ppo.steps=9")
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(r.stdout)
    assert cfg["ppo"]["estimator"] == "grpo" and cfg["ppo"]["steps"] == 9  # override over preset over base
    assert cfg["rollout"]["samples_per_prompt"] == 4 and cfg["ppo"]["kl_target"] == 5.0  # the base's own
    assert yaml.safe_load(rlhf_ray("config").stdout) == yaml.safe_load(rlhf_ray("config", "--config", TINY).stdout)
    preset.write_text("ppo:\n  stepz: 7\n")
    r = rlhf_ray("config", "--config", TINY, "--config", str(preset))
    assert r.returncode == 2 and f"{preset}: ppo.stepz: unknown key" in r.stderr


def test_dashed_overrides_are_accepted_and_a_key_without_value_is_answered():
    r = rlhf_ray("config", "--config", TINY, "--ppo.clip_eps=0.15", "--ppo.kl_coef", "0.2")
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(r.stdout)
    assert (cfg["ppo"]["clip_eps"], cfg["ppo"]["kl_coef"]) == (0.15, 0.2)
    bare = rlhf_ray("config", "--config", TINY, "--ppo.clip_eps")
    assert bare.returncode == 2 and "a config key needs a value: ppo.clip_eps=VALUE" in bare.stderr
    spaced = rlhf_ray("config", "--config", TINY, "ppo.clip_eps", "0.1")
    assert spaced.returncode == 2 and "ppo.clip_eps=VALUE" in spaced.stderr


def test_overrides_typed_after_a_sweeps_grid_are_overrides_of_every_trial(monkeypatch):
    from rlhf_ray import cli

    seen = {}

    def sweep(cfg, args):
        seen.update(steps=cfg.ppo.steps, grid=args.grid)
        return 0

    monkeypatch.setitem(cli.COMMANDS, "sweep", (sweep, "x"))
    assert cli.main(["sweep", "--config", TINY, "--grid", "ppo.kl_coef=[0.1,0.2]", "ppo.steps=3"]) == 0
    assert seen == {"steps": 3, "grid": ["ppo.kl_coef=[0.1,0.2]"]}
    assert cli.main(["sweep", "--config", TINY, "--grid", "ppo.kl_coef=[0.1]", "ppo.stepz=3"]) == 2  # checked first


def test_config_explain_prints_the_reference():
    r = rlhf_ray("config", "--explain", "learner")
    assert r.returncode == 0, r.stderr
    assert "learner.minibatch_prompts = 16  (int)" in r.stdout and "ppo." not in r.stdout.split("\n")[1]
    bad = rlhf_ray("config", "--explain", "lerner")
    assert bad.returncode == 2 and "did you mean 'learner'?" in bad.stderr


def test_an_unexpected_error_is_one_line_and_a_log_with_the_traceback(monkeypatch, capsys, tmp_path):
    from rlhf_ray import cli

    def boom(cfg, args):
        raise RuntimeError("the thing broke\nsecond line")

    monkeypatch.setitem(cli.COMMANDS, "config", (boom, "x"))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.delenv("RLHF_RAY_TRACEBACK", raising=False)
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # TMPDIR is read again
    assert cli.main(["config", "--config", TINY]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rlhf-ray: unexpected error: RuntimeError: the thing broke (the traceback is in ")
    log = Path(err[0].split("the traceback is in ")[1].split(";")[0])
    assert log.parent == tmp_path and "Traceback" in log.read_text() and "second line" in log.read_text()


def test_a_rehearsal_short_of_gpus_is_told_to_declare_them_not_to_drop_them():
    from rlhf_ray.launch import shortfalls

    asks = {"GPU": [("rollout.num_gpus=1 x 3", 3.0), ("learner.use_gpu=true x 4", 4.0)]}
    problems, _ = shortfalls(asks, {"GPU": 0.0}, {"GPU": 0.0}, rehearse=True)
    assert "ray start --head --num-gpus 7" in problems[0] and "0/false" not in problems[0]
    problems, _ = shortfalls(asks, {"GPU": 0.0}, {"GPU": 0.0}, rehearse=False)
    assert "set those keys to 0/false" in problems[0]


@pytest.mark.integration
def test_doctor_runs_every_check_on_cpu_and_says_which_it_skipped(tiny_model_dir):
    r = rlhf_ray("doctor", "--config", TINY, f"model.path={tiny_model_dir}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = {line[:42].strip(): line[42:].split(None, 1) for line in r.stdout.splitlines()
            if line[:1].isalpha() and "  " in line}
    for check in ("device", "engine (as a rollout actor builds it)", "learner", "adapter publish and hot swap",
                  "log-probs, engine vs learner (top_p 1.0)", "log-probs, engine vs learner (top_p 0.9)",
                  "learner update (gradient checkpointing)", "two-rank all-reduce"):
        assert rows[check][0] == "pass", (check, rows.get(check))
    assert "engine holds 1 LoRA(s), version 3; 3 distinct outputs of 3" in rows["adapter publish and hot swap"][1]
    gap = float(rows["log-probs, engine vs learner (top_p 0.9)"][1].split()[1].rstrip(","))
    assert gap < 1e-5  # fp32 on a CPU: the engine and the learner agree to float rounding
    assert "gloo" in rows["two-rank all-reduce"][1] and "all checks passed" in r.stdout


def test_a_failing_check_is_its_own_row_and_the_checks_after_it_say_why_they_skipped():
    from rlhf_ray.doctor import _need, _row

    def broken():
        raise RuntimeError("CUDA error: out of memory\nmore")

    assert (_row("engine", broken).result, _row("engine", broken).figures) == ("FAIL", "RuntimeError: CUDA error: out of memory")
    later = _row("publish", lambda: (True, str(_need({}, "gen"))))
    assert later.result == "skipped" and "needs the gen check" in later.figures
    assert _row("gap", lambda: (False, "mean 0.3")).result == "FAIL"
