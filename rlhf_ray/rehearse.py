"""Rehearsal (`--rehearse`): a GPU config run end to end on a CPU-only Ray cluster that
declares logical GPUs (`ray start --head --num-gpus 8`, or several local nodes in tests).

Kept from the config: every role, how many of each, their CPU and GPU requests, the
placement groups, the Ray Train worker counts, the adapter publishing between nodes.
Changed: a tiny random model of the same family (its config.json's architecture, rotary
settings and KV grouping) in place of the weights, short sequences and batches, a few steps,
and every device forced to CPU (``cluster.rehearse``), since the GPUs are only names.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from .config import Config

# Sizes a 2-core machine gets through in minutes; the counts of things are never shrunk.
PROMPT_TOKENS = 24
NEW_TOKENS = 16
STEPS = 2
ROWS_PER_WORKER = 2  # learner rows per rank per optimizer step
KV_CACHE_MIB = 64


def rehearsal_config(cfg: Config) -> Config:
    """``cfg`` as a rehearsal. Raises ValueError when ``model.path`` has no config.json to take
    the family from (a hub id with a shipped configs/shapes_only/ directory is enough)."""
    from .models.loading import shape_path
    from .models.tiny import build_tiny_model

    r = dataclasses.replace
    like = Path(shape_path(cfg.model)) if cfg.model.path else None
    if like is not None and not (like / "config.json").is_file():
        raise ValueError(f"--rehearse: model.path={cfg.model.path!r} is not a local directory with a config.json; "
                         "the rehearsal builds a tiny model of that family from it")
    tiny_dir = Path(cfg.output.dir).resolve() / f"_rehearsal_model_{like.name if like else 'tiny'}"
    m = cfg.model
    tiny = build_tiny_model(tiny_dir, layers=m.tiny_layers, hidden=m.tiny_hidden, heads=m.tiny_heads,
                            vocab_size=m.tiny_vocab, max_positions=m.tiny_max_positions, seed=m.seed, like=like)
    lc = cfg.learner
    rows = ROWS_PER_WORKER * lc.num_workers
    return r(
        cfg,
        model=r(m, path=str(tiny), dtype="float32"),  # fp32: vLLM-CPU and HF log-probs agree
        # The generated task in place of the config's data: a tiny random model reads it as well,
        # and a rehearsal needs no dataset download.
        data=r(cfg.data, num_prompts=min(cfg.data.num_prompts, 64), prompts_path=None,
               max_prompt_tokens=min(cfg.data.max_prompt_tokens, PROMPT_TOKENS)),
        sft=r(cfg.sft, num_examples=min(cfg.sft.num_examples, 64), epochs=1, batch_size=min(cfg.sft.batch_size, 8),
              max_seq_len=min(cfg.sft.max_seq_len, 64), output_dir=None, data_path=None),
        rm=r(cfg.rm, num_pairs=min(cfg.rm.num_pairs, 32), epochs=1, batch_size=min(cfg.rm.batch_size, 8),
             max_seq_len=min(cfg.rm.max_seq_len, 64), output_dir=None, data_path=None, eval_path=None),
        rollout=r(cfg.rollout, max_new_tokens=min(cfg.rollout.max_new_tokens, NEW_TOKENS), max_model_len=None,
                  kv_cache_mib=KV_CACHE_MIB, gpu_memory_utilization=None, enforce_eager=None),
        reward=r(cfg.reward, path=None, batch_size=min(cfg.reward.batch_size, 8)),
        learner=r(lc, minibatch_prompts=rows, micro_batch_size=min(lc.micro_batch_size, ROWS_PER_WORKER), epochs=1,
                  logprob_chunk_tokens=min(lc.logprob_chunk_tokens, 8)),
        ppo=r(cfg.ppo, steps=min(cfg.ppo.steps, STEPS), prompts_per_step=rows),  # x n samples: a multiple of rows
        eval=r(cfg.eval, num_prompts=min(cfg.eval.num_prompts, 8), samples_per_prompt=1, prompts_path=None),
        cluster=r(cfg.cluster, rehearse=True, call_timeout_s=min(cfg.cluster.call_timeout_s, 900.0)),
        output=r(cfg.output, name=f"{cfg.output.name}_rehearsal"),
    )


def describe(cfg: Config) -> str:
    """One line: what the rehearsal keeps, for the CLI to print before it starts."""
    r, lc = cfg.rollout, cfg.learner
    return (f"rehearsal: {r.num_engines} rollout engines x {r.num_gpus:g} GPU, reward {cfg.reward.num_gpus:g} GPU, "
            f"{lc.num_workers} learner workers{' x 1 GPU' if lc.use_gpu else ''}, sft {cfg.sft.num_workers} / "
            f"rm {cfg.rm.num_workers} workers{' x 1 GPU' if cfg.sft.use_gpu or cfg.rm.use_gpu else ''}; "
            f"tiny {Path(cfg.model.path).name} model, devices forced to CPU, {cfg.ppo.steps} PPO steps; "
            f"output {cfg.output.run_dir}")
