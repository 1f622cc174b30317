"""`rlhf-ray` command line. Every subcommand takes ``--config FILE`` and trailing
``key.sub=value`` overrides, and validates the whole config before doing any work."""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Callable, Optional, Sequence

from .config import Config, ConfigError, dump_config, load_config


def _cmd_config(cfg: Config, args: argparse.Namespace) -> int:
    if args.explain is not None:
        from .config_doc import explain

        print(explain(args.explain or None), end="")
        return 0
    print(dump_config(cfg), end="")
    return 0


def _cmd_doctor(cfg: Config, args: argparse.Namespace) -> int:
    from .doctor import render, run_doctor

    rows, code = run_doctor(cfg)
    print(render(rows))
    print("\nall checks passed" if code == 0 else "\na check failed: see its row (the roles' output is in this "
          "process's log above)")
    return code


def _cmd_build_model(cfg: Config, args: argparse.Namespace) -> int:
    from .models import resolve_model_path

    path = resolve_model_path(cfg.model)
    print(f"model ready: {path}")
    return 0


def _cmd_generate(cfg: Config, args: argparse.Namespace) -> int:
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    from .actors.engine import build_engine
    from .data.synthetic import reviews
    from .models import resolve_model_path

    path = resolve_model_path(cfg.model)
    prompts = args.prompt or [r.text.split(".")[0] for r in reviews(args.num, seed=cfg.data.seed)]
    llm = build_engine(cfg, path)
    params = SamplingParams(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                            max_tokens=cfg.rollout.max_new_tokens, seed=cfg.rollout.seed)
    lora = LoRARequest("cli", 1, args.adapter) if args.adapter else None
    for out in llm.generate(prompts, params, lora_request=lora, use_tqdm=False):
        print(f"{out.prompt!r} -> {out.outputs[0].text!r}")
    return 0


def _cmd_sft(cfg: Config, args: argparse.Namespace) -> int:
    from .report import heldout_note
    from .stages.sft import run_sft

    s = run_sft(cfg)
    print(f"sft: {s['train_examples']} examples, {s['steps']} steps, held-out loss {s['heldout_loss_before']} -> "
          f"{s['heldout_loss_after']}{heldout_note(s['heldout_examples'], 'examples')}; {s['time_s']:.1f}s\n"
          f"model: {s['output']}")
    return 0


def _cmd_train_rm(cfg: Config, args: argparse.Namespace) -> int:
    from .report import heldout_note
    from .stages.rm import run_train_rm

    s = run_train_rm(cfg)
    b, a = s["heldout_before"], s["heldout_after"]
    if s.get("kind") == "classifier":
        print(f"train-rm: a classifier of {s['labels']} on {s['train_examples']} texts, {s['steps']} steps; held-out "
              f"accuracy {b['accuracy']:.3f} -> {a['accuracy']:.3f} over {a['examples']} texts; {s['time_s']:.1f}s\n"
              f"model: {s['output']}")
        return 0
    print(f"train-rm: {s['train_pairs']} pairs, {s['steps']} steps; held-out pair accuracy {b['accuracy']:.3f} -> "
          f"{a['accuracy']:.3f}, reward gap {b['reward_gap']:.3f} -> {a['reward_gap']:.3f} over {a['pairs']} pairs"
          f"{heldout_note(a['pairs'], 'pairs')}; {s['time_s']:.1f}s\nmodel: {s['output']}")
    return 0


def _ppo(cfg: Config, resume=None, overwrite: bool = False) -> list[dict]:
    from .trainer import PPOTrainer, startup_line

    with PPOTrainer(cfg, resume=resume, overwrite=overwrite) as trainer:
        print(f"ray: {trainer.how_connected}; {startup_line(trainer.startup_s, trainer.startup_parts)}; "
              f"{len(trainer.generators)} rollout actors, {cfg.learner.num_workers} learner workers, "
              f"reference.mode={cfg.reference.mode}")
        if trainer.resumed_from is not None:
            print(f"resumed from {trainer.resumed_from.path} (step {trainer.step_index}, adapter version "
                  f"{trainer.version}); {max(0, cfg.ppo.steps - trainer.step_index)} of ppo.steps={cfg.ppo.steps} to go")
        trainer.run()
        return trainer.all_records


def _finish(cfg: Config, records: list[dict]) -> None:
    from .report import targets_table, write_report

    import ray

    if ray.is_initialized():
        # Every role is closed; disconnecting now means none of Ray's asynchronous notices
        # (raylet warnings, published by the cluster at any time) lands after the tables.
        ray.shutdown()
    _print_step_table(records)
    run_dir = cfg.output.run_dir.resolve()
    report = write_report(run_dir, cfg.output.name)
    table = targets_table(run_dir)
    if table:
        print("\n" + table)
    print(f"\nmetrics: {run_dir / 'metrics.jsonl'}\nreport:  {report}\nplots:   {run_dir / 'plots'}\n"
          f"logs:    {run_dir / 'logs'}")
    if "tensorboard" in cfg.output.trackers:
        print(f"tensorboard --logdir {run_dir.parent}")


