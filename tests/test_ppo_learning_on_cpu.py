"""PPO as a user at the target scale relies on it, on a real local Ray with vLLM-CPU: the loop
learns in the right direction, with several samples per prompt and nucleus sampling the
learner models; the trained adapter is saved and reloads exactly; 1 and 2 learner workers
make the same update; close() leaves nothing running."""
import glob
import json

import pytest
import ray
import torch

from rlhf_ray.actors.learner import LearnerCore
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
                   "learner.minibatch_prompts=2", "rollout.temperature=0.7", "rollout.top_p=0.9", "rollout.max_new_tokens=16", "ppo.truncated=score",
                   "ppo.kl_coef=0.01", "ppo.kl_target=null", "learner.lr=0.004", "learner.micro_batch_size=2",
                   "output.save_every=4", "output.name=learning")
    tr = PPOTrainer(cfg, progress=False)
    yield tr
    tr.close()


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


def _filled(batch, evaluated):
    import dataclasses

    b = dataclasses.replace(batch)
    b.old_logprobs = torch.cat([e["old_logprobs"] for e in evaluated])
    b.old_values = torch.cat([e["old_values"] for e in evaluated]) if evaluated[0]["old_values"] is not None else None
    b.ref_logprobs = torch.cat([e["ref_logprobs"] for e in evaluated])
    b.advantages = torch.linspace(-1, 1, b.action_mask.numel()).reshape(b.action_mask.shape) * b.action_mask
    b.returns = b.advantages.clone()
    return b


def test_two_ddp_workers_make_the_one_process_gradient(trainer, make_cfg):
    """End to end over real DDP: a 2-worker Ray Train group (gloo) against ``LearnerCore`` in this
    process (what one worker runs), one optimizer step on the ragged batch, with the option set
    that once differed between machines (critic-free, KL in the loss, GSPO's sequence ratio, each
    response weighing the same). test_learner_layouts_on_cpu.py checks every option this way.

    Compared: Adam's first moment after the step, (1 - beta1) x the clipped gradient, from the
    group's training state. Not the weights: Adam's first step moves each weight by about lr x
    sign(gradient), so a weight whose gradient is float noise moves +lr in one layout and -lr in
    the other whatever the maths (the earlier form of this test compared weights after four
    steps: 3e-5 on one machine, 2.7e-3 on another, with the gradients equal to ~1e-6 on both).
    The gradient's tolerance is the one test_learner_layouts_on_cpu.py justifies."""
    batch = _ragged_batch(trainer)
    options = ("learner.lr=0.05", "learner.epochs=1", "learner.minibatch_prompts=4", "learner.micro_batch_size=1",
               "ppo.estimator=grpo", "rollout.samples_per_prompt=2", "ppo.kl_in=loss", "ppo.kl_estimator=k3",
               "ppo.loss_agg=seq_mean_token_mean", "ppo.ratio_level=sequence", "ppo.clip_eps_high=0.28")
    group = LearnerGroup(make_cfg(*options, "learner.num_workers=2"), trainer.model_path,
                         trainer.run_dir / "ray_train_2")
    try:
        evaluated = group.evaluate(ray.put(batch))
        out = group.update(ray.put(_filled(batch, evaluated)), 1, kl_coef=0.5)
        two = group.training_state()["optimizer"]["state"]
        assert out[0]["stats"]["param_checksum"] == out[1]["stats"]["param_checksum"]
    finally:
        group.stop()
    core = LearnerCore(make_cfg(*options, "learner.num_workers=1"), trainer.model_path)
    mine = core.evaluate(batch)
    assert torch.allclose(mine["old_logprobs"], torch.cat([e["old_logprobs"] for e in evaluated]), atol=1e-5)
    stats = core.update(_filled(batch, [mine]), kl_coef=0.5)
    one = core.optimizer.state_dict()["state"]
    flat = lambda st: torch.cat([st[i]["exp_avg"].flatten() for i in sorted(st)])  # noqa: E731
    rel = ((flat(two) - flat(one)).norm() / flat(one).norm()).item()
    print(f"1 vs 2 workers: |m2 - m1| / |m1| = {rel:.2e}; |m1| = {flat(one).norm():.3e}")
    assert flat(one).norm() > 0 and rel < 1e-5
    ranks = [o["stats"] for o in out]  # the driver averages the ranks' figures
    for k in ("loss", "grad_norm", "kl_loss"):
        assert sum(r[k] for r in ranks) / 2 == pytest.approx(stats[k], rel=1e-5, abs=1e-7), k
    assert stats["optimizer_steps"] == ranks[0]["optimizer_steps"] == 1


def test_close_ends_every_actor_and_its_adapter_directory(trainer, records):
    root, _ = adapter_root()
    pids = {name: m["pid"] for name, m in trainer.fleet.memory().items()}
    name = trainer.remove_rollout_actor()
    # Its own <generator>-<pid> directory: another trainer on the machine may have a generator of that name.
    assert not (root / f"{name}-{pids[name]}").exists(), "a removed generator left its RAM-disk directory"
    handles = [h for _, h in trainer.fleet.members] + [h for _, h in trainer._roles]
    # Directories are <generator>-<pid>; other trainers of the session have their own.
    mine = [f"{name}-{m['pid']}" for name, m in trainer.fleet.memory().items()]
    trainer.close()
    for h in handles:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(h.memory_stats.remote(), timeout=60)
    left = [p.split("/")[-1] for p in glob.glob(str(root / "rollout-*"))]
    assert mine and not set(mine) & set(left), (mine, left)
