"""lora-targets: which layers the adapter should sit on, and at which rank, measured on the
default task. Each variant is a whole PPO run (the base config, plain PPO; held-out judge before
and after, held-out KL) on the base run's SFT model and reward model; the adapter's trainable
parameter count is recorded beside it, so attention-only and all-linear adapters are compared
at an equal count as well as at an equal rank."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from .common import table
from .presets import GOAL_PP, base_run, on_base_run, run_cell

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL_LINEAR = ATTENTION + ["gate_proj", "up_proj", "down_proj"]


def variants(cfg, shape: dict[str, int]) -> list[tuple[str, list[str], int]]:
    """(name, targets, rank): attention-only at the config's rank and twice it, all-linear at the
    rank whose parameter count is closest to attention-only's, and at the config's rank."""
    r = cfg.lora.rank
    equal = max(1, round(r * adapter_params(shape, ATTENTION, 1) / adapter_params(shape, ALL_LINEAR, 1)))
    return [(f"attention r{r}", ATTENTION, r), (f"attention r{2 * r}", ATTENTION, 2 * r),
            (f"all-linear r{equal}", ALL_LINEAR, equal), (f"all-linear r{r}", ALL_LINEAR, r)]


def model_shape(model_dir: Path) -> dict[str, int]:
    c = json.loads((Path(model_dir) / "config.json").read_text())
    heads = c["num_attention_heads"]
    return {"hidden": c["hidden_size"], "intermediate": c["intermediate_size"], "layers": c["num_hidden_layers"],
            "kv": c["hidden_size"] // heads * c.get("num_key_value_heads", heads)}


def adapter_params(shape: dict[str, int], targets: list[str], rank: int) -> int:
    """LoRA parameters of a Llama of ``shape``: rank x (in + out) per adapted matrix."""
    h, i, kv = shape["hidden"], shape["intermediate"], shape["kv"]
    dims = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    return shape["layers"] * sum(rank * sum(dims[t]) for t in targets)


def run(cfg, args) -> tuple[dict[str, Any], dict[str, Any], str]:
    from rlhf_ray.config import dump_config

    base = base_run(cfg, "lora-targets")
    shape = model_shape(base / "sft_model")
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="rr-lora-") as tmp:
        base_yaml = str(Path(tmp) / "base.yaml")
        Path(base_yaml).write_text(dump_config(cfg))
        for name, targets, rank in variants(cfg, shape):
            print(f"lora-targets: {name} ...", flush=True)
            label = name.replace(" ", "_")
            out[name] = {"targets": targets, "rank": rank, "params": adapter_params(shape, targets, rank), **run_cell(
                base_yaml, [], [*on_base_run(base),
                                f"lora.target_modules=[{','.join(targets)}]", f"lora.rank={rank}",
                                f"lora.alpha={2 * rank}", f"rollout.max_lora_rank={max(16, rank)}",
                                f"output.dir={base.parent / 'lora_targets'}", f"output.name={label}",
                                "output.trackers=[jsonl]"])}
    rows = [[n, v["rank"], v["params"], f"{100 * v['judge_before']:.1f}%",
             "-" if v["judge_after"] is None else f"{100 * v['judge_after']:.1f}%",
             "-" if v["gain_pp"] is None else f"{v['gain_pp']:+.1f}", "-" if v["kl_after"] is None else f"{v['kl_after']:.2f}",
             f"{v['samples_per_s']:.1f}" if v["samples_per_s"] else "-"] for n, v in out.items()]
    text = table(["adapter", "rank", "params", "judge before", "after", "pp", "KL after", "samples/s"], rows)
    targets = {n: {"value": v["gain_pp"], "goal": f"+{GOAL_PP:g} pp at a held-out KL within ppo.kl_target",
                   "met": bool(v["met"])} for n, v in out.items()}
    return {"variants": [v[0] for v in variants(cfg, shape)], "shape": shape}, {"variants": out, "targets": targets}, text
