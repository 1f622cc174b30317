"""Prompt sets for PPO and the judge: the generated task's prompts, or a file's; and fitting
token ids to a length limit (``data.over_long``), which the SFT and reward-model stages share."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..config import DataConfig
from .loaders import PLAIN, LoadReport, Renderer


@dataclass
class PromptSet:
    """Prompts ready for the engines, each with its record's other columns (for the reward and
    the judge) and where it came from (``file:line``, for messages)."""

    texts: list[str]
    ids: list[list[int]]
    columns: list[dict]
    where: list[str]


def load_prompt_texts(cfg: DataConfig, path: str | None, *, key: str = "data.prompts_path",
                      num: int | None = None, cap: int | None = None, split: str = "train",
                      render: Renderer = PLAIN) -> list[str]:
    """Prompt texts from ``path`` (``key`` names its config key; at most ``cap`` records), or
    ``num`` generated ones from the task's ``split`` when ``path`` is None."""
    records, _, report = _load_records(cfg, path, key, num, cap, split, render)
    report.announce(key)
    return [text for text, _ in records]


def generated_prompts(task: str, num: int, seed: int, split: str, template: str | None = None) -> list[tuple[str, dict]]:
    """(text, columns) of ``num`` prompts of the generated task ``task`` (data.task);
    ``template``: data.dialogue_template, for the dialogue task."""
    if task == "dialogue":
        from .dialogue import DEFAULT_TEMPLATE, prompts as dialogue_prompts

        return dialogue_prompts(num, seed, split, template or DEFAULT_TEMPLATE)
    if task == "math":
        from .math_task import math_problems

        return [(p["question"], {"answer": p["answer"]}) for p in math_problems(num, seed, split)]
    if task == "objective":
        from .objective import prompts

        return prompts(num, seed, split)
    from .task import task_prompts

    return [(p.text, {"subject": p.subject}) for p in task_prompts(num, seed, split)]


def _load_records(cfg: DataConfig, path: str | None, key: str, num: int | None, cap: int | None, split: str,
                  render: Renderer) -> tuple[list[tuple[str, dict]], list[str], LoadReport]:
    from .loaders import load_prompt_records

    if path is None:
        records = generated_prompts(cfg.task, num or cfg.num_prompts, cfg.seed, split, cfg.dialogue_template)
        where = [f"generated {split} prompt {i}" for i in range(len(records))]
        return records, where, LoadReport(f"generated {cfg.task} task", read=len(records), kept=len(records))
    where: list[str] = []
    records, report = load_prompt_records(cfg, path, key, limit=cap, render=render, wheres=where)
    return records, where, report


def prompt_records(cfg: DataConfig, path: str | None, tokenizer, *, key: str = "data.prompts_path",
                   num: int | None = None, cap: int | None = None, split: str = "train", max_new_tokens: int,
                   max_model_len: int) -> PromptSet:
    """PPO's prompts: texts (message lists rendered per ``data.chat_template``) and their token
    ids, fitted to ``data.max_prompt_tokens`` per ``data.over_long``; what was cut or left out
    is announced under ``key``. A file is read whole unless ``cap`` is set."""
    from .loaders import renderer

    records, where, report = _load_records(cfg, path, key, num, cap, split, renderer(cfg, tokenizer))
    texts, ids, kept = fit_prompts([t for t, _ in records], tokenizer, max_prompt_tokens=cfg.max_prompt_tokens,
                                   max_new_tokens=max_new_tokens, max_model_len=max_model_len,
                                   source=path or f"generated {split} prompts", over_long=cfg.over_long,
                                   report=report)
    report.announce(key)
    return PromptSet(texts, ids, [records[i][1] for i in kept], [where[i] for i in kept])


def prompt_set(cfg: DataConfig, path: str | None, tokenizer, *, key: str = "data.prompts_path",
               num: int | None = None, cap: int | None = None, split: str = "train", max_new_tokens: int,
               max_model_len: int) -> tuple[list[str], list[list[int]]]:
    """(texts, token ids) of :func:`prompt_records`."""
    ps = prompt_records(cfg, path, tokenizer, key=key, num=num, cap=cap, split=split,
                        max_new_tokens=max_new_tokens, max_model_len=max_model_len)
    return ps.texts, ps.ids


def cut_left(ids: list[int], room: int, bos_id: Optional[int]) -> Optional[list[int]]:
    """``ids`` in at most ``room`` tokens, its oldest tokens dropped (a leading ``bos_id`` kept
    in front); None when that leaves no token besides the BOS."""
    if len(ids) <= room:
        return ids
    head = ids[:1] if bos_id is not None and ids[:1] == [bos_id] else []
    keep = room - len(head)
    return head + ids[len(ids) - keep:] if keep >= 1 else None


def tokenize_prompts(texts: list[str], tokenizer, *, max_prompt_tokens: int, max_new_tokens: int,
                     max_model_len: int, source: str, over_long: str,
                     report: Optional[LoadReport] = None) -> tuple[list[str], list[list[int]]]:
    """(texts, token ids) of :func:`fit_prompts`."""
    texts, ids, _ = fit_prompts(texts, tokenizer, max_prompt_tokens=max_prompt_tokens, max_new_tokens=max_new_tokens,
                                max_model_len=max_model_len, source=source, over_long=over_long, report=report)
    return texts, ids


def fit_prompts(texts: list[str], tokenizer, *, max_prompt_tokens: int, max_new_tokens: int,
                max_model_len: int, source: str, over_long: str,
                report: Optional[LoadReport] = None) -> tuple[list[str], list[list[int]], list[int]]:
    """(texts, token ids, positions in ``texts`` kept) of the prompts. Longer than ``max_prompt_tokens``: ``truncate`` keeps
    the newest tokens (the text becomes what is left, so the reward model reads what the policy
    read), ``drop`` leaves the prompt out; either is counted in ``report``. A prompt that does not
    fit the model's context with ``max_new_tokens`` is a ValueError naming it."""
    if not texts:
        raise ValueError(f"{source}: the prompt set is empty")
    report = report or LoadReport(source)
    out_texts, out_ids, kept = [], [], []
    for i, text in enumerate(texts):
        p = tokenizer(text)["input_ids"]
        if len(p) > max_prompt_tokens:
            what = f"prompts over data.max_prompt_tokens={max_prompt_tokens}"
            cut = cut_left(p, max_prompt_tokens, tokenizer.bos_token_id) if over_long == "truncate" else None
            if cut is None:
                report.filtered[f"{what}, left out"] += 1
                report.kept -= 1
                continue
            report.filtered[f"{what}, cut from the left"] += 1
            head = 1 if cut[:1] == [tokenizer.bos_token_id] else 0
            p, text = cut, tokenizer.decode(cut[head:])
        if len(p) + max_new_tokens > max_model_len:
            raise ValueError(f"{source}: prompt {i} ({len(p)} tokens) + rollout.max_new_tokens="
                             f"{max_new_tokens} exceeds the model context of {max_model_len} tokens")
        out_texts.append(text)
        out_ids.append(p)
        kept.append(i)
    if not out_ids:
        raise ValueError(f"{source}: every prompt is longer than data.max_prompt_tokens={max_prompt_tokens} "
                         f"(data.over_long={over_long}; {report.summary()})")
    return out_texts, out_ids, kept
