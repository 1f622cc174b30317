"""The rollout fleet: vLLM generator actors, spawned, attached (serving the latest adapter
before they take any prompt), dealt prompts, given new adapter versions, scaled and closed.
Its size is independent of the learner's."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .batch import Samples
from .config import Config
from .launch import RoleFailed, RolePlacement, call, spawn

log = logging.getLogger(__name__)


@dataclass
class PendingRollout:
    """Requests sent to the generators and not read yet: (generator, reply ref, prompt
    positions) per generator, and how to send a share again to a replacement."""

    prompt_ids: list[list[int]]
    prompt_texts: list[str]
    n: int
    seeds: Optional[list[int]]
    parts: list[tuple[str, Any, list[int]]] = field(default_factory=list)
    columns: Optional[list[dict]] = None  # per prompt: its record's other columns, for the reward
    where: Optional[list[str]] = None  # per prompt: the record it came from

    def send(self, handle, chunk: list[int]):
        return handle.generate.remote([self.prompt_ids[j] for j in chunk],
                                      [self.seeds[j] for j in chunk] if self.seeds is not None else None, self.n)


def request_seed(seed: int, step: int, prompt: int) -> int:
    """A request's sampling seed from (run seed, step, prompt index): the same prompt of the
    same step gets the same samples whichever engine serves it (a resumed or re-dealt step
    reproduces them)."""
    return ((seed * 1_000_003 + step) * 1_000_003 + prompt) % (2**31 - 1)


def one_engine_at_a_time(cfg: Config) -> bool:
    """Engines holding part of a card (rollout.num_gpus < 1) start one after another: vLLM
    profiles the card's free memory while it builds and assumes nothing else changes it, so two
    engines building on one card at once can each count the other's memory as their own."""
    return 0 < cfg.rollout.num_gpus < 1


