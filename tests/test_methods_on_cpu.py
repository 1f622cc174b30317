"""The fine-tuning methods (rlhf_ray/models/methods.py) on the tiny model, without Ray: every
method folds exactly into the weights it wraps, its parameter count from shapes alone equals the
real modules', and the unmerged method saved and loaded back gives the same outputs."""
import types

import pytest
import torch

from rlhf_ray.config import ConfigError, load_config
from rlhf_ray.models.methods import (METHODS, MethodSpec, apply_method, load_method, merge_method, method_params,
                                     save_method, _bias_flags)
from rlhf_ray.plan.shapes import model_shape

ADAPTERS = [m for m in METHODS if m != "full"]
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _spec(method, targets=ALL_LINEAR, **kw):
    return MethodSpec(method=method, targets=tuple(targets), **kw)


def _model(path, head="causal_lm"):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(0)
    if head == "causal_lm":
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    m = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32, num_labels=1)
    m.config.pad_token_id = 0
    return m


def _out(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.fixture(scope="module")
def ids(tiny_model_dir):
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(tiny_model_dir).vocab_size
    return torch.randint(1, vocab, (3, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("head", ["causal_lm", "seq_cls"])
@pytest.mark.parametrize("method", ADAPTERS)
def test_merge_is_exact(tiny_model_dir, ids, method, head):
    """Away from the identity (random method tensors), the merged plain model gives the unmerged
    model's outputs: max abs difference under 1e-5 in fp32."""
    task = "CAUSAL_LM" if head == "causal_lm" else "SEQ_CLS"
    model = apply_method(_model(tiny_model_dir, head), _spec(method), task, init_identity=False)
    base = _out(_model(tiny_model_dir, head), ids)
    before = _out(model, ids)
    assert (before - base).abs().max() > 1e-3  # the method changes the outputs
    merged = merge_method(model)
    assert not any(type(m).__name__.endswith(("SSFLinear", "RepAdapterLinear")) for m in merged.modules())
    assert (_out(merged, ids) - before).abs().max() < 1e-5


@pytest.mark.parametrize("method", ADAPTERS)
def test_trainable_count_from_shapes_equals_the_modules(tiny_model_dir, method):
    """The planner's count (config.json on the meta device) is exact; and only the method trains."""
    for targets in (("q_proj", "v_proj"), ALL_LINEAR):
        spec = _spec(method, targets, repadapter_rank=8, repadapter_groups=4)
        model = apply_method(_model(tiny_model_dir), spec)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        shape = model_shape(tiny_model_dir, 8, list(targets))
        assert trainable == shape.method_params(spec) == method_params(shape.linears, spec) > 0, (method, targets)
    assert shape.method_params(_spec("full")) == shape.total_params


def test_seven_b_counts_from_config_json_alone():
    """Llama-2-7B, all seven projections: SSF 2 x out per layer; RepAdapter r x in + in x r / groups."""
    from pathlib import Path

    shape = model_shape(str(Path(__file__).parents[1] / "configs/shapes_only/meta-llama/Llama-2-7b-hf"), 16,
                        list(ALL_LINEAR))
    h, f, L = 4096, 11008, 32
    assert shape.method_params(_spec("ssf")) == L * 2 * (4 * h + 2 * f + h)
    assert shape.method_params(_spec("repadapter", repadapter_rank=8, repadapter_groups=2)) == \
        L * (6 * (8 * h + h * 4) + (8 * f + f * 4))


@pytest.mark.parametrize("method", ADAPTERS)
def test_saved_method_loads_back_unmerged(tiny_model_dir, ids, tmp_path, method):
    model = apply_method(_model(tiny_model_dir), _spec(method, ("q_proj", "v_proj", "down_proj")),
                         init_identity=False)
    want = _out(model, ids)
    save_method(model, tmp_path / "adapter")
    back = load_method(_model(tiny_model_dir), tmp_path / "adapter")
    assert torch.allclose(_out(back, ids), want, atol=1e-6)


@pytest.mark.parametrize("method", ["ssf", "repadapter"])
def test_merged_model_saves_and_loads_as_a_plain_model(tiny_model_dir, ids, tmp_path, method):
    """What the stages write: an SSF shift on a bias-free layer turns on the config's bias flag
    for that group (zero biases elsewhere); RepAdapter leaves the architecture as it was."""
    from transformers import AutoModelForCausalLM

    model = apply_method(_model(tiny_model_dir), _spec(method, ("q_proj", "up_proj")), init_identity=False)
    want = _out(model, ids)
    merge_method(model).save_pretrained(tmp_path / "m")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    assert (_out(back, ids) - want).abs().max() < 1e-5
    flags = (back.config.attention_bias, back.config.mlp_bias)
    assert flags == ((True, True) if method == "ssf" else (False, False))


def test_ssf_refuses_a_layer_no_config_flag_can_give_a_bias():
    model = torch.nn.Module()
    model.config = types.SimpleNamespace(model_type="gpt_neox")
    with pytest.raises(ValueError, match="q_proj has no bias and a gpt_neox model has no config flag"):
        _bias_flags(model, {"q_proj"})


def test_method_settings_and_old_key_names():
    cfg = load_config(None, ["sft.method=repadapter", "peft.repadapter_rank=4", "peft.target_modules=[q_proj]"])
    spec = MethodSpec.from_config(cfg, cfg.sft.method)
    assert (spec.method, spec.targets, spec.repadapter_rank) == ("repadapter", ("q_proj",), 4)
    # LoRA keeps its own targets; the other methods take peft.target_modules where given.
    assert MethodSpec.from_config(cfg, "lora").targets == tuple(cfg.lora.target_modules)
    assert load_config(None, ["sft.mode=lora"]).sft.method == "lora"  # the old name, with a warning
    with pytest.raises(ConfigError, match="sft.method.*did you mean 'ssf'"):
        load_config(None, ["sft.method=sff"])
    with pytest.raises(ConfigError, match="peft.repadapter_groups: 3 does not divide"):
        load_config(None, ["peft.repadapter_groups=3"])


@pytest.mark.parametrize("method", ["ssf", "repadapter"])
def test_only_the_method_trains_with_gradient_checkpointing(tiny_model_dir, ids, method):
    """What the stages do (checkpointed backward, AdamW on the trainable parameters): the method's
    tensors move, the base's do not."""
    model = _model(tiny_model_dir)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_method(model, _spec(method, ("q_proj", "down_proj")))
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    assert all(not torch.equal(p, q) for p, q in zip(params, before))
    assert all(torch.equal(p, base_before[n]) for n, p in model.named_parameters() if n in base_before)


@pytest.mark.parametrize("method", ["ssf", "repadapter", "full"])
def test_learner_trains_a_merged_weight_method_and_publishes_whole_fused_layers(tiny_cfg, tiny_model_dir, method):
    """learner.method other than lora: the learner's policy is the method (the reference is the
    base with it off), an update moves it, and a version carries the method's own tensors (what
    checkpoints keep) and the merged weights, with every part of a fused layer it touches (q/k/v,
    gate/up) and, for SSF, biases; restored into a fresh learner it makes the same weights."""
    import dataclasses

    from benchmarks.plan_check import _batch, _core
    from transformers import AutoConfig

    ref = "separate" if method == "full" else "shared_base"
    cfg = dataclasses.replace(tiny_cfg, reference=dataclasses.replace(tiny_cfg.reference, mode=ref),
                              peft=dataclasses.replace(tiny_cfg.peft, target_modules=["q_proj", "up_proj"]))
    cfg, core = _core(cfg, tiny_model_dir, minibatch_prompts=2, micro_batch_size=2, method=method)
    b = _batch(4, 6, 10, AutoConfig.from_pretrained(tiny_model_dir).vocab_size)
    ev = core.evaluate(b)
    if method != "full":  # the method starts as the identity: the reference is the policy itself
        assert torch.allclose(ev["old_logprobs"], ev["ref_logprobs"], atol=1e-6)
    b.old_logprobs, b.old_values = ev["old_logprobs"], ev["old_values"]
    b.advantages = torch.randn(b.action_mask.shape, generator=torch.Generator().manual_seed(1)) * b.action_mask
    b.returns = b.old_values + b.advantages
    core.update(b)
    v1 = core.adapter(1)
    assert v1.peft_config["rlhf_ray_method"] == method and v1.merged
    if method == "full":
        assert "model.layers.0.mlp.down_proj.weight" in v1.merged
    else:
        layer = "model.layers.0."
        sent = {k[len(layer):] for k in v1.merged if k.startswith(layer)}
        parts = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"}
        assert sent == {f"{p}.weight" for p in parts} | ({f"{p}.bias" for p in parts} if method == "ssf" else set())
        assert all(k.rsplit(".", 1)[-1].startswith(f"{method}_") for k in v1.tensors)
    _, fresh = _core(cfg, tiny_model_dir, minibatch_prompts=2, micro_batch_size=2, method=method)
    fresh.restore(v1, core.value_head_state(), core.training_state())
    again = fresh.adapter(1).merged
    assert all(torch.equal(again[k], v) for k, v in v1.merged.items())
