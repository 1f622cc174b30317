"""Checkpoint files, the learner's save/restore and numeric guards, without Ray (the resume of a
whole run against an uninterrupted one is in test_ppo_on_cpu.py)."""
import json
import random

import pytest
import torch

from benchmarks.plan_check import _batch, _core
from rlhf_ray.checkpoint import (check_compatible, find_checkpoint, list_checkpoints, load_checkpoint,
                                 metrics_prefix, random_state_from_json, random_state_to_json, save_checkpoint)
from rlhf_ray.cli import main
from rlhf_ray.config import ConfigError
from rlhf_ray.sync import AdapterVersion
from rlhf_ray.trainer import BadSteps, NumericError


def _updated_core(cfg, model_dir, seed=0):
    from transformers import AutoConfig

    cfg, core = _core(cfg, model_dir, minibatch_prompts=2, micro_batch_size=1)
    b = _batch(4, 6, 10, AutoConfig.from_pretrained(model_dir).vocab_size)
    ev = core.evaluate(b)
    b.old_logprobs, b.old_values = ev["old_logprobs"], ev["old_values"]
    g = torch.Generator().manual_seed(seed)
    b.advantages = torch.randn(b.action_mask.shape, generator=g) * b.action_mask
    b.returns = b.old_values + b.advantages
    return cfg, core, b


def _state(step, **extra):
    return {"step": step, "version": step, "fingerprint": {"model_type": "llama", "lora_rank": 8}, **extra}


def _adapter(step):
    return AdapterVersion(step, {"x.lora_A.weight": torch.full((2, 3), float(step))}, {"r": 8})


def test_checkpoints_are_complete_and_only_the_newest_kept(tmp_path):
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, _state(step), _adapter(step), {"weight": torch.ones(1, 4)},
                        {"optimizer": {"state": {}, "param_groups": []}, "minibatch_rng": torch.ones(3, dtype=torch.uint8)},
                        keep=2)
    # A checkpoint cut off while writing (no state.json) is never taken for one.
    (tmp_path / "checkpoints" / "step-000008" / "adapter").mkdir(parents=True)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000004", "step-000006"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    ck = load_checkpoint(tmp_path)  # a run directory means its newest checkpoint
    assert ck.step == 6 and ck.adapter.version == 6 and torch.equal(ck.adapter.tensors["x.lora_A.weight"],
                                                                    torch.full((2, 3), 6.0))
    assert torch.equal(ck.value_head["weight"], torch.ones(1, 4)) and ck.adapter.peft_config == {"r": 8}
    assert load_checkpoint(tmp_path / "checkpoints" / "step-000004").step == 4


def test_learner_state_loads_without_unpickling_objects(tmp_path):
    """learner.pt is read with weights_only=True: a pickled object in it is refused."""
    import argparse

    save_checkpoint(tmp_path, _state(1), _adapter(1), {}, {"optimizer": {"evil": argparse.Namespace(x=1)}}, keep=1)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        load_checkpoint(tmp_path)


