"""A generator fleet shared by several runs: vLLM engines that outlive any one run and serve
each attached run's own LoRA adapter versions, batching the requests of every run together.

``rlhf-ray fleet start`` makes the fleet's detached, named actors (a controller and the
generators); ``rlhf-ray train ... rollout.fleet=<name>`` attaches a run through
:class:`FleetClient`, which the trainer uses in place of its own :class:`fleet.RolloutFleet`.

- **Adapters**: the controller hands out a LoRA id per (run, version) and holds each run's
  slot reservation (its ``rollout.max_staleness`` + 1 versions); the engines have
  ``fleet.max_runs x (fleet.max_staleness + 1)`` slots. A generator retires a run's version only
  when none of that run's requests still needs it, so a new version never evicts one in use.
- **Fairness**: each generator keeps a queue per run and batches continuously: between engine
  steps it admits prompts while fewer than ``fleet.max_batch_samples`` samples are in flight,
  taken by deficit round-robin weighted by the runs' ``rollout.fleet_share`` (:class:`FairQueue`).
- **Leases**: a run holds a small actor of its own driver's; when that driver exits or is
  killed the actor dies with it, and the controller releases the run's adapters.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .batch import Samples
from .config import Config

log = logging.getLogger(__name__)

NAMESPACE = "rlhf-ray-fleet"
LEASE_CHECK_S = 2.0  # how often the controller checks that attached runs' drivers are alive


class FleetFull(ValueError):
    """A run asked for more LoRA slots than the fleet has free."""


class FleetError(RuntimeError):
    """The fleet refused or lost a request (its generator names itself)."""


def controller_name(fleet: str) -> str:
    return f"{fleet}:controller"


def generator_name(fleet: str, i: int) -> str:
    return f"{fleet}:gen-{i}"


def lora_slots(max_runs: int, max_staleness: int) -> int:
    """LoRA slots each engine needs: every run may hold its version in use plus the
    ``max_staleness`` older ones its rollouts in flight were sent with."""
    return max_runs * (max_staleness + 1)


# -- pure parts: slot table and fair queue -------------------------------------------------
@dataclass
class SlotTable:
    """Which runs hold the fleet's LoRA slots, and the ids handed out per (run, version)."""

    capacity: int
    max_staleness: int
    held: dict[str, int] = field(default_factory=dict)  # run -> slots reserved
    _ids: Any = field(default_factory=lambda: itertools.count(1))  # vLLM LoRA ids are > 0

    def reserve(self, run: str, staleness: int) -> int:
        """Reserve ``staleness + 1`` slots for ``run``; returns how many.

        Raises:
            FleetFull: not enough free slots (the message says which runs hold what).
            ValueError: the run is already attached, or wants more staleness than the fleet serves.
        """
        if run in self.held:
            raise ValueError(f"a run named {run!r} is already attached to this fleet (output.name must differ "
                             "between runs sharing a fleet)")
        if staleness > self.max_staleness:
            raise ValueError(f"rollout.max_staleness={staleness} exceeds the fleet's fleet.max_staleness="
                             f"{self.max_staleness}: start the fleet with a larger one, or lower the run's")
        need = staleness + 1
        free = self.capacity - sum(self.held.values())
        if need > free:
            holders = ", ".join(f"{r}: {n}" for r, n in self.held.items()) or "none"
            raise FleetFull(f"the fleet is full: run {run!r} needs {need} LoRA slot(s) (rollout.max_staleness="
                            f"{staleness} + 1) and {free} of {self.capacity} are free (held: {holders}); wait for "
                            "a run to end, or start the fleet with a larger fleet.max_runs")
        self.held[run] = need
        return need

    def release(self, run: str) -> bool:
        return self.held.pop(run, None) is not None

    def new_id(self) -> int:
        return next(self._ids)


@dataclass
class _Item:
    """One prompt of a run's request: generated with ``n`` samples in some engine round."""

    request: "Request"
    j: int  # its position in the request
    cost: int  # samples it makes
    version: Optional[int] = None  # the adapter version that generates it (set when admitted)


@dataclass
class Request:
    run: str
    version: int
    prompt_ids: list[list[int]]
    seeds: Optional[list[int]]
    n: int
    sampling: dict
    sent_at: float = field(default_factory=time.monotonic)
    outputs: dict[int, Any] = field(default_factory=dict)  # prompt position -> (vLLM output, version used)
    waited_s: float = 0.0  # summed over prompts: time from arrival to the round that took it
    error: Optional[str] = None
    done: threading.Event = field(default_factory=threading.Event)

    def finished(self) -> bool:
        return len(self.outputs) == len(self.prompt_ids)


