"""`rlhf-ray train-rm`: a reward model from preference pairs with the pairwise ranking loss
(``rlhf_ray.algo.pairwise_reward_loss``, each pair's ``margin`` subtracted when
``rm.use_margin``). Reports held-out pair accuracy and the mean reward gap, and stores the
training rewards' mean/std beside the model so PPO sees unit-scale rewards."""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Optional

import torch

from ..algo import pairwise_reward_loss
from ..config import Config
from ..data.loaders import PLAIN, LoadReport, Renderer
from ..models.methods import MethodSpec, apply_method
from .finetune import (Clock, peak_memory, eval_chunks, pad_right, prepare_for_training, save_model, stage_trackers,
                       train_epochs, train_stage, start_worker)
from . import base_model, rm_dir

NORMALIZER = "rlhf_ray_reward.json"
SCALE_PAIRS = 2048  # training pairs the reward mean/std are measured on


def reward_text(prompt: str, response: str) -> str:
    """What the reward model reads; the PPO reward role scores exactly this. Never an EOS token:
    training pairs have none, and vLLM's decoded response text leaves it out, so a finished
    and a truncated response look alike here (``ppo.truncated`` decides what a cut one earns)."""
    return prompt + response


def preference_data(cfg: Config, render: Renderer = PLAIN) -> tuple[list[dict], list[dict], list[LoadReport]]:
    """(train pairs, held-out pairs, load reports); message lists rendered by ``render``
    (``data.chat_template``, as PPO renders its prompts, so the reward model reads what it will score)."""
    rc = cfg.rm
    if rc.data_path is None:
        from ..data import objective, task

        preference_pairs = {"reviews": task.preference_pairs, "objective": objective.preference_pairs}.get(cfg.data.task)
        if preference_pairs is None:
            raise ValueError(f"data.task={cfg.data.task} has no generated preference pairs: its reward is a function "
                             "(reward.functions); set rm.data_path to train a reward model on your own pairs")
        n_eval = max(32, int(rc.num_pairs * rc.eval_fraction))
        train = preference_pairs(rc.num_pairs, rc.seed, "train")
        held = preference_pairs(n_eval, rc.seed, "heldout")
        return train, held, [LoadReport("generated task", read=len(train) + len(held), kept=len(train) + len(held))]
    from ..data.loaders import load_preferences

    pairs, report = load_preferences(rc.data_path, "rm.data_path", cfg.data.on_bad_record, limit=rc.max_pairs,
                                     render=render)
    if rc.eval_path is not None:
        held, eval_report = load_preferences(rc.eval_path, "rm.eval_path", cfg.data.on_bad_record, render=render)
        return pairs, held, [report, eval_report]
    random.Random(rc.seed).shuffle(pairs)
    n_eval = max(1, int(len(pairs) * rc.eval_fraction))
    if len(pairs) - n_eval < 1:
        raise ValueError(f"rm.data_path={rc.data_path!r}: {len(pairs)} pairs are too few to hold "
                         f"{n_eval} out for evaluation")
    return pairs[n_eval:], pairs[:n_eval], [report]


def encode(pairs: list[dict], tokenizer, max_len: int, report: LoadReport, use_margin: bool,
           over_long: str = "truncate") -> list[tuple]:
    """(chosen ids, rejected ids, margin) per pair. A pair longer than ``max_len``
    (``data.over_long``): ``truncate`` drops the shared prompt's oldest tokens (a leading BOS
    kept) so that both replies fit whole, and drops a pair whose longer reply leaves no room
    for a prompt token; ``drop`` drops it (cutting the end could cut away the part that
    differs). Everything cut or dropped is counted."""
    out = []
    for i, p in enumerate(pairs):
        c = tokenizer(reward_text(p["prompt"], p["chosen"]))["input_ids"]
        r = tokenizer(reward_text(p["prompt"], p["rejected"]))["input_ids"]
        if max(len(c), len(r)) > max_len:
            if over_long != "truncate":
                report.drop(f"pair {i}", f"longer than rm.max_seq_len={max_len}")
                continue
            fitted = _cut_prompt(p, tokenizer, max_len)
            if fitted is None:
                report.drop(f"pair {i}", f"a reply too long for rm.max_seq_len={max_len} (no room left for the prompt)")
                continue
            report.filtered[f"prompts cut from the left to fit rm.max_seq_len={max_len}"] += 1
            c, r = fitted
        margin = p.get("margin") if use_margin else None
        out.append((c, r, 0.0 if margin is None else float(margin)))
    return out


