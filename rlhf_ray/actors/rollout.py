"""Rollout generator: a vLLM engine serving the policy's current LoRA adapter.

Adapters are hot-swapped, never merged: each version is registered under a new LoRA id and
the previous id is removed (vLLM caches adapters by id; re-using one serves stale weights).
"""
from __future__ import annotations

import os
import time
from typing import Optional

from ..batch import Samples
from ..config import Config
from ..sync import AdapterVersion, adapter_root, remove_adapter_dir, write_adapter
from ..telemetry import MemorySampler
from .engine import build_engine


class RolloutGenerator:
    role = "rollout"

    def __init__(self, cfg: Config, model_path: str, name: str = "rollout-0"):
        from vllm import SamplingParams

        self.cfg = cfg
        self.name = name
        self.memory = MemorySampler()
        t = time.perf_counter()
        # processed_logprobs: the log-probs of the distribution actually sampled from
        # (after temperature), which is what the learner's ratio must use.
        self.llm = build_engine(cfg, model_path, logprobs_mode="processed_logprobs")
        self._params = SamplingParams(
            temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
            max_tokens=cfg.rollout.max_new_tokens, logprobs=0,
        )
        self._dir = adapter_root() / f"{name}-{os.getpid()}"
        self.version: Optional[int] = None
        self._lora = None
        # The first generate in a fresh engine is slow (warm-up); pay it here, not in a step.
        self.llm.generate([{"prompt_token_ids": [0, 1, 2]}], SamplingParams(max_tokens=2), use_tqdm=False)
        self.startup_s = time.perf_counter() - t

    def load_adapter(self, adapter: AdapterVersion) -> dict:
        """Serve ``adapter`` from now on; returns timing of the swap."""
        from vllm.lora.request import LoRARequest

        t = time.perf_counter()
        if adapter.peft_config.get("r", 0) > self.cfg.rollout.max_lora_rank:
            raise ValueError(f"{self.name}: adapter rank {adapter.peft_config.get('r')} exceeds the "
                             f"engine's max_lora_rank={self.cfg.rollout.max_lora_rank}")
        path = write_adapter(adapter, self._dir / f"v{adapter.version}")
        # lora_int_id must be > 0 and new for every version.
        request = LoRARequest(f"{self.name}-v{adapter.version}", adapter.version + 1, str(path))
        self.llm.llm_engine.add_lora(request)
        old, old_version = self._lora, self.version
        self._lora, self.version = request, adapter.version
        if old is not None:
            self.llm.llm_engine.remove_lora(old.lora_int_id)
            remove_adapter_dir(self._dir / f"v{old_version}")
        return {"version": adapter.version, "swap_s": time.perf_counter() - t}

    def generate(self, prompt_ids: list[list[int]], adapter: bool = True) -> Samples:
        """Sample one response per prompt with the current adapter (``adapter=False``: the base
        model alone, which benchmarks compare against)."""
        if adapter and self._lora is None:
            raise RuntimeError(f"{self.name}: no adapter loaded; publish version 0 first")
        t = time.perf_counter()
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], self._params,
                                 lora_request=self._lora if adapter else None, use_tqdm=False)
        samples = Samples()
        for p, o in zip(prompt_ids, outs):
            c = o.outputs[0]
            samples.prompt_ids.append(list(p))
            samples.response_ids.append(list(c.token_ids))
            samples.logprobs.append([lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)])
            samples.versions.append(self.version if adapter else -1)
            samples.prompts.append(o.prompt or "")
            samples.responses.append(c.text)
        samples.compute_s = time.perf_counter() - t
        return samples

    def memory_stats(self) -> dict:
        return {"role": self.role, "name": self.name, **self.memory.stats()}

    def shutdown(self) -> None:
        remove_adapter_dir(self._dir)
        self.memory.close()
