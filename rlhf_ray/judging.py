"""The held-out judge on a plain (transformers) model with greedy decoding: what the SFT stage
reports before and after training for tasks with answers (``eval.judge`` ``label_match`` or
``exact_match``), and what the PEFT comparison scores each method's merged model with. PPO's
own evaluation samples from the vLLM engines at the rollout's temperature instead; greedy is the
usual way to score objective questions (one answer per question, no sampling noise)."""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from .data.objective import by_set

GREEDY_JUDGES = ("label_match", "exact_match", "rouge")


@torch.no_grad()
def greedy_responses(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, batch_size: int = 32,
                     device=None) -> list[str]:
    """Each prompt's greedy continuation (left-padded batches, KV cache on), decoded without
    special tokens."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encdec = bool(getattr(model.config, "is_encoder_decoder", False))  # generate returns the decoder's tokens only
    was_training = model.training
    model.eval()
    out: list[str] = []
    for start in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[start:start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(chunk):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        out += tokenizer.batch_decode((gen if encdec else gen[:, width:]).cpu(), skip_special_tokens=True)
    model.train(was_training)
    return out


def judge_greedy(model, tokenizer, prompt_ids: list[list[int]], columns: list[dict], judge: Callable, *,
                 max_new_tokens: int, batch_size: int = 32, device=None) -> dict[str, Any]:
    """The judge's mean score on greedy responses, and per ``set`` column where the prompts
    have one (``judge_by_set``, ``judge_sets_mean``: the mean over sets, as the paper reports)."""
    responses = greedy_responses(model, tokenizer, prompt_ids, max_new_tokens, batch_size, device)
    verdicts = [judge(r, c) for r, c in zip(responses, columns)]
    scores = [v.score for v in verdicts]
    out: dict[str, Any] = {"judge_score": sum(scores) / max(len(scores), 1), "prompts": len(scores),
                           "decoding": "greedy", **judge_parts(verdicts)}
    if any("set" in c for c in columns):
        per_set = by_set(scores, columns)
        out["judge_by_set"], out["judge_sets_mean"] = per_set, sum(per_set.values()) / len(per_set)
    return out


def eval_prompts(cfg, tokenizer, max_model_len: Optional[int] = None):
    """The held-out prompts of ``eval.*`` (the judge's), as the PPO evaluation reads them."""
    from .data.prompts import prompt_records

    return prompt_records(cfg.data, cfg.eval.prompts_path, tokenizer, key="eval.prompts_path",
                          num=cfg.eval.num_prompts, cap=cfg.eval.max_prompts, split="heldout",
                          max_new_tokens=cfg.rollout.max_new_tokens,
                          max_model_len=max_model_len or cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens)


def judge_parts(verdicts: list) -> dict[str, Any]:
    """The means of a judge's several figures (ROUGE-1/2/L/Lsum) as ``judge_parts``; {} for a
    judge with one."""
    if not verdicts or not hasattr(verdicts[0], "parts"):
        return {}
    return {"judge_parts": {k: sum(v.parts[k] for v in verdicts) / len(verdicts) for k in verdicts[0].parts}}
