"""Experiment trackers: every stage's figures go to ``output.trackers`` under the same names
(``<stage>/<key>``, nested keys joined by ``/``), with the run's config as hyper-parameters.

- ``jsonl``: always; one JSON record per step (PPO's ``metrics.jsonl``, ``sft_metrics.jsonl``, ...).
- ``tensorboard``: ``<run>/tensorboard/<stage>``, so ``tensorboard --logdir runs/`` shows every run.
- ``wandb``: a run named ``<output.name>-<stage>`` grouped by ``output.name``; ``WANDB_MODE``
  is honoured, and without it and without an API key the run is written offline (``wandb sync``).
- ``mlflow``: ``MLFLOW_TRACKING_URI`` when set, else the local file store ``<output.dir>/mlruns``.

The PPO driver also exports its per-step figures through ``ray.util.metrics`` (:class:`RayGauges`),
so they show in the Ray dashboard's metrics view and in Prometheus on a cluster.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

log = logging.getLogger(__name__)

TRACKERS = ("jsonl", "tensorboard", "wandb", "mlflow")
# Tracker -> (module it needs, how to get it); jsonl needs nothing.
NEEDS = {"tensorboard": ("tensorboard", "pip install tensorboard"),
         "wandb": ("wandb", "pip install 'rlhf-ray[trackers]' (or wandb)"),
         "mlflow": ("mlflow", "pip install 'rlhf-ray[trackers]' (or mlflow-skinny)")}
# Environment a stage's Ray Train worker needs to log where the driver would (a cluster's
# workers do not inherit the submitting shell's variables).
ENV_PREFIXES = ("WANDB_", "MLFLOW_")
SKIP_KEYS = {"pid"}  # numeric, but not a figure


def missing_trackers(names: Iterable[str]) -> list[str]:
    """``name (how to install)`` for every tracker in ``names`` whose package is absent."""
    return [f"{n} ({NEEDS[n][1]})" for n in names
            if n in NEEDS and importlib.util.find_spec(NEEDS[n][0]) is None]


def check_trackers(names: Iterable[str]) -> None:
    """Raise ConfigError naming ``output.trackers`` when a tracker's package is not installed:
    before any actor starts, not after an hour of training."""
    from .config import ConfigError

    missing = missing_trackers(names)
    if missing:
        raise ConfigError(f"output.trackers: not installed here: {', '.join(missing)}")


def scalars(record: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a (nested) record as ``{"prefix/a/b": value}``; bools become 0/1,
    text, lists and non-finite numbers are left out (a tracker cannot plot them)."""
    out: dict[str, float] = {}
    for k, v in record.items():
        name = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(scalars(v, name))
        elif isinstance(v, bool):
            out[name] = float(v)
        elif isinstance(v, (int, float)) and k not in SKIP_KEYS and math.isfinite(v):
            out[name] = float(v)
    return out


