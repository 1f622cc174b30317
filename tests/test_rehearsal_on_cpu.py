"""The shipped 8x3090 config rehearsed on a simulated cluster of two nodes with four logical
GPUs each (Ray's own cluster utilities: two raylets, two object stores), with a tiny model of
the same family and every device forced to CPU: the real actors, resource requests,
placement groups and Ray Train worker groups, and adapter publishing across nodes."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import _free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def two_nodes():
    """Two nodes of 8 logical CPUs and 4 logical GPUs, on free ports; shut down (these
    nodes alone) at the end."""
    from ray.cluster_utils import Cluster

    node = {"num_cpus": 8, "num_gpus": 4, "object_store_memory": 300 * 2**20}
    cluster = Cluster(initialize_head=True, head_node_args={
        **node, "gcs_server_port": _free_port(), "include_dashboard": True, "dashboard_port": _free_port()})
    try:
        cluster.add_node(**node)
        yield cluster
    finally:
        import ray
        from ray.experimental import internal_kv

        # Cluster.shutdown() also clears this process's internal-KV client and Ray address, which
        # belong to the session's head (conftest.ray_head) that this process is connected to:
        # without them Ray Train and the trainers still running on that head stall. Put them back.
        kv = internal_kv.internal_kv_get_gcs_client()
        cluster.shutdown()
        if ray.is_initialized() and kv is not None:
            internal_kv._initialize_internal_kv(kv)


@pytest.mark.integration
@pytest.mark.slow  # a cluster of its own: two simulated nodes with logical GPUs, which the session's head has not
def test_8x3090_config_rehearsed_on_two_nodes_of_four(two_nodes, tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "rlhf_ray.cli", "run", "--rehearse", "--config",
         str(ROOT / "configs/llama2_7b_lora_8x3090.yaml"), f"cluster.address={two_nodes.address}",
         f"output.dir={tmp_path}"],
        capture_output=True, text=True, timeout=1500, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-6000:]
    assert "rehearsal: 3 rollout engines x 1 GPU" in r.stdout
    run = tmp_path / "llama2_7b_lora_8x3090_rehearsal"
    where = json.loads((run / "placement.json").read_text())
    learners = [where[f"learner-{i}"] for i in range(4)]
    roles = [where[f"rollout-{i}"] for i in range(3)] + [where["reward"]]
    # One GPU each, as on the real cluster; the learner ranks together on one node (their
    # all-reduce stays inside it), the engines and the reward model on the other.
    for group in (learners, roles):
        assert all(len(w["gpu_ids"]) == 1 for w in group), where
        assert len({w["node_id"] for w in group}) == 1, where
        assert len({w["gpu_ids"][0] for w in group}) == len(group), where
    assert learners[0]["node_id"] != roles[0]["node_id"], where
    ppo = json.loads((run / "ppo.json").read_text())
    assert ppo["rehearsal"] is True and ppo["steps"] == 2
    # Every engine on the other node served the adapter version of its step: publishing
    # crossed nodes and no sample came from a stale adapter.
    assert ppo["stale_samples"] == 0 and ppo["logprob_gap_max"] < 1e-3
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    for stage in ("sft", "rm"):
        s = json.loads((run / f"{stage}.json").read_text())
        assert s["workers"] == 8 and s["use_gpu"] is True, s


def test_role_bundles_one_per_gpu_fractional_roles_share_a_card():
    from rlhf_ray.config import load_config
    from rlhf_ray.launch import role_bundles

    cfg = load_config(ROOT / "configs/llama2_7b_lora_8x3090.yaml")
    bundles, index = role_bundles(cfg)
    assert bundles == [{"GPU": 1.0, "CPU": 0.5}] * 3 + [{"GPU": 1.0, "CPU": 0.25}]
    assert index == {"rollout-0": 0, "rollout-1": 1, "rollout-2": 2, "reward": 3}
    # Half-card engines pair up; the reward model's half joins the odd one out; a reference
    # actor without a GPU gets a CPU bundle of its own.
    cfg = load_config(ROOT / "configs/llama2_7b_lora_8x3090.yaml", [
        "rollout.num_gpus=0.5", "reward.num_gpus=0.5", "reference.mode=separate", "reference.num_gpus=0"])
    bundles, index = role_bundles(cfg)
    assert bundles == [{"GPU": 1.0, "CPU": 1.0}, {"GPU": 1.0, "CPU": 0.75}, {"CPU": 0.25}]
    assert index == {"rollout-0": 0, "rollout-1": 0, "rollout-2": 1, "reward": 1, "reference": 2}
    # On a laptop nothing asks for a GPU: one CPU bundle per role.
    bundles, _ = role_bundles(load_config(ROOT / "configs/tiny_cpu.yaml"))
    assert bundles == [{"CPU": 0.5}, {"CPU": 0.5}, {"CPU": 0.25}]


def test_rehearsal_config_keeps_every_request_and_shrinks_the_sizes(tmp_path):
    from rlhf_ray.config import load_config
    from rlhf_ray.launch import resource_requests
    from rlhf_ray.rehearse import rehearsal_config

    cfg = load_config(ROOT / "configs/llama31_8b_lora_8x3090.yaml", [f"output.dir={tmp_path}"])
    reh = rehearsal_config(cfg)
    assert resource_requests(reh) == resource_requests(cfg)
    for section in ("sft", "rm"):
        a, b = getattr(cfg, section), getattr(reh, section)
        assert (a.num_workers, a.use_gpu, a.num_cpus_per_worker) == (b.num_workers, b.use_gpu, b.num_cpus_per_worker)
    assert reh.cluster.rehearse and reh.model.dtype == "float32" and reh.ppo.steps <= 2
    from transformers import AutoConfig

    tiny = AutoConfig.from_pretrained(reh.model.path)
    assert tiny.model_type == "llama" and tiny.hidden_size == cfg.model.tiny_hidden
    # Llama-3.1's grouped-query attention (32 query heads, 8 KV heads) stays grouped.
    assert tiny.num_attention_heads // tiny.num_key_value_heads == 2
    rope = json.loads((Path(reh.model.path) / "config.json").read_text())
    assert "500000" in json.dumps(rope)  # the family's rotary base, wherever transformers files it


@pytest.mark.integration
@pytest.mark.slow  # on the same two simulated nodes
def test_a_sweep_rehearsed_on_two_nodes_shares_one_fleet_beside_its_learners(two_nodes, tmp_path):
    """Two trials of the 8x3090 config on one fleet of two generators: 2 GPUs for the fleet, and
    per trial 2 learner ranks and the reward role, 8 in all. The planner says so first."""
    layout = ["ppo.base=model", "reward.rule=letter_e", "rollout.num_engines=2", "learner.num_workers=2",
              "fleet.max_runs=2"]
    config = str(ROOT / "configs/llama2_7b_lora_8x3090.yaml")
    plan = subprocess.run([sys.executable, "-m", "rlhf_ray.cli", "plan", "--fleet", "--gpus", "8", "--config", config,
                           *layout], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert plan.returncode == 0, plan.stdout[-3000:] + plan.stderr[-3000:]
    assert "each needs 3 GPU(s)" in plan.stdout and "6 left -> 2 run(s) at once" in plan.stdout, plan.stdout
    r = subprocess.run(
        [sys.executable, "-m", "rlhf_ray.cli", "sweep", "--rehearse", "--config", config,
         "--grid", "ppo.kl_coef=[0.05,0.2]", *layout, f"cluster.address={two_nodes.address}",
         f"output.dir={tmp_path}"], capture_output=True, text=True, timeout=1500, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-6000:]
    sweep_dir = tmp_path / "llama2_7b_lora_8x3090_rehearsal"
    summary = json.loads((sweep_dir / "sweep.json").read_text())
    assert [t["status"] for t in summary["trials"]] == ["ok", "ok"], summary["trials"]
    for t in summary["trials"]:
        # the generators on their GPUs served each trial its own adapter versions, across nodes
        assert t["steps"] == 2 and t["stale_samples"] == 0 and t["logprob_gap_max"] < 1e-3, t
        where = json.loads((Path(t["run_dir"]) / "placement.json").read_text())
        learners = [where[f"learner-{i}"] for i in range(2)]
        assert all(len(w["gpu_ids"]) == 1 for w in [*learners, where["reward"]]), where
        assert not any(k.startswith("rollout-") for k in where), where  # no engines of its own
        fleet = {k: w for k, w in where.items() if ":gen-" in k}
        assert len(fleet) == 2 and all(len(w["gpu_ids"]) == 1 for w in fleet.values()), where
    assert summary["fleet_after"]["slots_used"] == 0
