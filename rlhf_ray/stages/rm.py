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
from ..data.loaders import LoadReport
from .finetune import Clock, pad_right, save_model, train_epochs, use_all_cores, write_summary
from . import base_model, rm_dir

NORMALIZER = "rlhf_ray_reward.json"


def reward_text(prompt: str, response: str) -> str:
    """What the reward model reads; the PPO reward role scores exactly this. Never an EOS token:
    training pairs have none, and vLLM's decoded response text leaves it out, so a finished
    and a truncated response look alike here (``ppo.truncated`` decides what a cut one earns)."""
    return prompt + response


def preference_data(cfg: Config) -> tuple[list[dict], list[dict], list[LoadReport]]:
    """(train pairs, held-out pairs, load reports)."""
    rc = cfg.rm
    if rc.data_path is None:
        from ..data.task import preference_pairs

        n_eval = max(32, int(rc.num_pairs * rc.eval_fraction))
        train = preference_pairs(rc.num_pairs, rc.seed, "train")
        held = preference_pairs(n_eval, rc.seed, "heldout")
        return train, held, [LoadReport("generated task", read=len(train) + len(held), kept=len(train) + len(held))]
    from ..data.loaders import load_preferences

    pairs, report = load_preferences(rc.data_path, "rm.data_path", cfg.data.on_bad_record, limit=rc.num_pairs)
    if rc.eval_path is not None:
        held, eval_report = load_preferences(rc.eval_path, "rm.eval_path", cfg.data.on_bad_record)
        return pairs, held, [report, eval_report]
    random.Random(rc.seed).shuffle(pairs)
    n_eval = max(1, int(len(pairs) * rc.eval_fraction))
    if len(pairs) - n_eval < 1:
        raise ValueError(f"rm.data_path={rc.data_path!r}: {len(pairs)} pairs are too few to hold "
                         f"{n_eval} out for evaluation")
    return pairs[n_eval:], pairs[:n_eval], [report]


def encode(pairs: list[dict], tokenizer, max_len: int, report: LoadReport, use_margin: bool) -> list[tuple]:
    """(chosen ids, rejected ids, margin) per pair; pairs longer than ``max_len`` are dropped
    and counted (cutting them could cut away the part that differs)."""
    out = []
    for i, p in enumerate(pairs):
        c = tokenizer(reward_text(p["prompt"], p["chosen"]))["input_ids"]
        r = tokenizer(reward_text(p["prompt"], p["rejected"]))["input_ids"]
        if max(len(c), len(r)) > max_len:
            report.drop(f"pair {i}", f"longer than rm.max_seq_len={max_len}")
            continue
        margin = p.get("margin") if use_margin else None
        out.append((c, r, 0.0 if margin is None else float(margin)))
    return out


def _rewards(model, seqs: list[list[int]], pad_id: int) -> torch.Tensor:
    ids, mask = pad_right(seqs, pad_id)
    return model(input_ids=ids, attention_mask=mask).logits[:, 0].float()


def _pair_loss(model, batch: list[tuple], pad_id: int) -> tuple[torch.Tensor, dict[str, float]]:
    n = len(batch)
    rewards = _rewards(model, [b[0] for b in batch] + [b[1] for b in batch], pad_id)
    chosen, rejected = rewards[:n], rewards[n:]
    margin = torch.tensor([b[2] for b in batch])
    loss = pairwise_reward_loss(chosen, rejected, margin)
    return loss, {"accuracy": float((chosen > rejected).float().mean())}


@torch.no_grad()
def evaluate_pairs(model, pairs: list[tuple], pad_id: int, batch_size: int) -> dict[str, float]:
    """Held-out pair accuracy (chosen scored above rejected) and reward gap."""
    model.eval()
    chosen, rejected = [], []
    for i in range(0, len(pairs), batch_size):
        b = pairs[i:i + batch_size]
        chosen.append(_rewards(model, [x[0] for x in b], pad_id))
        rejected.append(_rewards(model, [x[1] for x in b], pad_id))
    model.train()
    c, r = torch.cat(chosen), torch.cat(rejected)
    return {"accuracy": float((c > r).float().mean()), "reward_gap": float((c - r).mean()),
            "reward_gap_std": float((c - r).std()) if len(c) > 1 else 0.0, "pairs": len(c)}


@torch.no_grad()
def reward_scale(model, pairs: list[tuple], pad_id: int, batch_size: int) -> dict[str, float]:
    model.eval()
    scores = torch.cat([_rewards(model, [s for x in pairs[i:i + batch_size] for s in x[:2]], pad_id)
                        for i in range(0, len(pairs), batch_size)])
    return {"mean": float(scores.mean()), "std": float(scores.std().clamp_min(1e-6))}


def run_train_rm(cfg: Config, *, progress: bool = True) -> dict[str, Any]:
    from transformers import AutoModelForSequenceClassification

    from ..models import add_lora, load_tokenizer
    from ..models.loading import torch_dtype

    rc = cfg.rm
    clock = Clock()
    base = base_model(cfg, rc.base, "rm.base")
    train_pairs, held_pairs, reports = preference_data(cfg)
    tokenizer = load_tokenizer(base)
    train = encode(train_pairs, tokenizer, rc.max_seq_len, reports[0], rc.use_margin)
    held = encode(held_pairs, tokenizer, rc.max_seq_len, reports[-1], rc.use_margin)
    for key, report in zip(("rm.data_path", "rm.eval_path"), reports):
        report.announce(key)
    if not train or not held:
        raise ValueError(f"train-rm: {len(train)} training and {len(held)} held-out pairs left after "
                         f"dropping those over rm.max_seq_len ({'; '.join(r.summary() for r in reports)})")

    use_all_cores()
    torch.manual_seed(rc.seed)
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "score head newly initialised" is the point here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1,
                                                                   dtype=torch_dtype(cfg.model.dtype))
    finally:
        hf_logging.set_verbosity(verbosity)
    model.config.pad_token_id = tokenizer.pad_token_id
    if rc.mode == "lora":
        model = add_lora(model, cfg.lora, task_type="SEQ_CLS")
    params = [p for p in model.parameters() if p.requires_grad]
    pad = tokenizer.pad_token_id
    before = evaluate_pairs(model, held, pad, rc.batch_size)
    model.train()
    history = train_epochs(params, train, batch_size=rc.batch_size, epochs=rc.epochs, lr=rc.lr, seed=rc.seed,
                           loss_fn=lambda b: _pair_loss(model, b, pad), desc="train-rm", progress=progress)
    after = evaluate_pairs(model, held, pad, rc.batch_size)
    scale = reward_scale(model, train, pad, rc.batch_size)
    out = rm_dir(cfg)
    summary = {
        "stage": "rm", "base": base, "output": str(out), "mode": rc.mode, "use_margin": rc.use_margin,
        "data": [r.to_dict() for r in reports], "train_pairs": len(train), "heldout_pairs": len(held),
        "steps": len(history), "trainable_params": sum(p.numel() for p in params),
        "train_loss_first": history[0]["loss"], "train_loss_last": history[-1]["loss"],
        "heldout_before": before, "heldout_after": after, "normalizer": scale,
    }
    save_model(model, tokenizer, out, summary)
    (out / NORMALIZER).write_text(json.dumps(scale))
    summary["time_s"] = clock()
    write_summary(cfg.output.run_dir.resolve(), "rm", summary)
    return summary


def load_normalizer(path: str | Path) -> Optional[dict[str, float]]:
    p = Path(path) / NORMALIZER
    return json.loads(p.read_text()) if p.is_file() else None
