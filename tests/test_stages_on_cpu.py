"""The stages before PPO on the tiny model: SFT (full, LoRA, SSF and RepAdapter, merged) and
reward-model training with the margin ranking loss, on small generated sets; and their CLI error
paths."""
import json

import pytest
import torch

from rlhf_ray.config import load_config
from rlhf_ray.stages import policy_base, reward_path
from rlhf_ray.stages.rm import run_train_rm
from rlhf_ray.stages.sft import run_sft
from test_cli_on_cpu import TINY, rlhf_ray


@pytest.fixture(scope="module")
def stage_cfg(tiny_cfg, tmp_path_factory):
    def make(*overrides):
        return load_config(TINY, [f"model.tiny_dir={tiny_cfg.model.tiny_dir}",
                                  f"output.dir={tmp_path_factory.mktemp('stages')}", "sft.num_examples=800",
                                  "sft.epochs=3", "rm.num_pairs=256", "rm.epochs=2", *overrides])
    return make


@pytest.mark.integration
def test_sft_learns_the_responses(sft_run):  # the session's SFT run (conftest.py)
    cfg, s = sft_run
    # From a random model (ln 512 ~ 6.2 nats) to well under half of that on held-out records.
    assert s["heldout_loss_before"] > 5.5 and s["heldout_loss_after"] < 2.5
    assert s["train_examples"] == 760 and s["heldout_examples"] == 40
    assert json.loads((cfg.output.run_dir / "sft.json").read_text())["heldout_loss_after"] == s["heldout_loss_after"]
    assert policy_base(cfg) == s["output"]  # PPO picks the SFT model up as base and reference


@pytest.mark.integration
@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_the_objective_does_not_depend_on_the_worker_layout(stage_cfg, stage):
    """One worker taking whole batches against two gloo ranks in micro-batches of one row, with
    batches of 5 (ranks hold 3 and 2 rows: the run must not hang, and each step's loss is the
    whole batch's per-token / per-pair mean either way). Same seed, same batches, same first
    loss and held-out figure before training."""
    def run(*layout):
        size = "num_examples=40" if stage == "sft" else "num_pairs=40"
        cfg = stage_cfg(f"{stage}.{size}", f"{stage}.epochs=1", f"{stage}.batch_size=5", *layout,
                        "rm.base=model", f"{stage}.method=lora")
        return run_sft(cfg, progress=False) if stage == "sft" else run_train_rm(cfg, progress=False)

    one = run(f"{stage}.num_workers=1")
    two = run(f"{stage}.num_workers=2", f"{stage}.micro_batch_size=1", f"{stage}.num_cpus_per_worker=0.5")
    assert two["workers"] == 2 and one["steps"] == two["steps"]
    assert two["train_loss_first"] == pytest.approx(one["train_loss_first"], rel=1e-5)
    if stage == "sft":
        assert two["heldout_loss_before"] == pytest.approx(one["heldout_loss_before"], rel=1e-5)
    else:
        assert two["heldout_before"]["reward_gap"] == pytest.approx(one["heldout_before"]["reward_gap"], rel=1e-4)
        assert two["heldout_before"]["pairs"] == one["heldout_before"]["pairs"]


@pytest.mark.integration
def test_sft_lora_method_saves_a_merged_model(stage_cfg, tiny_model_dir):
    from rlhf_ray.models import load_causal_lm

    cfg = stage_cfg("sft.method=lora", "sft.num_examples=64", "sft.epochs=1", "sft.lr=0.01")
    s = run_sft(cfg, progress=False)
    assert s["trainable_params"] < 50_000  # the adapter only
    merged, base = load_causal_lm(s["output"]), load_causal_lm(tiny_model_dir)
    names = dict(merged.named_parameters())
    assert not any("lora" in n for n in names)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(names[q], dict(base.named_parameters())[q])  # the update is in the weights
    assert s["heldout_loss_after"] < s["heldout_loss_before"]


