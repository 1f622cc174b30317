"""Where output goes: a role's stdout/stderr (C-level writes too) into <run>/logs/<role>.log,
its last lines printed with a role failure, and the CLI's --quiet/--verbose levels."""
import logging
import subprocess
import sys

import pytest

from rlhf_ray import cli
from rlhf_ray.launch import RoleFailed
from rlhf_ray.logs import LOG_DIR_ENV, tail


def test_a_role_process_writes_everything_to_its_log_file(tmp_path):
    code = ("import os, sys; from rlhf_ray.logs import redirect_output; print('before'); "
            "redirect_output('rollout-0'); print('from python'); sys.stderr.write('to stderr\\n'); "
            "sys.stdout.flush(); os.write(2, b'from C\\n'); os.system('echo from a child')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, LOG_DIR_ENV: str(tmp_path)})
    assert r.returncode == 0 and r.stdout == "before\n" and r.stderr == ""
    lines = (tmp_path / "rollout-0.log").read_text().splitlines()
    assert sorted(lines) == sorted(["from python", "to stderr", "from C", "from a child"])


def test_tail_reads_the_roles_files_and_learner_ranks(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "reward.log").write_text("".join(f"line {i}\n" for i in range(40)))
    (logs / "learner-rank0.log").write_text("rank 0 says\n")
    (logs / "learner-rank1.log").write_text("rank 1 says\n")
    got = tail(tmp_path, "reward", lines=3)
    assert got.endswith("line 37\nline 38\nline 39") and "line 36" not in got
    assert "rank 0 says" in tail(tmp_path, "learner") and "rank 1 says" in tail(tmp_path, "learner")
    assert tail(tmp_path, "rollout-0") == ""


def test_a_role_failure_prints_the_roles_last_lines(tmp_path, monkeypatch, capsys):
    logs = tmp_path / "r" / "logs"
    logs.mkdir(parents=True)
    (logs / "rollout-1.log").write_text("loading\nRuntimeError: KV cache does not fit\n")

    def fail(cfg, args):
        raise RoleFailed("rollout-1", "actor died: the process exited", "died")

    monkeypatch.setitem(cli.COMMANDS, "train", (fail, ""))
    assert cli.main(["train", f"output.dir={tmp_path}", "output.name=r"]) == 1
    err = capsys.readouterr().err
    assert "rlhf-ray train: rollout-1 failed: actor died" in err
    assert err.rstrip().endswith("RuntimeError: KV cache does not fit")


@pytest.fixture(autouse=True)
def _restore_logging(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)  # --quiet sets it for the process
    yield
    log = logging.getLogger("rlhf_ray")
    for h in [h for h in log.handlers if getattr(h, "_rlhf_console", False)]:
        log.removeHandler(h)


@pytest.mark.parametrize("flag, shown", [("--quiet", {"warn"}), ([], {"warn", "info"}),
                                         ("--verbose", {"warn", "info", "debug"})])
def test_quiet_and_verbose_set_what_the_library_prints(flag, shown, monkeypatch, capsys):
    def speak(cfg, args):
        log = logging.getLogger("rlhf_ray.somewhere")
        log.warning("warn")
        log.info("info")
        log.debug("debug")
        return 0

    monkeypatch.setitem(cli.COMMANDS, "config", (speak, ""))
    assert cli.main(["config", *([flag] if flag else [])]) == 0
    err = capsys.readouterr().err
    assert {w for w in ("warn", "info", "debug") if f"rlhf-ray: {w}\n" in err} == shown
