"""Rollout generator: a vLLM engine serving the policy's current LoRA adapter.

Adapters are hot-swapped, never merged: each version is registered under a new LoRA id and
the previous id is removed (vLLM caches adapters by id; re-using one serves stale weights).
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Optional

from ..batch import Samples
from ..config import Config
from ..devices import role_device
from ..logs import redirect_output
from ..sync import AdapterVersion, adapter_root, remove_adapter_dir, write_adapter
from ..telemetry import MemorySampler, gpu_bytes_by_process, rss_by_process
from .engine import build_engine


class RolloutGenerator:
    role = "rollout"

    def __init__(self, cfg: Config, model_path: str, name: str = "rollout-0", *, seed: Optional[int] = None,
                 max_model_len: Optional[int] = None, engine=None):
        """``engine``: an already built ``vllm.LLM`` (made with ``logprobs_mode="processed_logprobs"``)
        to serve from instead of starting one; tests share one engine this way."""
        redirect_output(name)  # before vLLM / transformers print anything
        self.cfg = cfg
        self.name = name
        on_gpu = role_device(name, cfg.rollout.num_gpus, f"rollout.num_gpus={cfg.rollout.num_gpus:g}",
                             rehearse=cfg.cluster.rehearse).type == "cuda"
        self.memory = MemorySampler()
        self._own_engine = engine is None  # shutdown stops only an engine this generator built
        t = time.perf_counter()
        # processed_logprobs: the log-probs of the distribution actually sampled from (after
        # temperature, top-k and top-p), which is what the learner's ratio must use.
        self.llm = engine or build_engine(cfg, model_path, on_gpu=on_gpu, max_model_len=max_model_len, seed=seed,
                                          logprobs_mode="processed_logprobs")
        self._dir: Optional[os.PathLike] = None
        self.storage_note = ""
        self.version: Optional[int] = None
        self._lora = None
        self._merged = False  # serving merged weights (learner.method other than lora), reloaded in place
        self._loads = 0  # adapters loaded so far: each load gets a LoRA id and name of its own
        from vllm import SamplingParams

        # The first generate in a fresh engine is slow (warm-up); pay it here, not in a step.
        self.llm.generate([{"prompt_token_ids": [0, 1, 2]}], SamplingParams(max_tokens=2), use_tqdm=False)
        self.startup_s = time.perf_counter() - t

    def _params(self, n: int, seed: Optional[int]):
        from vllm import SamplingParams

        r = self.cfg.rollout
        # A per-request seed makes a prompt's samples independent of which engine serves it.
        return SamplingParams(n=n, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                              max_tokens=r.max_new_tokens, logprobs=0, seed=seed)

    def _storage(self, need_bytes: int) -> Path:
        if self._dir is None:
            # Room for two versions: the new one is written before the old one goes.
            root, self.storage_note = adapter_root(2 * need_bytes + 2**20)
            if self.storage_note:
                logging.getLogger(__name__).warning("%s: %s", self.name, self.storage_note)
            self._dir = root / f"{self.name}-{os.getpid()}"
            _sweep_dead(root)
        return Path(self._dir)

    def _load_merged(self, adapter: AdapterVersion) -> dict:
        """learner.method ssf | repadapter | full: the version's merged weights, reloaded in place
        (engine_ext.load_merged_weights), then the prefix cache emptied: its blocks were computed
        with the old weights, and vLLM keys them by tokens (and LoRA name), not by weights."""
        from safetensors.torch import save_file

        t = time.perf_counter()
        self._loads += 1
        path = self._storage(adapter.num_bytes) / f"v{adapter.version}-{self._loads}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(adapter.merged, str(path))
        try:
            loaded = self.llm.collective_rpc("load_merged_weights", args=(str(path),))
        finally:
            path.unlink(missing_ok=True)
        if not self.llm.reset_prefix_cache():
            raise RuntimeError(f"{self.name}: the prefix cache could not be reset after loading version "
                               f"{adapter.version} (requests still running)")
        self.version, self._merged = adapter.version, True
        released = sum(self.llm.collective_rpc("release_host_memory"))
        return {"version": adapter.version, "swap_s": time.perf_counter() - t, "host_released_bytes": released,
                "tensors": loaded[0] if loaded else 0}

    def load_adapter(self, adapter: AdapterVersion) -> dict:
        """Serve ``adapter`` from now on (a LoRA adapter, or a merged-weight version); returns
        timing of the swap."""
        from vllm.lora.request import LoRARequest

        if adapter.merged is not None:
            return self._load_merged(adapter)
        t = time.perf_counter()
        if adapter.peft_config.get("r", 0) > self.cfg.rollout.max_lora_rank:
            raise ValueError(f"{self.name}: adapter rank {adapter.peft_config.get('r')} exceeds the "
                             f"engine's max_lora_rank={self.cfg.rollout.max_lora_rank}")
        self._storage(adapter.num_bytes)
        # lora_int_id (> 0) and the name are new for every load, not just every version: after a
        # resume or a learner restart a version number comes back with other weights, and vLLM
        # caches adapters by id (and prefixes by name).
        self._loads += 1
        tag = f"v{adapter.version}-{self._loads}"
        path = write_adapter(adapter, self._dir / tag)
        request = LoRARequest(f"{self.name}-{tag}", self._loads, str(path))
        self.llm.llm_engine.add_lora(request)
        old = self._lora
        self._lora, self.version = request, adapter.version
        if old is not None:
            self.llm.llm_engine.remove_lora(old.lora_int_id)
            remove_adapter_dir(Path(old.lora_path))
        # The engine's worker keeps the heap pages of each retired version unless told to
        # return them (engine_ext.WorkerHostMemory); without this its RSS climbs per publish.
        released = sum(self.llm.collective_rpc("release_host_memory"))
        return {"version": adapter.version, "swap_s": time.perf_counter() - t, "host_released_bytes": released}

    def generate(self, prompt_ids: list[list[int]], seeds: Optional[list[int]] = None, n: int = 1,
                 adapter: bool = True) -> Samples:
        """``n`` samples per prompt with the current adapter, a prompt's samples adjacent
        (``adapter=False``: the base model alone, which benchmarks compare against).
        ``seeds``: one per prompt, so a prompt's samples do not depend on the engine."""
        if adapter and self._lora is None and not self._merged:
            raise RuntimeError(f"{self.name}: no adapter loaded; publish version 0 first")
        t = time.perf_counter()
        params = self._params(n, None) if seeds is None else [self._params(n, s) for s in seeds]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params,
                                 lora_request=self._lora if adapter else None, use_tqdm=False)
        samples = samples_from_outputs(prompt_ids, outs, [self.version if adapter else -1] * len(outs))
        samples.compute_s = time.perf_counter() - t
        return samples

    def adapter_state(self) -> dict:
        """What serving adapters holds on to: LoRA slots in the engine, version directories on
        the RAM disk. Both must stay at one however many versions were published."""
        dirs = len(list(Path(self._dir).iterdir())) if self._dir is not None and Path(self._dir).is_dir() else 0
        loras = len(self.llm.llm_engine.list_loras()) if self.cfg.learner.method == "lora" else 0
        return {"version": self.version, "loaded_loras": loras, "adapter_dirs": dirs}

    def startup_seconds(self) -> float:
        return self.startup_s

    def memory_stats(self) -> dict:
        # By process as well: with rollout.engine_in_process off, the engine's core and worker
        # are child processes of this actor.
        return {"role": self.role, "name": self.name, **self.memory.stats(), "rss_by_process": rss_by_process(),
                "gpu_bytes_by_process": gpu_bytes_by_process()}

    def shutdown(self) -> None:
        """Stop the engine (its core and workers, which hold the card on a GPU) and remove the
        adapter files. vLLM's own clean-up of a spawned engine core runs from a finalizer that a
        killed actor never reaches, and a replacement in the same slot would then find the card full."""
        if self._dir is not None:
            remove_adapter_dir(self._dir)
        if self._own_engine:
            try:
                self.llm.llm_engine.engine_core.shutdown()
            except Exception as e:  # already stopped, or dying with its process anyway
                logging.getLogger(__name__).debug("%s: engine shutdown: %s", self.name, e)
        self.memory.close()


