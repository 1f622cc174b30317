"""Rollout generator on transformers (``rollout.engine: transformers``): the policy's PEFT
model generating with its KV cache, the adapter's tensors swapped in place for each version.

It serves what vLLM does not: encoder-decoder models (T5, BART-style; vLLM 0.32 has no T5 and
moved BART to an out-of-tree plugin), and any decoder model transformers loads. It keeps the
vLLM generator's contract: one adapter version at a time, per-request seeds (a prompt's samples
do not depend on the engine or the batch it shares), ``n`` samples per prompt, log-probs of the
distribution actually sampled from (after temperature, top-k and top-p, by the same
``algo.sampling`` rule the learner models) and finish reasons.
"""
from __future__ import annotations

import contextlib
import time
from typing import Optional

import torch

from ..algo.sampling import sampling_logits
from ..batch import Samples
from ..config import Config
from ..devices import role_device
from ..logs import redirect_output
from ..sync import AdapterVersion
from ..telemetry import MemorySampler, rss_by_process


def engine_kind(cfg: Config, model_path: str) -> str:
    """``rollout.engine`` resolved for the policy at ``model_path``: vllm or transformers.

    Raises:
        ConfigError: vLLM asked for an encoder-decoder model (vLLM 0.32 serves none of T5's or BART's
            family), or a merged-weight learner.method on the transformers engine.
    """
    from ..config import ConfigError
    from ..models.seq2seq import is_encoder_decoder

    encdec = is_encoder_decoder(model_path)
    if cfg.rollout.engine == "vllm" and encdec:
        raise ConfigError(f"rollout.engine=vllm: the policy at {model_path} is an encoder-decoder model, which "
                          "vLLM 0.32 does not serve (no T5; BART only through an out-of-tree plugin); use "
                          "rollout.engine=transformers (or auto)")
    kind = ("transformers" if encdec else "vllm") if cfg.rollout.engine == "auto" else cfg.rollout.engine
    if kind == "transformers" and cfg.learner.method != "lora":
        raise ConfigError(f"learner.method={cfg.learner.method}: the transformers engine (rollout.engine="
                          f"{cfg.rollout.engine}, policy {model_path}) serves LoRA adapters only; merged-weight "
                          "methods need vLLM, which serves no encoder-decoder model")
    return kind


def row_seed(seed: int, sample: int) -> int:
    """The seed of a request's ``sample``-th sequence: distinct per sample, fixed by the request."""
    return (seed * 1_000_003 + sample) % (2 ** 63)


