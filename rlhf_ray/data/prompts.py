"""Prompt sets for PPO: a JSONL file or `datasets` directory with a `prompt` column,
or the generated review-sentiment prompts."""
from __future__ import annotations

from pathlib import Path

from ..config import DataConfig
from .synthetic import reviews


def synthetic_prompts(n: int, seed: int) -> list[str]:
    """Review openers that stop right before the judgement ("honestly the film felt")."""
    out = []
    for r in reviews(n, seed=seed):
        words = r.text.split(".")[0].split()
        out.append(" ".join(words[:-1]))
    return out


def load_prompt_texts(cfg: DataConfig) -> list[str]:
    if cfg.prompts_path is None:
        return synthetic_prompts(cfg.num_prompts, cfg.seed)
    import datasets

    p = Path(cfg.prompts_path)
    if p.is_dir():
        ds = datasets.load_from_disk(str(p))
    elif p.is_file() and p.stat().st_size == 0:
        raise ValueError(f"data.prompts_path={cfg.prompts_path!r}: the prompt set is empty")
    elif p.is_file():
        ds = datasets.load_dataset("json", data_files=str(p), split="train")
    else:
        raise FileNotFoundError(f"data.prompts_path={cfg.prompts_path!r} does not exist")
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    if "prompt" not in ds.column_names:
        raise ValueError(f"data.prompts_path={cfg.prompts_path!r}: no 'prompt' column (has {ds.column_names})")
    texts = [t for t in ds["prompt"]][: cfg.num_prompts]
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
    if bad:
        raise ValueError(f"data.prompts_path={cfg.prompts_path!r}: {len(bad)} empty or non-text prompts "
                         f"(first at record {bad[0]})")
    return texts


def tokenize_prompts(texts: list[str], tokenizer, *, max_prompt_tokens: int, max_new_tokens: int,
                     max_model_len: int, source: str) -> list[list[int]]:
    """Token ids per prompt; raises a ValueError naming the first offending prompt."""
    if not texts:
        raise ValueError(f"{source}: the prompt set is empty")
    ids = [tokenizer(t)["input_ids"] for t in texts]
    for i, p in enumerate(ids):
        if len(p) > max_prompt_tokens:
            raise ValueError(f"{source}: prompt {i} has {len(p)} tokens, more than "
                             f"data.max_prompt_tokens={max_prompt_tokens}: {texts[i][:60]!r}")
        if len(p) + max_new_tokens > max_model_len:
            raise ValueError(f"{source}: prompt {i} ({len(p)} tokens) + rollout.max_new_tokens="
                             f"{max_new_tokens} exceeds the model context of {max_model_len} tokens")
    return ids
