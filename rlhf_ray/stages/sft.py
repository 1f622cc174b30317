"""`rlhf-ray sft`: supervised fine-tuning on prompt/response records, loss on the response
(on the whole text for ``text``-only records). ``sft.method=full`` trains every weight (what a
randomly initialised tiny model needs); a method (lora, dora, ia3, ssf, repadapter) trains its
own tensors and is merged into the saved model, and kept unmerged in ``sft_model/adapter``."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Optional

import torch

from ..config import Config
from ..data.loaders import PLAIN, LoadReport, Renderer
from ..judging import GREEDY_JUDGES, eval_prompts, judge_greedy
from ..models.methods import MethodSpec, apply_method
from .finetune import (Clock, peak_memory, eval_chunks, pad_right, prepare_for_training, save_model, stage_trackers,
                       train_epochs, train_stage, start_worker)
from . import sft_dir


def sft_examples(cfg: Config, render: Renderer = PLAIN) -> tuple[list[dict[str, str]], Optional[LoadReport]]:
    """The records; ``messages`` rendered by ``render`` (``data.chat_template``)."""
    if cfg.sft.data_path is None:
        from ..data import math_task, objective, task

        if cfg.data.task == "dialogue":
            from ..data import dialogue

            return dialogue.sft_records(cfg.sft.num_examples, cfg.sft.seed, cfg.data.dialogue_template), None
        make = {"reviews": task.sft_records, "math": math_task.sft_records,
                "objective": objective.sft_records}[cfg.data.task]
        return make(cfg.sft.num_examples, cfg.sft.seed), None
    from ..data.loaders import load_sft

    return load_sft(cfg.sft.data_path, "sft.data_path", cfg.data.on_bad_record, limit=cfg.sft.max_examples,
                    render=render, dialogue_template=cfg.data.dialogue_template)


def encode(records: list[dict[str, str]], tokenizer, max_len: int, report: LoadReport,
           over_long: str = "truncate") -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per record; labels are -100 over the prompt. Longer than ``max_len``
    (``data.over_long``): ``truncate`` drops the prompt's oldest tokens (a leading BOS kept) so
    the response fits whole, and drops a record whose response leaves no room for a prompt token;
    ``drop`` drops a record whose prompt alone fills ``max_len`` and cuts a long response. A
    ``text``-only record (no prompt) is cut at the end. Everything cut or dropped is counted."""
    from ..data.prompts import cut_left

    out = []
    for i, r in enumerate(records):
        prompt = tokenizer(r["prompt"])["input_ids"]
        response = tokenizer(r["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if over_long == "truncate" and r["prompt"] and len(prompt) + len(response) > max_len:
            cut = cut_left(prompt, max_len - len(response), tokenizer.bos_token_id)
            if cut is None:
                report.drop(f"record {i}", f"response too long for sft.max_seq_len={max_len} (no room left "
                                           f"for the prompt: {len(response)} tokens)")
                continue
            report.filtered[f"prompts cut from the left to fit sft.max_seq_len={max_len}"] += 1
            prompt = cut
        if len(prompt) >= max_len:
            report.drop(f"record {i}", f"prompt longer than sft.max_seq_len={max_len}")
            continue
        if len(prompt) + len(response) > max_len:
            report.filtered[f"responses cut at sft.max_seq_len={max_len}"] += 1
        ids = (prompt + response)[:max_len]
        out.append((ids, ([-100] * len(prompt) + response)[:max_len]))
    return out


def _lm_loss_sum(model, batch: list[tuple[list[int], list[int]]], pad_id: int, device=None) -> torch.Tensor:
    """Cross-entropy summed over the batch's labelled tokens (``_tokens`` counts them)."""
    config = getattr(model, "module", model).config  # under DDP, the wrapped model's
    if getattr(config, "is_encoder_decoder", False):
        return _seq2seq_loss_sum(model, batch, pad_id, config, device)
    ids, mask = pad_right([b[0] for b in batch], pad_id)
    labels, _ = pad_right([b[1] for b in batch], pad_id, fill=-100)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100,
                                             reduction="sum")


def _seq2seq_loss_sum(model, batch: list[tuple[list[int], list[int]]], pad_id: int, config,
                      device=None) -> torch.Tensor:
    """The same sum for an encoder-decoder model: the prompt (the unlabelled head of a row)
    is the encoder's input, the response the decoder's target after its start token."""
    from ..models.seq2seq import decoder_start_id

    split = [sum(1 for x in lab if x == -100) for _, lab in batch]
    enc, enc_mask = pad_right([ids[:k] or [pad_id] for (ids, _), k in zip(batch, split)], pad_id)
    targets = [ids[k:] for (ids, _), k in zip(batch, split)]
    dec_in, dec_mask = pad_right([[decoder_start_id(config)] + t[:-1] for t in targets], pad_id)
    labels, _ = pad_right(targets, pad_id, fill=-100)
    logits = model(input_ids=enc.to(device), attention_mask=enc_mask.to(device), decoder_input_ids=dec_in.to(device),
                   decoder_attention_mask=dec_mask.to(device)).logits.float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).to(logits.device),
                                             ignore_index=-100, reduction="sum")


def _tokens(batch: list[tuple[list[int], list[int]]]) -> int:
    return sum(sum(1 for x in lab[1:] if x != -100) for _, lab in batch)


