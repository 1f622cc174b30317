"""The shipped 8x3090 config rehearsed on a simulated cluster of two nodes with four logical
GPUs each (Ray's own cluster utilities: two raylets, two object stores), with a tiny model of
the same family and every device forced to CPU: the real actors, resource requests,
placement groups and Ray Train worker groups, and adapter publishing across nodes."""
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        cluster.shutdown()


@pytest.mark.integration
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
