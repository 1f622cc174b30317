"""compare-trl: rlhf-ray vs TRL's GRPOTrainer in one run, with the same algorithm on both sides:
GRPO (group-normalised advantages, ``rollout.samples_per_prompt`` = TRL's ``num_generations``),
the k3 KL to the adapter-off reference as a loss term (TRL's ``beta``) at a fixed coefficient,
token-mean loss over the minibatch (TRL's default ``dapo``), a truncated response scored as it
is, the same clip, learning rate, epochs (TRL's ``num_iterations``), minibatch rows per
optimizer step, base, LoRA, prompts and reward model (the same scorer class, in TRL's process).

The main row is the config's model (the run's SFT model and trained reward model after
`make run`), with the held-out judge measured for both policies by one evaluation function
(HF sampling at temperature 1). The curve rows measure samples/s only, at two model sizes
(the tiny default and a 58 M-parameter Llama with a 32,000-token vocabulary built here, random
weights) and two response lengths, because on the 0.5 M-parameter model fixed per-call costs
dominate and say little about a larger one.

Samples/s are reported over the whole training call and after each side's first step (vLLM's
and HF's first calls, TRL's first generation round). Start-up is reported separately.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .common import MID, build_mid_model, table
from .ppo_step import bench_config

TARGET_TINY = 1.0  # samples/s after warm-up, at an equal or better judge
TARGET_MID = 1.5
GENERATIONS_PER_PROMPT = 4


def grpo_config(cfg, steps: int, max_new_tokens: int):
    """The config's run as GRPO with TRL's loss choices: ``ppo.prompts_per_step`` prompts of
    ``GENERATIONS_PER_PROMPT`` samples each step (the same samples per step as the PPO run)."""
    prompts = max(cfg.learner.num_workers, cfg.ppo.prompts_per_step // GENERATIONS_PER_PROMPT)
    ppo = dataclasses.replace(cfg.ppo, steps=steps, prompts_per_step=prompts, estimator="grpo", group_std=True,
                              kl_in="loss", kl_estimator="k3", kl_target=None, truncated="score",
                              loss_agg="token_mean", ratio_level="token", clip_eps_high=None)
    rollout = dataclasses.replace(cfg.rollout, samples_per_prompt=GENERATIONS_PER_PROMPT,
                                  max_new_tokens=max_new_tokens)
    # The PPO run's rows per optimizer step, now GENERATIONS_PER_PROMPT to a prompt.
    learner = dataclasses.replace(cfg.learner, minibatch_prompts=max(1, cfg.learner.minibatch_prompts // GENERATIONS_PER_PROMPT))
    return dataclasses.replace(cfg, ppo=ppo, rollout=rollout, learner=learner)


@torch.no_grad()
def judge_with_hf(model, tok, prompts: list[str], samples_per_prompt: int, max_new_tokens: int,
                  seed: int, adapter: bool = True) -> float:
    """Mean judge score of sampled continuations (temperature 1, no top-k/top-p)."""
    from contextlib import nullcontext

    from rlhf_ray.data.task import judge

    torch.manual_seed(seed)
    model.eval()
    tok.padding_side = "left"
    scores = []
    ctx = nullcontext() if adapter else model.disable_adapter()
    with ctx:
        for i in range(0, len(prompts), 32):
            batch = [p for p in prompts[i:i + 32] for _ in range(samples_per_prompt)]
            enc = tok(batch, return_tensors="pt", padding=True)
            out = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
            for row in out[:, enc["input_ids"].shape[1]:]:
                scores.append(judge(tok.decode(row, skip_special_tokens=True)).score)
    return sum(scores) / len(scores)


def _rlhf_ray(cfg, steps: int) -> dict[str, Any]:
    import ray

    from rlhf_ray.trainer import PPOTrainer

    t0 = time.perf_counter()
    with PPOTrainer(cfg, progress=False, overwrite=True) as tr:
        startup = time.perf_counter() - t0
        t = time.perf_counter()
        records = tr.run(steps, evaluate=False)
        train_s = time.perf_counter() - t
        adapter = ray.get(tr.latest_adapter)
    if tr.how_connected.startswith("started"):
        ray.shutdown()  # the next row starts its own head (a joined cluster stays)
    steady = records[1:] or records
    samples = sum(r["samples"] for r in records)
    return {"startup_s": startup, "train_s": train_s, "samples": samples, "samples_per_s": samples / train_s,
            "samples_per_s_after_step0": sum(r["samples"] for r in steady) / sum(r["time_s"]["total"] for r in steady),
            "reward_first": records[0]["reward_mean"], "reward_last": records[-1]["reward_mean"], "adapter": adapter}


def _trl(cfg, base: str, reward: str, prompts: list[str], steps: int, out_dir: str) -> dict[str, Any]:
    import datasets
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlhf_ray.actors.reward import RewardScorer
    from rlhf_ray.models import load_tokenizer

    cores = len(os.sched_getaffinity(0))
    t0 = time.perf_counter()
    scorer = RewardScorer(cfg, reward)  # the PPO reward role's class: same text, same normalisation
    torch.set_num_threads(cores)  # the scorer set 1 for its own actor; TRL has the machine to itself

    def reward_fn(prompts, completions, **_):
        return scorer.score(prompts, completions)

    per_step = cfg.ppo.prompts_per_step * cfg.rollout.samples_per_prompt  # samples generated per rlhf-ray step
    minibatch = cfg.minibatch_rows  # completions per optimizer step
    rounds = per_step // minibatch  # optimizer steps per generation round and epoch
    args = GRPOConfig(
        output_dir=out_dir, use_cpu=True, bf16=False, fp16=False, report_to=[], save_strategy="no",
        logging_steps=1, seed=cfg.model.seed, learning_rate=cfg.learner.lr, max_grad_norm=cfg.learner.max_grad_norm,
        per_device_train_batch_size=minibatch, steps_per_generation=rounds,
        num_generations=cfg.rollout.samples_per_prompt, num_iterations=cfg.learner.epochs,
        # the same optimizer steps per generated sample as rlhf-ray's epochs x minibatches
        max_steps=steps * cfg.learner.epochs * rounds,
        max_completion_length=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature, top_p=1.0,
        top_k=0, beta=cfg.ppo.kl_coef, epsilon=cfg.ppo.clip_eps, loss_type="dapo", scale_rewards="group",
        mask_truncated_completions=False, lr_scheduler_type="constant",
        warmup_steps=0, dataloader_num_workers=0, model_init_kwargs={"dtype": torch.float32},
    )
    lora = LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM")
    tok = load_tokenizer(base)
    ends: list[float] = []  # time at the end of every optimizer step

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            ends.append(time.perf_counter())

    trainer = GRPOTrainer(model=base, reward_funcs=reward_fn, args=args, processing_class=tok,
                          train_dataset=datasets.Dataset.from_dict({"prompt": prompts}), peft_config=lora,
                          callbacks=[Clock()])
    startup = time.perf_counter() - t0
    t = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t
    samples = steps * per_step
    per_round = cfg.learner.epochs * rounds  # optimizer steps per generation round (one rlhf-ray step)
    after_first = (samples - per_step) / (ends[-1] - ends[per_round - 1]) if steps > 1 else samples / train_s
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return {"startup_s": startup, "train_s": train_s, "samples": samples, "samples_per_s": samples / train_s,
            "samples_per_s_after_step0": after_first,
            "reward_first": rewards[0] if rewards else None, "reward_last": rewards[-1] if rewards else None,
            "model": trainer.model, "tokenizer": tok}


def _pair(cfg, base: str, reward: str, prompts: list[str], steps: int) -> tuple[dict, dict]:
    ours = _rlhf_ray(cfg, steps)
    with tempfile.TemporaryDirectory() as out_dir:
        theirs = _trl(cfg, base, reward, prompts, steps, out_dir)
    return ours, theirs


def _compared(model: str, length: int, steps: int, ours: dict, theirs: dict) -> dict[str, Any]:
    """One row of the comparison: both sides' figures (without their models) and the ratios."""
    strip = lambda d: {key: v for key, v in d.items() if key not in ("adapter", "model", "tokenizer")}  # noqa: E731
    return {"model": model, "max_new_tokens": length, "steps": steps, "rlhf_ray": strip(ours), "trl": strip(theirs),
            "speedup": ours["samples_per_s"] / theirs["samples_per_s"],
            "speedup_after_step0": ours["samples_per_s_after_step0"] / theirs["samples_per_s_after_step0"]}