class FairQueue:
    """Per-run queues of prompts, taken by deficit round-robin: every round each waiting run
    earns ``quantum x share`` samples of credit and takes whole prompts while its credit lasts,
    so a run with a deep queue cannot starve one with a shallow one, and shares weight them."""

    def __init__(self):
        self.queues: dict[str, deque[_Item]] = {}
        self.share: dict[str, float] = {}
        self.credit: dict[str, float] = {}
        self._order: deque[str] = deque()  # whose turn comes first: rotates every round

    def add_run(self, run: str, share: float = 1.0) -> None:
        if run not in self.queues:
            self.queues[run], self.credit[run] = deque(), 0.0
            self._order.append(run)
        self.share[run] = share

    def drop_run(self, run: str) -> list[_Item]:
        items = list(self.queues.pop(run, ()))
        self.share.pop(run, None)
        self.credit.pop(run, None)
        if run in self._order:
            self._order.remove(run)
        return items

    def push(self, request: Request) -> None:
        q = self.queues[request.run]
        q.extend(_Item(request, j, request.n) for j in range(len(request.prompt_ids)))

    def depth(self, run: Optional[str] = None) -> int:
        """Samples waiting (of ``run``, or of every run)."""
        runs = [run] if run is not None else list(self.queues)
        return sum(it.cost for r in runs for it in self.queues.get(r, ()))

    def take(self, budget: int, ready: Callable[[_Item], bool] = lambda it: True) -> list[_Item]:
        """Up to ``budget`` samples' worth of prompts (at least one prompt when any is ready)."""
        waiting = [r for r in self._order if any(ready(it) for it in self.queues[r])]
        if not waiting:
            return []
        total_share = sum(self.share[r] for r in waiting)
        out: list[_Item] = []
        used = 0
        for r in waiting:
            self.credit[r] += budget * self.share[r] / total_share
        progress = True
        while progress and used < budget:
            progress = False
            for r in waiting:
                q = self.queues[r]
                kept: deque[_Item] = deque()
                while q and used < budget:
                    it = q[0]
                    if not ready(it):
                        kept.append(q.popleft())
                        continue
                    if it.cost > self.credit[r] and (out or used):
                        break
                    q.popleft()
                    out.append(it)
                    used += it.cost
                    self.credit[r] -= it.cost
                    progress = True
                    if self.credit[r] <= 0:
                        break
                q.extendleft(reversed(kept))
        for r in waiting:  # credit does not pile up while a run's queue is empty
            if not self.queues[r]:
                self.credit[r] = 0.0
            self.credit[r] = min(self.credit[r], float(budget))
        self._order.rotate(-1)
        return out