def samples_from_outputs(prompt_ids: list[list[int]], outs: list, versions: list[Optional[int]]) -> Samples:
    """vLLM's outputs (one per prompt, with ``logprobs=0``) as :class:`Samples`, a prompt's
    samples adjacent, each with the adapter version that made it (``versions``: per prompt)."""
    samples = Samples()
    for i, (p, o, v) in enumerate(zip(prompt_ids, outs, versions)):
        for c in o.outputs:
            samples.prompt_ids.append(list(p))
            samples.response_ids.append(list(c.token_ids))
            samples.logprobs.append([lp[tok].logprob for tok, lp in zip(c.token_ids, c.logprobs)])
            samples.versions.append(v)
            # "stop": EOS or a stop string; "length": cut at max_new_tokens.
            samples.finished.append(c.finish_reason == "stop")
            samples.prompt_index.append(i)
            samples.prompts.append(o.prompt or "")
            samples.responses.append(c.text)
    return samples


def _sweep_dead(root: Path) -> None:
    """Remove the adapter directories of generators whose process is gone (killed or crashed:
    their ``shutdown`` never ran). Directories are named ``<generator>-<pid>``, and a RAM disk
    is per machine, so a pid that no longer runs here is a dead generator's."""
    import psutil

    if not root.is_dir():
        return
    for d in root.iterdir():
        pid = d.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            remove_adapter_dir(d)
