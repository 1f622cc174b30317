"""A generator fleet shared by several runs (rlhf_ray/shared_fleet.py) and sweeps on it
(rlhf_ray/sweep.py): the slot table and the fair queue as pure functions, then one real
fleet (a vLLM engine, detached actors on the session's head) that a killed driver's run and
a three-trial Ray Tune sweep with a crashing trial attach to."""
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rlhf_ray.config import ConfigError, load_config
from rlhf_ray.shared_fleet import FairQueue, FleetFull, Request, SlotTable, lora_slots
from rlhf_ray.sweep import parse_grid, trial_specs

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_cpu.yaml")


def test_slots_are_reserved_per_run_and_a_full_fleet_says_who_holds_them():
    table = SlotTable(lora_slots(2, 1), max_staleness=1)
    assert table.reserve("a", 1) == 2 and table.reserve("b", 0) == 1
    with pytest.raises(FleetFull, match=r"run 'c' needs 2 LoRA slot.*1 of 4 are free \(held: a: 2, b: 1\)"):
        table.reserve("c", 1)
    with pytest.raises(ValueError, match="already attached"):
        table.reserve("a", 0)
    with pytest.raises(ValueError, match="exceeds the fleet's fleet.max_staleness=1"):
        table.reserve("d", 2)
    assert table.release("a") and table.reserve("c", 1) == 2
    assert len({table.new_id() for _ in range(5)}) == 5  # ids never repeat: vLLM caches adapters by id


def _req(run, prompts, n=1):
    return Request(run, 0, [[1]] * prompts, None, n, {})


def test_a_deep_queue_does_not_starve_a_shallow_one_and_shares_weight_them():
    q = FairQueue()
    q.add_run("deep")
    q.add_run("shallow")
    q.push(_req("deep", 100))
    q.push(_req("shallow", 4))
    first = q.take(8)
    assert sum(it.request.run == "shallow" for it in first) == 4  # half the round is its
    q2 = FairQueue()
    q2.add_run("a", share=3.0)
    q2.add_run("b", share=1.0)
    q2.push(_req("a", 100))
    q2.push(_req("b", 100))
    taken = [it.request.run for _ in range(10) for it in q2.take(8)]
    assert taken.count("a") == pytest.approx(3 * taken.count("b"), rel=0.15)
    # a prompt whose adapter is not loaded yet waits; the others go past it
    q3 = FairQueue()
    q3.add_run("a")
    waiting, ready = _req("a", 1), _req("a", 2)
    waiting.version = 7
    q3.push(waiting)
    q3.push(ready)
    got = q3.take(8, ready=lambda it: it.request.version == 0)
    assert [it.request for it in got] == [ready, ready] and q3.depth("a") == 1


def test_the_fleet_benchmarks_steady_rate_leaves_start_up_out_and_counts_overlap_once():
    from benchmarks.fleet import generation_share, steady

    def run(ends, samples=32):
        return [{"ended_at": t, "samples": samples, "time_s": {"generate": 1.0, "total": 4.0}} for t in ends]

    # side by side: spans 10-20 and 15-25 cover 15 s; the first steps (start-up) are left out
    together = steady([run([10, 15, 20]), run([15, 20, 25])])
    assert together == {"steady_s": 15.0, "steady_samples": 128, "steady_samples_per_s": 128 / 15}
    # one after another: the spans add up
    assert steady([run([10, 15, 20]), run([30, 35, 40])])["steady_s"] == 20.0
    assert steady([run([10])])["steady_samples_per_s"] == 0.0  # one step: nothing steady
    assert generation_share([run([1, 2]), run([3, 4])]) == 0.25

    from benchmarks.fleet import MODES, summarise

    def mode(rate, steady_rate, share=0.5):
        rows = [{"reward_last": 0.1, "kl_per_seq_last": 0.2, "logprob_gap_max": 1e-7}] * 4
        return {"wall_s": 640 / rate, "samples": 640, "samples_per_s": rate, "steady_samples_per_s": steady_rate,
                "generation_share": share, "runs": rows}

    rates = {"shared": [(6, 40), (8, 44), (7, 42)], "separate, side by side": [(5, 20), (7, 22), (6, 21)],
             "separate, one after another": [(8, 40), (8, 42), (8, 41)]}
    results, text = summarise({m: [mode(*r) for r in rates[m]] for m in MODES})
    side = results["modes"]["separate, side by side"]
    assert side["samples_per_s"] == 6 and side["shared_speedup"] == 7 / 6 and side["shared_steady_speedup"] == 2.0
    assert side["shared_speedup_per_repeat"] == [6 / 5, 8 / 7, 7 / 6]
    assert results["steady_bound"] == 2.0 and "Medians of 3 alternating repeats" in text


