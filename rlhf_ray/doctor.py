"""`rlhf-ray doctor`: a smoke test of what a run does on this machine's devices, in minutes,
before a long job. It builds the engine exactly as a rollout actor does, publishes three adapter
versions, compares the engine's processed log-probs with the learner's (with and without top-p),
makes one learner update with gradient checkpointing, and all-reduces over two ranks; one table,
a line per check. On a GPU the engine and learner share one card; on a CPU the same checks run
where they apply and the table says which were skipped.

No Ray here: the roles' classes run in this process (the engine's core in its own processes
where vLLM puts it), so a failure is the check's, not the cluster's.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .config import Config

# Mean |engine - learner| log-prob per response token that counts as agreement. fp32 on a CPU
# agrees to ~1e-7; bf16 kernels differ by order 1e-2 (not batch-invariant, other reductions).
GAP_LIMIT = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 5e-2}
# The engine's share of the one card the doctor uses (the learner takes the rest).
DOCTOR_ENGINE_UTILIZATION = 0.4


@dataclass
class Check:
    name: str
    result: str  # pass | FAIL | skipped
    figures: str


def _row(name: str, fn: Callable[[], tuple[bool, str]]) -> Check:
    try:
        ok, figures = fn()
        return Check(name, "pass" if ok else "FAIL", figures)
    except _Skip as s:
        return Check(name, "skipped", str(s))
    except Exception as e:  # a check's failure is its row, the others still run
        return Check(name, "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])


class _Skip(Exception):
    pass


def doctor_config(cfg: Config) -> Config:
    """The run's config as the doctor uses it: one engine and one learner rank on one device,
    gradient checkpointing on, a short response, the engine's card share left for the learner."""
    r, lc = cfg.rollout, cfg.learner
    on_gpu = torch.cuda.is_available() and (r.num_gpus > 0 or lc.use_gpu)
    rollout = dataclasses.replace(
        r, num_engines=1, max_new_tokens=min(r.max_new_tokens, 32),
        num_gpus=1.0 if on_gpu else 0.0,
        gpu_memory_utilization=r.gpu_memory_utilization or (DOCTOR_ENGINE_UTILIZATION if on_gpu else None))
    learner = dataclasses.replace(lc, num_workers=1, use_gpu=on_gpu, gradient_checkpointing=True)
    return dataclasses.replace(cfg, rollout=rollout, learner=learner)


