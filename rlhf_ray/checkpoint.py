"""Checkpoints of a PPO run: everything the next step depends on, so a resumed run makes the
same steps an uninterrupted one would have made.

A checkpoint is a directory ``<run>/checkpoints/step-NNNNNN`` holding
- ``adapter/``: the adapter as a PEFT directory (what the generators serve on resume),
- ``value_head.safetensors``: the critic's head, when the estimator has one,
- ``learner.pt``: the optimizer state and the learner's RNG states (tensors, ints and floats
  only; read back with ``torch.load(weights_only=True)``, never by unpickling objects),
- ``state.json``: the driver's state (step, adapter version, KL coefficient, the prompt order
  and its RNG, how many metrics lines belong to the run, the held-out "before" evaluation)
  and what the run was made from (model, LoRA shape), to refuse a mismatched resume.

It is written under a temporary name and renamed into place, so a crash while saving leaves
the previous checkpoints whole; only the newest ``checkpoint.keep`` are kept.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import Config, ConfigError
from .sync import VALUE_HEAD_FILE, AdapterVersion, write_adapter

CHECKPOINTS = "checkpoints"
PREFIX = "step-"
STATE_FILE = "state.json"
LEARNER_FILE = "learner.pt"


@dataclass
class Checkpoint:
    path: Path
    state: dict[str, Any]  # the driver's, from state.json
    adapter: AdapterVersion
    value_head: dict[str, torch.Tensor]
    learner: dict[str, Any]  # optimizer state dict and RNG states of the learner ranks

    @property
    def step(self) -> int:
        return int(self.state["step"])


def fingerprint(cfg: Config, model_path: str) -> dict[str, Any]:
    """What a checkpoint's tensors only fit: the base's architecture and the adapter's shape."""
    from transformers import AutoConfig

    mc = AutoConfig.from_pretrained(model_path)
    return {"model_type": getattr(mc, "model_type", None), "hidden_size": getattr(mc, "hidden_size", None),
            "num_hidden_layers": getattr(mc, "num_hidden_layers", None), "vocab_size": getattr(mc, "vocab_size", None),
            "lora_rank": cfg.lora.rank, "lora_targets": sorted(cfg.lora.target_modules),
            "estimator": cfg.ppo.estimator,
            **({"method": cfg.learner.method} if cfg.learner.method != "lora" else {})}


def save_checkpoint(run_dir: Path, state: dict[str, Any], adapter: AdapterVersion,
                    value_head: dict[str, torch.Tensor], learner: dict[str, Any], keep: int) -> Path:
    """Write a checkpoint of step ``state["step"]`` atomically and drop all but the newest ``keep``."""
    from safetensors.torch import save_file

    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(int(state["step"]))
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    write_adapter(adapter, tmp / "adapter")
    if value_head:
        save_file({k: v.contiguous() for k, v in value_head.items()}, str(tmp / VALUE_HEAD_FILE))
    torch.save(learner, tmp / LEARNER_FILE)
    # state.json last: a directory with it is complete (the rename below makes that visible at once).
    (tmp / STATE_FILE).write_text(json.dumps(state))
    if final.exists():  # a re-run of the same step after a resume replaces it
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_name(step: int) -> str:
    """The directory name of step ``step``'s checkpoint (written after ``step`` steps)."""
    return f"{PREFIX}{step:06d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def find_checkpoint(path: Path) -> Path:
    """The checkpoint ``path`` means: a checkpoint directory itself, or a run directory (its
    newest checkpoint). Raises ConfigError naming the path when there is none."""
    path = Path(path)
    if (path / STATE_FILE).is_file() and (path / LEARNER_FILE).is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        what = "does not exist" if not path.exists() else f"holds no checkpoint (no {CHECKPOINTS}/{PREFIX}*/{STATE_FILE})"
        raise ConfigError(f"--resume {path}: {what}; checkpoints are written every checkpoint.every steps "
                          "(0 = never)")
    return found[-1]


def load_checkpoint(path: Path) -> Checkpoint:
    from safetensors.torch import load_file

    path = find_checkpoint(path)
    state = json.loads((path / STATE_FILE).read_text())
    adir = path / "adapter"
    adapter = AdapterVersion(version=int(state["version"]), tensors=load_file(str(adir / "adapter_model.safetensors")),
                             peft_config=json.loads((adir / "adapter_config.json").read_text()))
    head_file = path / VALUE_HEAD_FILE
    value_head = load_file(str(head_file)) if head_file.is_file() else {}
    learner = torch.load(path / LEARNER_FILE, weights_only=True, map_location="cpu")
    return Checkpoint(path, state, adapter, value_head, learner)


def check_compatible(ckpt: Checkpoint, expected: dict[str, Any]) -> None:
    """Refuse to resume from a checkpoint of another model or adapter shape, naming what differs."""
    saved = ckpt.state.get("fingerprint", {})
    diff = [f"{k}: checkpoint {saved.get(k)!r}, this run {v!r}" for k, v in expected.items() if saved.get(k) != v]
    if diff:
        raise ConfigError(f"--resume {ckpt.path}: made with a different model or adapter ({'; '.join(diff)})")


def random_state_to_json(state: tuple) -> list:
    """``random.Random.getstate()`` as JSON (tuples become lists)."""
    version, internal, gauss = state
    return [version, list(internal), gauss]


def random_state_from_json(data: list) -> tuple:
    version, internal, gauss = data
    return (version, tuple(internal), gauss)


def metrics_prefix(path: Path, lines: int) -> list[dict]:
    """The first ``lines`` records of a metrics file; the file is cut to them, so the steps
    a crashed run recorded after its last checkpoint are not counted twice when they are redone."""
    path = Path(path)
    if not path.is_file():
        return []
    kept = path.read_text().splitlines()[:lines]
    path.write_text("".join(line + "\n" for line in kept))
    return [json.loads(line) for line in kept]


def earlier_run(run_dir: Path) -> list[str]:
    """What an earlier PPO run left in ``run_dir`` that a new one would replace."""
    found = []
    n = len(list_checkpoints(run_dir))
    if n:
        found.append(f"{n} checkpoint(s)")
    if (run_dir / "adapter").is_dir():
        found.append("its adapter")
    return found


def refuse_to_replace(run_dir: Path) -> None:
    """ValueError naming ``--resume`` and ``--overwrite`` when ``run_dir`` holds an earlier run."""
    found = earlier_run(run_dir)
    if found:
        raise ValueError(f"{run_dir} holds an earlier run ({' and '.join(found)}): `rlhf-ray train --resume` "
                         f"continues it, --overwrite replaces it, or set another output.name")


def discard_checkpoints(run_dir: Path, after: int) -> list[Path]:
    """Remove the checkpoints of ``run_dir`` past step ``after`` (-1: all); returns them."""
    gone = [p for p in list_checkpoints(run_dir) if _step_of(p) > after]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def _step_of(path: Path) -> int:
    return int(path.name[len(PREFIX):])