# -- actors ----------------------------------------------------------------------------------
class SharedGenerator:
    """One vLLM engine of a shared fleet. Ray calls arrive on several threads (a threaded
    actor); only the engine thread touches the engine, so adapter loads and engine steps are
    serialised there."""

    role = "rollout"

    def __init__(self, cfg: Config, model_path: str, name: str, *, slots: int, max_model_len: int,
                 seed: int, max_batch_samples: int):
        from .actors.engine import build_engine
        from .devices import role_device
        from .logs import redirect_output
        from .telemetry import MemorySampler

        redirect_output(name.replace(":", "-"))
        self.cfg, self.name, self.budget = cfg, name, max_batch_samples
        on_gpu = role_device(name, cfg.rollout.num_gpus, f"rollout.num_gpus={cfg.rollout.num_gpus:g}",
                             rehearse=cfg.cluster.rehearse).type == "cuda"
        self.memory = MemorySampler()
        t = time.perf_counter()
        self.llm = build_engine(cfg, model_path, on_gpu=on_gpu, max_model_len=max_model_len, seed=seed,
                                logprobs_mode="processed_logprobs", max_loras=slots, max_cpu_loras=slots)
        from vllm import SamplingParams

        self.llm.generate([{"prompt_token_ids": [0, 1, 2]}], SamplingParams(max_tokens=2), use_tqdm=False)
        self.startup_s = time.perf_counter() - t
        self.max_model_len = max_model_len
        self._cond = threading.Condition()
        self._queue = FairQueue()
        self._jobs: deque[tuple[str, tuple, dict]] = deque()  # (kind, args, reply box)
        self._loras: dict[str, dict[int, Any]] = {}  # run -> version -> LoRARequest
        self._latest: dict[str, int] = {}
        self._keep: dict[str, int] = {}
        self._released: set[str] = set()
        self._running: dict[str, _Item] = {}  # engine request id -> prompt in flight
        self._request_ids = itertools.count()
        self._dir = None
        self.stats: dict[str, dict[str, float]] = {}
        self.steps = 0
        self.step_samples = 0
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name=f"{name}-engine", daemon=True)
        self._thread.start()

    # -- calls (any thread) ------------------------------------------------------------------
    def ping(self) -> str:
        return self.name

    def startup_seconds(self) -> float:
        return self.startup_s

    def add_run(self, run: str, keep: int, share: float) -> None:
        self._job("add_run", run, keep, share)

    def release_run(self, run: str) -> int:
        """Drop the run's queued prompts (their requests fail) and every adapter it holds."""
        return self._job("release", run)

    def load_adapter(self, run: str, adapter, lora_id: int) -> dict:
        return self._job("load", run, adapter, lora_id)

    def generate(self, run: str, version: int, prompt_ids: list[list[int]], seeds: Optional[list[int]], n: int,
                 sampling: dict) -> Samples:
        """``n`` samples per prompt with ``run``'s adapter ``version`` (a version already retired
        is served by the run's newest; each sample says which version made it). Waits until
        every prompt is generated (they join the running batch as room frees up)."""
        req = Request(run, version, prompt_ids, seeds, n, sampling)
        with self._cond:
            if run not in self._queue.queues:
                raise FleetError(f"{self.name}: run {run!r} is not attached (released: the run ended, or its "
                                 "driver died)" if run in self._released else f"{self.name}: run {run!r} is not attached")
            self._queue.push(req)
            self._cond.notify_all()
        req.done.wait()
        if req.error:
            raise FleetError(req.error)
        return self._samples(req)

    def status(self) -> dict:
        with self._cond:
            return {"name": self.name, "steps": self.steps,
                    "mean_batch_samples": self.step_samples / self.steps if self.steps else 0.0,
                    "queue_depth": {r: self._queue.depth(r) for r in self._queue.queues},
                    "adapters": {r: sorted(v) for r, v in self._loras.items()},
                    "loaded_loras": len(self.llm.llm_engine.list_loras()),
                    "runs": {r: dict(s) for r, s in self.stats.items()}}

    def memory_stats(self) -> dict:
        from .telemetry import gpu_bytes_by_process, rss_by_process

        return {"role": self.role, "name": self.name, **self.memory.stats(), "rss_by_process": rss_by_process(),
                "gpu_bytes_by_process": gpu_bytes_by_process()}

    def shutdown(self) -> None:
        from .sync import remove_adapter_dir

        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=60)
        if self._dir is not None:
            remove_adapter_dir(self._dir)
        try:
            self.llm.llm_engine.engine_core.shutdown()
        except Exception as e:
            log.debug("%s: engine shutdown: %s", self.name, e)
        self.memory.close()

    # -- the engine thread ---------------------------------------------------------------------
    def _job(self, kind: str, *args):
        box: dict = {"done": threading.Event()}
        with self._cond:
            self._jobs.append((kind, args, box))
            self._cond.notify_all()
        box["done"].wait()
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def _ready(self, it: _Item) -> bool:
        """A prompt can go into a round once its version is loaded (or already retired)."""
        r = it.request
        return r.version in self._loras.get(r.run, {}) or r.version < self._latest.get(r.run, -1)

    def _loop(self) -> None:
        """Continuous batching: between two engine steps the thread runs waiting jobs (adapter
        loads) and admits prompts of every run while fewer than ``max_batch_samples`` samples are
        in flight, so a run's request joins the batch already running instead of waiting for
        it to end, and a load waits at most one step."""
        while True:
            with self._cond:
                while not self._stop and not self._jobs and not self._running and \
                        not any(self._ready(it) for q in self._queue.queues.values() for it in q):
                    self._cond.wait(timeout=1.0)
                if self._stop:
                    self._fail_all(f"{self.name}: the fleet was stopped")
                    return
                jobs, self._jobs = list(self._jobs), deque()
            deferred = []
            for kind, args, box in jobs:
                try:
                    if not self._do(kind, args, box):
                        deferred.append((kind, args, box))
                        continue
                except BaseException as e:  # reported to the caller, the engine thread goes on
                    box["error"] = e
                box["done"].set()
            with self._cond:
                self._jobs.extendleft(reversed(deferred))
                room = self.budget - sum(it.cost for it in self._running.values())
                items = self._queue.take(room, self._ready) if room > 0 else []
            if items:
                self._admit(items)
            if self._running:
                self._step()
            elif deferred:
                time.sleep(0.01)  # a load waiting for a version in use, with nothing else to run

    def _do(self, kind: str, args: tuple, box: dict) -> bool:
        """Run one job; False when it has to wait (a load whose run holds all its slots in use)."""
        if kind == "add_run":
            run, keep, share = args
            with self._cond:
                self._queue.add_run(run, share)
            self._keep[run] = keep
            self._loras.setdefault(run, {})
            self._released.discard(run)
            self.stats.setdefault(run, {"requests": 0, "prompts": 0, "samples": 0, "wait_s": 0.0,
                                        "attached_at": time.time()})
            return True
        if kind == "release":
            (run,) = args
            with self._cond:
                for it in self._queue.drop_run(run):
                    it.request.error = f"{self.name}: run {run!r} was released from the fleet"
                    it.request.done.set()
            n = 0
            for version in list(self._loras.get(run, {})):
                self._retire(run, version)
                n += 1
            self._loras.pop(run, None)
            self._latest.pop(run, None)
            self._keep.pop(run, None)
            self._released.add(run)
            box["value"] = n
            return True
        if kind == "load":
            run, adapter, lora_id = args
            if run not in self._keep:
                raise FleetError(f"{self.name}: run {run!r} is not attached")
            held = self._loras[run]
            for version in sorted(held):  # oldest first, never one a queued or running prompt needs
                if len(held) < self._keep[run]:
                    break
                if not self._in_use(run, version):
                    self._retire(run, version)
            if len(held) >= self._keep[run]:
                return False
            box["value"] = self._add(run, adapter, lora_id)
            return True
        raise ValueError(kind)

    def _in_use(self, run: str, version: int) -> bool:
        with self._cond:
            q = self._queue.queues.get(run, ())
            running = [it for it in self._running.values() if it.request.run == run]
            return any(it.request.version == version for it in q) or any(it.version == version for it in running)

    def _add(self, run: str, adapter, lora_id: int) -> dict:
        from vllm.lora.request import LoRARequest

        from .sync import adapter_root, write_adapter

        t = time.perf_counter()
        if adapter.merged is not None:
            raise FleetError(f"{self.name}: a shared fleet serves LoRA adapters only, not merged weights")
        if adapter.peft_config.get("r", 0) > self.cfg.rollout.max_lora_rank:
            raise FleetError(f"{self.name}: adapter rank {adapter.peft_config.get('r')} exceeds the fleet's "
                             f"rollout.max_lora_rank={self.cfg.rollout.max_lora_rank}")
        if self._dir is None:
            import os

            root, note = adapter_root(4 * adapter.num_bytes * max(1, sum(self._keep.values())) + 2**20)
            if note:
                log.warning("%s: %s", self.name, note)
            self._dir = root / f"{self.name.replace(':', '-')}-{os.getpid()}"
        path = write_adapter(adapter, self._dir / f"{run}-v{adapter.version}-{lora_id}")
        request = LoRARequest(f"{run}-v{adapter.version}-{lora_id}", lora_id, str(path))
        self.llm.llm_engine.add_lora(request)
        self._loras[run][adapter.version] = request
        self._latest[run] = max(adapter.version, self._latest.get(run, -1))
        released = sum(self.llm.collective_rpc("release_host_memory"))
        return {"version": adapter.version, "swap_s": time.perf_counter() - t, "host_released_bytes": released,
                "lora_id": lora_id}

    def _retire(self, run: str, version: int) -> None:
        from pathlib import Path

        from .sync import remove_adapter_dir

        request = self._loras[run].pop(version)
        self.llm.llm_engine.remove_lora(request.lora_int_id)
        remove_adapter_dir(Path(request.lora_path))

    def _admit(self, items: list[_Item]) -> None:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        now = time.monotonic()
        for it in items:
            r = it.request
            held = self._loras.get(r.run, {})
            it.version = r.version if r.version in held else self._latest.get(r.run)
            s = r.sampling
            params = SamplingParams(n=r.n, temperature=s["temperature"], top_p=s["top_p"], top_k=s["top_k"],
                                    max_tokens=s["max_new_tokens"], logprobs=0,
                                    seed=r.seeds[it.j] if r.seeds is not None else None,
                                    output_kind=RequestOutputKind.FINAL_ONLY)
            r.waited_s += now - r.sent_at
            stats = self.stats.get(r.run)
            if stats is not None:
                stats["wait_s"] += now - r.sent_at
            key = str(next(self._request_ids))
            try:
                self.llm.llm_engine.add_request(key, {"prompt_token_ids": r.prompt_ids[it.j]}, params,
                                                lora_request=held.get(it.version))
            except Exception as e:  # this prompt's request hears it; the others go on
                self._finish(it, None, f"{self.name}: generation failed: {e!r}")
                continue
            self._running[key] = it

    def _step(self) -> None:
        self.steps += 1
        self.step_samples += sum(it.cost for it in self._running.values())
        try:
            outs = self.llm.llm_engine.step()
        except Exception as e:  # every request in flight hears it; the engine thread goes on
            why = f"{self.name}: generation failed: {e!r}"
            for key in list(self._running):
                self.llm.llm_engine.abort_request([key])
                self._finish(self._running.pop(key), None, why)
            return
        for out in outs:
            if out.finished and out.request_id in self._running:
                self._finish(self._running.pop(out.request_id), out, None)

    def _finish(self, it: _Item, out, error: Optional[str]) -> None:
        r = it.request
        with self._cond:
            if error:
                r.error = error
            r.outputs[it.j] = (out, it.version)
            s = self.stats.get(r.run)
            if s is not None and not error:
                s["samples"] += it.cost
                s["prompts"] += 1
            if r.finished() or error:
                if s is not None and r.finished() and not r.error:
                    s["requests"] += 1
                r.done.set()

    def _fail_all(self, why: str) -> None:
        for run in list(self._queue.queues):
            for it in self._queue.drop_run(run):
                it.request.error = why
                it.request.done.set()
        for kind, args, box in self._jobs:
            box["error"] = FleetError(why)
            box["done"].set()

    def _samples(self, req: Request) -> Samples:
        from .actors.rollout import samples_from_outputs

        js = range(len(req.prompt_ids))
        samples = samples_from_outputs(req.prompt_ids, [req.outputs[j][0] for j in js], [req.outputs[j][1] for j in js])
        samples.compute_s = time.monotonic() - req.sent_at
        samples.run = req.run  # checked by the client: a reply is for the run that asked
        samples.queue_wait_s = req.waited_s / max(1, len(req.prompt_ids))
        return samples