@torch.no_grad()
def eval_loss(model, examples: list, pad_id: int, chunk: int, device=None, rank: int = 0, world: int = 1) -> float:
    """Mean loss per labelled token over ``examples``, shared out over the ranks."""
    from ..devices import all_sum

    model.eval()
    total = sum(float(_lm_loss_sum(model, b, pad_id, device)) for b in eval_chunks(examples, chunk, rank, world))
    model.train()
    total, n = all_sum([total, _tokens(examples[rank::world])], device)
    return total / max(n, 1)


def run_sft(cfg: Config, *, progress: bool = True) -> dict[str, Any]:
    """Data is read, checked and split here; training runs on ``sft.num_workers`` Ray Train
    workers, and rank 0 evaluates and saves (``output.dir`` must be storage every node sees)."""
    from ..data.loaders import renderer
    from ..models import load_tokenizer, resolve_model_path
    from ..models.checks import check_inputs

    sc = cfg.sft
    clock = Clock()
    base = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(base)
    check_inputs(cfg, base, tokenizer, lora=sc.method != "full", targets=MethodSpec.from_config(cfg, sc.method).targets,
                 targets_key=MethodSpec.targets_key(cfg, sc.method), outputs=[("sft.output_dir", sc.output_dir)] if sc.output_dir else ())
    records, report = sft_examples(cfg, renderer(cfg.data, tokenizer))
    report = report or LoadReport("generated task", read=len(records), kept=len(records))
    examples = encode(records, tokenizer, sc.max_seq_len, report, cfg.data.over_long)
    report.announce("sft.data_path")
    if len(examples) < 2:
        raise ValueError(f"sft: {len(examples)} usable examples ({report.summary()})")
    rng = random.Random(sc.seed)
    rng.shuffle(examples)
    n_eval = int(len(examples) * sc.eval_fraction)
    held, train = examples[:n_eval], examples[n_eval:]
    out = sft_dir(cfg)
    summary = {"stage": "sft", "base": base, "output": str(out), "method": sc.method, "data": report.to_dict(),
               "train_examples": len(train), "heldout_examples": len(held), "workers": sc.num_workers,
               "use_gpu": sc.use_gpu}
    judged = None
    if cfg.eval.judge in GREEDY_JUDGES:  # a task with answers: the judge before and after, greedy
        ps = eval_prompts(cfg, tokenizer)
        judged = (ps.ids, ps.columns)
    return train_stage(cfg, "sft", _sft_worker, summary, clock,
                       {"cfg": cfg, "base": base, "train": train, "held": held, "progress": progress,
                        "judged": judged})


def _scores(judged: dict[str, Any]) -> dict[str, Any]:
    """The judge's figures for the trackers (no counts or labels)."""
    return {k: v for k, v in judged.items() if k in ("judge_score", "judge_sets_mean", "judge_by_set", "judge_parts")}


def _sft_worker(config: dict) -> None:

    from ..models import load_tokenizer
    from ..models.seq2seq import load_policy_lm

    cfg, base, train, held = config["cfg"], config["base"], config["train"], config["held"]
    sc = cfg.sft
    rank, world, device = start_worker(config, "sft")
    model = load_policy_lm(base, cfg.model.dtype, device)
    model = apply_method(model, MethodSpec.from_config(cfg, sc.method),
                         "SEQ_2_SEQ_LM" if model.config.is_encoder_decoder else "CAUSAL_LM")
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    pad = load_tokenizer(base).pad_token_id
    chunk = sc.micro_batch_size or sc.batch_size
    before = eval_loss(model, held, pad, chunk, device, rank, world) if held else None
    judged = config.get("judged") if rank == 0 else None

    def judge() -> dict[str, Any]:
        from ..data.task import JUDGES

        return judge_greedy(model, load_tokenizer(base), *judged, JUDGES[cfg.eval.judge],
                            max_new_tokens=cfg.rollout.max_new_tokens, device=device)

    judge_before = judge() if judged else None
    with stage_trackers(config, "sft", rank) as trackers:
        if trackers and before is not None:
            trackers.log({"heldout_loss": before, **({"judge": _scores(judge_before)} if judge_before else {})}, 0)
        ddp = prepare_for_training(model, sc.gradient_checkpointing, world)
        history = train_epochs(ddp, params, train, batch_size=sc.batch_size, epochs=sc.epochs, lr=sc.lr,
                               seed=sc.seed, loss_fn=lambda b: (_lm_loss_sum(ddp, b, pad, device), {}),
                               count_fn=_tokens, desc="sft", progress=config["progress"], device=device, rank=rank,
                               world=world, micro_batch_size=sc.micro_batch_size,
                               on_step=trackers.log if trackers else None)
        if sc.gradient_checkpointing:
            model.gradient_checkpointing_disable()
        after = eval_loss(model, held, pad, chunk, device, rank, world) if held else None
        judge_after = judge() if judged else None
        if trackers and after is not None:
            trackers.log({"heldout_loss": after, **({"judge": _scores(judge_after)} if judge_after else {})},
                         len(history))
    if rank != 0:
        return
    summary = {**config["summary"], "steps": len(history), "trainable_params": sum(p.numel() for p in params),
               "train_loss_first": history[0]["loss"], "train_loss_last": history[-1]["loss"],
               "heldout_loss_before": before, "heldout_loss_after": after, **peak_memory(device),
               **({"judge_before": judge_before, "judge_after": judge_after} if judged else {})}
    save_model(model, load_tokenizer(base), Path(summary["output"]), summary)
