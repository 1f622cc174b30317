"""compare-trl: rlhf-ray's PPO vs TRL's GRPOTrainer in one run, on the same base (the run's
SFT model, else the tiny model), the same LoRA, the same prompts, the same reward model (the
same scorer class, in TRL's process), the same number of generated samples and optimizer steps
per sample; samples/s of each, and the judge score each policy reaches on the held-out prompts,
measured by one evaluation function (HF sampling at temperature 1) for both.

Why GRPO: TRL 1.x has no PPO trainer any more (PPO left the library; its online trainers are
GRPO and RLOO). GRPO is its main one, with LoRA, a KL term to the adapter-off reference (beta)
and reward functions; RLOO differs only in the baseline. Neither has a value head, so TRL does
less work per sample than PPO: the comparison favours TRL on compute.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from typing import Any

import torch

from .common import table
from .ppo_step import bench_config

TARGET_SPEEDUP = 1.5
GENERATIONS_PER_PROMPT = 4


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
    with PPOTrainer(cfg, progress=False) as tr:
        startup = time.perf_counter() - t0
        t = time.perf_counter()
        records = tr.run(steps, evaluate=False)
        train_s = time.perf_counter() - t
        adapter = ray.get(tr.latest_adapter)
    steady = records[1:] or records
    return {"startup_s": startup, "train_s": train_s, "samples": sum(r["samples"] for r in records),
            "samples_per_s": sum(r["samples"] for r in records) / train_s,
            "samples_per_s_after_step0": sum(r["samples"] for r in steady) / sum(r["time_s"]["total"] for r in steady),
            "adapter": adapter}


def _trl(cfg, base: str, reward: str, prompts: list[str], steps: int, out_dir: str) -> dict[str, Any]:
    import datasets
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from rlhf_ray.actors.reward import RewardScorer
    from rlhf_ray.models import load_tokenizer

    cores = len(os.sched_getaffinity(0))
    t0 = time.perf_counter()
    scorer = RewardScorer(cfg, reward)  # the PPO reward role's class: same text, same normalisation
    torch.set_num_threads(cores)  # the scorer set 1 for its own actor; TRL has the machine to itself

    def reward_fn(prompts, completions, **_):
        return scorer.score(prompts, completions)

    per_step = cfg.ppo.batch_size  # samples generated per rlhf-ray step
    minibatch = cfg.learner.minibatch_size
    args = GRPOConfig(
        output_dir=out_dir, use_cpu=True, bf16=False, fp16=False, report_to=[], save_strategy="no",
        logging_steps=1, seed=cfg.model.seed, learning_rate=cfg.learner.lr, max_grad_norm=cfg.learner.max_grad_norm,
        per_device_train_batch_size=minibatch, steps_per_generation=per_step // minibatch,
        num_generations=GENERATIONS_PER_PROMPT, num_iterations=cfg.learner.epochs,
        # the same optimizer steps per generated sample as rlhf-ray's epochs x minibatches
        max_steps=steps * cfg.learner.epochs * (per_step // minibatch),
        max_completion_length=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature, top_p=1.0,
        top_k=0, beta=cfg.ppo.kl_coef, epsilon=cfg.ppo.clip_eps, lr_scheduler_type="constant",
        warmup_steps=0, dataloader_num_workers=0, model_init_kwargs={"dtype": torch.float32},
    )
    lora = LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM")
    tok = load_tokenizer(base)
    trainer = GRPOTrainer(model=base, reward_funcs=reward_fn, args=args, processing_class=tok,
                          train_dataset=datasets.Dataset.from_dict({"prompt": prompts}), peft_config=lora)
    startup = time.perf_counter() - t0
    t = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t
    samples = steps * per_step
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return {"startup_s": startup, "train_s": train_s, "samples": samples, "samples_per_s": samples / train_s,
            "reward_first": rewards[0] if rewards else None, "reward_last": rewards[-1] if rewards else None,
            "model": trainer.model, "tokenizer": tok}


def run(cfg, args) -> tuple[dict[str, Any], dict[str, Any], str]:
    from peft import set_peft_model_state_dict

    from rlhf_ray.data.prompts import load_prompt_texts
    from rlhf_ray.models import add_lora, load_causal_lm, load_tokenizer
    from rlhf_ray.stages import policy_base, reward_path

    cfg = bench_config(cfg)
    steps = args.trl_steps
    cfg = dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, steps=steps))
    base, reward = policy_base(cfg), reward_path(cfg)
    prompts = load_prompt_texts(cfg.data, cfg.data.prompts_path)
    held = load_prompt_texts(cfg.data, cfg.eval.prompts_path, key="eval.prompts_path",
                             num=cfg.eval.num_prompts, split="heldout")
    k, new = cfg.eval.samples_per_prompt, cfg.rollout.max_new_tokens

    ours = _rlhf_ray(cfg, steps)
    with tempfile.TemporaryDirectory() as out_dir:
        theirs = _trl(cfg, base, reward, prompts, steps, out_dir)

    # One evaluation for all three policies: base (adapter off), rlhf-ray's adapter, TRL's adapter.
    tok = load_tokenizer(base)
    judged = {"base": judge_with_hf(theirs["model"], tok, held, k, new, seed=1, adapter=False),
              "trl": judge_with_hf(theirs["model"], theirs["tokenizer"], held, k, new, seed=1)}
    policy = add_lora(load_causal_lm(base, cfg.model.dtype), cfg.lora)
    set_peft_model_state_dict(policy, ours["adapter"].tensors)
    judged["rlhf_ray"] = judge_with_hf(policy, tok, held, k, new, seed=1)

    speedup = ours["samples_per_s"] / theirs["samples_per_s"]
    met = speedup >= TARGET_SPEEDUP and judged["rlhf_ray"] >= judged["trl"]
    strip = lambda d: {key: v for key, v in d.items() if key not in ("adapter", "model", "tokenizer")}
    results = {
        "trl_trainer": "GRPOTrainer", "rlhf_ray": strip(ours), "trl": strip(theirs), "judge": judged,
        "speedup_samples_per_s": speedup,
        "speedup_after_step0": ours["samples_per_s_after_step0"] / theirs["samples_per_s"],
        "targets": {"speedup_at_equal_or_better_judge": {
            "value": speedup, "goal": f">= {TARGET_SPEEDUP} with judge >= TRL's", "met": met}},
        "_extra_versions": ["trl", "accelerate"],
    }
    rows = [["rlhf-ray PPO (2 vLLM actors, Ray Train)", ours["samples"], round(ours["startup_s"], 1),
             round(ours["train_s"], 1), round(ours["samples_per_s"], 2), round(judged["rlhf_ray"], 3)],
            ["TRL GRPOTrainer (HF generate)", theirs["samples"], round(theirs["startup_s"], 1),
             round(theirs["train_s"], 1), round(theirs["samples_per_s"], 2), round(judged["trl"], 3)]]
    text = table(["system", "samples", "start-up s", "train s", "samples/s", "judge"], rows)
    text += (f"\nbase (adapter off) judge: {judged['base']:.3f}; rlhf-ray / TRL samples/s = {speedup:.2f} "
             f"({results['speedup_after_step0']:.2f} after rlhf-ray's step 0); target >= {TARGET_SPEEDUP} at an "
             f"equal or better judge score: {'met' if met else 'NOT met'}")
    params = {"steps": steps, "samples_per_step": cfg.ppo.batch_size, "generations_per_prompt_trl":
              GENERATIONS_PER_PROMPT, "eval_prompts": len(held), "eval_samples_per_prompt": k}
    return params, results, text