class RunLease:
    """Owned by a run's driver: Ray kills it when that driver exits, which is how the
    controller learns that a run crashed without detaching."""

    def ping(self) -> bool:
        return True


class FleetController:
    """The fleet's registry: its generators, the attached runs and their LoRA slots, and the
    lease watch that releases a run whose driver is gone."""

    def __init__(self, name: str, info: dict, generator_names: list[str], slots: int, max_staleness: int):
        self.name, self.info = name, info
        self.generator_names = generator_names
        self.slots = SlotTable(slots, max_staleness)
        self.runs: dict[str, dict] = {}
        self.ended: list[dict] = []  # runs released: how (detached, or driver gone) and when
        self._lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._watch, name="lease-watch", daemon=True).start()

    def _generators(self) -> list:
        import ray

        return [ray.get_actor(n, namespace=NAMESPACE) for n in self.generator_names]

    def describe(self) -> dict:
        return {"name": self.name, **self.info, "generators": list(self.generator_names),
                "lora_slots": self.slots.capacity, "max_staleness": self.slots.max_staleness}

    def attach(self, run: str, staleness: int, share: float, lease, info: dict) -> dict:
        import ray

        with self._lock:
            gone = self._check_leases()
        for dead in gone:  # a crashed run's slots are free before the new one asks
            self.detach(dead, why="driver gone")
        with self._lock:
            keep = self.slots.reserve(run, staleness)
            self.runs[run] = {"keep": keep, "share": share, "lease": lease, "attached_at": time.time(), **info}
        try:
            ray.get([g.add_run.remote(run, keep, share) for g in self._generators()])
        except BaseException:
            with self._lock:
                self.slots.release(run)
                self.runs.pop(run, None)
            raise
        return {**self.describe(), "keep": keep}

    def lora_id(self, run: str) -> int:
        with self._lock:
            if run not in self.runs:
                raise FleetError(f"fleet {self.name!r}: run {run!r} is not attached (released?)")
            return self.slots.new_id()

    def detach(self, run: str, why: str = "ended") -> bool:
        import ray

        with self._lock:
            if run not in self.runs:
                return False
            entry = self.runs.pop(run)
            self.slots.release(run)
            self.ended.append({"run": run, "why": why, "at": time.time(),
                               "held_s": time.time() - entry["attached_at"]})
        for g in self._generators():
            try:
                ray.get(g.release_run.remote(run), timeout=60)
            except Exception as e:  # a dead generator holds nothing
                log.warning("fleet %s: releasing %s on a generator: %s", self.name, run, e)
        return True

    def _check_leases(self) -> list[str]:
        """Runs whose driver is gone (their lease actor died with it)."""
        import ray

        gone = []
        for run, entry in list(self.runs.items()):
            try:
                ray.get(entry["lease"].ping.remote(), timeout=10)
            except ray.exceptions.GetTimeoutError:
                continue  # busy or slow: not proof of death
            except Exception:
                gone.append(run)
        return gone

    def _watch(self) -> None:
        while not self._stop.wait(LEASE_CHECK_S):
            with self._lock:
                gone = self._check_leases()
            for run in gone:
                log.warning("fleet %s: run %s's driver is gone; releasing its adapters", self.name, run)
                self.detach(run, why="driver gone")

    def status(self) -> dict:
        import ray

        gens = {}
        for n, g in zip(self.generator_names, self._generators()):
            try:
                gens[n] = ray.get(g.status.remote(), timeout=30)
            except Exception as e:
                gens[n] = {"error": str(e).splitlines()[0]}
        runs = {}
        now = time.time()
        with self._lock:
            attached = dict(self.runs)
            used = sum(self.slots.held.values())
            ended = list(self.ended[-20:])
        for run, entry in attached.items():
            per = [g.get("runs", {}).get(run, {}) for g in gens.values()]
            samples = sum(p.get("samples", 0) for p in per)
            prompts = sum(p.get("prompts", 0) for p in per)
            held = now - entry["attached_at"]
            runs[run] = {"keep": entry["keep"], "share": entry["share"], "attached_s": held,
                         "samples": samples, "samples_per_s": samples / held if held > 0 else 0.0,
                         "queue_wait_mean_s": sum(p.get("wait_s", 0.0) for p in per) / prompts if prompts else 0.0,
                         "queue_depth": sum(g.get("queue_depth", {}).get(run, 0) for g in gens.values()),
                         "adapters": {n: g.get("adapters", {}).get(run, []) for n, g in gens.items()},
                         **{k: v for k, v in entry.items() if k not in ("lease", "keep", "share", "attached_at")}}
        return {**self.describe(), "slots_used": used, "runs": runs, "generators_status": gens, "ended": ended}

    def stop(self) -> None:
        self._stop.set()


