"""The rollout generator's samples, on the session's vLLM engine (no Ray): truncation flags,
several samples per prompt, per-request seeds."""
import dataclasses

import pytest

from rlhf_ray.actors.rollout import RolloutGenerator
from rlhf_ray.data.synthetic import corpus
from rlhf_ray.models import add_lora, load_causal_lm, load_tokenizer
from rlhf_ray.sync import extract_adapter

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def generator(tiny_cfg, tiny_model_dir, vllm_engine):
    cfg = dataclasses.replace(tiny_cfg, rollout=dataclasses.replace(tiny_cfg.rollout, max_new_tokens=32,
                                                                    temperature=1.3))
    gen = RolloutGenerator(cfg, tiny_model_dir, "test-gen", engine=vllm_engine)
    gen.load_adapter(extract_adapter(add_lora(load_causal_lm(tiny_model_dir), cfg.lora), 0))
    yield gen
    gen.shutdown()


@pytest.fixture(scope="module")
def prompts(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    return [tok(t.split(".")[0])["input_ids"] for t in corpus(64, seed=3)], tok


def test_truncation_flags_say_how_each_response_ended(generator, prompts):
    ids, tok = prompts
    s = generator.generate(ids, seeds=list(range(len(ids))), n=2)
    limit = generator.cfg.rollout.max_new_tokens
    for resp, done in zip(s.response_ids, s.finished):
        if done:  # ended by EOS, before or at the limit
            assert resp[-1] == tok.eos_token_id and len(resp) <= limit
        else:  # cut at the limit with no EOS
            assert len(resp) == limit and tok.eos_token_id not in resp
    # The untrained tiny model ends some responses and runs others into the limit.
    assert 0 < sum(s.finished) < len(s)
    assert s.truncation_rate == (len(s) - sum(s.finished)) / len(s)


def test_several_samples_of_one_prompt_differ_and_stay_together(generator, prompts):
    ids, _ = prompts
    s = generator.generate(ids[:8], seeds=list(range(8)), n=4)
    assert len(s) == 32 and s.prompt_index == [i for i in range(8) for _ in range(4)]
    for i in range(8):
        group = [tuple(r) for r, p in zip(s.response_ids, s.prompt_index) if p == i]
        assert all(tuple(s.prompt_ids[4 * i]) == tuple(ids[i]) for _ in group)
        assert len(set(group)) == 4, f"prompt {i}: identical samples {group}"


def test_a_request_seed_fixes_the_samples(generator, prompts):
    ids, _ = prompts
    a = generator.generate(ids[:6], seeds=[10, 11, 12, 13, 14, 15])
    # The same prompt with the same seed, asked in another batch and order, gets the same sample.
    b = generator.generate([ids[3], ids[0]], seeds=[13, 10])
    assert b.response_ids == [a.response_ids[3], a.response_ids[0]]
    c = generator.generate(ids[:6], seeds=[20, 21, 22, 23, 24, 25])
    assert c.response_ids != a.response_ids


def test_shutdown_stops_an_engine_it_built_and_its_child_processes(tiny_cfg, tiny_model_dir):
    """With the engine core in child processes (vLLM's default on a GPU), shutdown ends them:
    a killed generator's finalizer would not, and the card would stay held."""
    import psutil

    cfg = dataclasses.replace(tiny_cfg, rollout=dataclasses.replace(tiny_cfg.rollout, engine_in_process=False))
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    gen = RolloutGenerator(cfg, tiny_model_dir, "test-own-engine")
    # Python's multiprocessing resource tracker stays for the life of this process; it holds no card.
    engine_procs = [p for p in me.children(recursive=True)
                    if p.pid not in before and "resource_tracker" not in " ".join(p.cmdline())]
    assert engine_procs, "the engine core did not run in a child process"
    gen.shutdown()
    _, alive = psutil.wait_procs(engine_procs, timeout=30)
    assert not alive, f"engine processes left running: {[p.pid for p in alive]}"
