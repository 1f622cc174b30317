"""The edge where plain role classes become Ray actors: connecting to Ray, spawning
roles with their resources, calling them with timeouts, and the learner group."""
from __future__ import annotations

import logging
import math
import os
import queue as _queue
import socket
import threading
import time
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

from .config import Config

log = logging.getLogger(__name__)

# Each role's process gets one math thread: on a laptop the roles outnumber the cores,
# and oversubscribed OpenMP pools spin against each other.
ROLE_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_LOGGING_LEVEL": "WARNING"}


class RoleFailed(RuntimeError):
    """A role's actor died or raised; the message names the role. ``kind``: "died" (the
    process is gone), "timeout" (no answer within cluster.call_timeout_s: hung or lost),
    "raised" (the role's own code raised) or "" (everything else)."""

    def __init__(self, role: str, detail: str, kind: str = ""):
        super().__init__(f"{role} failed: {detail}")
        self.role, self.kind = role, kind

    @property
    def recoverable(self) -> bool:
        """A new actor can take over: the old one died or hung, its inputs were not at fault."""
        return self.kind in ("died", "timeout")


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    host, port = parsed.hostname, parsed.port
    if not host or not port:
        raise ConnectionError(f"Ray address {address!r} is not host:port (or auto)")
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as e:
        raise ConnectionError(f"cannot reach the Ray head at {address!r} ({e}); "
                              "is `ray start --head` running there, and is RAY_ADDRESS right?") from None


def connect(cfg: Config) -> str:
    """Join the cluster at cluster.address or RAY_ADDRESS, or start a local head.
    Returns a description of what was done."""
    import ray

    if ray.is_initialized():
        return "already connected"
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        if address != "auto":
            _check_reachable(address)
        ray.init(address=address, log_to_driver=False)
        return f"joined {address}"
    return start_local_head(cfg)


def start_local_head(cfg: Config, num_cpus: Optional[float] = None, **ray_options: Any) -> str:
    """Start a Ray head of this process's own and connect to it: what a run does when it has no
    cluster to join, and what the test suite does once per session so that every trainer and
    stage attaches to one head (``ray_options``: its own temp dir and free ports). The driver
    that started it stops it with ``ray.shutdown()``; no other Ray process on the machine is
    touched. Returns a description for the start-up line."""
    import ray

    auth = _local_auth(cfg.cluster.local_auth)
    # address="local": a head of our own even when another local cluster is running. The
    # dashboard (which also accepts job submissions) listens on cluster.dashboard_host only.
    # log_to_driver=False: the roles write to <run>/logs (logs.redirect_output); Ray's own
    # actors (Ray Train's controller) keep their lines in its session logs (<run>/logs/ray).
    ray.init(address="local", num_cpus=cfg.cluster.num_cpus if num_cpus is None else num_cpus,
             include_dashboard=True, log_to_driver=False, dashboard_host=cfg.cluster.dashboard_host,
             runtime_env={"env_vars": dict(ROLE_ENV)}, **ray_options)
    return f"started a local head (dashboard on {cfg.cluster.dashboard_host}; {auth})"


def _local_auth(mode: str) -> str:
    """Make sure a local head asks for Ray's auth token: Ray enables token authentication by
    itself when a token exists (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) and
    RAY_AUTH_MODE is unset; where none exists, one is made in ~/.ray/auth_token (what `ray
    get-auth-token --generate` does). Without it anyone who reaches the machine's Ray ports
    could run code in the roles. Returns what the head will do, for the start-up line."""
    env_mode = os.environ.get("RAY_AUTH_MODE", "")
    if env_mode and env_mode.lower() != "token":
        return f"authentication: RAY_AUTH_MODE={env_mode}"
    default = Path.home() / ".ray" / "auth_token"
    have = bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") or default.is_file())
    if not have and mode == "token":
        import secrets

        default.parent.mkdir(parents=True, exist_ok=True)
        default.touch(mode=0o600)
        default.write_text(secrets.token_hex(32))
        have = True
        log.warning("made a Ray auth token in %s so the local head asks for it "
                    "(cluster.local_auth=ray_default: leave it to Ray)", default)
    return "token authentication" if have else "no authentication (no Ray auth token on this machine)"


