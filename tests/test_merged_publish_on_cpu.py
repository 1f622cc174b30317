"""PPO with a method vLLM cannot serve as an adapter (learner.method ssf | repadapter): the
generators load each version's merged weights in place, on real vLLM engines, and serve exactly
the learner's policy; a short PPO run keeps 0 stale samples and a learner/engine gap like LoRA's."""
import dataclasses

import pytest
import torch

from rlhf_ray.actors.rollout import RolloutGenerator
from rlhf_ray.data.synthetic import corpus
from rlhf_ray.models import load_causal_lm, load_tokenizer
from rlhf_ray.models.methods import MethodSpec, apply_method, merged_tensors, method_state, ssf_engine_base
from rlhf_ray.sync import AdapterVersion

pytestmark = pytest.mark.integration


def _version(model_dir, spec, version, identity):
    model = apply_method(load_causal_lm(model_dir), spec, init_identity=identity)
    return AdapterVersion(version, method_state(model), {"rlhf_ray_method": spec.method, **spec.to_json()},
                          merged=merged_tensors(model)), model


def _hf_logprobs(model, prompt, response):
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    return [float(logp[len(prompt) - 1 + i, tok]) for i, tok in enumerate(response)]


@pytest.mark.parametrize("method", ["repadapter", "ssf"])
def test_generator_serves_each_versions_merged_weights(tiny_cfg, tiny_model_dir, tmp_path, method):
    cfg = dataclasses.replace(
        tiny_cfg, learner=dataclasses.replace(tiny_cfg.learner, method=method),
        rollout=dataclasses.replace(tiny_cfg.rollout, max_new_tokens=8, temperature=1.0, top_p=1.0, top_k=0),
        peft=dataclasses.replace(tiny_cfg.peft, target_modules=["q_proj", "up_proj"]))
    spec = MethodSpec.from_config(cfg, method)
    path = str(ssf_engine_base(tiny_model_dir, spec, tmp_path / "engine_base")) if method == "ssf" else tiny_model_dir
    tok = load_tokenizer(tiny_model_dir)
    ids = [tok(t.split(".")[0])["input_ids"] for t in corpus(6, seed=5)]
    seeds = list(range(len(ids)))
    gen = RolloutGenerator(cfg, path, f"merged-{method}")
    try:
        v0, base = _version(tiny_model_dir, spec, 0, identity=True)
        gen.load_adapter(v0)
        s0 = gen.generate(ids, seeds=seeds)
        v1, policy = _version(tiny_model_dir, spec, 1, identity=False)
        info = gen.load_adapter(v1)
        assert info["version"] == 1 and info["tensors"] == len(v1.merged)
        s1 = gen.generate(ids, seeds=seeds)
        assert set(s1.versions) == {1} and s1.response_ids != s0.response_ids  # other weights, other samples
        # The engine's log-probs are the learner's policy's (the method unmerged, in transformers).
        gap = max(abs(a - b) for p, r, lp in zip(s1.prompt_ids, s1.response_ids, s1.logprobs)
                  for a, b in zip(lp, _hf_logprobs(policy, p, r)))
        assert gap < 1e-3, gap
        base_gap = max(abs(a - b) for p, r, lp in zip(s0.prompt_ids, s0.response_ids, s0.logprobs)
                       for a, b in zip(lp, _hf_logprobs(base, p, r)))
        assert base_gap < 1e-3, base_gap
        # Back to the first weights: the first samples again (nothing cached from version 1).
        gen.load_adapter(dataclasses.replace(v0, version=2))
        assert gen.generate(ids, seeds=seeds).response_ids == s0.response_ids
        assert gen.adapter_state()["adapter_dirs"] == 0  # the file of a version goes once loaded
    finally:
        gen.shutdown()


@pytest.mark.parametrize("method", ["repadapter", "ssf"])
def test_ppo_with_merged_weight_publishing(make_cfg, method):
    from rlhf_ray.trainer import PPOTrainer

    cfg = make_cfg("rollout.num_engines=1", "learner.num_workers=1", f"learner.method={method}",
                   "peft.target_modules=[q_proj, v_proj, up_proj]", "ppo.steps=3", f"output.name=merged_{method}",
                   "learner.lr=0.01", "checkpoint.every=2")
    with PPOTrainer(cfg, progress=False) as tr:
        records = tr.run(evaluate=False)
        assert [r["stale_samples"] for r in records] == [0, 0, 0]
        assert [r["generated_with_version"] for r in records] == [[0], [1], [2]]
        assert max(r["logprob_gap"] for r in records) < 1e-4
        assert records[-1]["policy_ref_gap"] > 0  # the policy moved away from the base
        saved = (tr.run_dir / "checkpoints" / "step-000002" / "adapter" / "adapter_config.json").read_text()
        assert f'"rlhf_ray_method": "{method}"' in saved