def _cmd_train(cfg: Config, args: argparse.Namespace) -> int:
    resume = None
    if args.resume is not None:
        cfg, resume = _resume_target(cfg, args)
        args.run_dir = cfg.output.run_dir  # where a failed role's log is, for main
    elif cfg.cluster.rehearse:
        _rehearsal_inputs(cfg, args)
    plan_gate(cfg)  # the config the run will use: a resumed run's own
    _finish(cfg, _ppo(cfg, resume, overwrite=args.overwrite))
    return 0


def _resume_target(cfg: Config, args: argparse.Namespace):
    """(config, checkpoint) of ``train --resume [DIR]``: DIR is a run or checkpoint directory
    (default: this config's run directory). Without --config the run's own config.yaml is
    used (with the command line's overrides), and the run continues in its directory."""
    import dataclasses
    from pathlib import Path

    from .checkpoint import find_checkpoint

    ckpt = find_checkpoint(Path(args.resume) if args.resume else cfg.output.run_dir)
    run_dir = ckpt.parent.parent.resolve()
    if args.config is None and (run_dir / "config.yaml").is_file():
        cfg = load_config(run_dir / "config.yaml", args.all_overrides)
    return dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, dir=str(run_dir.parent),
                                                               name=run_dir.name)), ckpt


def _rehearsal_inputs(cfg: Config, args: argparse.Namespace) -> None:
    """A rehearsed `train` has no SFT or reward model of the tiny stand-in yet: its own
    (tiny, one-epoch) stages make them, on the workers the config asks for."""
    from .stages import rm_dir, sft_dir

    need_rm = trains_rm(cfg) and not (rm_dir(cfg) / "config.json").is_file()
    need_sft = cfg.ppo.base == "sft" or (need_rm and cfg.rm.base == "sft")
    if need_sft and not (sft_dir(cfg) / "config.json").is_file():
        _cmd_sft(cfg, args)
    if need_rm:
        _cmd_train_rm(cfg, args)


def trains_rm(cfg: Config) -> bool:
    """The run's reward uses the reward model `train-rm` writes: no reward.path, and no rule,
    function or URL instead."""
    return cfg.reward.uses_model and cfg.reward.path is None


def _check_every_stage(cfg: Config) -> None:
    """Every stage's resources against the cluster before the first starts: a PPO layout the
    cluster cannot hold fails now, not after SFT and the reward model have trained."""
    from .launch import connect, preflight, stage_requests

    print(f"ray: {connect(cfg)}")
    preflight(cfg, stage_requests("sft", cfg.sft))
    if trains_rm(cfg):
        preflight(cfg, stage_requests("rm", cfg.rm))
    preflight(cfg)


