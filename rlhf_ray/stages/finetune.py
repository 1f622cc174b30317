"""What both pre-PPO stages share: running on Ray Train workers, the data-parallel loop
(seeded shuffling, AdamW with linear decay, micro-batches, gradient clipping, a progress
bar), and saving a model (LoRA merged) with its tokenizer."""
from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from ..config import Config


def train_epochs(params: Sequence[torch.nn.Parameter], examples: list, *, batch_size: int, epochs: int,
                 lr: float, seed: int, loss_fn: Callable[[list], tuple[torch.Tensor, dict[str, float]]],
                 desc: str, progress: bool, max_grad_norm: float = 1.0, rank: int = 0, world: int = 1,
                 micro_batch_size: Optional[int] = None) -> list[dict[str, float]]:
    """Minibatch training; ``loss_fn(rows) -> (loss, stats)``. Every rank draws the same
    shuffled batches (same seed) and trains on its rows ``batch[rank::world]`` in micro-batches
    of ``micro_batch_size``, so each optimizer step sees the whole batch once over the ranks
    (DDP averages the gradients). A batch with fewer rows than ranks is skipped on every rank
    (each must run the same number of backward passes). Returns this rank's stats per step."""
    from tqdm import tqdm

    rng = random.Random(seed)
    steps_per_epoch = (len(examples) + batch_size - 1) // batch_size
    total = steps_per_epoch * epochs
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup))))
    history = []
    bar = tqdm(total=total, desc=desc, unit="step", disable=not progress or rank != 0)
    for _ in range(epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            bar.update(1)
            batch = order[i:i + batch_size]
            if len(batch) < world:
                continue
            rows = [examples[j] for j in batch[rank::world]]
            micro = micro_batch_size or len(rows)
            opt.zero_grad(set_to_none=True)
            loss_sum, stats = 0.0, {}
            for k in range(0, len(rows), micro):
                part = rows[k:k + micro]
                loss, stats = loss_fn(part)
                # Each micro-batch's mean weighted by its share of the rank's rows.
                (loss * (len(part) / len(rows))).backward()
                loss_sum += float(loss.detach()) * len(part) / len(rows)
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            sched.step()
            history.append({**stats, "loss": loss_sum})
            bar.set_postfix(loss=f"{loss_sum:.3f}")
    bar.close()
    return history


def worker_threads() -> None:
    # A stage worker shares its node's cores with the other ranks there; the roles' one-thread
    # rule (OMP_NUM_THREADS=1 in their environment) is for PPO, where roles outnumber cores.
    import ray.train

    local = max(1, ray.train.get_context().get_local_world_size())
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local))


def run_on_workers(cfg: Config, stage: str, fn: Callable[[dict], None], config: dict) -> None:
    """``fn(config)`` on the stage's Ray Train workers (``<stage>.num_workers``, one GPU each
    with ``<stage>.use_gpu``), so on a cluster the stage trains on GPU workers, not on the head.
    The resources are checked against the cluster before anything starts; a worker's error is
    raised as ``RoleFailed`` naming the stage."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ..launch import RoleFailed, connect, preflight, stage_requests, torch_config

    sc = getattr(cfg, stage)
    connect(cfg)
    preflight(cfg, stage_requests(stage, sc))
    trainer = TorchTrainer(
        fn, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu,
                                     resources_per_worker={"CPU": sc.num_cpus_per_worker}),
        torch_config=torch_config(cfg, sc.use_gpu),
        run_config=RunConfig(storage_path=str(cfg.output.run_dir.resolve() / "ray_train"), name=stage))
    try:
        trainer.fit()
    except Exception as e:
        lines = [line for line in str(e).strip().splitlines() if line.strip()]
        raise RoleFailed(f"{stage} (Ray Train)", lines[-1] if lines else repr(e)) from e


def prepare_for_training(model, use_checkpointing: bool, world: int):
    """Gradient checkpointing (inputs keep requires_grad so a frozen, PEFT-wrapped base still
    back-propagates into the adapter) and DDP across the ranks; returns the module to call."""
    if use_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    if world > 1:
        import ray.train.torch

        return ray.train.torch.prepare_model(model, move_to_device=False)
    return model


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