def test_resume_from_nothing_or_another_model_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="holds no checkpoint"):
        find_checkpoint(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        find_checkpoint(tmp_path / "missing")
    save_checkpoint(tmp_path, _state(2), _adapter(2), {}, {"optimizer": {}}, keep=1)
    ck = load_checkpoint(tmp_path)
    check_compatible(ck, {"model_type": "llama", "lora_rank": 8})
    with pytest.raises(ConfigError, match=r"lora_rank: checkpoint 8, this run 16"):
        check_compatible(ck, {"model_type": "llama", "lora_rank": 16})


def test_cli_resume_without_a_checkpoint_fails_before_any_actor(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path), f"output.dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "holds no checkpoint" in err and str(tmp_path) in err


def test_a_new_run_drops_an_earlier_runs_checkpoints_and_a_resume_the_later_ones(tmp_path):
    from rlhf_ray.checkpoint import discard_checkpoints

    for step in (2, 4, 6):
        save_checkpoint(tmp_path, _state(step), _adapter(step), {}, {"optimizer": {}}, keep=5)
    assert [p.name for p in discard_checkpoints(tmp_path, after=2)] == ["step-000004", "step-000006"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000002"]
    discard_checkpoints(tmp_path, after=-1)
    assert list_checkpoints(tmp_path) == []


def test_prompt_order_rng_and_metrics_survive_the_round_trip(tmp_path):
    rng = random.Random(5)
    rng.random()
    back = random.Random()
    back.setstate(random_state_from_json(json.loads(json.dumps(random_state_to_json(rng.getstate())))))
    assert [back.random() for _ in range(3)] == [rng.random() for _ in range(3)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": i}) + "\n" for i in range(5)))
    assert [r["step"] for r in metrics_prefix(path, 3)] == [0, 1, 2]
    assert len(path.read_text().splitlines()) == 3  # the steps after the checkpoint are redone, not doubled


def test_learner_restore_continues_exactly(tiny_cfg, tiny_model_dir):
    """Update, save, update again; a fresh learner restored from the save makes the same second
    update to the last bit (optimizer moments, step counts and minibatch order included)."""
    cfg, a, batch = _updated_core(tiny_cfg, tiny_model_dir)
    a.update(batch)
    saved = (a.adapter(1), a.value_head_state(), a.training_state())
    a.update(batch)
    _, b, _ = _updated_core(tiny_cfg, tiny_model_dir)
    b.restore(*saved)
    b.update(batch)
    for (name, pa), pb in zip(a.module.named_parameters(), b.module.parameters()):
        if pa.requires_grad:
            assert torch.equal(pa, pb), name


def test_nonfinite_gradients_skip_the_whole_update(tiny_cfg, tiny_model_dir):
    """NaN in the second minibatch: the first one's optimizer step is taken back too."""
    cfg, core, batch = _updated_core(tiny_cfg, tiny_model_dir)
    before = [p.detach().clone() for p in core.params]
    # The learner's minibatch order (its RNG starts at model.seed): rows perm[2:4] are minibatch 2.
    perm = torch.randperm(len(batch), generator=torch.Generator().manual_seed(cfg.model.seed))
    batch.advantages[int(perm[2]), -1] = float("nan")
    stats = core.update(batch)
    assert stats["nonfinite_grad"] == 1.0 and stats["optimizer_steps"] == 1
    assert all(torch.equal(p, q) for p, q in zip(core.params, before))
    assert not core.optimizer.state  # Adam's moments are back to none as well


def test_nonfinite_step_inputs_are_named():
    from rlhf_ray.batch import Samples, TokenBatch
    from rlhf_ray.experience import Experience
    from rlhf_ray.trainer import nonfinite_parts

    mask = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    b = TokenBatch(torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.long), mask, torch.zeros(2, 3))
    b.old_logprobs, b.advantages, b.returns = torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3)
    b.advantages[1, 2] = float("inf")  # outside the trained tokens: harmless
    exp = Experience(Samples(), b, mask, torch.zeros(2), torch.zeros(2), torch.zeros(2, 3))
    assert nonfinite_parts(exp) == []
    b.advantages[0, 1] = float("nan")
    exp.rewards = torch.tensor([0.0, float("inf")])
    assert nonfinite_parts(exp) == ["rewards", "advantages"]


def test_too_many_bad_steps_in_a_row_stop_the_run(tmp_path, caplog):
    guard = BadSteps(limit=2)
    guard.observe(["rewards"], 0, None)
    guard.observe([], 1, None)  # a good step resets the run of bad ones
    guard.observe(["gradients"], 2, None)
    guard.observe(["advantages"], 3, None)
    with pytest.raises(NumericError, match=r"3 PPO steps in a row.*ppo.max_bad_steps=2.*step-000002"):
        guard.observe(["rewards"], 4, tmp_path / "step-000002")
    said = [r.message for r in caplog.records if "NaN or inf" in r.message]
    assert guard.total == 4 and len(said) == 4 and "update skipped" in said[0]
    assert "rest of the update dropped (1 bad step(s) in a row)" in said[1]


def test_learner_restore_takes_the_rate_given_not_the_saved_one(tiny_cfg, tiny_model_dir):
    """A resume with a lower learner.lr, or a guard rollback, trains at the rate given; the
    optimizer state's own rate (the one it was saved with) is replaced."""
    cfg, a, batch = _updated_core(tiny_cfg, tiny_model_dir)
    saved = (a.adapter(1), a.value_head_state(), a.training_state())
    _, b, _ = _updated_core(tiny_cfg, tiny_model_dir)
    b.restore(*saved, lr=cfg.learner.lr / 4)
    assert b.update(batch)["lr"] == pytest.approx(cfg.learner.lr / 4)
    b.restore(*saved)  # no rate given: the saved one
    assert b.update(batch)["lr"] == pytest.approx(cfg.learner.lr)