def _cmd_run(cfg: Config, args: argparse.Namespace) -> int:
    """The whole pipeline: model, SFT, reward model, PPO with evaluation, report."""
    import datetime
    import json
    import time

    from .models import resolve_model_path

    from .checkpoint import refuse_to_replace

    if not args.overwrite:  # before SFT: refused in seconds, not after the stages
        refuse_to_replace(cfg.output.run_dir.resolve())
    _check_every_stage(cfg)
    plan_gate(cfg)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    stages = [("model", lambda: print(f"model: {resolve_model_path(cfg.model)}")), ("sft", lambda: _cmd_sft(cfg, args))]
    if trains_rm(cfg):
        stages.append(("rm", lambda: _cmd_train_rm(cfg, args)))
    for stage, fn in stages:
        t = time.perf_counter()
        fn()
        times[stage] = time.perf_counter() - t
    t = time.perf_counter()
    records = _ppo(cfg, overwrite=args.overwrite)
    times["ppo"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t0
    run_dir = cfg.output.run_dir.resolve()
    (run_dir / "pipeline.json").write_text(json.dumps(
        {"time_s": times, "finished": datetime.datetime.now().isoformat(timespec="seconds")}, indent=2))
    _finish(cfg, records)
    return 0


def checkpoint_line(cfg: Config, step_s: float) -> str:
    """What one failure costs at the rate model's step time, with this config's checkpoints."""
    hours = cfg.ppo.steps * step_s / 3600
    if not cfg.checkpoint.every:
        return (f"checkpoints: none (checkpoint.every=0) in a run of ~{hours:.1f} h at {step_s:.0f} s per step: "
                "one failure loses all of it")
    return (f"checkpoints: every {cfg.checkpoint.every} steps, ~{cfg.checkpoint.every * step_s / 60:.0f} min apart at "
            f"{step_s:.0f} s per step (run ~{hours:.1f} h), the newest {cfg.checkpoint.keep} kept")


def _make_plan(cfg: Config, gpus: Optional[int] = None, nodes: Optional[int] = None,
               gpu_mem_gib: Optional[float] = None):
    """(plan, shape, rm_shape, model, gpus, nodes, gpu_mem_gib, lengths) of ``cfg``, from the
    models' config.json alone; the flags override cluster.nodes / cluster.gpu_memory_gib.

    Raises:
        ValueError: a count or size that is not positive, or GPUs not divisible by nodes.
    """
    import math
    from pathlib import Path

    from .models.loading import shape_path
    from .plan import model_shape
    from .plan.placement import GIB, make_plan

    model = shape_path(cfg.model)
    targets = list(cfg.lora.target_modules)
    shape = model_shape(model, cfg.lora.rank, targets)
    rm = cfg.reward.path if cfg.reward.path and (Path(cfg.reward.path) / "config.json").is_file() else model
    rm_shape = model_shape(rm, cfg.lora.rank, targets)
    nodes = nodes if nodes is not None else cfg.cluster.nodes
    gpu_mem_gib = gpu_mem_gib if gpu_mem_gib is not None else cfg.cluster.gpu_memory_gib
    reference_gpus = cfg.reference.num_gpus if cfg.reference.mode == "separate" else 0.0
    asked = (int(cfg.learner.use_gpu) * cfg.learner.num_workers + cfg.rollout.num_gpus * cfg.rollout.num_engines
             + cfg.reward.num_gpus + reference_gpus)
    gpus = gpus if gpus is not None else max(1, math.ceil(asked - 1e-9))
    if nodes < 1 or gpus < 1 or gpu_mem_gib <= 0:
        raise ValueError(f"--gpus {gpus}, --nodes {nodes}, --gpu-mem-gib {gpu_mem_gib:g}: each must be positive")
    if gpus % nodes:
        raise ValueError(f"{gpus} GPUs are not divisible by {nodes} nodes (--gpus / --nodes, cluster.nodes)")
    memory = int(gpu_mem_gib * GIB)
    lengths = dict(seq_len=cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens,
                   response_tokens=cfg.rollout.max_new_tokens)
    plan = make_plan(cfg, shape, rm_shape, nodes=nodes, gpus_per_node=gpus // nodes, gpu_memory=memory, **lengths)
    return plan, shape, rm_shape, model, gpus, nodes, gpu_mem_gib, lengths


def plan_gate(cfg: Config) -> None:
    """Before any actor of a GPU run starts: refuse a layout the planner says cannot fit (an
    engine's KV cache too small, an actor larger than a card), where it would otherwise fail
    minutes later inside vLLM or with a CUDA out-of-memory error."""
    if cfg.cluster.rehearse or not (cfg.learner.use_gpu or cfg.rollout.num_gpus > 0):
        return
    plan = _make_plan(cfg)[0]
    if plan.problems:
        raise ConfigError(f"the GPU layout does not fit ({cfg.cluster.gpu_memory_gib:g} GiB per card, "
                          f"cluster.gpu_memory_gib): " + "; ".join(plan.problems)
                          + ". `rlhf-ray plan` with this config shows every actor's memory")


def _cmd_plan(cfg: Config, args: argparse.Namespace) -> int:
    """Per-actor memory and placement from the model's config.json alone (no weights, no GPU),
    then the rate model's generator/learner splits (GPU roles only)."""
    from .plan.placement import render
    from .plan.rates import render_splits, split_table

    try:
        plan, shape, rm_shape, model, gpus, nodes, gpu_mem_gib, lengths = _make_plan(
            cfg, args.gpus, args.nodes, args.gpu_mem_gib)
    except ValueError as e:
        print(f"rlhf-ray plan: {e}", file=sys.stderr)
        return 2
    memory = int(gpu_mem_gib * 2**30)
    print(f"plan for {gpus} GPUs of {gpu_mem_gib:g} GiB on {nodes} node(s), model {model}")
    print(render(plan, shape, memory))
    from .launch import cpu_role_warnings

    for w in cpu_role_warnings(cfg):
        print(f"warning: {w}")
    print()
    if cfg.rollout.num_gpus > 0 and cfg.learner.use_gpu and cfg.reward.num_gpus > 0:
        rows = split_table(cfg, shape, rm_shape, gpus=gpus, nodes=nodes, gpu_memory=memory, **lengths)
        print(render_splits(rows, (cfg.rollout.num_engines, cfg.learner.num_workers)))
        mine = next((e for e in rows if (e.generators, e.learners) == (cfg.rollout.num_engines, cfg.learner.num_workers)),
                    None)
        if mine is not None:
            print(checkpoint_line(cfg, mine.step_s))
    else:
        print("rate model: only for GPU layouts (rollout.num_gpus > 0, learner.use_gpu, reward.num_gpus > 0)")
    if args.fleet:
        from .plan.fleet import fleet_plan, render_fleet
        from .shared_fleet import fleet_max_model_len

        print()
        print(render_fleet(fleet_plan(cfg, shape, gpus=gpus, gpu_memory=memory,
                                      max_model_len=fleet_max_model_len(cfg))))
    return 1 if plan.problems else 0


BENCHMARKS = {  # name -> (module under benchmarks/, function)
    "rollout": ("rollout", "run"), "sync": ("sync", "run"), "step": ("ppo_step", "run_step"),
    "memory": ("ppo_step", "run_memory"), "scaling": ("ppo_step", "run_scaling"),
    "compare-trl": ("compare_trl", "run"), "learner-memory": ("learner_memory", "run"),
    "soak": ("soak", "run"), "startup": ("startup", "run"), "presets": ("presets", "run"),
    "lora-targets": ("lora_targets", "run"), "recipes": ("recipes", "run"),
    "peft": ("peft", "run"),  # not in `bench all`: it needs the objective-question config
    "publish": ("publish", "run"),
    "fleet": ("fleet", "run"),  # not in `bench all`: 12 PPO runs (minutes); four runs on one shared fleet vs own engines
    "engines": ("engines", "run"),  # the transformers rollout engine against vLLM on a decoder model
    "summarise": ("summarise", "run"),  # not in `bench all`: it needs the T5 config (configs/tiny_t5_cpu.yaml)
}


def _cmd_bench(cfg: Config, args: argparse.Namespace) -> int:
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if not (root / "benchmarks" / "common.py").is_file():
        print(f"rlhf-ray bench: the benchmarks/ folder of the repository is not at {root}", file=sys.stderr)
        return 1
    sys.path.insert(0, str(root))
    if args.name == "report":
        print(f"wrote {importlib.import_module('benchmarks.report').write()}")
        return 0
    if args.name == "all":
        return _bench_all(cfg, args)
    run_bench(cfg, args)
    return 0


# `bench all`, in this order: the cheap ones first, so a failure shows early. The soak runs short
# (--steps, default 5); `bench soak --steps 300` is the long one.
BENCH_ALL = ["sync", "rollout", "step", "memory", "scaling", "startup", "learner-memory", "soak", "compare-trl",
             "lora-targets", "recipes", "presets", "publish", "engines"]


def _bench_all(cfg: Config, args: argparse.Namespace) -> int:
    """Every benchmark one after another, each writing its JSON, then BENCHMARKS.md. From a tree
    with uncommitted changes only with --allow-dirty (the results are then marked so)."""
    import copy

    common = importlib.import_module("benchmarks.common")
    commit = common.git_commit() or ""
    if commit.endswith("+dirty") and not args.allow_dirty:
        print("rlhf-ray bench all: the tree has uncommitted changes; commit them first (results must name the "
              "commit they measure) or pass --allow-dirty (the results are then marked uncommitted)", file=sys.stderr)
        return 1
    failed = []
    for name in BENCH_ALL:
        print(f"\n== bench {name} ==", flush=True)
        one = copy.copy(args)
        one.name = name
        try:
            run_bench(cfg, one)
        except Exception as e:  # one benchmark's failure does not lose the others' results
            failed.append(f"{name}: {type(e).__name__}: {e}")
            print(f"bench {name} failed: {e}", file=sys.stderr)
    print(f"wrote {importlib.import_module('benchmarks.report').write()}")
    for f in failed:
        print(f"failed: {f}", file=sys.stderr)
    return 1 if failed else 0


def run_bench(cfg: Config, args: argparse.Namespace, trainer=None):
    """Run benchmark ``args.name``, write its JSON and print its table; returns the JSON's path.
    ``trainer``: a live ``PPOTrainer`` to measure instead of starting one (step, memory and
    scaling, which measure PPO steps; the test suite passes its shared trainer), whose config
    the result then records."""
    import importlib
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    module, fn = BENCHMARKS[args.name]
    bench = getattr(importlib.import_module(f"benchmarks.{module}"), fn)
    if trainer is not None:
        params, results, text = bench(trainer.cfg, args, trainer=trainer)
        cfg = trainer.cfg
    else:
        params, results, text = bench(cfg, args)
    common = importlib.import_module("benchmarks.common")
    path = common.write_result(args.name, cfg, params, results, text, out_dir=args.out,
                               extra_versions=results.pop("_extra_versions", ()))
    print(text)
    print(f"\nresults: {path}")
    return path


def _print_step_table(records: list[dict], max_rows: int = 20) -> None:
    cols = ["generate", "reward", "reference", "train", "publish", "idle", "total"]
    print(f"{'step':>4} {'ver':>3} {'stale':>5} {'reward':>8} {'kl/seq':>7} {'lp_gap':>8} {'cut':>4} {'tok/s':>7} "
          + " ".join(f"{c:>9}" for c in cols))
    every = max(1, -(-len(records) // max_rows))
    for r in records:
        if r["step"] % every and r is not records[-1]:
            continue
        t = r["time_s"]
        print(f"{r['step']:>4} {r['generated_with_version'][0]:>3} {r['stale_samples']:>5} "
              f"{r['reward_mean']:>8.3f} {r['kl_per_seq']:>7.3f} {r['logprob_gap']:>8.1e} "
              f"{100 * r.get('truncation_rate', 0.0):>3.0f}% "
              f"{r['tokens_per_s']:>7.0f} " + " ".join(f"{t.get(c, 0.0):>8.3f}s" for c in cols))


def _cmd_fleet(cfg: Config, args: argparse.Namespace) -> int:
    import dataclasses

    from .launch import connect
    from .shared_fleet import fleet_status, format_status, start_fleet, stop_fleet

    if args.name:
        cfg = dataclasses.replace(cfg, fleet=dataclasses.replace(cfg.fleet, name=args.name))
    if not (cfg.cluster.address or os.environ.get("RAY_ADDRESS")):
        # A head started by this command would end with it, and the fleet with the head.
        raise ValueError("rlhf-ray fleet needs a Ray cluster that outlives this command: start one (ray start "
                         "--head) and set cluster.address (or RAY_ADDRESS=auto)")
    connect(cfg)
    if args.action == "start":
        d = start_fleet(cfg)
        print(f"fleet {d['name']}: {len(d['generators'])} generator(s) serving {d['model_path']}, "
              f"{d['lora_slots']} LoRA slots per engine; attach a run with rollout.fleet={d['name']}")
    elif args.action == "status":
        print(format_status(fleet_status(cfg.fleet.name)))
    else:
        d = stop_fleet(cfg.fleet.name)
        print(f"fleet {d['name']} stopped" + (f" (runs still attached lose it: {', '.join(d['runs_attached'])})"
                                               if d["runs_attached"] else ""))
    return 0


def _cmd_sweep(cfg: Config, args: argparse.Namespace) -> int:
    from .sweep import format_summary, run_sweep, trial_specs

    files = args.config or [default_config()]
    specs = trial_specs([f for f in files if f], args.all_overrides, args.grid or [], args.trials or [])
    plan_gate(cfg)
    summary = run_sweep(cfg, [f for f in files if f], args.all_overrides, specs, parallel=args.parallel)
    print(format_summary(summary))
    print(f"\nsweep: {cfg.output.run_dir.resolve() / 'sweep.md'}")
    return 0 if all(r["status"] == "ok" for r in summary["trials"]) else 1


def default_config() -> Optional[str]:
    """The embedded default run's config, when the repository's configs/ is beside the package
    (a clone, `make venv`, `pip install -e`); else None: the built-in defaults."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"
    return str(path) if path.is_file() else None


def _cmd_objective_data(cfg: Config, args: argparse.Namespace) -> int:
    """A classification set in a FewCLUE shape -> <out>/<set>_sft.jsonl and <set>_prompts.jsonl."""
    import json
    from pathlib import Path

    from .data.loaders import iter_records
    from .data.objective import SHAPES, convert, shape_with

    labels = None
    if args.labels:
        pairs = [x.split("=", 1) for x in args.labels.split(",")]
        if any(len(p) != 2 or not p[0] or not p[1] for p in pairs):
            raise ConfigError(f"--labels {args.labels!r}: expected value=word pairs, e.g. Positive=正面,Negative=负面")
        labels = dict(pairs)
    shape = shape_with(SHAPES[args.shape], labels)
    name = args.set or args.shape
    if args.template is not None:
        try:
            args.template.format(**{f: "" for f in shape.fields}, options="")
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(f"--template {args.template!r}: {type(e).__name__} {e}; a {args.shape} question may use "
                              f"{', '.join('{' + f + '}' for f in (*shape.fields, 'options'))}") from None
    read = list(iter_records(args.input, "--input"))
    records = [rec for _, rec in read if isinstance(rec, dict)]
    if len(records) < len(read):
        print(f"warning: {len(read) - len(records)} lines of {args.input} are not JSON objects; left out")
    sft, prompts, counts = convert(records, name, shape, args.template)
    if not prompts:
        raise ConfigError(f"--input {args.input}: none of its {counts['read']} records is a {args.shape} record "
                          f"with a label ({counts['missing_column']} lack a column of {list(shape.fields)} + "
                          f"{shape.label!r}, {counts['no_label']} have no label of {sorted(shape.words) or 'any'})")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for suffix, rows in (("sft", sft), ("prompts", prompts)):
        (out / f"{name}_{suffix}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"{args.input}: read {counts['read']}, kept {counts['kept']} ({counts['missing_column']} missing a column, "
          f"{counts['no_label']} without a label); wrote {out / (name + '_sft.jsonl')} and "
          f"{out / (name + '_prompts.jsonl')}")
    print(f"e.g.: {prompts[0]['prompt']!r} -> {prompts[0]['answer']!r}")
    return 0


COMMANDS: dict[str, tuple[Callable[[Config, argparse.Namespace], int], str]] = {
    "config": (_cmd_config, "validate a config and print it fully resolved"),
    "build-model": (_cmd_build_model, "build the tiny local model + tokenizer (or check model.path)"),
    "generate": (_cmd_generate, "sample from the base model (or a LoRA adapter) with vLLM"),
    "sft": (_cmd_sft, "supervised fine-tuning; writes <run_dir>/sft_model (PPO's base and reference)"),
    "train-rm": (_cmd_train_rm, "reward model from preference pairs (pairwise ranking loss with margin)"),
    "train": (_cmd_train, "PPO: vLLM rollout actors, reward, reference, Ray Train learner; report"),
    "run": (_cmd_run, "the whole pipeline: tiny model, SFT, reward model, PPO, held-out judge, report"),
    "bench": (_cmd_bench, "a benchmark; writes benchmarks/results/<name>.json and prints its table"),
    "doctor": (_cmd_doctor, "smoke test of this machine's devices in minutes: engine, adapter hot swap, log-probs, "
                            "one learner update, a two-rank all-reduce (run it first on a new GPU machine)"),
    "fleet": (_cmd_fleet, "a generator fleet shared by several runs: start | status | stop (runs attach with "
                          "rollout.fleet=<name>)"),
    "sweep": (_cmd_sweep, "PPO trials (--grid key=[a,b] ... or --trials a.yaml b.yaml) as Ray Tune trials sharing one "
                          "generator fleet; writes a summary table"),
    "plan": (_cmd_plan, "per-actor memory and GPU placement from the model's config.json (no weights, no GPU)"),
    "objective-data": (_cmd_objective_data, "a classification set in a FewCLUE shape (EPRSTMT, TNEWS, OCNLI, BUSTM) "
                                            "as questions: SFT records and prompts with the answer, for label_match"),
}


REHEARSABLE = ("sft", "train-rm", "train", "run", "sweep")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf-ray", description="RLHF (PPO + LoRA) on Ray with vLLM generators.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == "bench":  # before the overrides, which would otherwise swallow it
            p.add_argument("name", choices=[*BENCHMARKS, "all", "report"],
                           help="which benchmark; all: every one, then BENCHMARKS.md; report: BENCHMARKS.md only")
        if name == "fleet":
            p.add_argument("action", choices=["start", "status", "stop"])
        p.add_argument("--config", action="append", default=None, metavar="FILE",
                       help="YAML config; given again, each file is layered over the ones before it (a base, "
                            "then a preset). Default: configs/tiny_cpu.yaml, the embedded default run")
        p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
        if name == "bench":
            p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
            p.add_argument("--allow-dirty", action="store_true",
                           help="all: run from a tree with uncommitted changes (results marked uncommitted)")
            p.add_argument("--repeats", type=int, default=3,
                           help="rollout, engines: timed rounds; startup: rounds of every variant; fleet: alternating "
                                "repeats of its three modes")
            p.add_argument("--num-prompts", type=int, default=64, help="rollout, engines: prompts per round")
            p.add_argument("--publishes", type=int, default=100, help="sync: publishes per fleet size")
            p.add_argument("--soak", type=int, default=1000, help="sync: soak publishes")
            p.add_argument("--steps", type=int, default=5, help="step/memory/scaling/soak: measured PPO steps "
                                                                  "(soak: use 300)")
            p.add_argument("--max-actors", type=int, default=2, help="scaling: largest rollout fleet")
            p.add_argument("--trl-steps", type=int, default=10, help="compare-trl: training steps of each")
            p.add_argument("--variants", default=None,
                           help="startup: which engine layouts, e.g. separate,in-process (default: all this machine has)")
            p.add_argument("--curve-steps", type=int, default=4,
                           help="compare-trl: training steps of each in the size and length curve")
            p.add_argument("--lengths", default=None,
                           help="compare-trl: response lengths of the curve, e.g. 32,128 (default: the config's)")
            p.add_argument("--rows", type=int, default=8, help="learner-memory: batch rows")
            p.add_argument("--seq-len", type=int, default=1024, help="learner-memory: tokens per row")
            p.add_argument("--mid-size", action=argparse.BooleanOptionalAction, default=True,
                           help="learner-memory: the 58 M-parameter Llama (--no-mid-size: the config's tiny one); "
                                "compare-trl: a curve row with it")
            p.add_argument("--presets", default=None,
                           help="presets: which, e.g. grpo,rloo (default: ppo and every configs/presets/ algorithm)")
            p.add_argument("--samples", default="4,8", help="presets: samples per prompt of the grid")
            p.add_argument("--staleness", default="0,1", help="presets: rollout.max_staleness values of the grid")
            p.add_argument("--seeds", default="1", help="presets: seeds of every cell, e.g. 1,2,3 (the seed spread)")
            p.add_argument("--methods", default=None,
                           help="peft: which methods, e.g. lora,ssf (default: full,lora,dora,ia3,ssf,repadapter); "
                                "publish: which learner.method (default: lora,ssf,repadapter,full)")
            p.add_argument("--before", default=None, help="learner-memory: also measure this git revision's learner")
            p.add_argument("--plan-checks", action=argparse.BooleanOptionalAction, default=True,
                           help="memory: also check the planner against torch and vLLM (tests/test_plan_on_cpu.py "
                                "runs the same checks)")
        if name == "config":
            p.add_argument("--explain", nargs="?", const="", default=None, metavar="SECTION",
                           help="print every key (of SECTION) with its type, default and meaning instead")
        if name == "fleet":
            p.add_argument("--name", default=None, help="the fleet (default fleet.name)")
        if name == "sweep":
            p.add_argument("--grid", nargs="+", default=None, metavar="KEY=[A,B]",
                           help="one trial per combination, e.g. ppo.kl_coef=[0.05,0.1] learner.lr=[1e-3,2e-3] (a key=value "
                                 "without brackets applies to every trial)")
            p.add_argument("--trials", nargs="+", default=None, metavar="FILE",
                           help="one trial per YAML file, each layered over --config")
            p.add_argument("--parallel", type=int, default=None, help="trials at once (default: all)")
        if name == "plan":
            p.add_argument("--gpus", type=int, default=None, help="GPUs in all (default: what the config asks for)")
            p.add_argument("--gpu-mem-gib", type=float, default=None,
                           help="memory of one GPU (default: cluster.gpu_memory_gib; RTX 3090: 24)")
            p.add_argument("--fleet", action="store_true",
                           help="also plan a shared generator fleet of this config's engines (fleet.max_runs runs): "
                                "LoRA slots, KV cache, how many runs' learners fit beside it")
            p.add_argument("--nodes", type=int, default=None,
                           help="nodes the GPUs are spread over, evenly (default: cluster.nodes)")
        noise = p.add_mutually_exclusive_group()
        noise.add_argument("--quiet", action="store_true", help="warnings and results only (no progress bars)")
        noise.add_argument("--verbose", action="store_true", help="also debug messages")
        if name in REHEARSABLE:
            p.add_argument("--rehearse", action="store_true",
                           help="run this config's actors, resource requests and placement with a tiny model of the "
                                "same family on CPU (a CPU-only cluster declaring logical GPUs is enough)")
        if name in ("train", "run"):
            p.add_argument("--overwrite", action="store_true",
                           help="replace an earlier run's checkpoints and adapter in the run directory "
                                "(without it such a directory is refused)")
        if name == "train":
            p.add_argument("--resume", nargs="?", const="", default=None, metavar="DIR",
                           help="continue from the newest checkpoint of DIR (a run directory, default this "
                                "config's) or from DIR itself when it is a checkpoint")
        if name == "objective-data":
            from .data.objective import SHAPES

            p.add_argument("--shape", required=True, choices=sorted(SHAPES), help="the set's FewCLUE record shape")
            p.add_argument("--input", required=True, help="the set's JSON/JSONL file (or a `datasets` directory)")
            p.add_argument("--output", required=True, help="folder for <set>_sft.jsonl and <set>_prompts.jsonl")
            p.add_argument("--set", default=None, help="the set's name in the `set` column (default: the shape)")
            p.add_argument("--template", default=None,
                           help="the question, with the record's fields and {options} in braces (default: English)")
            p.add_argument("--labels", default=None, help="label words, e.g. Positive=正面,Negative=负面")
        if name == "generate":
            p.add_argument("--prompt", action="append", help="a prompt (repeatable); default: generated ones")
            p.add_argument("--num", type=int, default=4, help="number of generated prompts")
            p.add_argument("--adapter", default=None, help="PEFT LoRA adapter directory to serve")
    return parser


def dashed_overrides(argv: Sequence[str]) -> list[str]:
    """``--ppo.clip_eps=0.1`` and ``--ppo.clip_eps 0.1`` (the Hydra/argparse habit) as the override
    ``ppo.clip_eps=0.1``; only for a dotted key of a known section, so no option is taken."""
    from .config import _sections

    sections, out, i = _sections(), [], 0
    argv = list(argv)
    while i < len(argv):
        a = argv[i]
        key = a[2:].split("=", 1)[0]
        if a.startswith("--") and "." in key and key.split(".")[0] in sections:
            if "=" in a:
                out.append(a[2:])
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                out.append(f"{key}={argv[i + 1]}")
                i += 1
            else:
                out.append(a)  # no value: left for the error that says so
        else:
            out.append(a)
        i += 1
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        return _main(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:
        print("rlhf-ray: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the last resort: one line here, the traceback in a file
        import tempfile
        import time
        import traceback

        log = os.path.join(tempfile.gettempdir(), f"rlhf-ray-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
        try:
            with open(log, "w") as f:
                traceback.print_exc(file=f)
            where = f"the traceback is in {log}"
        except OSError:
            where = "no log could be written: set RLHF_RAY_TRACEBACK=1 to see the traceback"
        first = str(e).splitlines()[0] if str(e) else ""
        print(f"rlhf-ray: unexpected error: {type(e).__name__}: {first} ({where}; please report it)", file=sys.stderr)
        if os.environ.get("RLHF_RAY_TRACEBACK"):
            raise
        return 1


def _main(argv: Sequence[str]) -> int:
    parser = build_parser()
    # Overrides may come before or after options (`train a.b=1 --config x.yaml c.d=2`);
    # argparse leaves the later ones unparsed, so collect them here.
    args, extra = parser.parse_known_args(dashed_overrides(argv))
    unknown = [x for x in extra if x.startswith("-") or "=" not in x]
    dotted = [x for x in unknown if x.startswith("--") and "." in x]
    if dotted:  # a config key given as an option without a value
        parser.error(f"{dotted[0]}: a config key needs a value: {dotted[0][2:]}=VALUE")
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if getattr(args, "resume", None) and "=" in args.resume and not os.path.isdir(args.resume):
        # `train --resume key=value`: the override, not a directory, followed the flag.
        extra.insert(0, args.resume)
        args.resume = ""
    if getattr(args, "grid", None):
        # Overrides typed after --grid land in it: a key=value without a [list] is an override of
        # every trial, and of the sweep's own fleet, not an axis of one value.
        axes = [g for g in args.grid if "=" not in g or g.split("=", 1)[1].lstrip().startswith("[")]
        extra += [g for g in args.grid if g not in axes]
        args.grid = axes
    args.all_overrides = [*args.overrides, *extra]
    from .logs import setup_logging

    setup_logging("quiet" if args.quiet else "verbose" if args.verbose else "normal")
    if args.quiet:
        os.environ["TQDM_DISABLE"] = "1"  # tqdm reads its defaults from TQDM_* variables
    try:
        cfg = load_config(args.config or default_config(), args.all_overrides)
    except ConfigError as e:
        print(f"rlhf-ray: config error: {e}", file=sys.stderr)
        return 2
    from .launch import RoleFailed

    fn, _ = COMMANDS[args.command]
    try:
        if getattr(args, "rehearse", False):
            from .rehearse import describe, rehearsal_config

            cfg = rehearsal_config(cfg)
            print(describe(cfg))
        return fn(cfg, args)
    except ConfigError as e:  # found after loading: a --resume target, a model that does not fit
        print(f"rlhf-ray {args.command}: config error: {e}", file=sys.stderr)
        return 2
    except (RoleFailed, ConnectionError, FileNotFoundError, ValueError) as e:
        # Data, model and role errors name their file/key/role; a traceback adds nothing.
        print(f"rlhf-ray {args.command}: {e}", file=sys.stderr)
        if isinstance(e, RoleFailed):
            from .logs import tail

            # The role's own output went to its log file, not to this screen: show its end.
            last = tail(getattr(args, "run_dir", cfg.output.run_dir).resolve(), e.role.split()[0])
            if last:
                print(last, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