def _cut_prompt(pair: dict, tokenizer, max_len: int) -> Optional[tuple[list[int], list[int]]]:
    """(chosen ids, rejected ids) in ``max_len`` tokens each, from the prompt's ids cut from the
    left and each reply's ids (tokenized apart, so the cut is on a token boundary); None if the
    longer reply leaves no room for a prompt token."""
    from ..data.prompts import cut_left

    prompt = tokenizer(pair["prompt"])["input_ids"]
    c, r = (tokenizer(pair[k], add_special_tokens=False)["input_ids"] for k in ("chosen", "rejected"))
    cut = cut_left(prompt, max_len - max(len(c), len(r)), tokenizer.bos_token_id)
    return None if cut is None else (cut + c, cut + r)


def _rewards(model, seqs: list[list[int]], pad_id: int, device=None) -> torch.Tensor:
    ids, mask = pad_right(seqs, pad_id)
    return model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, 0].float()


def _pair_loss_sum(model, batch: list[tuple], pad_id: int, device=None) -> tuple[torch.Tensor, dict[str, float]]:
    """The ranking loss summed over the batch's pairs, and how many it ranks right."""
    n = len(batch)
    rewards = _rewards(model, [b[0] for b in batch] + [b[1] for b in batch], pad_id, device)
    chosen, rejected = rewards[:n], rewards[n:]
    margin = torch.tensor([b[2] for b in batch], device=rewards.device)
    loss = pairwise_reward_loss(chosen, rejected, margin) * n
    return loss, {"accuracy": float((chosen > rejected).float().sum())}


def _scores(model, seqs: list[list[int]], pad_id: int, chunk: int, device, rank: int, world: int) -> torch.Tensor:
    """This rank's share of the rewards of ``seqs`` (in order of ``seqs[rank::world]``)."""
    parts = [_rewards(model, b, pad_id, device).cpu() for b in eval_chunks(seqs, chunk, rank, world)]
    return torch.cat(parts) if parts else torch.zeros(0)


@torch.no_grad()
def evaluate_pairs(model, pairs: list[tuple], pad_id: int, chunk: int, device=None, rank: int = 0,
                   world: int = 1) -> dict[str, float]:
    """Held-out pair accuracy (chosen scored above rejected) and reward gap, shared out over the ranks."""
    from ..devices import all_sum

    model.eval()
    c = _scores(model, [x[0] for x in pairs], pad_id, chunk, device, rank, world)
    r = _scores(model, [x[1] for x in pairs], pad_id, chunk, device, rank, world)
    model.train()
    gap = (c - r).double()
    n, right, s1, s2 = all_sum([len(gap), float((gap > 0).sum()), float(gap.sum()), float((gap ** 2).sum())], device)
    mean = s1 / n
    var = (s2 - n * mean ** 2) / (n - 1) if n > 1 else 0.0
    return {"accuracy": right / n, "reward_gap": mean, "reward_gap_std": max(var, 0.0) ** 0.5, "pairs": int(n)}


@torch.no_grad()
def reward_scale(model, pairs: list[tuple], pad_id: int, chunk: int, device=None, rank: int = 0,
                 world: int = 1) -> dict[str, float]:
    from ..devices import all_sum

    model.eval()
    x = _scores(model, [s for p in pairs for s in p[:2]], pad_id, chunk, device, rank, world).double()
    n, s1, s2 = all_sum([len(x), float(x.sum()), float((x ** 2).sum())], device)
    mean = s1 / n
    std = (max(s2 - n * mean ** 2, 0.0) / (n - 1)) ** 0.5 if n > 1 else 0.0
    return {"mean": mean, "std": max(std, 1e-6)}