def run_doctor(cfg: Config, prompts: int = 8) -> tuple[list[Check], int]:
    """Every check's row, and the exit code (1 if any failed)."""
    from .actors.learner import LearnerCore
    from .actors.rollout import RolloutGenerator
    from .batch import Samples, pad_samples
    from .models import load_tokenizer, resolve_model_path

    cfg = doctor_config(cfg)
    path = resolve_model_path(cfg.model)
    on_gpu = cfg.learner.use_gpu
    device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
    tok = load_tokenizer(path)
    rows: list[Check] = []
    state: dict = {}

    def device_info():
        if on_gpu:
            p = torch.cuda.get_device_properties(0)
            return True, (f"{p.name}, {p.total_memory / 2**30:.1f} GiB, {torch.cuda.device_count()} visible; "
                          f"model.dtype={cfg.model.dtype}")
        return True, f"CPU, {os.cpu_count()} cores, no CUDA; model.dtype={cfg.model.dtype}"

    rows.append(_row("device", device_info))

    def engine():
        t = time.perf_counter()
        state["gen"] = RolloutGenerator(cfg, path, "doctor-rollout")
        kw = state["gen"].llm.llm_engine.vllm_config
        return True, (f"built in {time.perf_counter() - t:.1f} s; eager={kw.model_config.enforce_eager}, "
                      f"lora targets {list(cfg.lora.target_modules)}, gpu_memory_utilization="
                      f"{cfg.rollout.gpu_memory_utilization}")

    rows.append(_row("engine (as a rollout actor builds it)", engine))

    def learner():
        t = time.perf_counter()
        state["core"] = LearnerCore(cfg, path, device=device)
        return True, f"LoRA r={cfg.lora.rank} on {device}, gradient checkpointing, built in {time.perf_counter() - t:.1f} s"

    rows.append(_row("learner", learner))

    def publish():
        gen, core = _need(state, "gen", "core")
        g = torch.Generator().manual_seed(0)
        swaps, outs = [], []
        ids = [tok("the film was")["input_ids"]]
        for v in range(3):
            with torch.no_grad():  # a different adapter each version, as updates make it
                for n, p in core.module.policy.named_parameters():
                    if "lora_B" in n:
                        p.copy_(torch.randn(p.shape, generator=g).to(p.device, p.dtype) * 0.05)
            swaps.append(gen.load_adapter(core.adapter(v + 1))["swap_s"])
            outs.append(gen.generate(ids, seeds=[7]).response_ids[0])
        st = gen.adapter_state()
        ok = st["loaded_loras"] == 1 and st["version"] == 3 and st["adapter_dirs"] == 1
        return ok, (f"3 versions, {max(swaps) * 1e3:.0f} ms per swap at most; engine holds {st['loaded_loras']} "
                    f"LoRA(s), version {st['version']}; {len(set(map(tuple, outs)))} distinct outputs of 3")

    rows.append(_row("adapter publish and hot swap", publish))

    def logprob_gap(top_p: float):
        def check():
            gen, core = _need(state, "gen", "core")
            from .models.policy import Sampling

            rc = dataclasses.replace(cfg.rollout, top_p=top_p)
            gen.cfg = dataclasses.replace(cfg, rollout=rc)  # the sampling params are read per call
            core.module.sampling = Sampling.from_config(rc)
            ids = [tok(t)["input_ids"] for t in ("the film was", "a quiet story about", "i did not expect",
                                                  "the plot", "this book", "every scene of the", "we watched",
                                                  "what a")[:prompts]]
            s: Samples = gen.generate(ids, seeds=list(range(len(ids))))
            batch = pad_samples(s, tok.pad_token_id)
            lp = core.evaluate(batch)["old_logprobs"]
            m = batch.action_mask
            gap = ((lp - batch.behaviour_logprobs).abs() * m).sum() / m.sum().clamp(min=1)
            worst = float(((lp - batch.behaviour_logprobs).abs() * m).max())
            state["samples"] = s
            limit = GAP_LIMIT[cfg.model.dtype]
            return float(gap) <= limit, (f"mean {float(gap):.2e}, max {worst:.2e} nats per token over "
                                         f"{int(m.sum())} tokens (limit {limit:g} in {cfg.model.dtype})")
        return check

    rows.append(_row("log-probs, engine vs learner (top_p 1.0)", logprob_gap(1.0)))
    rows.append(_row("log-probs, engine vs learner (top_p 0.9)", logprob_gap(0.9)))

    def update():
        core = _need(state, "core")[0]
        s = state.get("samples")
        if s is None:
            raise _Skip("no samples (the engine check failed)")
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        batch = pad_samples(s, tok.pad_token_id)
        ev = core.evaluate(batch)
        m = batch.action_mask
        g = torch.Generator().manual_seed(1)
        batch.old_logprobs, batch.ref_logprobs = ev["old_logprobs"], ev["ref_logprobs"]
        batch.advantages = torch.randn(m.shape, generator=g) * m
        if ev["old_values"] is not None:
            batch.old_values, batch.returns = ev["old_values"], torch.randn(m.shape, generator=g) * m
        before = core.param_checksum()
        t = time.perf_counter()
        stats = core.update(batch)
        took = time.perf_counter() - t
        finite = all(math.isfinite(v) for v in stats.values() if isinstance(v, float))
        moved = core.param_checksum() != before
        peak = ""
        if on_gpu:
            peak = f"; CUDA peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
        return finite and moved and not stats["nonfinite_grad"], (
            f"{stats['optimizer_steps']} optimizer steps in {took:.1f} s, loss {stats.get('loss', float('nan')):.3f}, "
            f"grad norm {stats.get('grad_norm', float('nan')):.3f}, adapter moved: {moved}{peak}")

    rows.append(_row("learner update (gradient checkpointing)", update))
    rows.append(_row("two-rank all-reduce", lambda: all_reduce_check(on_gpu)))
    gen = state.get("gen")
    if gen is not None:
        gen.shutdown()
    return rows, int(any(r.result == "FAIL" for r in rows))


def _need(state: dict, *names: str) -> list:
    missing = [n for n in names if n not in state]
    if missing:
        raise _Skip(f"needs the {' and '.join(missing)} check(s), which failed")
    return [state[n] for n in names]


def _all_reduce_rank(rank: int, world: int, port: int, backend: str, out) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend, rank=rank, world_size=world)
    dev = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    x = torch.full((1 << 20,), float(rank + 1), device=dev)
    t = time.perf_counter()
    dist.all_reduce(x)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    out.put((rank, float(x[0]), time.perf_counter() - t))
    dist.destroy_process_group()


def all_reduce_check(on_gpu: bool) -> tuple[bool, str]:
    """Two processes all-reduce 4 MiB: NCCL between two cards where there are two, gloo on the
    CPU. A broken peer-to-peer path (consumer cards without NVLink) shows here in seconds."""
    import socket

    import torch.multiprocessing as mp

    if on_gpu and torch.cuda.device_count() < 2:
        raise _Skip("one GPU visible: NCCL needs two (run the doctor on a node with 2+ cards)")
    backend = "nccl" if on_gpu else "gloo"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_all_reduce_rank, args=(r, 2, port, backend, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = []
    try:
        for _ in procs:
            results.append(out.get(timeout=120))
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    ok = all(v == 3.0 for _, v, _ in results) and len(results) == 2
    return ok, f"{backend}, 4 MiB, {max(t for *_, t in results) * 1e3:.0f} ms, sum {results[0][1]:g} (expect 3)"


def render(rows: list[Check]) -> str:
    from .plan.placement import _table

    return _table(["check", "result", "figures"], [[r.name, r.result, r.figures] for r in rows])
