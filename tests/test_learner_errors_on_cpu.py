"""The learner's and the GPU roles' failure modes that a CPU can reproduce: a rank's own error reported as
itself, once (a rank broken by its peers is left to Ray Train's restart); engine options and role
placement warnings read from the config. The driver's reply loop runs on a plain queue: no Ray here."""
import queue
import threading

import pytest

from rlhf_ray.actors.learner import peer_failure
from rlhf_ray.config import load_config
from rlhf_ray.launch import LearnerGroup, LearnerRestarted, RoleFailed
from tests.test_config_on_cpu import TINY


@pytest.mark.parametrize("error,peer", [
    (RuntimeError("element 0 of tensors does not require grad and does not have a grad_fn"), False),
    (ValueError("a batch with no response tokens"), False),
    (KeyError("value_head"), False),
    (RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.0.0.2]:4711"), True),
    (RuntimeError("NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled system error"), True),
    (ConnectionResetError("reset"), True),
])
def test_peer_failures_are_told_from_the_learners_own_errors(error, peer):
    assert peer_failure(error) is peer


def _group(errors):
    g = LearnerGroup.__new__(LearnerGroup)  # the reply loop only; no Ray Train run behind it
    g.cfg, g.world, g.timeout, g.restarts = load_config(TINY), 2, 5.0, 0
    g.group, g._fresh, g._fresh_group = "g1", {}, None
    g.outbox = queue.Queue()
    for e in errors:
        g.outbox.put(e)
    stop = threading.Event()
    g._thread = threading.Thread(target=stop.wait, daemon=True)
    g._thread.start()
    return g, stop


TB = "Traceback (most recent call last):\n  File \"learner.py\", line 131\nRuntimeError: element 0 of tensors does not require grad\n"


def test_the_learners_own_error_is_reported_at_once_without_a_restart():
    g, stop = _group([("error", 1, 1, {"group": "g1", "traceback": TB, "peer_failure": False})])
    with pytest.raises(RoleFailed) as e:
        g._collect("updated", 1)
    stop.set()
    assert e.value.kind == "raised" and not e.value.recoverable and not isinstance(e.value, LearnerRestarted)
    assert str(e.value).startswith("learner (rank 1) failed: RuntimeError: element 0 of tensors does not require grad")
    assert "not retried" in str(e.value)


def test_a_rank_broken_by_its_peer_waits_for_the_restarted_group():
    gloo = TB.replace("RuntimeError: element 0 of tensors does not require grad", "RuntimeError: Connection closed by peer")
    g, stop = _group([("error", 1, 0, {"group": "g1", "traceback": gloo, "peer_failure": True}),
                      ("ready", None, 0, {"group": "g2", "inbox": "q0", "adapter": ["a"], "value_head": {}}),
                      ("ready", None, 1, {"group": "g2", "inbox": "q1"})])
    with pytest.raises(LearnerRestarted):
        g._collect("updated", 1)
    stop.set()
    assert g.group == "g2" and g.inboxes == ["q0", "q1"] and g.restarts == 1


def test_the_engine_wraps_only_the_adapters_layers_and_asks_for_its_share_of_a_card():
    from rlhf_ray.actors.engine import engine_kwargs

    cfg = load_config(TINY, ["lora.target_modules=[q_proj,v_proj]"])
    assert engine_kwargs(cfg, "m")["lora_target_modules"] == ["q_proj", "v_proj"]
    auto = "rollout.gpu_memory_utilization=null"
    half = load_config(TINY, ["rollout.num_gpus=0.5", auto])
    assert engine_kwargs(half, "m", on_gpu=True)["gpu_memory_utilization"] == 0.45
    assert engine_kwargs(load_config(TINY, ["rollout.num_gpus=1", auto]), "m", on_gpu=True)["gpu_memory_utilization"] == 0.9
    assert engine_kwargs(load_config(TINY, ["rollout.num_gpus=0.5", "rollout.gpu_memory_utilization=0.3"]), "m",
                         on_gpu=True)["gpu_memory_utilization"] == 0.3


