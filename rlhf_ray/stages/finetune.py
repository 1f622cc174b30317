"""What both pre-PPO stages share: running on Ray Train workers, the data-parallel loop
(seeded shuffling, AdamW with linear decay, micro-batches, gradient clipping, a progress
bar), and saving a model (LoRA merged) with its tokenizer."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from ..config import Config

ADAPTER_DIR = "adapter"  # <model dir>/adapter: the stage's method, unmerged

log = logging.getLogger(__name__)


def train_epochs(model, params: Sequence[torch.nn.Parameter], examples: list, *, batch_size: int, epochs: int,
                 lr: float, seed: int, loss_fn: Callable[[list], tuple[torch.Tensor, dict[str, float]]],
                 count_fn: Callable[[list], int], desc: str, progress: bool, device: torch.device,
                 max_grad_norm: float = 1.0, rank: int = 0, world: int = 1,
                 micro_batch_size: Optional[int] = None,
                 on_step: Optional[Callable[[dict[str, float], int], None]] = None) -> list[dict[str, float]]:
    """Minibatch training of ``model`` (the DDP wrapper under several ranks).

    ``loss_fn(rows) -> (loss summed over the rows' units, {stat: sum})`` and ``count_fn(rows)``
    the units (response tokens, pairs). Every rank draws the same shuffled batches (same seed)
    and trains on its rows ``batch[rank::world]`` in micro-batches of ``micro_batch_size``; each
    micro-batch's sum is divided by the whole batch's units (every rank counts them from the
    same batch) and multiplied by ``world`` (DDP averages over ranks), so the objective is the
    batch's per-unit mean whatever the layout. Gradients are all-reduced once per step (the
    other micro-batches run under ``no_sync``), so ranks holding different numbers of rows stay
    in step; a batch with fewer rows than ranks is skipped on every rank. Returns per-step
    means over the whole batch (``loss`` and each stat) and the step's ``lr``; ``on_step(means,
    step)`` is called with each (steps count from 1)."""
    from tqdm import tqdm

    from ..devices import all_sum

    rng = random.Random(seed)
    steps_per_epoch = (len(examples) + batch_size - 1) // batch_size
    total = steps_per_epoch * epochs
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup))))
    no_sync = model.no_sync if hasattr(model, "no_sync") else contextlib.nullcontext
    history = []
    bar = tqdm(total=total, desc=desc, unit="step", disable=not progress or rank != 0)
    for _ in range(epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            bar.update(1)
            batch = [examples[j] for j in order[i:i + batch_size]]
            if len(batch) < world:
                continue
            units = count_fn(batch)
            rows = batch[rank::world]
            micro = micro_batch_size or len(rows)
            parts = [rows[k:k + micro] for k in range(0, len(rows), micro)]
            opt.zero_grad(set_to_none=True)
            sums: dict[str, float] = {"loss": 0.0}
            for k, part in enumerate(parts):
                with no_sync() if k < len(parts) - 1 else contextlib.nullcontext():
                    loss, stats = loss_fn(part)
                    (loss * (world / max(units, 1))).backward()
                sums["loss"] += float(loss.detach())
                for key, v in stats.items():
                    sums[key] = sums.get(key, 0.0) + v
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            lr_now = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            history.append(dict(zip(sums, (v / max(units, 1) for v in all_sum(list(sums.values()), device)))))
            history[-1]["lr"] = lr_now
            bar.set_postfix(loss=f"{history[-1]['loss']:.3f}")
            if on_step is not None:
                on_step(history[-1], len(history))
    bar.close()
    return history


def worker_threads() -> None:
    # A stage worker shares its node's cores with the other ranks there; the roles' one-thread
    # rule (OMP_NUM_THREADS=1 in their environment) is for PPO, where roles outnumber cores.
    import ray.train

    local = max(1, ray.train.get_context().get_local_world_size())
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local))


def start_worker(config: dict, stage: str) -> tuple[int, int, torch.device]:
    """A stage worker's first steps, the same for every stage: (rank, world size, device), its
    output into ``<run>/logs/<stage>-rank<r>.log``, its threads, and the stage's seed."""
    import ray.train

    from ..devices import train_device
    from ..logs import redirect_output

    cfg = config["cfg"]
    sc = getattr(cfg, stage)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    redirect_output(f"{stage}-rank{rank}", config["log_dir"])
    worker_threads()
    device = train_device(stage, sc.use_gpu, cfg.cluster.rehearse)
    torch.manual_seed(sc.seed)
    return rank, world, device