# -- starting, finding, stopping ------------------------------------------------------------
def fleet_max_model_len(cfg: Config) -> int:
    """The engines' context: fleet.max_model_len, else rollout.max_model_len, else the
    longest prompt the data may give (data.max_prompt_tokens) plus rollout.max_new_tokens."""
    return cfg.fleet.max_model_len or cfg.rollout.max_model_len or (cfg.data.max_prompt_tokens
                                                                    + cfg.rollout.max_new_tokens)


def check_fleet_config(cfg: Config) -> None:
    """What a shared fleet cannot serve, refused before any actor starts."""
    if cfg.learner.method != "lora":
        raise ValueError(f"a shared fleet serves LoRA adapters, but learner.method={cfg.learner.method} publishes "
                         "merged weights: run it with a fleet of its own (no rollout.fleet)")


def start_fleet(cfg: Config, model_path: Optional[str] = None) -> dict:
    """Start the detached fleet ``fleet.name`` on the connected cluster: its controller and
    ``rollout.num_engines`` generators (built in parallel). Returns its description.

    Raises:
        ValueError: a fleet of that name is running already, or the config cannot be served.
    """
    import ray

    from .actors.engine import allocator_env
    from .actors.hf_rollout import engine_kind
    from .launch import call
    from .stages import policy_base

    check_fleet_config(cfg)
    name = cfg.fleet.name
    if find_fleet(name) is not None:
        raise ValueError(f"a fleet named {name!r} is already running (rlhf-ray fleet status --name {name}; "
                         "stop it first, or set fleet.name)")
    model_path = str(model_path or policy_base(cfg))
    if engine_kind(cfg, model_path) != "vllm":
        raise ValueError(f"{model_path}: a shared fleet serves vLLM engines only (rollout.engine="
                         f"{cfg.rollout.engine}; encoder-decoder policies run with a fleet of their own)")
    slots = lora_slots(cfg.fleet.max_runs, cfg.fleet.max_staleness)
    max_len = fleet_max_model_len(cfg)
    r = cfg.rollout
    env = {**allocator_env(cfg)}
    gens, names = [], []
    for i in range(r.num_engines):
        gname = generator_name(name, i)
        names.append(gname)
        gens.append(ray.remote(SharedGenerator).options(
            name=gname, namespace=NAMESPACE, lifetime="detached", num_cpus=r.num_cpus, num_gpus=r.num_gpus,
            max_concurrency=256, runtime_env={"env_vars": _role_env(cfg, name, env)}).remote(
                cfg, model_path, gname, slots=slots, max_model_len=max_len, seed=r.seed + i,
                max_batch_samples=cfg.fleet.max_batch_samples))
    try:
        for gname, g in zip(names, gens):
            call(gname, g.ping.remote(), cfg.cluster.start_timeout_s, timeout_key="cluster.start_timeout_s")
        info = {"model_path": model_path, "max_model_len": max_len, "max_lora_rank": r.max_lora_rank,
                "lora_targets": list(cfg.lora.target_modules), "max_runs": cfg.fleet.max_runs,
                "started_at": time.time()}
        controller = ray.remote(FleetController).options(
            name=controller_name(name), namespace=NAMESPACE, lifetime="detached", num_cpus=0,
            max_concurrency=32).remote(name, info, names, slots, cfg.fleet.max_staleness)
        return ray.get(controller.describe.remote(), timeout=60)
    except BaseException:
        for g in gens:
            ray.kill(g)
        raise