def test_a_model_role_left_on_the_cpu_beside_gpus_is_warned_of():
    from rlhf_ray.launch import cpu_role_warnings

    assert cpu_role_warnings(load_config(TINY)) == []  # all on CPU: nothing to say
    gpu = ["rollout.num_gpus=1", "learner.use_gpu=true"]
    said = cpu_role_warnings(load_config(TINY, gpu))
    assert len(said) == 1 and said[0].startswith("reward.num_gpus=0: the reward model runs on the CPU")
    said = cpu_role_warnings(load_config(TINY, [*gpu, "reward.num_gpus=1", "reference.mode=separate"]))
    assert len(said) == 1 and said[0].startswith("reference.num_gpus=0")
    assert cpu_role_warnings(load_config(TINY, [*gpu, "reward.rule=sentiment"])) == []  # no reward model


def test_the_no_gradient_passes_take_more_rows_than_training():
    lc = load_config(TINY, ["learner.micro_batch_size=1"]).learner
    assert lc.inference_rows == 4
    assert load_config(TINY, ["learner.inference_micro_batch_size=16"]).learner.inference_rows == 16


@pytest.mark.parametrize("share,at_once", [(1.0, 3), (0.0, 3), (0.5, 1)])
def test_engines_sharing_cards_are_built_one_at_a_time(share, at_once):
    """vLLM profiles a card's free memory while it builds an engine: two at once on one card
    would each count the other's. The fleet's launch order, with a recording _spawn (no Ray)."""
    from rlhf_ray.fleet import RolloutFleet

    cfg = load_config(TINY, ["rollout.num_engines=3", f"rollout.num_gpus={share}"])
    fleet = RolloutFleet.__new__(RolloutFleet)
    fleet.cfg, fleet.members, fleet._building, fleet.latest_adapter = cfg, [], [], None
    ready_at_spawn = []

    def spawn(slot=None):
        ready_at_spawn.append(len(fleet.members))  # engines ready when this one starts
        return (f"rollout-{len(ready_at_spawn) - 1}", None)

    fleet._spawn = spawn
    fleet._attach = lambda gen: fleet.members.append(gen)
    fleet.launch()
    assert len(fleet._building) == at_once
    fleet.start("adapter-ref")
    assert [n for n, _ in fleet.members] == ["rollout-0", "rollout-1", "rollout-2"]
    assert ready_at_spawn == ([0, 1, 2] if at_once == 1 else [0, 0, 0])
    fleet.launch()  # a full fleet launches no more
    assert fleet._building == [] and len(ready_at_spawn) == 3


def test_a_replacement_engine_waits_for_the_card_its_predecessor_still_holds():
    from rlhf_ray.actors.engine import wait_for_card

    readings = iter([(2, 24), (10, 24), (23, 24)])  # GiB free of 24 as the old engine exits
    slept = []
    assert wait_for_card(0.9, 60, free_total=lambda: next(readings), sleep=slept.append) == 4.0
    assert slept == [2.0, 2.0]
    # It gives up at the start timeout and lets vLLM say what is missing.
    assert wait_for_card(0.9, 6, free_total=lambda: (1, 24), sleep=lambda s: None) == 6.0
    assert wait_for_card(0.5, 60, free_total=lambda: (13, 24), sleep=lambda s: None) == 0.0


def test_an_engines_gpu_memory_is_found_in_its_child_processes():
    import os
    import subprocess
    import sys

    from rlhf_ray.telemetry import gpu_bytes_by_process

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        got = gpu_bytes_by_process(running=[(child.pid, 5 * 2**30), (child.pid + 10**6, 2**30), (os.getpid(), 2**20)])
        # this process and its child, each with its own bytes; another process's card memory is not ours
        assert sorted(got.values()) == [2**20, 5 * 2**30] and got[f"self-{os.getpid()}"] == 2**20
        assert any(k.endswith(f"-{child.pid}") for k in got)
        assert gpu_bytes_by_process() == {}  # no NVML on this machine: nothing, and no error
    finally:
        child.kill()