def run_on_workers(cfg: Config, stage: str, fn: Callable[[dict], None], config: dict) -> None:
    """``fn(config)`` on the stage's Ray Train workers (``<stage>.num_workers``, one GPU each
    with ``<stage>.use_gpu``), so on a cluster the stage trains on GPU workers, not on the head.
    The resources are checked against the cluster before anything starts; a worker's error is
    raised as ``RoleFailed`` naming the stage."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ..launch import RoleFailed, connect, preflight, stage_requests, torch_config
    from ..logs import link_ray_logs, log_to_run_dir

    sc = getattr(cfg, stage)
    log_to_run_dir(cfg.output.run_dir.resolve())
    how = connect(cfg)
    if how != "already connected":
        log.info("%s", how)
    link_ray_logs(cfg.output.run_dir.resolve())
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
        from ..devices import data_parallel

        return data_parallel(model)
    return model


def eval_chunks(rows: list, chunk: int, rank: int, world: int) -> list[list]:
    """This rank's share of an evaluation set, in forwards of ``chunk`` rows: every rank
    evaluates (sums are all-reduced) instead of seven GPUs waiting on one."""
    mine = rows[rank::world]
    return [mine[i:i + chunk] for i in range(0, len(mine), chunk)]


def metrics_path(run_dir: Path, stage: str) -> Path:
    """The stage's jsonl tracker file: one record per optimizer step (and the held-out figures)."""
    return run_dir / f"{stage}_metrics.jsonl"


@contextlib.contextmanager
def stage_trackers(config: dict, stage: str, rank: int) -> Iterator[Optional[Any]]:
    """Rank 0's trackers for a stage (None on the other ranks), opened on the worker: the
    figures are logged live from where they are made, into the run directory every node sees,
    with the tracker settings the driver decided (``tracking.driver_env``)."""
    if rank != 0:
        yield None
        return
    from ..tracking import Trackers

    os.environ.update(config["tracker_env"])
    run_dir = Path(config["run_dir"])
    trackers = Trackers(config["cfg"], stage, run_dir, jsonl=metrics_path(run_dir, stage))
    try:
        yield trackers
    except BaseException:
        trackers.close(failed=True)
        raise
    trackers.close()


def _follow(path: Path, total: int, desc: str, done: threading.Event) -> None:
    """The driver's progress bar for a stage: rank 0's jsonl lines, as they are written."""
    from tqdm import tqdm

    bar, offset = None, 0
    while True:
        finished = done.wait(0.5)
        try:
            with path.open("rb") as f:
                f.seek(offset)
                chunk = f.read()
        except OSError:
            chunk = b""
        # Whole lines only: over NFS the last one may still be half written.
        lines = chunk[:chunk.rfind(b"\n") + 1]
        offset += len(lines)
        if bar is None and lines:  # from rank 0's first record: Ray's start-up is not a training step
            bar = tqdm(total=total, desc=desc, unit="step")
        for line in lines.splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if "loss" in rec:
                bar.n = min(total, rec["step"])
                bar.set_postfix(loss=f"{rec['loss']:.3f}")
        if finished:
            break
    if bar is not None:
        bar.close()


def train_stage(cfg: Config, stage: str, fn: Callable[[dict], None], summary: dict[str, Any], clock: "Clock",
                config: dict) -> dict[str, Any]:
    """Run a stage's worker ``fn`` (``config`` plus the driver's ``summary``, whose ``output``
    is the model directory) and return what rank 0 wrote beside the model it saved, timed and
    stored as ``<run>/<stage>.json``. With ``config["progress"]`` the driver shows a bar of
    the training steps (the workers' own output goes to ``<run>/logs``)."""
    from ..logs import log_dir
    from ..tracking import driver_env

    path = Path(summary["output"]) / "stage.json"
    path.unlink(missing_ok=True)  # what the workers write is what is read back
    run_dir = cfg.output.run_dir.resolve()
    metrics_path(run_dir, stage).unlink(missing_ok=True)
    sc = getattr(cfg, stage)
    total = -(-len(config["train"]) // sc.batch_size) * sc.epochs
    done = threading.Event()
    follower = threading.Thread(target=_follow, args=(metrics_path(run_dir, stage), total, stage, done), daemon=True)
    if config.get("progress", True):
        follower.start()
    env = driver_env(cfg)
    try:
        run_on_workers(cfg, stage, fn, {**config, "summary": summary, "progress": False, "run_dir": str(run_dir),
                                        "log_dir": str(log_dir(run_dir)), "tracker_env": env})
    finally:
        done.set()
        if follower.is_alive():
            follower.join()
    if not path.is_file():
        raise FileNotFoundError(f"{stage}: rank 0 saved the model on its node, but {path} is not visible here; "
                                "on more than one node output.dir must be storage every node sees (NFS)")
    summary = json.loads(path.read_text())
    summary["time_s"] = clock()
    write_summary(cfg.output.run_dir.resolve(), stage, summary)
    return summary


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
    """Save the model with its method merged (a plain model dir later stages and vLLM load), and
    the method unmerged in ``<out>/adapter`` for reuse (``models.methods.load_method``)."""
    from ..models.methods import merge_method, method_of, save_method

    if hasattr(model, "peft_config") or method_of(model) is not None:
        shutil.rmtree(out / ADAPTER_DIR, ignore_errors=True)
        save_method(model, out / ADAPTER_DIR)
        model = merge_method(model)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "stage.json").write_text(json.dumps(summary, indent=2))


def peak_memory(device) -> dict[str, int]:
    """This worker's peak resident memory so far (the model load included) and, on a GPU, its
    peak allocated CUDA memory: what a method's choice changes."""
    import resource

    out = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device is not None and torch.device(device).type == "cuda":
        out["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return out


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