@torch.no_grad()
def sample_tokens(model, prompts: list[list[int]], generators: list[torch.Generator], *, temperature: float,
                  top_k: int, top_p: float, max_new_tokens: int, eos_id: int, pad_id: int,
                  device=None) -> tuple[list[list[int]], list[list[float]], list[bool]]:
    """One batch: each row's sampled tokens (EOS included when it ended), their log-probs under
    the truncated, renormalised distribution, and whether it ended with EOS. Row ``i`` draws
    only from ``generators[i]``, so its tokens do not depend on the rest of the batch beyond
    float rounding. Decoder models get left-padded prompts; encoder-decoder models encode once
    and decode from the decoder start token."""
    rows = len(prompts)
    encdec = bool(getattr(model.config, "is_encoder_decoder", False))
    width = max(len(p) for p in prompts)
    ids = torch.full((rows, width), pad_id, dtype=torch.long)
    mask = torch.zeros(rows, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        if encdec:
            ids[i, :len(p)], mask[i, :len(p)] = torch.tensor(p), 1
        else:
            ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    ids, mask = ids.to(device), mask.to(device)
    if encdec:
        from ..models.seq2seq import decoder_start_id

        enc = model.get_encoder()(input_ids=ids, attention_mask=mask)
        step_in = torch.full((rows, 1), decoder_start_id(model.config), dtype=torch.long, device=device)
    else:
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        step_in = ids
    past = None
    tokens: list[list[int]] = [[] for _ in range(rows)]
    logprobs: list[list[float]] = [[] for _ in range(rows)]
    done = [False] * rows
    for _ in range(max_new_tokens):
        if encdec:
            out = model(encoder_outputs=enc, attention_mask=mask, decoder_input_ids=step_in, past_key_values=past,
                        use_cache=True)
        else:
            out = model(input_ids=step_in, attention_mask=mask, position_ids=positions, past_key_values=past,
                        use_cache=True, logits_to_keep=1)
        past = out.past_key_values
        z = sampling_logits(out.logits[:, -1], temperature=temperature, top_k=top_k, top_p=top_p)
        logp = torch.log_softmax(z, dim=-1).cpu()
        probs = logp.exp()
        nxt = torch.full((rows,), pad_id, dtype=torch.long)
        for i in range(rows):
            if done[i]:
                continue
            tok = int(torch.multinomial(probs[i], 1, generator=generators[i]))
            nxt[i] = tok
            tokens[i].append(tok)
            logprobs[i].append(float(logp[i, tok]))
            done[i] = tok == eos_id
        if all(done):
            break
        step_in = nxt.unsqueeze(1).to(device)
        if not encdec:
            mask = torch.cat([mask, torch.ones(rows, 1, dtype=mask.dtype, device=device)], dim=1)
            positions = positions[:, -1:] + 1
    return tokens, logprobs, done


class TransformersGenerator:
    role = "rollout"

    def __init__(self, cfg: Config, model_path: str, name: str = "rollout-0", *, seed: Optional[int] = None,
                 max_model_len: Optional[int] = None, engine=None):
        """``max_model_len`` and ``engine`` are the vLLM generator's; here nothing is sized up front."""
        redirect_output(name)
        from ..models import add_lora, load_tokenizer
        from ..models.seq2seq import load_policy_lm

        t = time.perf_counter()
        self.cfg, self.name = cfg, name
        self.device = role_device(name, cfg.rollout.num_gpus, f"rollout.num_gpus={cfg.rollout.num_gpus:g}",
                                  rehearse=cfg.cluster.rehearse)
        self.memory = MemorySampler()
        base = load_policy_lm(model_path, cfg.model.dtype, device=self.device).eval()
        self.encdec = bool(base.config.is_encoder_decoder)
        self.model = add_lora(base, cfg.lora, task_type="SEQ_2_SEQ_LM" if self.encdec else "CAUSAL_LM").eval()
        self.tokenizer = load_tokenizer(model_path)
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
        self.version: Optional[int] = None
        self._rng = torch.Generator().manual_seed(cfg.rollout.seed if seed is None else seed)
        self.startup_s = time.perf_counter() - t

    def load_adapter(self, adapter: AdapterVersion) -> dict:
        """Serve ``adapter`` from now on: its LoRA tensors copied into the model in place."""
        from peft import set_peft_model_state_dict

        if adapter.merged is not None:
            raise ValueError(f"{self.name}: the transformers engine serves LoRA adapters only "
                             f"(got a {adapter.peft_config.get('rlhf_ray_method')} version)")
        t = time.perf_counter()
        result = set_peft_model_state_dict(self.model, adapter.tensors)
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if unexpected:
            raise ValueError(f"{self.name}: adapter tensors do not fit this model: {unexpected[:3]}")
        self.version = adapter.version
        return {"version": adapter.version, "swap_s": time.perf_counter() - t, "host_released_bytes": 0}

    def generate(self, prompt_ids: list[list[int]], seeds: Optional[list[int]] = None, n: int = 1,
                 adapter: bool = True) -> Samples:
        """``n`` samples per prompt (adjacent), as the vLLM generator returns them."""
        if adapter and self.version is None:
            raise RuntimeError(f"{self.name}: no adapter loaded; publish version 0 first")
        t = time.perf_counter()
        r = self.cfg.rollout
        seeds = seeds if seeds is not None else [int(torch.randint(0, 2 ** 62, (1,), generator=self._rng))
                                                 for _ in prompt_ids]
        rows = [(i, j) for i in range(len(prompt_ids)) for j in range(n)]
        samples = Samples()
        for start in range(0, len(rows), r.batch_rows):
            chunk = rows[start:start + r.batch_rows]
            gens = [torch.Generator().manual_seed(row_seed(seeds[i], j)) for i, j in chunk]
            with (self.model.disable_adapter() if not adapter else contextlib.nullcontext()):
                toks, lps, ended = sample_tokens(
                    self.model, [prompt_ids[i] for i, _ in chunk], gens, temperature=r.temperature, top_k=r.top_k,
                    top_p=r.top_p, max_new_tokens=r.max_new_tokens, eos_id=self.eos_id, pad_id=self.pad_id,
                    device=self.device)
            for (i, _), tok, lp, end in zip(chunk, toks, lps, ended):
                samples.prompt_ids.append(list(prompt_ids[i]))
                samples.response_ids.append(tok)
                samples.logprobs.append(lp)
                samples.versions.append(self.version if adapter else -1)
                samples.finished.append(end)
                samples.prompt_index.append(i)
                samples.prompts.append("")
                samples.responses.append(self.tokenizer.decode(tok, skip_special_tokens=True))
        samples.compute_s = time.perf_counter() - t
        return samples

    def adapter_state(self) -> dict:
        return {"version": self.version, "loaded_loras": int(self.version is not None), "adapter_dirs": 0}

    def startup_seconds(self) -> float:
        return self.startup_s

    def memory_stats(self) -> dict:
        return {"role": self.role, "name": self.name, **self.memory.stats(), "rss_by_process": rss_by_process()}

    def shutdown(self) -> None:
        self.memory.close()

