"""The memory planner against shapes written here and against what torch and vLLM allocate."""
import dataclasses
from pathlib import Path

import pytest
import torch

from rlhf_ray.plan import model_shape
from rlhf_ray.plan.memory import kv_cache_sequences, learner_bytes
from test_cli_on_cpu import rlhf_ray

ROOT = Path(__file__).resolve().parents[1]
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_exact_counts_from_config_json_alone():
    s = model_shape(str(ROOT / "configs/models/llama-2-7b"), 16, QKVO)
    # 32 layers x (4 x 4096^2 + 3 x 4096 x 11008 + 2 x 4096) + 2 x 32000 x 4096 + 4096
    assert s.total_params == 6_738_415_616
    assert s.lora_params == 32 * 4 * 16 * (4096 + 4096) == 16_777_216 and s.lora_targets == 128
    assert s.kv_bytes_per_token(2) == 2 * 32 * 32 * 128 * 2  # 512 KiB per token in bf16
    s8 = model_shape(str(ROOT / "configs/models/llama-3.1-8b"), 16, QKVO)
    assert s8.total_params == 8_030_261_248
    # k and v project 4096 -> 1024 (8 KV heads of 128)
    assert s8.lora_params == 32 * 16 * (2 * (4096 + 4096) + 2 * (4096 + 1024)) == 13_631_488
    with pytest.raises(ValueError, match="gate_proj2"):
        model_shape(str(ROOT / "configs/models/llama-2-7b"), 16, ["q_proj", "gate_proj2"])


def _core(cfg, model_dir, **learner):
    from rlhf_ray.actors.learner import LearnerCore

    cfg = dataclasses.replace(cfg, learner=dataclasses.replace(cfg.learner, num_workers=1, **learner))
    return cfg, LearnerCore(cfg, model_dir)


def _batch(rows, prompt, response, vocab):
    from rlhf_ray.batch import TokenBatch

    g = torch.Generator().manual_seed(0)
    seq = prompt + response
    mask = torch.zeros(rows, seq - 1)
    mask[:, prompt - 1:] = 1
    return TokenBatch(torch.randint(3, vocab, (rows, seq), generator=g), torch.ones(rows, seq, dtype=torch.long),
                      mask, torch.zeros(rows, seq - 1))


def test_static_bytes_equal_what_the_learner_allocates(tiny_cfg, tiny_model_dir):
    cfg, core = _core(tiny_cfg, tiny_model_dir, minibatch_size=4, micro_batch_size=4)
    b = _batch(4, 6, 10, tiny_cfg.model.tiny_vocab)
    ev = core.evaluate(b)
    b.old_logprobs, b.old_values = ev["old_logprobs"], ev["old_values"]
    b.advantages, b.returns = b.action_mask.clone(), b.action_mask.clone()
    core.update(b)
    shape = model_shape(tiny_model_dir, cfg.lora.rank, list(cfg.lora.target_modules))
    plan = learner_bytes(shape, dtype="float32", lora_rank=cfg.lora.rank, targets=list(cfg.lora.target_modules),
                         critic=True, micro_batch=1, seq_len=16, response_tokens=10, chunk_tokens=2048,
                         checkpointing=False, truncation=False)
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)
    frozen = [p for p in core.module.parameters() if not p.requires_grad]
    trainable = [p for p in core.module.parameters() if p.requires_grad]
    lora = [p for n, p in core.module.named_parameters() if "lora_" in n]
    assert nbytes(frozen) == plan.weights
    assert nbytes(lora) == plan.adapter
    assert nbytes(trainable) - nbytes(lora) == plan.value_head // 4
    assert nbytes(p.grad for p in trainable) == plan.gradients + plan.value_head // 4
    states = [t for s in core.optimizer.state.values() for t in s.values() if t.dim() > 0]
    assert nbytes(states) == plan.optimizer + plan.value_head // 2


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activations_within_15_percent_of_what_autograd_saves(tmp_path, checkpointing):
    """A small bf16 Llama with GQA (the 7B plan's dtype): the planner's activation bytes against
    the tensors autograd keeps for backward, counted by saved_tensors_hooks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf_ray.config import load_config
    from rlhf_ray.telemetry import saved_for_backward_bytes

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=2000, hidden_size=256, intermediate_size=688, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                 tie_word_embeddings=False)).save_pretrained(tmp_path / "m")
    cfg = load_config(ROOT / "configs/tiny_cpu.yaml", ["model.dtype=bfloat16", f"model.path={tmp_path / 'm'}"])
    cfg, core = _core(cfg, str(tmp_path / "m"), gradient_checkpointing=checkpointing)
    core.module.train()
    b = _batch(2, 32, 224, 2000)
    params = list(core.module.parameters())
    _, measured = saved_for_backward_bytes(lambda: core.module(b.input_ids, b.attention_mask, b.action_mask),
                                           exclude=params)
    shape = model_shape(str(tmp_path / "m"), cfg.lora.rank, list(cfg.lora.target_modules))
    planned = learner_bytes(shape, dtype="bfloat16", lora_rank=cfg.lora.rank, targets=list(cfg.lora.target_modules),
                            critic=True, micro_batch=2, seq_len=256, response_tokens=224, chunk_tokens=2048,
                            checkpointing=checkpointing, truncation=False).activations
    print(f"checkpointing={checkpointing}: planned {planned:,} bytes, saved for backward {measured:,} "
          f"({planned / measured:.3f}x)")
    assert abs(planned - measured) <= 0.15 * measured


@pytest.mark.integration
def test_kv_capacity_equals_vllms_own_figure(tiny_cfg, tiny_model_dir, vllm_engine):
    cache = vllm_engine.llm_engine.vllm_config.cache_config
    max_len = vllm_engine.llm_engine.vllm_config.model_config.max_model_len
    shape = model_shape(tiny_model_dir, tiny_cfg.lora.rank, list(tiny_cfg.lora.target_modules))
    assert cache.block_size == 128  # vLLM-CPU's block; the planner assumes 16 on GPUs
    planned = kv_cache_sequences(tiny_cfg.rollout.kv_cache_mib * 2**20, shape, tiny_cfg.model.dtype, max_len,
                                 block_size=cache.block_size)
    assert planned == pytest.approx(cache.kv_cache_max_concurrency, rel=1e-9)


def test_plan_cli_places_the_7b_config_and_names_what_does_not_fit():
    cfg = str(ROOT / "configs/llama2_7b_lora_8x3090.yaml")
    r = rlhf_ray("plan", "--config", cfg, "--gpus", "8")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "6,738,415,616 parameters" in r.stdout and "16,777,216 trainable" in r.stdout
    for actor in ("learner-0", "learner-3", "rollout-2", "reward"):
        assert actor in r.stdout
    assert "fits: every actor has a place" in r.stdout
    two = rlhf_ray("plan", "--config", cfg, "--gpus", "8", "--nodes", "2")
    assert two.returncode == 0 and "node 1 gpu 3" in two.stdout
    small = rlhf_ray("plan", "--config", cfg, "--gpus", "8", "--gpu-mem-gib", "12")
    assert small.returncode == 1 and "learner-0 needs" in small.stdout and "gradient_checkpointing" in small.stdout
    newer = rlhf_ray("plan", "--config", str(ROOT / "configs/llama31_8b_lora_8x3090.yaml"), "--gpus", "8")
    assert newer.returncode == 0 and "8,030,261,248 parameters" in newer.stdout