def _role_env(cfg: Config, fleet: str, extra: dict) -> dict:
    from pathlib import Path

    from .launch import ROLE_ENV
    from .logs import LOG_DIR_ENV

    logs = Path(cfg.output.dir).resolve() / f"fleet-{fleet}" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    return {**ROLE_ENV, LOG_DIR_ENV: str(logs), **extra}


def find_fleet(name: str):
    """The controller of the running fleet ``name``, or None."""
    import ray

    try:
        return ray.get_actor(controller_name(name), namespace=NAMESPACE)
    except ValueError:
        return None


def fleet_status(name: str) -> dict:
    controller = find_fleet(name)
    if controller is None:
        raise ValueError(f"no fleet named {name!r} is running on this cluster (rlhf-ray fleet start)")
    import ray

    return ray.get(controller.status.remote(), timeout=120)


def stop_fleet(name: str) -> dict:
    """Stop the fleet's generators (their engines first) and its controller. Runs still
    attached lose their generators (their next request fails, naming the fleet)."""
    import ray

    controller = find_fleet(name)
    if controller is None:
        raise ValueError(f"no fleet named {name!r} is running on this cluster")
    desc = ray.get(controller.describe.remote(), timeout=60)
    attached = list(ray.get(controller.status.remote(), timeout=120)["runs"])
    for gname in desc["generators"]:
        try:
            g = ray.get_actor(gname, namespace=NAMESPACE)
        except ValueError:
            continue
        try:
            ray.get(g.shutdown.remote(), timeout=120)
        except Exception:
            pass
        ray.kill(g)
    ray.get(controller.stop.remote(), timeout=30)
    ray.kill(controller)
    return {"name": name, "generators": desc["generators"], "runs_attached": attached}


