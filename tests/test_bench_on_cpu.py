"""Every benchmark runs on a tiny setting and writes well-formed JSON. These check that the
benchmarks work, not how fast anything is: the figures come from `rlhf-ray bench` and live in
benchmarks/results and BENCHMARKS.md. They reuse what the session built: its Ray head, and for
the benchmarks that measure PPO steps (step, memory, scaling) its shared trainer, whose engines
and learner are already warm. One runs as the subcommand a user types, joining the session's
head; the others call the same code (cli.run_bench) in this process."""
import json

import pytest

from rlhf_ray.cli import build_parser, run_bench
from rlhf_ray.config import load_config
from test_cli_on_cpu import TINY, rlhf_ray

pytestmark = pytest.mark.integration

TINY_ARGS = {
    "rollout": ["--repeats", "1", "--num-prompts", "4"],
    "sync": ["--publishes", "3", "--soak", "5"],
    "step": ["--steps", "1"],
    "memory": ["--steps", "2", "--no-plan-checks"],  # test_plan_on_cpu.py runs the same checks
    "scaling": ["--steps", "1", "--max-actors", "2"],
    "compare-trl": ["--trl-steps", "1", "--curve-steps", "0", "--no-mid-size", "eval.num_prompts=4"],
    "startup": ["--repeats", "1", "--variants", "in-process"],
    "learner-memory": ["--no-mid-size", "--rows", "4", "--seq-len", "64"],
    "engines": ["--repeats", "1", "--num-prompts", "4"],
}
ON_THE_SHARED_TRAINER = ("step", "memory", "scaling")


def _in_process(name, tmp_path, *overrides, trainer=None):
    args, extra = build_parser().parse_known_args(["bench", name, "--out", str(tmp_path / "results"),
                                                   *TINY_ARGS[name], *overrides])
    cfg = load_config(TINY, [*args.overrides, *extra])
    return json.loads(run_bench(cfg, args, trainer=trainer).read_text())


def test_rollout_benchmark_runs_as_the_subcommand_on_the_sessions_head(tmp_path, tiny_model_dir, ray_head):
    out = tmp_path / "results"
    r = rlhf_ray("bench", "rollout", "--config", TINY, "--out", str(out), f"model.path={tiny_model_dir}",
                 f"output.dir={tmp_path}", *TINY_ARGS["rollout"], timeout=900,
                 env={"RAY_ADDRESS": ray_head.address})
    assert r.returncode == 0, r.stderr[-4000:]
    doc = json.loads((out / "rollout.json").read_text())
    assert doc["table"] in r.stdout and doc["config"]["model"]["path"] == tiny_model_dir
    _check("rollout", doc)


@pytest.mark.parametrize("name", ON_THE_SHARED_TRAINER)
def test_step_benchmarks_measure_the_shared_trainer(name, fresh_trainer, tmp_path, capsys):
    doc = _in_process(name, tmp_path, trainer=fresh_trainer)
    assert doc["table"] in capsys.readouterr().out
    assert doc["config"]["output"]["name"] == fresh_trainer.cfg.output.name  # the trainer's config is recorded
    _check(name, doc, trainer=fresh_trainer)


@pytest.mark.parametrize("name", sorted(set(TINY_ARGS) - set(ON_THE_SHARED_TRAINER) - {"rollout"}))
def test_benchmark_writes_its_json(name, tmp_path, tiny_model_dir, capsys):
    doc = _in_process(name, tmp_path, f"model.path={tiny_model_dir}", f"output.dir={tmp_path}",
                      "ppo.prompts_per_step=8", "learner.minibatch_prompts=4")
    assert doc["table"] in capsys.readouterr().out
    assert doc["config"]["model"]["path"] == tiny_model_dir
    _check(name, doc)