def resource_requests(cfg: Config) -> dict[str, list[tuple[str, float]]]:
    """What each role asks Ray for: {resource: [(who and how, amount), ...]}."""
    r, lc = cfg.rollout, cfg.learner
    asks: dict[str, list[tuple[str, float]]] = {"CPU": [], "GPU": []}

    def add(resource: str, what: str, each: float, count: int = 1) -> None:
        if each > 0:
            asks[resource].append((what + (f" x {count}" if count > 1 else ""), each * count))

    if r.fleet is None:  # a shared fleet's engines are running already, on the fleet's resources
        add("CPU", f"rollout.num_cpus={r.num_cpus:g}", r.num_cpus, r.num_engines)
        add("GPU", f"rollout.num_gpus={r.num_gpus:g}", r.num_gpus, r.num_engines)
    add("CPU", f"reward.num_cpus={cfg.reward.num_cpus:g}", cfg.reward.num_cpus, cfg.reward.num_actors)
    add("GPU", f"reward.num_gpus={cfg.reward.num_gpus:g}", cfg.reward.num_gpus, cfg.reward.num_actors)
    if cfg.reference.mode == "separate":
        add("CPU", f"reference.num_cpus={cfg.reference.num_cpus:g}", cfg.reference.num_cpus)
        add("GPU", f"reference.num_gpus={cfg.reference.num_gpus:g}", cfg.reference.num_gpus)
    add("CPU", f"learner.num_cpus_per_worker={lc.num_cpus_per_worker:g}", lc.num_cpus_per_worker, lc.num_workers)
    if lc.use_gpu:
        add("GPU", "learner.use_gpu=true", 1.0, lc.num_workers)
    return asks


def stage_requests(stage: str, sc: Any) -> dict[str, list[tuple[str, float]]]:
    """What an SFT / reward-model stage's Ray Train workers ask for (``sc``: its config section)."""
    asks: dict[str, list[tuple[str, float]]] = {"CPU": [], "GPU": []}
    n = f" x {sc.num_workers}" if sc.num_workers > 1 else ""
    if sc.num_cpus_per_worker > 0:
        asks["CPU"].append((f"{stage}.num_cpus_per_worker={sc.num_cpus_per_worker:g}{n}",
                            sc.num_cpus_per_worker * sc.num_workers))
    if sc.use_gpu:
        asks["GPU"].append((f"{stage}.use_gpu=true{n}", float(sc.num_workers)))
    return asks


def shortfalls(requests: dict[str, list[tuple[str, float]]], have: dict[str, float], free: dict[str, float], *,
               rehearse: bool = False) -> tuple[list[str], list[str]]:
    """(resources the cluster lacks, each with its fix; resources only busy now) for the roles'
    ``requests`` against the cluster's totals ``have`` and what is ``free``."""
    problems, waits = [], []
    for resource, asks in requests.items():
        need = sum(n for _, n in asks)
        if need <= 0:
            continue
        detail = ", ".join(what for what, _ in asks)
        if need > have.get(resource, 0.0) + 1e-9:
            unit = "GPUs" if resource == "GPU" else "logical CPUs"
            if resource == "GPU" and rehearse:
                # A rehearsal keeps every GPU request: zeroing them would rehearse another layout.
                fix = (f"a rehearsal keeps the GPU requests: start a head that declares logical GPUs (ray start "
                       f"--head --num-gpus {math.ceil(need)}) and point cluster.address (or RAY_ADDRESS) at it")
            elif resource == "GPU":
                fix = "set those keys to 0/false to run on CPU, or join a cluster with GPUs"
            else:
                fix = ("lower those keys, or give the head more logical CPUs (ray start --num-cpus N; they are "
                       "bookkeeping, cluster.num_cpus for a local head)")
            problems.append(f"the run asks for {need:g} {unit} ({detail}) but the Ray cluster has "
                            f"{have.get(resource, 0.0):g}; {fix}")
        elif need > free.get(resource, 0.0) + 1e-9:
            waits.append(f"{need:g} {resource} asked, {free.get(resource, 0.0):g} free now (other jobs hold the rest)")
    return problems, waits


