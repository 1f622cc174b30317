"""The loop both pre-PPO stages share: seeded shuffling, AdamW with linear decay, gradient
clipping, a progress bar; and saving a model (LoRA merged) with its tokenizer."""
from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch


def use_all_cores() -> None:
    # The stages run in the driver process alone; the roles' one-thread rule is for PPO.
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))


def train_epochs(params: Sequence[torch.nn.Parameter], examples: list, *, batch_size: int, epochs: int,
                 lr: float, seed: int, loss_fn: Callable[[list], tuple[torch.Tensor, dict[str, float]]],
                 desc: str, progress: bool, max_grad_norm: float = 1.0) -> list[dict[str, float]]:
    """Minibatch training; ``loss_fn(batch) -> (loss, stats)``. Returns the stats of every step."""
    from tqdm import tqdm

    rng = random.Random(seed)
    steps_per_epoch = (len(examples) + batch_size - 1) // batch_size
    total = steps_per_epoch * epochs
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup))))
    history = []
    bar = tqdm(total=total, desc=desc, unit="step", disable=not progress)
    for _ in range(epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            loss, stats = loss_fn([examples[j] for j in order[i:i + batch_size]])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            sched.step()
            history.append({"loss": float(loss.detach()), **stats})
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]['loss']:.3f}")
    bar.close()
    return history


def pad_right(seqs: list[list[int]], pad_id: int, fill: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) right-padded; ``fill`` pads ids with another value (e.g. -100 labels)."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id if fill is None else fill, dtype=torch.long)
    mask = torch.zeros(len(seqs), n, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids, mask


def save_model(model, tokenizer, out: Path, summary: dict[str, Any]) -> None:
    """Save (merging a PEFT adapter first) so later stages and vLLM load a plain model dir."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "stage.json").write_text(json.dumps(summary, indent=2))


def write_summary(run_dir: Path, stage: str, summary: dict[str, Any]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / f"{stage}.json"
    path.write_text(json.dumps(summary, indent=2))
    return path


class Clock:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return round(time.perf_counter() - self.t0, 2)
