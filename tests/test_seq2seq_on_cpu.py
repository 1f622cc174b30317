"""Encoder-decoder policies (a tiny T5), the transformers rollout engine, the classifier reward,
the dialogue-summary task and ROUGE (issue #29). The fast tests need no Ray; the pipeline test
runs SFT, the classifier and PPO on the session's head."""
from pathlib import Path

import pytest
import torch

from rlhf_ray.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def t5_cfg(tmp_path_factory):
    base = tmp_path_factory.mktemp("t5")
    return load_config(ROOT / "configs" / "tiny_t5_cpu.yaml", [
        f"model.tiny_dir={base / 'tiny_t5'}", f"output.dir={base / 'runs'}"])


@pytest.fixture(scope="module")
def t5_dir(t5_cfg):
    from rlhf_ray.models import resolve_model_path

    return resolve_model_path(t5_cfg.model)


def _engine_cfg(cfg, *overrides):
    return load_config(None, [f"{k}={v}" for k, v in {
        "model.tiny_dir": cfg.model.tiny_dir, "model.tiny_arch": cfg.model.tiny_arch,
        "model.tiny_corpus": cfg.model.tiny_corpus, "lora.target_modules": "[q,k,v,o]",
        "rollout.temperature": 0.7, "rollout.top_p": 0.9, "rollout.max_new_tokens": 12,
        "learner.num_workers": 1, "rollout.engine": "transformers", "rollout.batch_rows": 5}.items()] + list(overrides))


def _prompts(tok, n=4):
    from rlhf_ray.data import dialogue

    return [tok(t)["input_ids"] for t, _ in dialogue.prompts(n)]


def _random_adapter(core, version, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in core.module.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return core.adapter(version)


def test_tiny_t5_is_an_encoder_decoder_with_t5_tokens(t5_dir):
    from rlhf_ray.models import load_tokenizer
    from rlhf_ray.models.seq2seq import is_encoder_decoder, load_policy_lm

    assert is_encoder_decoder(t5_dir)
    tok = load_tokenizer(t5_dir)
    ids = tok("summarize: anna: hi")["input_ids"]
    assert ids[-1] == tok.eos_token_id and tok.bos_token_id is None and tok.pad_token_id == 0
    model = load_policy_lm(t5_dir)
    assert type(model).__name__ == "T5ForConditionalGeneration" and model.config.decoder_start_token_id == 0


def test_aligned_hidden_gives_the_models_own_logprobs(t5_dir):
    """Prompt + response rows in the decoder-only layout give exactly T5's own teacher-forced
    log-probs of the response (rows of different lengths, right-padded)."""
    from rlhf_ray.batch import Samples, pad_samples
    from rlhf_ray.models import load_tokenizer
    from rlhf_ray.models.policy import Sampling, sequence_logprobs
    from rlhf_ray.models.seq2seq import load_policy_lm

    tok, model = load_tokenizer(t5_dir), load_policy_lm(t5_dir).eval()
    s = Samples()
    for i, p in enumerate(_prompts(tok, 3)):
        r = tok("anna and ben will meet at the cafe", add_special_tokens=False)["input_ids"][: 2 + 2 * i]
        s.prompt_ids.append(p)
        s.response_ids.append(r + [tok.eos_token_id])
        s.logprobs.append([0.0] * (len(r) + 1))
    b = pad_samples(s, tok.pad_token_id)
    lp = sequence_logprobs(model, b.input_ids, b.attention_mask, b.action_mask, Sampling())
    for i in range(3):
        r = torch.tensor([s.response_ids[i]])
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([s.prompt_ids[i]]), labels=r).logits.float()
        direct = torch.log_softmax(logits, -1)[0].gather(-1, r[0][:, None])[:, 0]
        assert torch.allclose(lp[i][b.action_mask[i].bool()], direct, atol=1e-4)
        assert float(lp[i][~b.action_mask[i].bool()].abs().sum()) == 0.0