def run_train_rm(cfg: Config, *, progress: bool = True) -> dict[str, Any]:
    """Pairs are read, checked and encoded here; training runs on ``rm.num_workers`` Ray Train
    workers, and rank 0 evaluates, measures the reward scale and saves."""
    from ..data.loaders import renderer
    from ..models import load_tokenizer
    from ..models.checks import check_inputs

    if cfg.rm.kind == "classifier":
        from .classifier import run_train_classifier

        return run_train_classifier(cfg, progress=progress)
    rc = cfg.rm
    clock = Clock()
    base = base_model(cfg, rc.base, "rm.base")
    tokenizer = load_tokenizer(base)
    check_inputs(cfg, base, tokenizer, key="rm.base", lora=rc.method != "full", head="seq_cls",
                 targets=MethodSpec.from_config(cfg, rc.method).targets, targets_key=MethodSpec.targets_key(cfg, rc.method),
                 outputs=[("rm.output_dir", rc.output_dir)] if rc.output_dir else ())
    train_pairs, held_pairs, reports = preference_data(cfg, renderer(cfg.data, tokenizer))
    train = encode(train_pairs, tokenizer, rc.max_seq_len, reports[0], rc.use_margin, cfg.data.over_long)
    held = encode(held_pairs, tokenizer, rc.max_seq_len, reports[-1], rc.use_margin, cfg.data.over_long)
    for key, report in zip(("rm.data_path", "rm.eval_path"), reports):
        report.announce(key)
    if not train or not held:
        raise ValueError(f"train-rm: {len(train)} training and {len(held)} held-out pairs left after "
                         f"dropping those over rm.max_seq_len ({'; '.join(r.summary() for r in reports)})")
    out = rm_dir(cfg)
    summary = {"stage": "rm", "base": base, "output": str(out), "method": rc.method, "use_margin": rc.use_margin,
               "data": [r.to_dict() for r in reports], "train_pairs": len(train), "heldout_pairs": len(held),
               "workers": rc.num_workers, "use_gpu": rc.use_gpu}
    return train_stage(cfg, "rm", _rm_worker, summary, clock,
                       {"cfg": cfg, "base": base, "train": train, "held": held, "progress": progress})


def _rm_worker(config: dict) -> None:
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from ..models import load_tokenizer
    from ..models.loading import load_pretrained

    cfg, base, train, held = config["cfg"], config["base"], config["train"], config["held"]
    rc = cfg.rm
    rank, world, device = start_worker(config, "rm")
    tokenizer = load_tokenizer(base)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "score head newly initialised" is the point here
    try:
        model = load_pretrained(AutoModelForSequenceClassification, base, cfg.model.dtype, device, num_labels=1)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.config.pad_token_id = tokenizer.pad_token_id
    if rc.method != "full":
        model = apply_method(model, MethodSpec.from_config(cfg, rc.method), task_type="SEQ_CLS")
        _fp32_score_head(model)
    params = [p for p in model.parameters() if p.requires_grad]
    pad = tokenizer.pad_token_id
    chunk = rc.micro_batch_size or rc.batch_size
    before = evaluate_pairs(model, held, pad, chunk, device, rank, world)
    with stage_trackers(config, "rm", rank) as trackers:
        if trackers:
            trackers.log({"heldout": before}, 0)
        model.train()
        ddp = prepare_for_training(model, rc.gradient_checkpointing, world)
        history = train_epochs(ddp, params, train, batch_size=rc.batch_size, epochs=rc.epochs, lr=rc.lr,
                               seed=rc.seed, loss_fn=lambda b: _pair_loss_sum(ddp, b, pad, device), count_fn=len,
                               desc="train-rm", progress=config["progress"], device=device, rank=rank, world=world,
                               micro_batch_size=rc.micro_batch_size, on_step=trackers.log if trackers else None)
        if rc.gradient_checkpointing:
            model.gradient_checkpointing_disable()
        after = evaluate_pairs(model, held, pad, chunk, device, rank, world)
        if trackers:
            trackers.log({"heldout": after}, len(history))
    # A sample is enough for a mean and a std; all pairs of a large set would be hours on 7B.
    scale = reward_scale(model, random.Random(rc.seed).sample(train, min(len(train), SCALE_PAIRS)), pad, chunk,
                         device, rank, world)
    if rank != 0:
        return
    out = Path(config["summary"]["output"])
    summary = {**config["summary"], "steps": len(history), "trainable_params": sum(p.numel() for p in params),
               "train_loss_first": history[0]["loss"], "train_loss_last": history[-1]["loss"],
               "heldout_before": before, "heldout_after": after, "normalizer": scale, **peak_memory(device)}
    save_model(model, tokenizer, out, summary)
    (out / NORMALIZER).write_text(json.dumps(scale))


def _fp32_score_head(model) -> None:
    """PEFT upcasts the adapter to fp32 but not its trainable copy of the score head (nor does
    anything upcast the head under SSF or RepAdapter); in a bf16
    model that head's small late updates would round away (a bf16 step near weights of 0.02 is
    ~1e-4). Train it in fp32, its input cast up to meet it (the learner does the same with its
    value head)."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    score = model.get_submodule("base_model.model.score" if hasattr(model, "peft_config") else "score")
    score.register_forward_pre_hook(lambda _, args: tuple(a.float() for a in args))


def load_normalizer(path: str | Path) -> Optional[dict[str, float]]:
    p = Path(path) / NORMALIZER
    return json.loads(p.read_text()) if p.is_file() else None
