"""Prompt sets for PPO and the judge: the generated task's prompts, or a file's."""
from __future__ import annotations

from ..config import DataConfig
from .task import task_prompts


def load_prompt_texts(cfg: DataConfig, path: str | None, *, key: str = "data.prompts_path",
                      num: int | None = None, split: str = "train") -> list[str]:
    """Prompt texts from ``path`` (``key`` names its config key), or ``num`` generated ones
    from the task's ``split`` of subjects when ``path`` is None."""
    from .loaders import load_prompts

    num = num or cfg.num_prompts
    if path is None:
        return [p.text for p in task_prompts(num, cfg.seed, split)]
    texts, report = load_prompts(cfg, path, key, limit=num)
    report.announce(key)
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
