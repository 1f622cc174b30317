"""The stages before PPO: supervised fine-tuning and reward-model training. Each writes a
model directory that the next stage (and PPO) loads like any downloaded model, plus a
``<stage>.json`` summary in the run directory that the report reads."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..config import Config


def sft_dir(cfg: Config) -> Path:
    return Path(cfg.sft.output_dir or cfg.output.run_dir / "sft_model").resolve()


def rm_dir(cfg: Config) -> Path:
    return Path(cfg.rm.output_dir or cfg.output.run_dir / "reward_model").resolve()


def base_model(cfg: Config, choice: str, key: str) -> str:
    """``choice`` (the value of config key ``key``): ``sft`` = the SFT stage's model for this
    run, ``model`` = model.path (or the tiny model)."""
    from ..models import resolve_model_path

    if choice == "model":
        return resolve_model_path(cfg.model)
    d = sft_dir(cfg)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{key}=sft but there is no SFT model at {d}: run `rlhf-ray sft` "
                                f"with this config first, or set {key}=model")
    return str(d)


def policy_base(cfg: Config) -> str:
    """PPO's base (and reference) model."""
    return base_model(cfg, cfg.ppo.base, "ppo.base")


def reward_path(cfg: Config) -> Optional[str]:
    """The reward model PPO scores with: ``reward.path`` (a directory, or a hub id), else the one
    ``train-rm`` wrote; None when the reward comes from rules, functions or a URL alone."""
    if not cfg.reward.uses_model:
        return None
    if cfg.reward.path is not None:
        from ..models.loading import resolve_path

        return resolve_path(cfg.reward.path, "reward.path")
    d = rm_dir(cfg)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"reward.path is null and there is no trained reward model at {d}: "
                                "run `rlhf-ray train-rm` with this config first, or set reward.path")
    return str(d)