def format_status(st: dict) -> str:
    lines = [f"fleet {st['name']}: {len(st['generators'])} generator(s) serving {st['model_path']}, "
             f"LoRA slots {st['slots_used']}/{st['lora_slots']} (max_staleness {st['max_staleness']})"]
    for n, g in st["generators_status"].items():
        if "error" in g:
            lines.append(f"  {n}: UNREACHABLE ({g['error']})")
            continue
        lines.append(f"  {n}: {g['steps']} engine steps, {g['mean_batch_samples']:.1f} samples in flight per step, "
                     f"{g['loaded_loras']} adapters loaded, queue {sum(g['queue_depth'].values())} samples")
    if not st["runs"]:
        lines.append("  no run attached")
    else:
        lines.append(f"  {'run':<24} {'slots':>5} {'share':>5} {'samples':>8} {'samples/s':>9} {'wait (s)':>8} "
                     f"{'queue':>5}  versions")
        for run, r in st["runs"].items():
            versions = sorted({v for vs in r["adapters"].values() for v in vs})
            lines.append(f"  {run:<24} {r['keep']:>5} {r['share']:>5g} {r['samples']:>8} {r['samples_per_s']:>9.2f} "
                         f"{r['queue_wait_mean_s']:>8.3f} {r['queue_depth']:>5}  {versions}")
    for e in st.get("ended", [])[-5:]:
        lines.append(f"  ended: {e['run']} ({e['why']}, after {e['held_s']:.0f} s)")
    return "\n".join(lines)


# -- a run's side ------------------------------------------------------------------------------
class _Pending:
    """A rollout sent to the fleet and not read yet (what ``trainer`` keeps in its pipeline)."""

    def __init__(self, prompt_ids, prompt_texts, n, seeds, columns, where):
        self.prompt_ids, self.prompt_texts, self.n, self.seeds = prompt_ids, prompt_texts, n, seeds
        self.columns, self.where = columns, where
        self.parts: list[tuple[str, Any, list[int]]] = []