@pytest.mark.parametrize("arch", ["t5", "llama"])
def test_transformers_engine_matches_the_learner(arch, t5_cfg, tiny_cfg):
    """The transformers generator's processed log-probs (T 0.7, top-p 0.9) are the learner's to
    float rounding; per-request seeds reproduce a prompt's samples whatever the batch; n samples
    of a prompt are adjacent and differ; a new version changes samples and the old one comes back
    byte for byte."""
    from rlhf_ray.actors.hf_rollout import TransformersGenerator
    from rlhf_ray.actors.learner import LearnerCore
    from rlhf_ray.batch import pad_samples
    from rlhf_ray.models import load_tokenizer, resolve_model_path

    cfg = _engine_cfg(t5_cfg) if arch == "t5" else load_config(None, [
        f"model.tiny_dir={tiny_cfg.model.tiny_dir}", "rollout.temperature=0.7", "rollout.top_p=0.9",
        "rollout.max_new_tokens=12", "learner.num_workers=1", "rollout.engine=transformers", "rollout.batch_rows=5"])
    path = resolve_model_path(cfg.model)
    tok = load_tokenizer(path)
    core = LearnerCore(cfg, path)
    gen = TransformersGenerator(cfg, path)
    v1 = _random_adapter(core, 1)
    assert gen.load_adapter(v1)["version"] == 1
    prompts = _prompts(tok) if arch == "t5" else [tok(t)["input_ids"] for t in
                                                   ("the film was", "overall the phone seemed", "the battery", "it")]
    s = gen.generate(prompts, seeds=[11, 12, 13, 14], n=2)
    assert s.prompt_index == [0, 0, 1, 1, 2, 2, 3, 3] and set(s.versions) == {1}
    assert any(s.response_ids[2 * i] != s.response_ids[2 * i + 1] for i in range(4))
    batch = pad_samples(s, tok.pad_token_id)
    old = core.evaluate(batch)["old_logprobs"]
    gap = float(((old - batch.behaviour_logprobs).abs() * batch.action_mask).max())
    assert gap < 1e-4, gap
    for i, r in enumerate(s.response_ids):
        ended = r[-1] == tok.eos_token_id
        assert s.finished[i] == ended and (ended or len(r) == cfg.rollout.max_new_tokens)
    alone = gen.generate(prompts[2:3], seeds=[13], n=2)  # another batch, same request
    assert alone.response_ids == s.response_ids[4:6]
    assert all(a == pytest.approx(b, abs=1e-5) for a, b in zip(alone.logprobs, s.logprobs[4:6]))
    gen.load_adapter(_random_adapter(core, 2, scale=0.5, seed=1))
    assert gen.generate(prompts, seeds=[11, 12, 13, 14], n=2).response_ids != s.response_ids
    gen.load_adapter(v1)
    assert gen.generate(prompts, seeds=[11, 12, 13, 14], n=2).response_ids == s.response_ids
    assert gen.adapter_state() == {"version": 1, "loaded_loras": 1, "adapter_dirs": 0}


def test_vllm_is_refused_for_an_encoder_decoder_policy(t5_cfg, t5_dir):
    from rlhf_ray.actors.hf_rollout import engine_kind

    assert engine_kind(t5_cfg, t5_dir) == "transformers"  # auto
    with pytest.raises(ConfigError, match="rollout.engine=vllm.*encoder-decoder"):
        engine_kind(load_config(None, ["rollout.engine=vllm"]), t5_dir)
    with pytest.raises(ConfigError, match="rollout.engine.*LoRA adapters only"):
        load_config(None, ["rollout.engine=transformers", "learner.method=ssf"])
    with pytest.raises(ConfigError, match="learner.method=ssf: the transformers engine"):
        engine_kind(load_config(None, ["learner.method=ssf"]), t5_dir)  # auto resolves to transformers


