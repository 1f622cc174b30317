"""Reward models: a sequence-classification head with one output on a causal LM base."""
from __future__ import annotations

from pathlib import Path


def build_reward_model(base_path: str, out_dir: str | Path, seed: int = 0) -> Path:
    """A reward model directory made from ``base_path`` with a fresh (untrained) score head.

    Training it on preference pairs is the reward-model stage; an untrained head gives
    arbitrary but deterministic scores, enough to exercise the PPO machinery.
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    from .loading import load_tokenizer

    out = Path(out_dir)
    if (out / "config.json").is_file():
        return out
    torch.manual_seed(seed)
    tok = load_tokenizer(base_path)
    model = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def load_reward_model(path: str, dtype: str = "float32", device=None):
    """The reward model in ``dtype``; on a GPU ``device`` loaded straight onto it (a 7B model
    would otherwise pass through 13.5 GB of host memory first)."""
    from transformers import AutoModelForSequenceClassification

    from .loading import load_pretrained, load_tokenizer

    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"reward.path={path!r}: no config.json in that directory")
    model = load_pretrained(AutoModelForSequenceClassification, path, dtype, device)
    if model.config.num_labels != 1:
        raise ValueError(f"reward.path={path!r}: the head has {model.config.num_labels} outputs, expected 1")
    tok = load_tokenizer(path)
    model.config.pad_token_id = tok.pad_token_id
    return model.eval(), tok