@pytest.mark.integration
@pytest.mark.parametrize("method", ["ssf", "repadapter"])
def test_sft_with_a_method_saves_it_merged_and_unmerged(stage_cfg, tiny_model_dir, method):
    """On Ray Train, on the objective-question task: the stage trains only the method's tensors,
    saves a plain model with them folded in (the unmerged method beside it gives the same
    outputs), and scores the held-out questions before and after, per set."""
    from rlhf_ray.models import load_causal_lm
    from rlhf_ray.models.methods import MethodSpec, load_method
    from rlhf_ray.plan.shapes import model_shape

    cfg = stage_cfg(f"sft.method={method}", "sft.num_examples=64", "sft.epochs=1", "sft.lr=0.01",
                    "data.task=objective", "eval.judge=label_match", "eval.num_prompts=16", "rollout.max_new_tokens=4")
    s = run_sft(cfg, progress=False)
    spec = MethodSpec.from_config(cfg, method)
    assert s["method"] == method and s["trainable_params"] == model_shape(tiny_model_dir, 8, ["q_proj"]).method_params(spec)
    assert s["peak_rss_bytes"] > 0 and s["train_loss_last"] < s["train_loss_first"]
    for when in ("judge_before", "judge_after"):
        assert set(s[when]["judge_by_set"]) == {"eprstmt", "tnews", "ocnli", "bustm"} and s[when]["decoding"] == "greedy"
    merged = load_causal_lm(s["output"])
    assert merged.config.attention_bias == (method == "ssf")  # SSF's shift became q/k/v/o biases
    unmerged = load_method(load_causal_lm(tiny_model_dir), f"{s['output']}/adapter")
    ids = torch.randint(3, 500, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (merged(input_ids=ids).logits - unmerged(input_ids=ids).logits).abs().max() < 1e-4


@pytest.mark.integration
def test_reward_model_with_repadapter_keeps_its_score_head(sft_run, stage_cfg):
    cfg = stage_cfg(f"rm.output_dir={sft_run[0].output.run_dir / 'rm_repadapter'}", "rm.method=repadapter",
                    "rm.num_pairs=128", "rm.lr=0.005", "rm.base=model")
    s = run_train_rm(cfg, progress=False)
    assert s["method"] == "repadapter" and s["train_loss_last"] < s["train_loss_first"]
    from safetensors.torch import load_file

    saved = load_file(f"{s['output']}/adapter/adapter_model.safetensors")
    assert "score.weight" in saved and any(k.endswith("repadapter_down") for k in saved)


@pytest.mark.integration
def test_reward_model_ranks_held_out_pairs(sft_run):
    cfg, _ = sft_run
    s = run_train_rm(cfg, progress=False)
    # Held-out pairs come from subjects the RM never saw; chance is 0.5.
    assert s["heldout_after"]["accuracy"] >= 0.85 and s["heldout_after"]["reward_gap"] > 0.5
    assert s["heldout_pairs"] == 32 and s["train_pairs"] == 256
    assert reward_path(cfg) == s["output"]
    norm = json.loads((cfg.output.run_dir / "reward_model" / "rlhf_ray_reward.json").read_text())
    assert norm["std"] > 0

    from rlhf_ray.actors.reward import RewardScorer

    scorer = RewardScorer(cfg, s["output"])  # the PPO role, in-process: unit-scale scores
    good, bad = scorer.score(["this film is"] * 2, [" great. the plot was lovely and good.",
                                                    " awful. the plot was dull and bad."])
    assert good - bad > 1.0


@pytest.mark.integration
def test_reward_model_lora_method_trains_the_score_head_too(sft_run, stage_cfg):
    cfg = stage_cfg(f"rm.output_dir={sft_run[0].output.run_dir / 'rm_lora'}", "rm.method=lora", "rm.num_pairs=128",
                    "rm.lr=0.005", "rm.base=model")
    s = run_train_rm(cfg, progress=False)
    assert s["train_loss_last"] < s["train_loss_first"]
    from rlhf_ray.models.reward import load_reward_model

    model, _, _ = load_reward_model(s["output"])
    assert not any("lora" in n for n, _ in model.named_parameters())


def test_cli_stage_errors_name_file_and_line(tmp_path, tiny_model_dir):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "p", "chosen": " a", "rejected": " b"}\n{"prompt": "p", "chosen": " a"}\n')
    r = rlhf_ray("train-rm", "--config", TINY, f"model.path={tiny_model_dir}", "rm.base=model",
                 f"rm.data_path={pairs}", "data.on_bad_record=error", f"output.dir={tmp_path}")
    assert r.returncode == 1 and f"{pairs}:2: missing key 'rejected'" in r.stderr
    r = rlhf_ray("train-rm", "--config", TINY, f"model.path={tiny_model_dir}", f"output.dir={tmp_path}")
    assert r.returncode == 1 and "rm.base=sft but there is no SFT model" in r.stderr
    r = rlhf_ray("sft", "--config", TINY, f"model.path={tiny_model_dir}", f"sft.data_path={tmp_path / 'no.jsonl'}",
                 f"output.dir={tmp_path}")
    assert r.returncode == 1 and "sft.data_path=" in r.stderr and "does not exist" in r.stderr