def run(cfg, args) -> tuple[dict[str, Any], dict[str, Any], str]:
    from peft import set_peft_model_state_dict

    from rlhf_ray.data.prompts import load_prompt_texts
    from rlhf_ray.models import add_lora, load_causal_lm, load_tokenizer, resolve_model_path
    from rlhf_ray.stages import policy_base, reward_path

    cfg = bench_config(cfg)
    steps, new = args.trl_steps, cfg.rollout.max_new_tokens
    main_cfg = grpo_config(cfg, steps, new)
    base, reward = policy_base(main_cfg), reward_path(main_cfg)
    prompts = load_prompt_texts(cfg.data, cfg.data.prompts_path, cap=cfg.data.max_prompts)
    held = load_prompt_texts(cfg.data, cfg.eval.prompts_path, key="eval.prompts_path",
                             num=cfg.eval.num_prompts, cap=cfg.eval.max_prompts, split="heldout")
    k = cfg.eval.samples_per_prompt

    # The main row: the config's model, judged.
    ours, theirs = _pair(main_cfg, base, reward, prompts, steps)
    tok = load_tokenizer(base)
    judged = {"base": judge_with_hf(theirs["model"], tok, held, k, new, seed=1, adapter=False),
              "trl": judge_with_hf(theirs["model"], theirs["tokenizer"], held, k, new, seed=1)}
    policy = add_lora(load_causal_lm(base, cfg.model.dtype), cfg.lora)
    set_peft_model_state_dict(policy, ours["adapter"].tensors)
    judged["rlhf_ray"] = judge_with_hf(policy, tok, held, k, new, seed=1)
    main = {**_compared("config", new, steps, ours, theirs), "judge": judged}
    # Ours asynchronous (rollout.max_staleness=1: the next rollout runs while a step trains, the
    # off-policy correction on by itself) against the same TRL run: TRL's GRPOTrainer has no
    # asynchronous mode that runs here (its vLLM server mode needs a GPU), so its row is the one above.
    async_cfg = dataclasses.replace(main_cfg, rollout=dataclasses.replace(main_cfg.rollout, max_staleness=1))
    ours_async = _rlhf_ray(async_cfg, steps)
    set_peft_model_state_dict(policy, ours_async["adapter"].tensors)
    judged["rlhf_ray_async"] = judge_with_hf(policy, tok, held, k, new, seed=1)
    main_async = {**_compared("config S=1", new, steps, ours_async, theirs),
                  "judge": {**judged, "rlhf_ray": judged["rlhf_ray_async"]}}
    del theirs, policy

    # The curve: samples/s only, by model size and response length.
    curve = []
    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else [new]
    with tempfile.TemporaryDirectory() as tmp:
        sizes = {"tiny": str(resolve_model_path(cfg.model))}
        if args.mid_size:
            longest = max(lengths) + cfg.data.max_prompt_tokens + 8
            sizes["mid"], _ = build_mid_model(Path(tmp) / "mid", MID, max(256, longest), tokenizer_from=sizes["tiny"])
        for size, path in sizes.items() if args.curve_steps > 0 else ():
            for length in lengths:
                c = grpo_config(cfg, args.curve_steps, length)
                c = dataclasses.replace(c, model=dataclasses.replace(c.model, path=path),
                                        ppo=dataclasses.replace(c.ppo, base="model"))
                o, t = _pair(c, path, reward, prompts, args.curve_steps)
                curve.append(_compared(size, length, args.curve_steps, o, t))
                del t

    # The better of our synchronous and asynchronous rows, each at its own judge.
    best = max((main, main_async), key=lambda r: (r["judge"]["rlhf_ray"] >= judged["trl"], r["speedup_after_step0"]))
    tiny_met = best["speedup_after_step0"] >= TARGET_TINY and best["judge"]["rlhf_ray"] >= judged["trl"]
    mid = [r for r in curve if r["model"] == "mid" and r["max_new_tokens"] == new]
    targets = {"tiny_after_warmup_at_equal_or_better_judge": {
        "value": best["speedup_after_step0"], "row": best["model"], "goal": f">= {TARGET_TINY} with judge >= TRL's",
        "met": tiny_met}}
    if mid:
        targets["mid_size_after_warmup"] = {"value": mid[0]["speedup_after_step0"], "goal": f">= {TARGET_MID}",
                                            "met": mid[0]["speedup_after_step0"] >= TARGET_MID}
    results = {"trl_trainer": "GRPOTrainer", "algorithm": "GRPO on both sides", "main": main,
               "main_async": main_async, "curve": curve,
               "mid_model": dict(MID), "targets": targets, "_extra_versions": ["trl", "accelerate"]}

    def row(r, judge=None):
        o, t = r["rlhf_ray"], r["trl"]
        return [r["model"], r["max_new_tokens"], o["samples"], round(o["startup_s"], 1), round(t["startup_s"], 1),
                round(o["samples_per_s"], 2), round(t["samples_per_s"], 2), round(r["speedup"], 2),
                round(o["samples_per_s_after_step0"], 2), round(t["samples_per_s_after_step0"], 2),
                round(r["speedup_after_step0"], 2)] + ([judge] if judge is not None else ["-"])
    text = table(["model", "tokens", "samples", "start-up s ours", "start-up s TRL", "samples/s ours",
                  "samples/s TRL", "ratio", "after step 0 ours", "after step 0 TRL", "ratio", "judge ours/TRL"],
                 [row(main, f"{judged['rlhf_ray']:.3f}/{judged['trl']:.3f}"),
                  row(main_async, f"{judged['rlhf_ray_async']:.3f}/{judged['trl']:.3f}")] + [row(r) for r in curve])
    text += (f"\nGRPO, {GENERATIONS_PER_PROMPT} samples per prompt, on both sides; base (adapter off) judge "
             f"{judged['base']:.3f}.\n" + "\n".join(
                 f"target {name}: {t['value']:.2f} (goal {t['goal']}): {'met' if t['met'] else 'NOT met'}"
                 for name, t in targets.items()))
    params = {"steps": steps, "curve_steps": args.curve_steps, "samples_per_step": main_cfg.ppo.prompts_per_step
              * GENERATIONS_PER_PROMPT, "generations_per_prompt": GENERATIONS_PER_PROMPT, "lengths": lengths,
              "eval_prompts": len(held), "eval_samples_per_prompt": k}
    return params, results, text