def flat_config(cfg_dict: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"ppo.clip_eps": 0.2, ...}``: numbers and text as they are, anything else as text."""
    out: dict[str, Any] = {}
    for k, v in cfg_dict.items():
        name = f"{prefix}.{k}" if prefix else k
        if isinstance(v, Mapping):
            out.update(flat_config(v, name))
        else:
            out[name] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
    return out


class _Jsonl:
    def __init__(self, path: Path, append: bool):
        from .telemetry import MetricsWriter

        self._w = MetricsWriter(path, append=append)

    def log(self, record: Mapping[str, Any], flat: dict[str, float], step: int) -> None:
        self._w.write({"step": step, **record})

    def close(self, failed: bool = False) -> None:
        self._w.close()


class _TensorBoard:
    def __init__(self, log_dir: Path, hparams: dict[str, Any], config_text: str, from_step: Optional[int]):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        # purge_step: after going back to a checkpoint, TensorBoard hides the abandoned steps
        # (those >= from_step of earlier event files) instead of drawing both futures.
        self._w = SummaryWriter(log_dir=str(log_dir), purge_step=from_step)
        self._w.add_text("config", "```\n" + config_text + "\n```", 0)
        # In the stage's own event file (add_hparams would make a sub-run), so the HPARAMS tab
        # lists every stage of every run side by side.
        for summary in hparams_summary(hparams, {}):
            self._w.file_writer.add_summary(summary)

    def log(self, record: Mapping[str, Any], flat: dict[str, float], step: int) -> None:
        for name, v in flat.items():
            self._w.add_scalar(name, v, step)
        self._w.flush()

    def close(self, failed: bool = False) -> None:
        self._w.close()


def _wandb_key_known() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc

        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode() -> str:
    """``WANDB_MODE``, else online where an API key is known, else offline (``wandb sync`` later)."""
    return os.environ.get("WANDB_MODE") or ("online" if _wandb_key_known() else "offline")


def driver_env(cfg) -> dict[str, str]:
    """What a stage's workers must log with, decided once on the driver: its wandb mode (the
    key may be in the driver's ~/.netrc only) and MLflow store (a relative output.dir means
    the driver's working directory, not the worker's)."""
    env = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}
    if "wandb" in cfg.output.trackers:
        env["WANDB_MODE"] = wandb_mode()
        if env["WANDB_MODE"] == "offline" and not os.environ.get("WANDB_MODE"):
            log.info("wandb: no API key here, so runs are written offline under %s/wandb (`wandb sync` "
                     "uploads them)", cfg.output.run_dir)
    if "mlflow" in cfg.output.trackers:
        env["MLFLOW_TRACKING_URI"] = mlflow_uri(cfg.output.dir)
    return env


class _Wandb:
    def __init__(self, run_dir: Path, name: str, group: str, config: dict[str, Any]):
        import wandb

        mode = wandb_mode()
        self._run = wandb.init(project=os.environ.get("WANDB_PROJECT", "rlhf-ray"), name=name, group=group,
                               dir=str(run_dir), config=config, mode=mode, reinit="create_new",
                               settings=wandb.Settings(silent=True, console="off"))

    def log(self, record: Mapping[str, Any], flat: dict[str, float], step: int) -> None:
        self._run.log(flat, step=step)

    def close(self, failed: bool = False) -> None:
        self._run.finish(exit_code=1 if failed else 0)


def mlflow_uri(output_dir: str) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or (Path(output_dir).resolve() / "mlruns").as_uri()


class _Mlflow:
    def __init__(self, uri: str, experiment: str, name: str, params: dict[str, Any]):
        if uri.startswith("file:"):
            # MLflow 3 refuses its file store unless asked; it is what a local run wants
            # (no server, no database), and `mlflow ui --backend-store-uri` reads it.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self._c = MlflowClient(tracking_uri=uri)
        exp = self._c.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else self._c.create_experiment(experiment)
        self.run_id = self._c.create_run(exp_id, run_name=name).info.run_id
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self._c.log_batch(self.run_id, params=items[i:i + 100])

    def log(self, record: Mapping[str, Any], flat: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, v, ts, step) for k, v in flat.items()]
        for i in range(0, len(items), 1000):  # the batch limit for metrics
            self._c.log_batch(self.run_id, metrics=items[i:i + 1000])

    def close(self, failed: bool = False) -> None:
        self._c.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


class Trackers:
    """The trackers of one stage. ``log(record, step)`` writes the record whole to the jsonl
    file (when ``jsonl`` is given) and its numeric leaves, named ``<stage>/<key>``, to the
    others; ``log(record, step, prefix="eval")`` files them under another name (the held-out
    evaluation inside PPO). ``from_step``: the run continues from a checkpoint at that step
    (see ``rewind``). A tracker that fails while logging is reported once, closed and dropped:
    a tracker must never stop training."""

    def __init__(self, cfg, stage: str, run_dir: Path, *, jsonl: Optional[Path] = None, append: bool = False,
                 from_step: Optional[int] = None):
        self.stage, self._cfg, self._run_dir = stage, cfg, Path(run_dir)
        self._backends: dict[str, Any] = {}
        try:
            if jsonl is not None:
                self._backends["jsonl"] = _Jsonl(jsonl, append)
            self._open_others(from_step)
        except BaseException:
            self.close(failed=True)
            raise

    def _open_others(self, from_step: Optional[int]) -> None:
        from .config import dump_config

        cfg, names = self._cfg, set(self._cfg.output.trackers)
        hparams = flat_config(cfg.to_dict())
        # A continued run is a new wandb/MLflow run (both keep only the first value of a step).
        run_name = f"{cfg.output.name}-{self.stage}" + (f"-from-step-{from_step}" if from_step else "")
        if "tensorboard" in names:
            self._backends["tensorboard"] = _TensorBoard(self._run_dir / "tensorboard" / self.stage, hparams,
                                                         dump_config(cfg), from_step)
        if "wandb" in names:
            self._backends["wandb"] = _Wandb(self._run_dir, run_name, cfg.output.name, cfg.to_dict())
        if "mlflow" in names:
            self._backends["mlflow"] = _Mlflow(mlflow_uri(cfg.output.dir),
                                               os.environ.get("MLFLOW_EXPERIMENT_NAME", "rlhf-ray"), run_name,
                                               hparams)

    @property
    def names(self) -> list[str]:
        return list(self._backends)

    def rewind(self, step: int) -> None:
        """The run went back to its checkpoint at ``step``: the steps from there on are made
        again, so every tracker but the jsonl file (whose owner rewrites it) starts over there."""
        jsonl = self._backends.pop("jsonl", None)
        self.close()
        if jsonl is not None:
            self._backends["jsonl"] = jsonl
        self._open_others(step)

    def log(self, record: Mapping[str, Any], step: int, *, prefix: Optional[str] = None) -> None:
        flat = scalars(record, prefix or self.stage)
        for name, backend in list(self._backends.items()):
            try:
                backend.log(record, flat, step)
            except Exception as e:  # a full disk or a lost server: say so, keep training
                log.warning("tracker %s failed (%s: %s); it is left out for the rest of the stage",
                            name, type(e).__name__, e)
                self._close_one(self._backends.pop(name), name, failed=True)

    def close(self, failed: bool = False) -> None:
        """``failed``: the stage ended with an error (wandb and MLflow mark the run so)."""
        for name, backend in list(self._backends.items()):
            self._close_one(backend, name, failed)
        self._backends = {}

    @staticmethod
    def _close_one(backend: Any, name: str, failed: bool) -> None:
        try:
            backend.close(failed)
        except Exception as e:
            log.warning("tracker %s did not close cleanly (%s)", name, e)


# -- Ray dashboard ------------------------------------------------------------------------------
# Per-step figures exported by the driver; Prometheus sees them as ray_rlhf_<name>{run=...}.
GAUGES = {
    "samples_per_s": "samples per second of the last PPO step",
    "tokens_per_s": "response tokens per second of the last PPO step",
    "adapter_version": "the adapter version the generators serve",
    "stale_samples": "samples of the last step made with an older adapter",
    "logprob_gap": "mean |vLLM - learner| log-prob of the same tokens, last step",
    "reward_mean": "mean reward-model score of the last step",
    "kl_per_seq": "KL to the reference per response, last step",
    "step": "PPO steps done",
}
RECORD_KEYS = {"adapter_version": "published_version"}  # gauge -> metrics.jsonl key, where they differ


class RayGauges:
    """``ray.util.metrics`` gauges set from each PPO step's record (tag ``run`` = output.name)."""

    def __init__(self, run: str):
        from ray.util.metrics import Gauge

        self._tags = {"run": run}
        self._g = {k: Gauge(f"rlhf_{k}", description=d, tag_keys=("run",)) for k, d in GAUGES.items()}

    def set(self, record: Mapping[str, Any]) -> None:
        for k, g in self._g.items():
            v = record["step"] + 1 if k == "step" else record.get(RECORD_KEYS.get(k, k))
            if isinstance(v, (int, float)) and math.isfinite(v):
                g.set(float(v), tags=self._tags)