def preflight(cfg: Config, requests: Optional[dict[str, list[tuple[str, float]]]] = None) -> None:
    """Before any actor starts: the CPUs and GPUs the roles (or ``requests``, a stage's) ask
    for, against what the cluster has. Ray would otherwise leave an actor pending until
    cluster.call_timeout_s runs out, with a message that names no cause.

    Raises:
        ValueError: one line per short resource, naming every role's request and the cluster's total.
    """
    import ray

    problems, waits = shortfalls(requests or resource_requests(cfg), ray.cluster_resources(),
                                 ray.available_resources(), rehearse=cfg.cluster.rehearse)
    if problems:
        raise ValueError("; ".join(problems))
    if waits:
        log.warning("the roles will wait for resources: %s", "; ".join(waits))
    for w in cpu_role_warnings(cfg):
        log.warning(w)


def cpu_role_warnings(cfg: Config) -> list[str]:
    """Model roles left on the CPU in a run whose policy is on GPUs. A role with num_gpus 0 gets
    the CPU and one math thread (devices.role_device): for a 7B model, hours per step."""
    if not (cfg.learner.use_gpu or cfg.rollout.num_gpus > 0):
        return []
    out = []
    if cfg.reward.uses_model and cfg.reward.num_gpus == 0:
        out.append("reward.num_gpus=0: the reward model runs on the CPU while the policy uses GPUs (a 7B reward "
                   "model there takes hours per step); give it a share of a card, e.g. reward.num_gpus=1")
    if cfg.reference.mode == "separate" and cfg.reference.num_gpus == 0:
        out.append("reference.num_gpus=0: the separate reference model runs on the CPU while the policy uses GPUs "
                   "(hours per step at 7B); set reference.num_gpus, or reference.mode=shared_base (no second copy)")
    return out


def role_bundles(cfg: Config) -> tuple[list[dict[str, float]], dict[str, int]]:
    """The placement-group layout of the roles the driver spawns (``rollout-i``, ``reward``, a
    ``reference`` actor): one bundle per GPU, holding the roles whose shares add up to at most
    one card (first fit, largest share first, config order among equals), then one bundle per
    CPU-only role. Returns (bundles, bundle index of each role); a role asking for nothing has
    no bundle. The learner's Ray Train workers are laid out by Ray Train (one GPU each, PACK)."""
    r = cfg.rollout
    roles = [(f"rollout-{i}", r.num_gpus, r.num_cpus) for i in range(r.num_engines if r.fleet is None else 0)]
    k = cfg.reward.num_actors
    roles += [(name, cfg.reward.num_gpus, cfg.reward.num_cpus)
              for name in (["reward"] if k == 1 else [f"reward-{i}" for i in range(k)])]
    if cfg.reference.mode == "separate":
        roles.append(("reference", cfg.reference.num_gpus, cfg.reference.num_cpus))
    bundles: list[dict[str, float]] = []
    index: dict[str, int] = {}
    for name, gpus, cpus in sorted((x for x in roles if x[1] > 0), key=lambda x: -x[1]):
        fit = next((i for i, b in enumerate(bundles) if gpus < 1 and b["GPU"] + gpus <= 1 + 1e-9), None)
        if fit is None:
            bundles.append({"GPU": 0.0, "CPU": 0.0})
            fit = len(bundles) - 1
        bundles[fit]["GPU"] += gpus
        bundles[fit]["CPU"] += cpus
        index[name] = fit
    for name, _, cpus in (x for x in roles if x[1] <= 0 and x[2] > 0):
        bundles.append({"CPU": cpus})
        index[name] = len(bundles) - 1
    # Ray refuses zero-valued resources in a bundle.
    return [{k: v for k, v in b.items() if v > 0} for b in bundles], index


