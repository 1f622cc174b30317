"""summarise: the encoder-decoder system on the tiny T5 and the generated SAMSum-shaped task, in
one command: `rlhf-ray bench summarise --config configs/tiny_t5_cpu.yaml`. The shape of the
second source this project follows (Flan-T5 on dialogue summaries: full fine-tuning against
LoRA scored by ROUGE, then PPO with LoRA against a hate-speech classifier, reward and KL before
and after), at tiny-model scale.

1. The base: the tiny T5 after one epoch of full SFT on part of the demonstrations (the stand-in
   for a pretrained model: it knows the format, summarises poorly).
2. Full fine-tuning and LoRA each train that base on the same demonstrations; per method the
   trainable parameters, time, and held-out ROUGE-1/2/L/Lsum (greedy), before and after.
3. A classifier reward ("nothate" / "hate") on generated labelled texts, and PPO with LoRA from
   the better SFT model on the transformers engine: the classifier reward, the KL to the
   reference and ROUGE on held-out prompts (sampled) before and after PPO.
"""
from __future__ import annotations

import time
from typing import Any

from .common import table, with_overrides

METHODS = {"full": 3e-3, "lora": 1e-2}  # method -> SFT learning rate (LoRA trains fewer weights: a larger rate)
BASE_EXAMPLES = 600


def run(cfg, args) -> tuple[dict[str, Any], dict[str, Any], str]:
    from rlhf_ray.stages.rm import run_train_rm
    from rlhf_ray.stages.sft import run_sft
    from rlhf_ray.trainer import PPOTrainer

    if cfg.data.task != "dialogue" or cfg.eval.judge != "rouge" or cfg.rm.kind != "classifier":
        raise ValueError("bench summarise: give it the dialogue-summary config (--config configs/tiny_t5_cpu.yaml: "
                         "data.task=dialogue, eval.judge=rouge, rm.kind=classifier)")
    root = (cfg.output.run_dir.parent / f"{cfg.output.name}_summarise").resolve()
    root.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"methods": {}}

    def load(*overrides: str):
        return with_overrides(cfg, f"output.dir={root}", "output.trackers=[jsonl]", *overrides)

    print("summarise: the base (one epoch of full SFT on part of the demonstrations) ...", flush=True)
    base = root / "base"
    s0 = run_sft(load("output.name=base", "sft.method=full", "sft.epochs=1", f"sft.num_examples={BASE_EXAMPLES}",
                      f"sft.output_dir={base}"), progress=False)
    out["base"] = {"judge": s0["judge_after"], "time_s": s0["time_s"]}
    for m, lr in METHODS.items():
        print(f"summarise: {m} ...", flush=True)
        s = run_sft(load(f"output.name=sft_{m}", f"model.path={base}", f"sft.method={m}", f"sft.lr={lr}",
                         f"sft.output_dir={root / ('sft_' + m)}"), progress=False)
        out["methods"][m] = {"lr": lr, "trainable_params": s["trainable_params"], "time_s": s["time_s"],
                             "judge_before": s["judge_before"], "judge_after": s["judge_after"],
                             "train_loss_last": s["train_loss_last"]}
        print(f"summarise: {m}: {s['trainable_params']:,} trainable, ROUGE-L "
              f"{s['judge_after']['judge_parts']['rougeL']:.4f}", flush=True)
    best = max(out["methods"], key=lambda k: out["methods"][k]["judge_after"]["judge_parts"]["rougeL"])
    print(f"summarise: classifier reward and PPO from {best} ...", flush=True)
    rc = load("output.name=rlhf", f"model.path={base}", f"sft.output_dir={root / ('sft_' + best)}", "ppo.base=sft")
    t = time.perf_counter()
    rm = run_train_rm(rc, progress=False)
    with PPOTrainer(rc, progress=False, overwrite=True) as tr:
        records = tr.run()
        evals = tr.evals
    out["rlhf"] = {"from": best, "classifier_accuracy": rm["heldout_after"]["accuracy"],
                   "before": _figures(evals.get("before")), "after": _figures(evals.get("after")),
                   "stale_samples": sum(r["stale_samples"] for r in records),
                   "logprob_gap_max": max(r["logprob_gap"] for r in records), "time_s": time.perf_counter() - t}
    rl = out["rlhf"]
    full, lora = (out["methods"][m]["judge_after"]["judge_parts"]["rougeL"] for m in ("full", "lora"))
    base_l = out["base"]["judge"]["judge_parts"]["rougeL"]
    out["targets"] = {
        "SFT raises ROUGE-L over the base (both methods)": {
            "value": min(full, lora) - base_l, "goal": "> 0", "met": min(full, lora) > base_l},
        "classifier reward after - before PPO (held-out)": {
            "value": rl["after"]["reward_mean"] - rl["before"]["reward_mean"], "goal": "> 0",
            "met": rl["after"]["reward_mean"] > rl["before"]["reward_mean"]},
        "held-out KL after PPO within ppo.kl_target": {
            "value": rl["after"]["kl_per_seq"], "goal": f"<= {cfg.ppo.kl_target}",
            "met": rl["after"]["kl_per_seq"] <= (cfg.ppo.kl_target or 1e9)},
        "0 stale samples, log-prob gap < 1e-4 (transformers engine)": {
            "value": rl["logprob_gap_max"], "goal": "< 1e-4 with 0 stale",
            "met": rl["stale_samples"] == 0 and rl["logprob_gap_max"] < 1e-4}}
    params = {"methods": METHODS, "base_examples": BASE_EXAMPLES, "sft_examples": cfg.sft.num_examples,
              "sft_epochs": cfg.sft.epochs, "ppo_steps": cfg.ppo.steps, "root": str(root)}
    return params, out, render(out)


def _figures(e: dict | None) -> dict | None:
    if not e:
        return None
    return {k: e[k] for k in ("judge_score", "judge_parts", "reward_mean", "kl_per_seq") if k in e}


def render(out: dict[str, Any]) -> str:
    keys = ("rouge1", "rouge2", "rougeL", "rougeLsum")
    f4 = lambda x: f"{x:.4f}"  # noqa: E731
    rows = [["base", "-", "-"] + [f4(out["base"]["judge"]["judge_parts"][k]) for k in keys]]
    for m, r in out["methods"].items():
        rows.append([m, f"{r['trainable_params']:,}", f"{r['time_s']:.0f}"]
                    + [f4(r["judge_after"]["judge_parts"][k]) for k in keys])
    rl = out["rlhf"]
    text = table(["SFT", "trainable", "s"] + [k.replace("rouge", "ROUGE-") for k in keys], rows)
    ppo = [[when, f"{e['reward_mean']:.3f}", f"{e['kl_per_seq']:.2f}"] + [f4(e["judge_parts"][k]) for k in keys]
           for when, e in (("before PPO", rl["before"]), ("after PPO", rl["after"]))]
    text += "\n\n" + table([f"{rl['from']} + PPO (LoRA)", "classifier reward", "KL/seq"]
                           + [k.replace("rouge", "ROUGE-") for k in keys], ppo)
    return text + (f"\nSFT rows: greedy, held-out prompts. PPO rows: sampled, held-out prompts; reward = the "
                   f"classifier's 'nothate' logit (held-out accuracy {rl['classifier_accuracy']:.3f}); "
                   f"{rl['stale_samples']} stale samples, log-prob gap max {rl['logprob_gap_max']:.1e}.")