def _check(name, doc, trainer=None):
    assert doc["benchmark"] == name
    assert doc["machine"]["cpus"] >= 1 and doc["machine"]["memory_gib"] > 0
    assert {"torch", "ray", "peft", "transformers"} <= set(doc["versions"]) and doc["versions"]["torch"]
    assert doc["git_commit"]
    res = doc["results"]
    for target in res.get("targets", {}).values():  # each target says its value, goal and verdict
        assert {"value", "goal", "met"} <= set(target)
    if name == "rollout":
        assert res["tokens_per_s_median"]["actor/lora"] > 0 and res["ratio_base"] > 0
    elif name == "engines":  # both engines sample what the learner would, to float rounding
        assert all(g["max"] < 1e-4 for g in res["logprob_gap"].values()) and res["transformers_over_vllm"] > 0
    elif name == "sync":
        assert res["soak"]["stale_samples"] == 0 and res["soak"]["samples_checked"] == 5 * 4
        assert res["latency"]["2_generators"]["p50_s"] > 0 and res["adapter_bytes"] > 0
    elif name == "step":
        assert set(res["compute_s_mean"]) == {"generate", "reward", "reference", "advantages", "train", "publish"}
        assert 0.0 <= res["overhead_frac_mean"] < 1.0
    elif name == "memory":
        # Every actor of the trainer, each with the planner's estimate beside its peak.
        actors = {name for name, _ in trainer.generators} | {"reward", "reference", "learner-0"}
        assert actors <= set(res["per_actor"]), sorted(res["per_actor"])
        first = trainer.generators[0][0]
        assert all(res["per_actor"][a]["planned_bytes"] > 0 for a in (first, "reward", "learner-0"))
    elif name == "scaling":
        assert set(res["by_rollout_actors"]) == {"1", "2"}
    elif name == "learner-memory":
        assert len(res["by_variant"]) == 3 and res["parameters"] > 0
        for phases in res["by_variant"].values():
            assert phases["update"]["peak_bytes"] >= phases["update"]["resident_bytes"] > 0
    elif name == "compare-trl":
        main = res["main"]  # GRPO on both sides: 2 prompts x 4 samples per step
        assert main["trl"]["samples"] == main["rlhf_ray"]["samples"] == 8 and res["curve"] == []
        assert doc["versions"]["trl"] and 0.0 <= main["judge"]["trl"] <= 1.0
        assert res["main_async"]["rlhf_ray"]["samples"] == 8 and 0.0 <= res["main_async"]["judge"]["rlhf_ray"] <= 1.0
        assert doc["config"]["ppo"]["estimator"] == "gae"  # the config as given; the GRPO one is derived
    elif name == "startup":
        assert set(res["summary"]) == {"in-process"}
        for runs in res["runs"].values():
            assert runs[0]["startup_s"] > 0 and runs[0]["cpu_s_total"] > 0 and runs[0]["parts"]["learner"] > 0


def test_presets_grid_runs_a_cell_layered_over_the_base(tmp_path, sft_model_dir, untrained_rm, capsys):
    """One cell of the preset grid, tiny: the preset and async.yaml layered over the base config,
    on the base run's SFT model and reward model; the cell is added to the results file."""
    base = tmp_path / "runs" / "base"
    base.mkdir(parents=True)
    (base / "sft_model").symlink_to(sft_model_dir)
    (base / "reward_model").symlink_to(untrained_rm)
    args, extra = build_parser().parse_known_args([
        "bench", "presets", "--out", str(tmp_path / "results"), "--presets", "grpo", "--samples", "4",
        "--staleness", "1", f"output.dir={tmp_path / 'runs'}", "output.name=base", "ppo.steps=2", "eval.num_prompts=4"])
    cfg = load_config(TINY, [*args.overrides, *extra])
    doc = json.loads(run_bench(cfg, args).read_text())
    cell = doc["results"]["cells"]["grpo/n4/s1/seed1"]
    assert (cell["preset"], cell["samples_per_prompt"], cell["staleness"], cell["steps"]) == ("grpo", 4, 1, 2)
    assert 0.0 <= cell["judge_before"] <= 1.0 and cell["kl_after"] >= 0.0 and cell["stopped"] is None
    run = tmp_path / "runs" / "presets" / "grpo_n4_s1_seed1"
    used = load_config(run / "config.yaml")
    assert (used.ppo.estimator, used.rollout.max_staleness, used.tis_cap, used.ppo.prompts_per_step) == ("grpo", 1, 2.0, 8)
    assert doc["results"]["targets"]["grpo/n4/s1/seed1"]["met"] is False  # 2 steps do not gain 25 points
    assert "grpo" in capsys.readouterr().out