class RolePlacement:
    """A placement group laid out by ``role_bundles``, reserved (and so placed) before any
    role starts: the same config lands the same way every time, and a layout Ray cannot
    satisfy (a bundle no node can hold whole) fails here, naming the bundles, instead of
    leaving an actor pending. PACK puts the group on as few nodes as it fits; the learner's
    group, made after it, takes the GPUs left (the other node, when there are two of four)."""

    def __init__(self, cfg: Config, timeout_s: float):
        import ray
        from ray.exceptions import GetTimeoutError
        from ray.util.placement_group import placement_group, remove_placement_group

        self.bundles, self.index = role_bundles(cfg)
        self.pg = None
        if not self.bundles:
            return
        self.pg = placement_group(self.bundles, strategy="PACK", name=f"rlhf-ray-{cfg.output.name}-roles")
        try:
            ray.get(self.pg.ready(), timeout=timeout_s)
        except GetTimeoutError:
            remove_placement_group(self.pg)
            self.pg = None
            layout = ", ".join(f"{name}: {self.bundles[i]}" for name, i in self.index.items())
            raise RoleFailed("placement", f"Ray did not place the roles' placement group within {timeout_s:g}s "
                             f"({layout}); every bundle must fit whole on one node (see `ray status`)") from None

    def options(self, role: str) -> dict[str, Any]:
        """Ray actor options that put ``role`` in its bundle; none for a role outside the
        layout (a generator added by scaling up is scheduled wherever Ray finds room)."""
        if self.pg is None or role not in self.index:
            return {}
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
            self.pg, placement_group_bundle_index=self.index[role])}

    def close(self) -> None:
        if self.pg is not None:
            from ray.util.placement_group import remove_placement_group

            try:
                remove_placement_group(self.pg)
            except Exception:  # the cluster is already gone
                pass
            self.pg = None


def spawn(cls: type, cfg: Config, *args: Any, num_cpus: float, num_gpus: float = 0.0,
          placement: Optional[dict[str, Any]] = None, restarts: int = 0, env: Optional[dict[str, str]] = None,
          **kwargs: Any) -> Any:
    """Start ``cls(cfg, *args, **kwargs)`` as an actor. ``restarts``: Ray starts a dead actor
    again this many times (same arguments, same bundle) and re-runs the call it died in; only
    for roles whose calls are pure functions of their inputs (reward, reference). ``env``: more
    environment for the actor's process, on top of ``ROLE_ENV``. The role's output goes to
    ``<run>/logs/<role>.log`` (see ``logs.redirect_output``)."""
    import ray

    from .logs import LOG_DIR_ENV, log_dir

    env = {**ROLE_ENV, LOG_DIR_ENV: str(log_dir(cfg.output.run_dir.resolve())), **(env or {})}
    return ray.remote(cls).options(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=restarts,
                                   max_task_retries=restarts, runtime_env={"env_vars": env},
                                   **(placement or {})).remote(cfg, *args, **kwargs)