def test_seq2seq_sft_loss_is_the_models_own(t5_dir):
    from rlhf_ray.data.loaders import LoadReport
    from rlhf_ray.models import load_tokenizer
    from rlhf_ray.models.seq2seq import load_policy_lm
    from rlhf_ray.stages.sft import _lm_loss_sum, _tokens, encode

    tok, model = load_tokenizer(t5_dir), load_policy_lm(t5_dir).eval()
    records = [{"prompt": "summarize: anna: hi\nben: hello", "response": "anna and ben met."},
               {"prompt": "summarize: carl: lunch?", "response": "carl asks."}]
    rows = encode(records, tok, 64, LoadReport("x"))
    with torch.no_grad():
        total = float(_lm_loss_sum(model, rows, tok.pad_token_id))
        expected = 0.0
        for r in records:
            labels = torch.tensor([tok(r["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]])
            out = model(input_ids=torch.tensor([tok(r["prompt"])["input_ids"]]), labels=labels)
            expected += float(out.loss) * labels.shape[1]
    assert total == pytest.approx(expected, rel=1e-5)
    assert _tokens(rows) == sum(len(tok(r["response"], add_special_tokens=False)["input_ids"]) + 1 for r in records)


def test_rouge_judge_and_dialogue_task():
    from rlhf_ray.data import dialogue
    from rlhf_ray.data.task import JUDGES

    d = dialogue.dialogues(50)
    assert all(d_.facts["place"] not in dialogue.HELDOUT_PLACES for d_ in d)
    assert all(x.facts["place"] in dialogue.HELDOUT_PLACES for x in dialogue.dialogues(20, split="heldout"))
    rude = [x for x in d if x.rude]
    assert 0 < len(rude) < len(d) and all(dialogue.has_insult(x.dialogue) for x in rude)
    ref = {"summary": "anna and ben will meet at the cafe on friday at six."}
    same, other = JUDGES["rouge"](ref["summary"], ref), JUDGES["rouge"]("carl will study.", ref)
    assert same.score == pytest.approx(1.0) and set(same.parts) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    assert other.score < 0.3
    with pytest.raises(ValueError, match="no 'summary' column"):
        JUDGES["rouge"]("x", {"answer": "y"})
    recs = dialogue.classifier_records(200)
    assert {r["label"] for r in recs} == {0, 1}
    assert all(r["label"] == int(dialogue.has_insult(r["text"])) for r in recs)


def test_samsum_records_load_as_sft_and_prompts(tmp_path):
    import json

    from rlhf_ray.data.loaders import load_prompt_records, load_sft

    path = tmp_path / "samsum.jsonl"
    path.write_text(json.dumps({"id": "1", "dialogue": "anna: hi\nben: hello", "summary": "they greet."}) + "\n")
    sft, _ = load_sft(str(path), "sft.data_path", "error", dialogue_template="Summarize:\n{dialogue}\nSummary:")
    assert sft == [{"prompt": "Summarize:\nanna: hi\nben: hello\nSummary:", "response": "they greet."}]
    cfg = load_config(None, ["data.dialogue_template='dialogue: {dialogue}'"]).data
    (text, columns), = load_prompt_records(cfg, str(path))[0]
    assert text == "dialogue: anna: hi\nben: hello" and columns["summary"] == "they greet."
    with pytest.raises(ConfigError, match="dialogue_template"):
        load_config(None, ["data.dialogue_template=no_slot"])


def test_classifier_label_is_checked():
    from transformers import RobertaConfig

    from rlhf_ray.models.reward import class_index

    two = RobertaConfig(num_labels=2, id2label={0: "nothate", 1: "hate"})
    assert class_index(two, "nothate") == 0 and class_index(two, "1") == 1
    with pytest.raises(ValueError, match=r"reward.label is not set.*0=nothate, 1=hate"):
        class_index(two, None)
    with pytest.raises(ValueError, match=r"reward.label='polite': not a class"):
        class_index(two, "polite")
    assert class_index(RobertaConfig(num_labels=1), None) is None


@pytest.mark.integration
def test_t5_pipeline_sft_classifier_ppo(ray_head, t5_cfg):
    """SFT (full) raises ROUGE; the classifier learns the insults; PPO with LoRA on two learner
    workers and two transformers engines runs with 0 stale samples, a log-prob gap under 1e-4
    and the classifier reward and ROUGE in its evaluation."""
    import json

    from rlhf_ray.stages.rm import run_train_rm
    from rlhf_ray.stages.sft import run_sft
    from rlhf_ray.trainer import PPOTrainer

    cfg = load_config(ROOT / "configs" / "tiny_t5_cpu.yaml", [
        f"model.tiny_dir={t5_cfg.model.tiny_dir}", f"output.dir={t5_cfg.output.dir}", "sft.num_examples=600",
        "sft.epochs=2", "rm.num_pairs=400", "ppo.steps=3", "ppo.prompts_per_step=8", "learner.minibatch_prompts=4",
        "eval.num_prompts=8", "output.trackers=[jsonl]"])
    sft = run_sft(cfg, progress=False)
    assert sft["judge_after"]["judge_parts"]["rougeL"] > sft["judge_before"]["judge_parts"]["rougeL"] + 0.2
    rm = run_train_rm(cfg, progress=False)
    assert rm["kind"] == "classifier" and rm["heldout_after"]["accuracy"] > 0.8
    with PPOTrainer(cfg, progress=False, overwrite=True) as tr:
        assert tr.engine == "transformers"
        records = tr.run()
        summary = json.loads((tr.run_dir / "ppo.json").read_text())
    assert [r["stale_samples"] for r in records] == [0, 0, 0]
    assert max(r["logprob_gap"] for r in records) < 1e-4
    after = summary["eval"]["after"]
    assert set(after["judge_parts"]) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    assert summary["eval"]["before"]["reward_mean"] == pytest.approx(summary["eval"]["before"]["reward/model"]) \
        if "reward/model" in summary["eval"]["before"] else True
    assert summary["rollout_engine"] == "transformers" and summary["stale_samples"] == 0