def test_grids_and_trial_files_become_checked_trials(tmp_path):
    assert parse_grid(["ppo.kl_coef=[0.05,0.2]", "learner.lr=1e-3"]) == [
        ["ppo.kl_coef=0.05", "learner.lr=1e-3"], ["ppo.kl_coef=0.2", "learner.lr=1e-3"]]
    specs = trial_specs([TINY], ["ppo.steps=2"], ["ppo.kl_coef=[0.05,0.1,0.2]"], [])
    assert [s["name"] for s in specs] == ["trial-0", "trial-1", "trial-2"]
    with pytest.raises(ConfigError, match="ppo.kl_coeff"):
        trial_specs([TINY], [], ["ppo.kl_coeff=[0.1]"], [])
    bad = tmp_path / "bad.yaml"
    bad.write_text("rollout: {max_staleness: -1}\n")
    with pytest.raises(ConfigError, match="bad.yaml.*max_staleness"):
        trial_specs([TINY], [], [], [str(bad)])
    with pytest.raises(ConfigError, match="rollout.fleet"):
        load_config(TINY, ["rollout.fleet=f", "learner.method=ssf"])


@pytest.fixture(scope="module")
def fleet(ray_head, tiny_cfg, tiny_model_dir, tmp_path_factory):
    """One shared fleet of one engine, started as `rlhf-ray fleet start` does, stopped at the end."""
    from rlhf_ray.shared_fleet import start_fleet, stop_fleet

    out = tmp_path_factory.mktemp("fleet")
    overrides = [f"model.tiny_dir={tiny_cfg.model.tiny_dir}", f"output.dir={out}", "ppo.base=model",
                 "reward.rule=letter_e", "ppo.prompts_per_step=8", "learner.minibatch_prompts=4",
                 "eval.num_prompts=4", "rollout.num_engines=1", "fleet.name=test-fleet", "fleet.max_runs=3",
                 "fleet.max_staleness=1", "ppo.steps=3"]
    cfg = load_config(TINY, overrides)
    start_fleet(cfg)
    try:
        yield cfg, overrides, out
    finally:
        stop_fleet("test-fleet")


@pytest.mark.integration
def test_a_run_whose_driver_is_killed_gets_its_slots_released(fleet, ray_head):
    from rlhf_ray.shared_fleet import LEASE_CHECK_S, fleet_status

    script = textwrap.dedent("""
        import os, signal, sys, ray
        ray.init(address=sys.argv[1], log_to_driver=False)
        from rlhf_ray.shared_fleet import RunLease, find_fleet
        lease = ray.remote(RunLease).options(num_cpus=0).remote()
        ray.get(find_fleet("test-fleet").attach.remote("killed", 1, 1.0, lease, {}))
        print("attached", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script, ray_head.address], capture_output=True, text=True,
                          timeout=180, cwd=ROOT)
    assert "attached" in proc.stdout, proc.stderr[-2000:]
    assert proc.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 30 * LEASE_CHECK_S
    while time.monotonic() < deadline:
        st = fleet_status("test-fleet")
        if "killed" not in st["runs"]:
            break
        time.sleep(LEASE_CHECK_S)
    assert "killed" not in st["runs"] and st["slots_used"] == 0
    assert any(e["run"] == "killed" and e["why"] == "driver gone" for e in st["ended"])


@pytest.mark.integration
@pytest.mark.slow
def test_a_sweep_shares_the_fleet_and_outlives_a_crashing_trial(fleet, tmp_path):
    """Three Tune trials on one fleet: synchronous, asynchronous (staleness 1) and one whose
    reward function raises mid-run. The other two finish with the per-run checks; the fleet
    has released every adapter and still serves."""
    from rlhf_ray.shared_fleet import fleet_status
    from rlhf_ray.sweep import run_sweep

    cfg, overrides, out = fleet
    crash = tmp_path / "crash.py"
    crash.write_text(textwrap.dedent("""
        CALLS = [0]
        def score(responses, **kwargs):
            CALLS[0] += 1
            if CALLS[0] >= 3:
                raise RuntimeError("injected crash")
            return [0.0 for _ in responses]
    """))
    files = []
    for name, text in [("sync", "ppo: {kl_coef: 0.05}\n"),
                       ("async", "ppo: {kl_coef: 0.2}\nrollout: {max_staleness: 1}\n"),
                       ("crash", f"reward: {{functions: [{{path: '{crash}:score'}}]}}\n")]:
        (tmp_path / f"{name}.yaml").write_text(text)
        files.append(str(tmp_path / f"{name}.yaml"))
    specs = trial_specs([TINY], overrides, [], files)
    sweep_cfg = load_config(TINY, [*overrides, "rollout.fleet=test-fleet", "output.name=sweep"])
    summary = run_sweep(sweep_cfg, [TINY], overrides, specs)
    rows = {r["label"]: r for r in summary["trials"]}
    assert rows["sync"]["status"] == "ok" and rows["sync"]["steps"] == 3, rows
    assert rows["sync"]["stale_samples"] == 0 and rows["sync"]["logprob_gap_max"] < 1e-3
    assert rows["async"]["status"] == "ok" and rows["async"]["steps"] == 3
    assert rows["async"]["max_staleness_seen"] <= 1
    assert rows["crash"]["status"] == "error" and "injected crash" in rows["crash"]["error"]
    assert (out / "sweep" / "sweep.md").is_file()
    # Tune saw every step of the finished trials
    assert sorted(r["steps"] for r in summary["trials"] if r["status"] == "ok") == [3, 3]
    st = fleet_status("test-fleet")
    assert st["runs"] == {} and st["slots_used"] == 0
    assert all("error" not in g and g["loaded_loras"] == 0 for g in st["generators_status"].values())
    assert {e["run"] for e in st["ended"]} >= {"trial-0", "trial-1", "trial-2"}