def call(role: str, refs: Any, timeout_s: float, restarts: Optional[int] = None,
         timeout_key: str = "cluster.call_timeout_s") -> Any:
    """``ray.get`` that names the role when its actor dies, raises or hangs (``restarts``: how
    many times Ray was allowed to start it again, said when it died for good; ``timeout_key``:
    the config key the deadline came from)."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

    try:
        return ray.get(refs, timeout=timeout_s)
    except RayActorError as e:
        note = f" (it had up to cluster.max_role_restarts={restarts} restarts)" if restarts is not None else ""
        raise RoleFailed(role, f"actor died: {str(e).splitlines()[0]}{note}", "died") from e
    except RayTaskError as e:
        if getattr(e.cause, "report_as_is", False):  # a user's code failed (a reward function): its own words
            raise e.cause from None
        raise RoleFailed(role, f"raised {e.cause!r}" if e.cause else str(e), "raised") from e
    except GetTimeoutError as e:
        raise RoleFailed(role, f"no answer within {timeout_key}={timeout_s}", "timeout") from e


def torch_config(cfg: Config, use_gpu: bool):
    """Ray Train's process group: NCCL between GPUs; gloo on CPU and in a rehearsal, where the
    workers hold logical GPUs but compute on CPU."""
    from ray.train.torch import TorchConfig

    return TorchConfig(backend="nccl" if use_gpu and not cfg.cluster.rehearse else "gloo",
                       timeout_s=int(cfg.cluster.collective_timeout_s))


class LearnerRestarted(RoleFailed):
    """Ray Train started the learner's workers again after one failed: their weights are the
    initial ones until the driver restores a checkpoint. Where nothing restores one, it ends
    the run like any other role failure, naming the learner."""

    def __init__(self, detail: str):
        super().__init__("learner", detail, "restarted")


class LearnerGroup:
    """Driver side of the Ray Train learner: ``TorchTrainer.fit`` runs in a thread while
    the driver sends requests through per-rank queues and reads the replies.

    A worker that dies (or raises) makes Ray Train restart the whole group, up to
    ``cluster.max_role_restarts`` times (its ``FailureConfig``); the new workers announce
    themselves with fresh inboxes and the pending request raises :class:`LearnerRestarted`."""

    def __init__(self, cfg: Config, model_path: str, storage_dir: Path):
        import ray
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer
        from ray.util.queue import Queue

        from .actors.learner import train_loop
        from .logs import log_dir

        self.cfg = cfg
        self.world = cfg.learner.num_workers
        self.timeout = cfg.cluster.call_timeout_s
        self.inboxes: list[Any] = []
        self.outbox = Queue(actor_options={"num_cpus": 0})
        self.restarts = 0
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"cfg": cfg, "model_path": model_path, "outbox": self.outbox,
                               "log_dir": str(log_dir(cfg.output.run_dir.resolve()))},
            scaling_config=ScalingConfig(
                num_workers=self.world, use_gpu=cfg.learner.use_gpu,
                resources_per_worker={"CPU": cfg.learner.num_cpus_per_worker}),
            torch_config=torch_config(cfg, cfg.learner.use_gpu),
            run_config=RunConfig(storage_path=str(Path(storage_dir).resolve()), name="learner",
                                 failure_config=FailureConfig(max_failures=cfg.cluster.max_role_restarts)),
        )
        self._error: Optional[BaseException] = None
        self._next_id = 0
        self._fresh: dict[int, Any] = {}  # rank -> inbox, of a group that is announcing itself
        self._fresh_group: Optional[str] = None
        self.group: Optional[str] = None  # the id of the worker group the inboxes belong to
        self._thread = threading.Thread(target=self._fit, args=(trainer,), daemon=True, name="learner-fit")
        self._thread.start()
        try:
            self._collect("ready", None)
        except LearnerRestarted:
            pass
        self.restarts -= 1  # the first start is not a restart (a failed start-up is)
        self.initial_adapter_ref = self._first_adapter
        self.initial_value_head = self._first_value_head  # {} without a critic
        self._ray = ray

    def _fit(self, trainer) -> None:
        try:
            trainer.fit()
        except BaseException as e:  # reported by _collect
            self._error = e

    def _collect(self, kind: str, request_id: Optional[int]) -> list[Any]:
        """One reply of ``kind`` to request ``request_id`` per rank, in rank order. A reply to
        an earlier request (one that timed out on this side) is dropped, never credited here.
        A restarted group's announcements end the wait with :class:`LearnerRestarted`."""
        replies: dict[int, Any] = {}
        deadline = time.monotonic() + self.timeout
        failed: Optional[str] = None  # a rank's error, while Ray Train may still restart the group
        while len(replies) < self.world:
            try:
                k, rid, rank, payload = self.outbox.get(timeout=1.0)
            except _queue.Empty:
                if not self._thread.is_alive():
                    raise RoleFailed("learner", f"Ray Train run ended: {self._error!r}"
                                     + (f"; first error: {failed}" if failed else ""))
                if time.monotonic() > deadline:
                    raise RoleFailed("learner", failed or f"no {kind!r} reply within "
                                     f"cluster.call_timeout_s={self.timeout}s")
                continue
            if k == "ready":
                deadline = time.monotonic() + self.timeout  # a group is starting: give it the time
                self._announce(rank, payload)
                continue
            if k == "error":
                if payload["group"] not in (None, self.group, self._fresh_group):
                    continue  # from a group already replaced
                if payload["group"] is not None and payload["group"] == self._fresh_group:
                    self._fresh, self._fresh_group = {}, None  # that group will not finish starting
                tb = payload["traceback"]
                detail = tb.strip().splitlines()[-1] + "\n" + tb
                if not payload.get("peer_failure", True):
                    # The learner's own code raised on these inputs: a restart would raise again
                    # (and every rank would be retried as if a worker had died), so say it as it is.
                    raise RoleFailed(f"learner (rank {rank})", tb.strip().splitlines()[-1] + " (raised in the learner's "
                                     "code, not retried; the traceback is in the rank's log)", kind="raised")
                if self.restarts >= self.cfg.cluster.max_role_restarts:
                    raise RoleFailed(f"learner (rank {rank})", detail)
                failed = failed or f"rank {rank}: {detail}"
                deadline = time.monotonic() + self.timeout  # time for Ray Train to restart the group
                continue
            if rid != request_id or failed:
                continue
            if k != kind:
                raise RoleFailed("learner", f"expected {kind!r}, got {k!r} from rank {rank}")
            replies[rank] = payload
        return [replies[r] for r in range(self.world)]

    def _announce(self, rank: int, payload: dict) -> None:
        """A worker of a (re)started group is ready; once every rank of that group is, it is used."""
        if payload["group"] != self._fresh_group:  # the first of a new group: an older one never finished
            self._fresh, self._fresh_group = {}, payload["group"]
        self._fresh[rank] = payload["inbox"]
        if rank == 0:
            self._first_adapter = payload["adapter"][0]
            self._first_value_head = payload.get("value_head") or {}
        if len(self._fresh) == self.world:
            self.inboxes = [self._fresh[r] for r in range(self.world)]
            self.group, self._fresh, self._fresh_group = self._fresh_group, {}, None
            self.restarts += 1
            raise LearnerRestarted(f"Ray Train restarted the learner's {self.world} workers "
                                   f"(restart {self.restarts} of cluster.max_role_restarts="
                                   f"{self.cfg.cluster.max_role_restarts})")

    def _request(self, kind: str, reply: str, batch_ref=None, version: Optional[int] = None,
                 options: Optional[dict] = None) -> list[Any]:
        from ray.exceptions import RayActorError

        self._next_id += 1
        for q in self.inboxes:
            try:
                q.put((kind, self._next_id, [batch_ref], version, options or {}))
            except RayActorError:  # its worker died; the restarted group announces itself
                pass
        return self._collect(reply, self._next_id)

    def evaluate(self, batch_ref) -> list[dict]:
        return self._request("evaluate", "evaluated", batch_ref)

    def update(self, batch_ref, next_version: int, kl_coef: float = 0.0) -> list[dict]:
        return self._request("update", "updated", batch_ref, next_version, {"kl_coef": float(kl_coef)})

    def memory(self) -> list[dict]:
        return self._request("memory", "memory")

    def training_state(self) -> dict[str, Any]:
        """Optimizer and RNG state for a checkpoint (rank 0's; the ranks hold the same)."""
        return self._ray.get(self._request("state", "state")[0][0])

    def restore(self, checkpoint_ref, version: Optional[int] = None) -> list[dict]:
        """Every rank loads a checkpoint; returns each rank's parameter checksum and, from rank 0
        with a merged-weight method, a [ref] to that version as the generators load it."""
        return self._request("restore", "restored", checkpoint_ref, version)

    def stop(self) -> None:
        if self._thread.is_alive():
            for q in self.inboxes:
                try:
                    q.put(("stop",))
                except Exception:  # a dead worker's inbox; Ray Train ends the rest
                    pass
            self._thread.join(timeout=120)
            if self._thread.is_alive():
                log.warning("the learner's Ray Train run did not end within 120 s of 'stop'")
        # The driver owns the outbox's actor: it would outlive the group in a process that runs
        # several trainers (benchmarks, the test suite).
        self.outbox.shutdown(force=True)
