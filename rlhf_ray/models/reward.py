"""Reward models: a sequence-classification head with one output on a causal LM base, or a
classifier with several classes whose one class's score is the reward (``reward.label``)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional


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


def class_index(config, label: Optional[str], key: str = "reward.label") -> Optional[int]:
    """The output a reward reads: None for a one-output reward model (``label`` must then be
    unset or name its only class), else the index of ``label``, a class name of the config's
    ``id2label`` or an index.

    Raises:
        ValueError: naming ``key`` and the model's classes.
    """
    n = int(config.num_labels)
    names = {int(i): str(v) for i, v in (getattr(config, "id2label", None) or {}).items()}
    classes = ", ".join(f"{i}={names.get(i, i)}" for i in range(n))
    if label is None:
        if n == 1:
            return None
        raise ValueError(f"{key} is not set, but the reward model has {n} classes ({classes}): name the class "
                         "whose score is the reward (e.g. the 'not hate' class of a hate-speech classifier)")
    by_name = {v: i for i, v in names.items()}
    if str(label) in by_name:
        return by_name[str(label)]
    if str(label).isdigit() and int(label) < n:
        return int(label)
    raise ValueError(f"{key}={label!r}: not a class of the reward model ({classes})")


def load_reward_model(path: str, dtype: str = "float32", device=None, label: Optional[str] = None):
    """The reward model in ``dtype``; on a GPU ``device`` loaded straight onto it (a 7B model
    would otherwise pass through 13.5 GB of host memory first). ``label``: reward.label (a
    classifier's class); the third value is its index, None for a one-output model."""
    from transformers import AutoModelForSequenceClassification

    from .loading import load_pretrained, load_tokenizer

    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"reward.path={path!r}: no config.json in that directory")
    model = load_pretrained(AutoModelForSequenceClassification, path, dtype, device)
    index = class_index(model.config, label)
    tok = load_tokenizer(path)
    model.config.pad_token_id = tok.pad_token_id
    return model.eval(), tok, index