class RolloutFleet:
    def __init__(self, cfg: Config, model_path: str, *, max_model_len: Optional[int], timeout_s: float,
                 placement: Optional[RolePlacement] = None, engine: str = "vllm"):
        """``engine``: ``rollout.engine`` resolved for this policy (``actors.hf_rollout.engine_kind``)."""
        from .actors.engine import allocator_env

        self.cfg, self.model_path, self.max_model_len, self.timeout = cfg, model_path, max_model_len, timeout_s
        self.engine = engine
        self.env = allocator_env(cfg) if engine == "vllm" else {}  # before any generator starts: a missing tcmalloc fails here
        self.placement = placement
        self.members: list[tuple[str, Any]] = []
        self._spawned = 0
        self._slot: dict[str, str] = {}  # generator -> the layout name whose bundle it holds
        self.latest_adapter = None
        # Generators that died or hung and were replaced: (old name, new name, why).
        self.replaced: list[tuple[str, str, str]] = []
        # Called once a step's requests are dispatched and before any reply is read; fault
        # tests kill a generator here, which is "mid-step" by construction.
        self.after_dispatch: Optional[Callable[[], None]] = None
        self._publishing: list[tuple[str, Any, Any]] = []  # load_adapter calls not yet read (publish(wait=False))
        self._building: list[tuple[str, Any]] = []  # launched, not attached yet

    def launch(self) -> None:
        """Spawn ``rollout.num_engines`` engines without waiting: they build (in parallel) while
        the rest of start-up goes on, since an engine is its slowest part. Engines that share
        cards are built one at a time (:func:`one_engine_at_a_time`)."""
        n = self.cfg.rollout.num_engines - len(self._building) - len(self.members)
        if one_engine_at_a_time(self.cfg):
            n = min(n, 1 - len(self._building))
        self._building += [self._spawn() for _ in range(max(0, n))]

    def start(self, adapter_ref) -> None:
        """Attach the launched engines (launching them first if :meth:`launch` was not called)."""
        self.latest_adapter = adapter_ref
        self.launch()
        while self._building:
            self._attach(self._building[0])
            self._building.pop(0)
            self.launch()  # the next one, where they start one at a time

    def build_seconds(self) -> dict[str, float]:
        """Each generator's own engine build and warm-up time (its constructor)."""
        refs = [(name, h.startup_seconds.remote()) for name, h in self.members]
        return {name: call(name, ref, self.timeout) for name, ref in refs}

    def _spawn(self, slot: Optional[str] = None) -> tuple[str, Any]:
        """A new generator; ``slot``: the layout name whose placement bundle it takes (a
        replacement takes its predecessor's; by default its own name's, if the layout has one)."""
        from .actors.hf_rollout import TransformersGenerator
        from .actors.rollout import RolloutGenerator

        i = self._spawned
        self._spawned += 1
        name = f"rollout-{i}"
        self._slot[name] = slot or name
        r = self.cfg.rollout
        cls = RolloutGenerator if self.engine == "vllm" else TransformersGenerator
        return name, spawn(cls, self.cfg, self.model_path, name, num_cpus=r.num_cpus,
                           num_gpus=r.num_gpus, seed=r.seed + i, max_model_len=self.max_model_len, env=self.env,
                           placement=self.placement.options(self._slot[name]) if self.placement else None)

    def _attach(self, gen: tuple[str, Any]) -> None:
        """A generator joins the fleet only once it serves the latest adapter."""
        self._load_latest(gen)
        self.members.append(gen)

    def _load_latest(self, gen: tuple[str, Any]) -> None:
        """A new generator's first call: it waits for the engine to be built, so its deadline is
        cluster.start_timeout_s, not the call deadline."""
        name, handle = gen
        call(name, handle.load_adapter.remote(self.latest_adapter), self.cfg.cluster.start_timeout_s,
             timeout_key="cluster.start_timeout_s")

    def add(self) -> str:
        gen = self._spawn()
        self._attach(gen)
        return gen[0]

    def remove(self) -> str:
        """Stop the newest generator: its RAM-disk directory goes with it."""
        if len(self.members) <= 1:
            raise ValueError("cannot remove the last rollout actor")
        gen = self.members.pop()
        _stop(gen)
        return gen[0]

    def replace(self, name: str, why: RoleFailed) -> tuple[str, Any]:
        """A new generator in place of ``name`` (dead or hung), serving the latest adapter
        before it takes any prompt. At most ``cluster.max_role_restarts`` over the run."""
        import ray

        limit = self.cfg.cluster.max_role_restarts
        if len(self.replaced) >= limit:
            raise RoleFailed(name, f"{why} -- and the rollout fleet has already replaced {len(self.replaced)} "
                             f"generator(s), the most cluster.max_role_restarts={limit} allows", why.kind) from why
        i = next(k for k, (n, _) in enumerate(self.members) if n == name)
        try:
            ray.kill(self.members[i][1])  # a hung one still holds its GPU share (and its bundle)
        except Exception:
            pass
        # Into the same placement bundle: on a full GPU cluster there is no other room.
        new = self._spawn(slot=self._slot.get(name))
        log.warning("%s %s (%s); replaced by %s", name, why.kind or "failed", why, new[0])
        try:
            self._load_latest(new)
        except BaseException:
            _stop(new)
            raise
        self.members[i] = new
        self.replaced.append((name, new[0], str(why)))
        return new

    def _current(self, name: str) -> tuple[str, Any]:
        """``name``'s member, or its replacement's when it was already replaced (an
        asynchronous run still holds requests sent to the one it replaced)."""
        seen = {n: h for n, h in self.members}
        while name not in seen:
            nxt = next((new for old, new, _ in self.replaced if old == name), None)
            if nxt is None:
                raise RoleFailed(name, "is no longer in the rollout fleet")
            name = nxt
        return name, seen[name]

    def _call_or_replace(self, name: str, ref: Any, send: Callable[[Any], Any]) -> Any:
        """The reply to ``ref`` from generator ``name``; when it died or hung, ``send(handle)``
        asks its replacement again (the same request: per-request seeds give the same samples)."""
        while True:
            try:
                return call(name, ref, self.timeout)
            except RoleFailed as e:
                if not e.recoverable:
                    raise
                if any(n == name for n, _ in self.members):
                    name, handle = self.replace(name, e)
                else:  # replaced since this request was sent: ask the replacement
                    name, handle = self._current(name)
                ref = send(handle)

    def publish(self, adapter_ref, *, wait: bool = True) -> list[dict]:
        """Every generator serves ``adapter_ref`` before its next request (a generator found
        dead is replaced, and its replacement starts on ``adapter_ref``).

        ``wait=False`` returns at once: each generator loads the adapter after the requests
        already sent to it, so a generation in flight finishes on the version it started with,
        and every later request runs on the new one; what it returns is then the replies to the
        publish before (:meth:`settle` collects them)."""
        previous = self.settle()
        self.latest_adapter = adapter_ref
        self._publishing = [(name, h.load_adapter.remote(adapter_ref), adapter_ref) for name, h in self.members]
        return self.settle() if wait else previous

    def settle(self) -> list[dict]:
        """The replies of the last publish not yet collected (swap timings)."""
        pending, self._publishing = self._publishing, []
        return [self._call_or_replace(name, ref, lambda h, a=adapter: h.load_adapter.remote(a))
                for name, ref, adapter in pending]

    def dispatch(self, prompt_ids: list[list[int]], prompt_texts: list[str], *, n: int,
                 seeds: Optional[list[int]] = None, columns: Optional[list[dict]] = None,
                 where: Optional[list[str]] = None) -> "PendingRollout":
        """Send the requests of :meth:`generate` without waiting (prompts dealt round-robin, a
        prompt's samples on one engine); :meth:`collect` reads them. ``columns``/``where``
        stay here and are given to each prompt's samples."""
        k = len(self.members)
        chunks = [list(range(len(prompt_ids)))[i::k] for i in range(k)]
        pending = PendingRollout(prompt_ids, prompt_texts, n, seeds, [], columns, where)
        pending.parts = [(name, pending.send(h, c), c) for (name, h), c in zip(self.members, chunks) if c]
        if self.after_dispatch is not None:
            self.after_dispatch()
        return pending

    def collect(self, pending: "PendingRollout") -> Samples:
        """The samples of a dispatched rollout, in prompt order with ``prompt_index`` into its
        ``prompt_ids``, each with the adapter version that made it."""
        parts = []
        for name, ref, c in pending.parts:
            # A generator lost mid-step: its whole share is generated again by a replacement
            # (its partial output never reached us, so nothing is counted twice).
            parts.append(placed(self._call_or_replace(name, ref, lambda h, c=c: pending.send(h, c)), c, pending))
        return in_prompt_order(parts)

    def generate(self, prompt_ids: list[list[int]], prompt_texts: list[str], *, n: int,
                 seeds: Optional[list[int]] = None, columns: Optional[list[dict]] = None,
                 where: Optional[list[str]] = None) -> Samples:
        """``n`` samples per prompt, prompts dealt round-robin (a prompt's samples stay on one
        engine), returned in prompt order with ``prompt_index`` into ``prompt_ids``."""
        return self.collect(self.dispatch(prompt_ids, prompt_texts, n=n, seeds=seeds, columns=columns, where=where))

    def adapter_state(self) -> dict[str, dict]:
        refs = [(name, h.adapter_state.remote()) for name, h in self.members]
        return {name: call(name, ref, self.timeout) for name, ref in refs}

    def memory(self) -> dict[str, dict]:
        refs = [(name, h.memory_stats.remote()) for name, h in self.members]
        return {name: call(name, ref, self.timeout) for name, ref in refs}

    def close(self) -> None:
        while self.members:
            _stop(self.members.pop())
        while self._building:
            _stop(self._building.pop())


def placed(part: Samples, chunk: list[int], pending) -> Samples:
    """A generator's reply to the prompts ``chunk`` of a dispatched rollout, with its
    ``prompt_index`` into the whole rollout and each prompt's text, columns and origin."""
    part.prompt_index = [chunk[i] for i in part.prompt_index]
    part.prompts = [pending.prompt_texts[j] for j in part.prompt_index]
    part.columns = [pending.columns[j] if pending.columns else {} for j in part.prompt_index]
    part.where = [pending.where[j] if pending.where else f"prompt {j}" for j in part.prompt_index]
    return part


def in_prompt_order(parts: list[Samples]) -> Samples:
    samples = Samples()
    for part in parts:
        samples.extend(part)
    order = sorted(range(len(samples)), key=lambda i: samples.prompt_index[i])  # stable: groups stay in order
    return samples.reordered(order)


def _stop(gen: tuple[str, Any]) -> None:
    import ray

    _, handle = gen
    try:
        ray.get(handle.shutdown.remote(), timeout=30)
    except Exception:  # a dead actor has nothing left to clean
        pass
    ray.kill(handle)