class FleetClient:
    """A run's view of a shared fleet, with :class:`fleet.RolloutFleet`'s interface: the
    trainer dispatches, collects and publishes through it the same way. A generator of a shared
    fleet is not replaced by a run (the fleet is not the run's to change): a lost one fails the
    run, naming it."""

    def __init__(self, cfg: Config, model_path: str, *, max_model_len: int, timeout_s: float, run: str):
        import ray

        self.cfg, self.timeout, self.run = cfg, timeout_s, run
        check_fleet_config(cfg)
        name = cfg.rollout.fleet
        self.controller = find_fleet(name)
        if self.controller is None:
            raise ValueError(f"rollout.fleet={name}: no fleet of that name is running on this cluster "
                             f"(start it with `rlhf-ray fleet start --config ... fleet.name={name}`)")
        desc = ray.get(self.controller.describe.remote(), timeout=timeout_s)
        self.fleet_name = name
        self._check_compatible(desc, model_path, max_model_len)
        self.lease = ray.remote(RunLease).options(num_cpus=0).remote()
        r = cfg.rollout
        self.sampling = {"temperature": r.temperature, "top_p": r.top_p, "top_k": r.top_k,
                         "max_new_tokens": r.max_new_tokens}
        from .launch import call

        self.attached = call(f"fleet {name}", self.controller.attach.remote(
            run, r.max_staleness, r.fleet_share, self.lease,
            {"output": str(cfg.output.run_dir.resolve()), "max_staleness": r.max_staleness}), timeout_s)
        self.members = [(g, ray.get_actor(g, namespace=NAMESPACE)) for g in desc["generators"]]
        self.replaced: list[tuple[str, str, str]] = []
        self.latest_adapter = None
        self.latest_version: Optional[int] = None
        self.after_dispatch: Optional[Callable[[], None]] = None
        self._publishing: list[tuple[str, Any]] = []
        self._waits: list[float] = []
        self._closed = False

    def _check_compatible(self, desc: dict, model_path: str, max_model_len: int) -> None:
        from pathlib import Path

        where = f"rollout.fleet={desc['name']}"
        if Path(desc["model_path"]).resolve() != Path(model_path).resolve():
            raise ValueError(f"{where} serves {desc['model_path']}, but this run's policy is {model_path}: a fleet "
                             "serves one base model")
        if max_model_len > desc["max_model_len"]:
            raise ValueError(f"{where}: this run needs sequences of {max_model_len} tokens (longest prompt + "
                             f"rollout.max_new_tokens), the fleet's engines hold {desc['max_model_len']} (fleet."
                             "max_model_len)")
        if self.cfg.lora.rank > desc["max_lora_rank"]:
            raise ValueError(f"{where}: lora.rank={self.cfg.lora.rank} exceeds the fleet's rollout.max_lora_rank="
                             f"{desc['max_lora_rank']}")
        targets = set(desc["lora_targets"])
        if "all-linear" not in targets and not set(self.cfg.lora.target_modules) <= targets:
            raise ValueError(f"{where}: lora.target_modules={list(self.cfg.lora.target_modules)} are not all among "
                             f"the fleet's {sorted(targets)} (the engines wrap only those layers)")

    # -- RolloutFleet's interface ---------------------------------------------------------------
    def launch(self) -> None:
        """Nothing to build: the fleet's engines are running."""

    def start(self, adapter_ref) -> None:
        self.publish(adapter_ref)

    def build_seconds(self) -> dict[str, float]:
        return {}  # paid once, when the fleet started

    def publish(self, adapter_ref, *, wait: bool = True) -> list[dict]:
        """Every generator loads ``adapter_ref`` under a LoRA id the controller hands out; the
        requests sent after this use it (they name its version)."""
        import ray

        from .launch import call

        previous = self.settle()
        adapter = ray.get(adapter_ref)
        lora_id = call(f"fleet {self.fleet_name}", self.controller.lora_id.remote(self.run), self.timeout)
        self.latest_adapter, self.latest_version = adapter_ref, adapter.version
        self._publishing = [(name, h.load_adapter.remote(self.run, adapter_ref, lora_id)) for name, h in self.members]
        return self.settle() if wait else previous

    def settle(self) -> list[dict]:
        from .launch import call

        pending, self._publishing = self._publishing, []
        return [call(name, ref, self.timeout) for name, ref in pending]

    def dispatch(self, prompt_ids, prompt_texts, *, n: int, seeds=None, columns=None, where=None) -> _Pending:
        k = len(self.members)
        chunks = [list(range(len(prompt_ids)))[i::k] for i in range(k)]
        pending = _Pending(prompt_ids, prompt_texts, n, seeds, columns, where)
        for (name, h), c in zip(self.members, chunks):
            if c:
                ref = h.generate.remote(self.run, self.latest_version, [prompt_ids[j] for j in c],
                                        [seeds[j] for j in c] if seeds is not None else None, n, self.sampling)
                pending.parts.append((name, ref, c))
        if self.after_dispatch is not None:
            self.after_dispatch()
        return pending

    def collect(self, pending: _Pending) -> Samples:
        from .fleet import in_prompt_order, placed
        from .launch import call

        parts = []
        for name, ref, c in pending.parts:
            part = call(name, ref, self.timeout)
            if getattr(part, "run", self.run) != self.run:
                raise FleetError(f"{name} answered run {self.run!r} with samples of run {part.run!r}")
            self._waits.append(getattr(part, "queue_wait_s", 0.0))
            parts.append(placed(part, c, pending))
        return in_prompt_order(parts)

    def generate(self, prompt_ids, prompt_texts, *, n: int, seeds=None, columns=None, where=None) -> Samples:
        return self.collect(self.dispatch(prompt_ids, prompt_texts, n=n, seeds=seeds, columns=columns, where=where))

    def take_stats(self) -> dict[str, float]:
        """This run's mean queue wait on the fleet since the last call (for its step record)."""
        waits, self._waits = self._waits, []
        return {"fleet_queue_wait_s": sum(waits) / len(waits) if waits else 0.0}

    def adapter_state(self) -> dict[str, dict]:
        import ray

        out = {}
        for name, h in self.members:
            st = ray.get(h.status.remote(), timeout=self.timeout)
            versions = st["adapters"].get(self.run, [])
            out[name] = {"version": max(versions) if versions else None, "loaded_loras": len(versions),
                         "adapter_dirs": len(versions)}
        return out

    def memory(self) -> dict[str, dict]:
        from .launch import call

        refs = [(name, h.memory_stats.remote()) for name, h in self.members]
        return {name: call(name, ref, self.timeout) for name, ref in refs}

    def add(self) -> str:
        raise ValueError("a shared fleet's size is the fleet's: it is not scaled by a run")

    def remove(self) -> str:
        raise ValueError("a shared fleet's size is the fleet's: it is not scaled by a run")

    def close(self) -> None:
        """Release this run's adapters (the fleet keeps running)."""
        import ray

        if self._closed:
            return
        self._closed = True
        try:
            ray.get(self.controller.detach.remote(self.run), timeout=self.timeout)
        except Exception as e:  # the fleet is gone: nothing of ours is left on it
            log.warning("fleet %s: detaching %s: %s", self.fleet_name, self.run, e)
        try:
            ray.kill(self.lease)
        except Exception:
            pass
