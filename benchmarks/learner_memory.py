"""learner-memory: how far the learner's resident memory rises above its loaded model during
`evaluate` (old/ref log-probs and values) and one `update` (PPO epochs over the batch), on a
mid-size Llama built here with random weights (8 layers, hidden 512, vocabulary 32,000: 58 M
parameters; the full-vocabulary logits of 8 x 1,024 tokens are 0.98 GiB in fp32).

Each phase runs in a fresh process (so one phase's peak cannot hide another's) with a 5 ms
RSS sampler. ``--before REV`` also runs the same phases with the learner code of an older
commit (checked out into a temporary git worktree), for the before/after row.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from .common import MID, ROOT, build_mid_model, table

GOALS_GIB = {"evaluate": 1.0, "update": 3.0}

# Runs inside the measured process: only the learner API that the old and the new code share.
PHASE = r'''
import gc, json, sys, threading, time
import psutil, torch
torch.set_num_threads(2)
import rlhf_ray
from rlhf_ray.config import load_config
from rlhf_ray.actors.learner import LearnerCore
from rlhf_ray.batch import TokenBatch
a = json.loads(sys.argv[1])
cfg = load_config(None, a["overrides"])
core = LearnerCore(cfg, a["model_path"])
g = torch.Generator().manual_seed(0)
rows, seq, prompt = a["rows"], a["seq_len"], a["prompt_len"]
ids = torch.randint(3, a["vocab"], (rows, seq), generator=g)
mask = torch.zeros(rows, seq - 1)
mask[:, prompt - 1:] = 1
b = TokenBatch(ids, torch.ones(rows, seq, dtype=torch.long), mask, torch.zeros(rows, seq - 1))
if a["phase"] == "update":
    ev = core.evaluate(b)
    b.old_logprobs, b.old_values = ev["old_logprobs"], ev["old_values"]
    b.advantages = torch.randn(rows, seq - 1, generator=g) * mask
    b.returns = torch.randn(rows, seq - 1, generator=g) * mask
    del ev
gc.collect()
proc = psutil.Process()
base = proc.memory_info().rss
peak = [base]
stop = threading.Event()
def sample():
    while not stop.wait(0.005):
        peak[0] = max(peak[0], proc.memory_info().rss)
threading.Thread(target=sample, daemon=True).start()
t = time.perf_counter()
(core.evaluate if a["phase"] == "evaluate" else core.update)(b)
seconds = time.perf_counter() - t
stop.set()
peak[0] = max(peak[0], proc.memory_info().rss)
print("RESULT " + json.dumps({"resident_bytes": base, "peak_bytes": peak[0], "rise_bytes": peak[0] - base,
                              "seconds": seconds, "code": rlhf_ray.__file__}))
'''


def _phase(code_root: Path, args: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(code_root), "OMP_NUM_THREADS": "2"}
    r = subprocess.run([sys.executable, "-c", PHASE, json.dumps(args)], capture_output=True, text=True,
                       env=env, cwd=tempfile.gettempdir(), timeout=3600)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if r.returncode != 0 or line is None:
        raise RuntimeError(f"learner-memory phase {args['phase']} failed:\n{r.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def run(cfg, args) -> tuple[dict[str, Any], dict[str, Any], str]:
    spec = dict(MID) if args.mid_size else {"layers": cfg.model.tiny_layers, "hidden": cfg.model.tiny_hidden,
                                            "heads": cfg.model.tiny_heads, "intermediate": 4 * cfg.model.tiny_hidden,
                                            "vocab": cfg.model.tiny_vocab}
    rows, seq_len = args.rows, args.seq_len
    common = ["learner.num_workers=1", "learner.epochs=2", f"learner.minibatch_prompts={rows}",
              f"ppo.prompts_per_step={rows}", f"data.max_prompt_tokens=32"]
    variants: list[tuple[str, Path, list[str]]] = []
    with tempfile.TemporaryDirectory(prefix="rr-learner-mem-") as tmp:
        model_path, n_params = build_mid_model(Path(tmp) / "model", spec, seq_len + 8)
        worktree = None
        if args.before:
            worktree = Path(tmp) / "before"
            subprocess.run(["git", "worktree", "add", "--detach", str(worktree), args.before], cwd=ROOT,
                           check=True, capture_output=True)
            variants.append((f"before ({args.before})", worktree, []))
        for micro, ckpt in ((rows, False), (2, False), (1, True)):
            variants.append((f"micro-batch {micro}" + (", checkpointing" if ckpt else ""), ROOT,
                             [f"learner.micro_batch_size={micro}", f"learner.gradient_checkpointing={ckpt}"]))
        measured: dict[str, dict[str, Any]] = {}
        try:
            for label, code, extra in variants:
                measured[label] = {}
                for phase in ("evaluate", "update"):
                    measured[label][phase] = _phase(code, {
                        "model_path": model_path, "overrides": [*common, *extra], "rows": rows, "seq_len": seq_len,
                        "prompt_len": 24, "vocab": spec["vocab"], "phase": phase})
        finally:
            if worktree is not None:
                subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT, capture_output=True)
    gib = 2**30
    logits_gib = rows * seq_len * spec["vocab"] * 4 / gib
    rows_out = [[label, round(m["evaluate"]["rise_bytes"] / gib, 2), round(m["update"]["rise_bytes"] / gib, 2),
                 round(m["evaluate"]["seconds"], 1), round(m["update"]["seconds"], 1)] for label, m in measured.items()]
    best = min((m for label, m in measured.items() if not label.startswith("before")),
               key=lambda m: m["update"]["rise_bytes"])
    default = measured[f"micro-batch 2"]
    targets = {f"{phase}_rise_gib": {"value": default[phase]["rise_bytes"] / gib, "goal": f"<= {goal}",
                                     "met": default[phase]["rise_bytes"] / gib <= goal}
               for phase, goal in GOALS_GIB.items()}
    results = {"parameters": n_params, "fp32_logits_gib": logits_gib, "by_variant": measured, "targets": targets,
               "best_update_rise_gib": best["update"]["rise_bytes"] / gib}
    params = {"model": spec, "rows": rows, "seq_len": seq_len, "prompt_len": 24, "epochs": 2, "minibatch": rows,
              "before": args.before, "sampler_interval_s": 0.005}
    text = (f"learner memory, {n_params / 1e6:.1f} M-parameter Llama, {rows} rows x {seq_len} tokens "
            f"(one fp32 logits tensor: {logits_gib:.2f} GiB); GiB above resident\n"
            + table(["learner", "evaluate GiB", "update GiB", "evaluate s", "update s"], rows_out)
            + f"\ntargets (micro-batch 2): evaluate <= {GOALS_GIB['evaluate']} GiB, update <= {GOALS_GIB['update']} GiB")
    return params, results, text
