"""Issue #14, items 3, 6 and 7: chat templates (``data.chat_template``), data longer than the
limits (``data.over_long``) and the small held-out note, hub names for models and data sets
(offline: one line). The tiny tokenizer, with a small template set on it; no Ray, no models run."""
import json

import pytest

from rlhf_ray.config import ConfigError, load_config
from rlhf_ray.data import task
from rlhf_ray.data.loaders import (PLAIN, DataError, LoadReport, is_hub_name, load_preferences, load_prompts,
                                   load_sft, renderer)
from rlhf_ray.data.prompts import cut_left, prompt_set, tokenize_prompts
from rlhf_ray.models import load_tokenizer
from rlhf_ray.report import heldout_note, targets
from rlhf_ray.stages import rm, sft

# Writes the BOS token itself, as Llama's and many others do; the tiny tokenizer adds one too.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
CHAT = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "is the film good"},
        {"role": "assistant", "content": "it was great"}]


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _data(*overrides):
    return load_config(None, list(overrides)).data


@pytest.fixture
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


@pytest.fixture
def chat_tok(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    tok.chat_template = TEMPLATE
    return tok


# -- chat templates --------------------------------------------------------------------------
def test_message_records_use_the_tokenizers_template(tmp_path, chat_tok):
    render = renderer(_data(), chat_tok)
    (rec,), _ = load_sft(_jsonl(tmp_path / "sft.jsonl", [{"messages": CHAT}]), "sft.data_path", "skip", render=render)
    # The template's "<s>" is left out: the tokenizer adds the BOS itself.
    assert rec == {"prompt": "<|system|>be kind\n<|user|>is the film good\n<|assistant|>", "response": "it was great"}
    rejected = CHAT[:2] + [{"role": "assistant", "content": "it was dull"}]
    (pair,), _ = load_preferences(_jsonl(tmp_path / "p.jsonl", [{"chosen": CHAT, "rejected": rejected}]),
                                  "rm.data_path", "skip", render=render)
    assert pair["prompt"] == rec["prompt"] and (pair["chosen"], pair["rejected"]) == ("it was great", "it was dull")
    prompts = _jsonl(tmp_path / "prompts.jsonl", [{"messages": CHAT[:2]}, {"prompt": CHAT[1:2]},
                                                  {"prompt": "plain text stays"}])
    texts, _ = load_prompts(_data(), prompts, render=render)
    assert texts == [rec["prompt"], "<|user|>is the film good\n<|assistant|>", "plain text stays"]
    # The reward model reads what PPO's reward role will score: rendered prompt + reply, no end of turn.
    assert rm.reward_text(pair["prompt"], pair["chosen"]) == texts[0] + "it was great"


def test_auto_none_and_a_template_file(tmp_path, tok, chat_tok):
    assert renderer(_data(), tok) is PLAIN  # auto, and the tokenizer has no template
    assert renderer(_data("data.chat_template=none"), chat_tok) is PLAIN
    assert PLAIN.dialogue(CHAT, "messages") == ("\n\nSystem: be kind\n\nHuman: is the film good\n\nAssistant:",
                                                " it was great")
    assert PLAIN.prompt(CHAT[1:2], "prompt") == "\n\nHuman: is the film good\n\nAssistant:"
    f = tmp_path / "chat.jinja"
    f.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}[assistant]{% endif %}")
    render = renderer(_data(f"data.chat_template={f}"), chat_tok)  # the file wins over the tokenizer's own
    assert render.dialogue(CHAT, "messages") == ("[system] be kind [user] is the film good [assistant]",
                                                 "it was great")


def test_bad_template_file_is_a_config_error(tmp_path, tok):
    missing = tmp_path / "nope.jinja"
    with pytest.raises(ConfigError, match=rf"^data.chat_template='{missing}': cannot read the template file"):
        renderer(_data(f"data.chat_template={missing}"), tok)
    for body in ("{% for m in messages %}", "{{ raise_exception('roles must alternate') }}"):
        bad = tmp_path / "bad.jinja"
        bad.write_text(body)
        with pytest.raises(ConfigError, match=rf"^data.chat_template='{bad}': the chat template cannot render"):
            renderer(_data(f"data.chat_template={bad}"), tok)


def test_rendered_text_tokenizes_to_one_bos(chat_tok):
    bos = chat_tok.bos_token_id
    prompt = renderer(_data(), chat_tok).prompt(CHAT[1:2], "prompt")
    ids = chat_tok(prompt)["input_ids"]
    assert ids.count(bos) == 1 and ids[0] == bos
    assert chat_tok("<s>" + prompt)["input_ids"] == [bos] + ids  # what keeping the template's BOS would give


def test_bad_messages_are_bad_records(tmp_path, chat_tok):
    render = renderer(_data(), chat_tok)
    f = _jsonl(tmp_path / "p.jsonl", [{"messages": CHAT}, {"prompt": []}, {"prompt": "ok"}])
    texts, report = load_prompts(_data(), f, render=render)
    assert texts == ["ok"]
    assert report.first_problems == [f"{f}:1: the last message of 'messages' is the assistant's; a prompt ends "
                                     "with the user's turn", f"{f}:2: 'prompt' is not a non-empty list of messages"]


def test_generated_task_is_unchanged(tiny_cfg, chat_tok):
    """The default run's records are plain strings: no template, and the same token ids as before."""
    render = renderer(tiny_cfg.data, chat_tok)
    train, held, _ = rm.preference_data(tiny_cfg, render)
    assert train == task.preference_pairs(tiny_cfg.rm.num_pairs, tiny_cfg.rm.seed, "train")
    pairs = train[:50]
    report = LoadReport("generated task")
    enc = rm.encode(pairs, chat_tok, tiny_cfg.rm.max_seq_len, report, True, "truncate")
    assert [e[0] for e in enc] == [chat_tok(p["prompt"] + p["chosen"])["input_ids"] for p in pairs]
    assert not report.filtered and not report.dropped
    assert sft.sft_examples(tiny_cfg, render)[0] == task.sft_records(tiny_cfg.sft.num_examples, tiny_cfg.sft.seed)
    texts, ids = prompt_set(tiny_cfg.data, None, chat_tok, max_new_tokens=16, max_model_len=256)
    assert texts == [p.text for p in task.task_prompts(tiny_cfg.data.num_prompts, tiny_cfg.data.seed)]
    assert ids == [chat_tok(t)["input_ids"] for t in texts]


# -- over-long data --------------------------------------------------------------------------
def test_cut_left_keeps_bos_and_newest_tokens():
    assert cut_left([1, 10, 11, 12, 13], 3, bos_id=1) == [1, 12, 13]
    assert cut_left([10, 11, 12, 13], 3, bos_id=1) == [11, 12, 13]
    assert cut_left([1, 10, 11], 3, bos_id=1) == [1, 10, 11]
    assert cut_left([1, 10, 11], 1, bos_id=1) is None  # no room for a prompt token beside the BOS
    assert cut_left([10, 11], 0, bos_id=None) is None


def _ids(tok, text, special=True):
    return tok(text, add_special_tokens=special)["input_ids"]


def test_sft_truncates_the_prompt_from_the_left(tok):
    bos, eos = tok.bos_token_id, tok.eos_token_id
    long_prompt = "the film was good and the story was great. " * 6
    records = [{"prompt": long_prompt, "response": " great."}, {"prompt": "the film was", "response": " good." * 30},
               {"prompt": "the film was", "response": " good."}]
    p, r = _ids(tok, long_prompt), _ids(tok, " great.", False) + [eos]
    assert len(p) + len(r) > 24 and len(r) < 23
    report = LoadReport("x")
    out = sft.encode(records, tok, 24, report, "truncate")
    keep = 24 - len(r) - 1  # the BOS stays in front of the newest prompt tokens
    assert out[0] == ([bos] + p[-keep:] + r, [-100] * (keep + 1) + r)
    assert out[1] == (_ids(tok, "the film was") + _ids(tok, " good.", False) + [eos],
                      [-100] * len(_ids(tok, "the film was")) + _ids(tok, " good.", False) + [eos])
    assert len(out) == 2
    assert report.filtered == {"prompts cut from the left to fit sft.max_seq_len=24": 1}
    assert report.dropped == {"response too long for sft.max_seq_len=24": 1}
    # drop: the old behaviour (a prompt filling the limit drops its record, a long response is cut).
    report = LoadReport("x")
    out = sft.encode(records, tok, 24, report, "drop")
    assert len(out) == 2 and out[0][0] == (_ids(tok, "the film was") + _ids(tok, " good." * 30, False) + [eos])[:24]
    assert report.dropped == {"prompt longer than sft.max_seq_len=24": 1}


def test_rm_truncates_the_shared_prompt_so_both_replies_fit(tok):
    bos = tok.bos_token_id
    long_prompt = "the film was good and the story was great. " * 6
    pairs = [{"prompt": long_prompt, "chosen": " great.", "rejected": " awful and dull and bad.", "margin": 1.0},
             {"prompt": "the film was", "chosen": " good." * 40, "rejected": " bad.", "margin": None},
             {"prompt": "the film was", "chosen": " good.", "rejected": " bad.", "margin": None}]
    p = _ids(tok, long_prompt)
    c, r = _ids(tok, " great.", False), _ids(tok, " awful and dull and bad.", False)
    report = LoadReport("x")
    out = rm.encode(pairs, tok, 24, report, True, "truncate")
    keep = 24 - max(len(c), len(r)) - 1
    assert out[0] == ([bos] + p[-keep:] + c, [bos] + p[-keep:] + r, 1.0)
    assert len(out[0][1]) == 24
    assert out[1] == (_ids(tok, "the film was good."), _ids(tok, "the film was bad."), 0.0)  # joint, as before
    assert report.filtered == {"prompts cut from the left to fit rm.max_seq_len=24": 1}
    assert report.dropped == {"a reply too long for rm.max_seq_len=24": 1}
    report = LoadReport("x")
    assert len(rm.encode(pairs, tok, 24, report, True, "drop")) == 1
    assert report.dropped == {"longer than rm.max_seq_len=24": 2}


def test_ppo_prompts_truncate_or_drop(tmp_path, tok, caplog):
    caplog.set_level("INFO", logger="rlhf_ray")
    bos = tok.bos_token_id
    long = "the film was good and the story was great. " * 4
    full = _ids(tok, long)
    texts, ids = tokenize_prompts(["the film was", long], tok, max_prompt_tokens=8, max_new_tokens=4,
                                  max_model_len=256, source="s", over_long="truncate")
    assert ids == [_ids(tok, "the film was"), [bos] + full[-7:]]
    assert texts[1] == tok.decode(full[-7:])  # the reward model reads the prompt the policy saw
    report = LoadReport("s", kept=2)
    texts, ids = tokenize_prompts(["the film was", long], tok, max_prompt_tokens=8, max_new_tokens=4,
                                  max_model_len=256, source="s", over_long="drop", report=report)
    assert texts == ["the film was"] and report.kept == 1
    assert report.filtered == {"prompts over data.max_prompt_tokens=8, left out": 1}
    with pytest.raises(ValueError, match="s: every prompt is longer than data.max_prompt_tokens=8"):
        tokenize_prompts([long], tok, max_prompt_tokens=8, max_new_tokens=4, max_model_len=256, source="s",
                         over_long="drop")
    f = _jsonl(tmp_path / "p.jsonl", [{"prompt": "the film was"}, {"prompt": long}])
    prompt_set(_data("data.max_prompt_tokens=8"), f, tok, max_new_tokens=4, max_model_len=256)
    out = caplog.text
    assert "data.prompts_path: " in out and "1 prompts over data.max_prompt_tokens=8, cut from the left" in out


def test_small_heldout_sets_are_said_so():
    assert heldout_note(12, "pairs") == " (only 12 held-out pairs: too few to mean much)"
    assert heldout_note(49, "prompts") == " (only 49 held-out prompts: too few to mean much)"
    assert heldout_note(50, "pairs") == heldout_note(None, "pairs") == heldout_note(0, "examples") == ""
    ev = {"judge": "positive_sentiment", "judge_score": 0.5, "kl_per_seq": 0.1, "prompts": 8}
    rows = targets(None, {"heldout_after": {"accuracy": 0.95, "pairs": 12}},
                   {"eval": {"before": {**ev, "judge_score": 0.25}, "after": ev}, "kl_target": None}, None)
    assert rows[0]["value"] == "0.950 (only 12 held-out pairs: too few to mean much)"
    assert rows[1]["value"] == "+25.0 pp (25.0% -> 50.0%) (only 8 held-out prompts: too few to mean much)"
    rows = targets(None, {"heldout_after": {"accuracy": 0.95, "pairs": 100}}, None, None)
    assert rows[0]["value"] == "0.950"


# -- hub names -------------------------------------------------------------------------------
@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No hub and an empty cache. huggingface_hub and datasets read these variables when they
    are imported, which an earlier test may have done: their settings are set to match."""
    import datasets
    import huggingface_hub

    home = tmp_path / "hf_home"
    for var, value in {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_CACHE", str(home / "hub"), raising=False)


def test_hub_model_offline_is_one_line(offline):
    from rlhf_ray.models import resolve_model_path

    with pytest.raises(FileNotFoundError) as err:
        resolve_model_path(load_config(None, ["model.path=no-such-org/no-such-model"]).model)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg == ("model.path='no-such-org/no-such-model': not a local directory, and the Hugging Face hub cannot "
                   "provide it (offline: HF_HUB_OFFLINE is set, and config.json is not in the local cache); download "
                   "it where the hub is reachable (`hf download no-such-org/no-such-model --local-dir DIR`) and set "
                   "model.path=DIR")
    with pytest.raises(FileNotFoundError, match=r"^model.path='./no/such/dir': no config.json in that directory$"):
        resolve_model_path(load_config(None, ["model.path=./no/such/dir"]).model)


def test_hub_model_found_stays_a_hub_id(monkeypatch):
    import huggingface_hub

    from rlhf_ray.models import resolve_model_path

    asked = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name: asked.append((repo, name)) or "/x")
    assert resolve_model_path(load_config(None, ["model.path=org/model"]).model) == "org/model"
    assert asked == [("org/model", "config.json")]


def test_hub_dataset_offline_is_one_line(offline, tmp_path):
    with pytest.raises(DataError) as err:
        load_prompts(_data(), "no-such-org/no-such-set:test", "eval.prompts_path")
    assert str(err.value) == (
        "eval.prompts_path='no-such-org/no-such-set:test': not a local file or directory, and the `datasets` hub "
        "cannot provide it (offline: HF_DATASETS_OFFLINE or HF_HUB_OFFLINE is set, and it is not in the local "
        "cache); save it where the hub is reachable (`python -c \"import datasets; datasets.load_dataset("
        "'no-such-org/no-such-set', split='test').save_to_disk('DIR')\"`) and set eval.prompts_path=DIR")
    # Local paths keep their own errors.
    with pytest.raises(DataError, match=r"^sft.data_path='/nope.jsonl' does not exist$"):
        load_sft("/nope.jsonl", "sft.data_path", "skip")
    with pytest.raises(DataError, match=r"^rm.data_path='missing.jsonl' does not exist$"):
        load_preferences("missing.jsonl", "rm.data_path", "skip")


def test_hub_dataset_records_come_through_the_same_loader(monkeypatch):
    import datasets

    asked = []

    def fake(path, split, **extra):
        asked.append((path, split, *sorted(extra.items())))
        return datasets.Dataset.from_list([{"prompt": "the film was"}, {"prompt": ""}])

    monkeypatch.setattr(datasets, "load_dataset", fake)
    texts, report = load_prompts(_data(), "org/reviews")
    assert texts == ["the film was"] and asked == [("org/reviews", "train")]
    load_prompts(_data(), "Anthropic/hh-rlhf/harmless-base:test")  # a subset kept in a folder
    assert asked[-1] == ("Anthropic/hh-rlhf", "test", ("data_dir", "harmless-base"))
    load_prompts(_data(), "nyu-mll/glue@sst2:validation")
    assert asked[-1] == ("nyu-mll/glue", "validation", ("name", "sst2"))
    assert report.first_problems == ["org/reviews[record 1]: empty 'prompt'"]
    load_prompts(_data(), "imdb:test[:10]")
    assert asked[-1] == ("imdb", "test[:10]")


def test_what_counts_as_a_hub_name():
    for name in ("imdb", "Anthropic/hh-rlhf", "org/name:test", "stanfordnlp/sst2:validation[:50]",
                 "Anthropic/hh-rlhf/harmless-base:test", "nyu-mll/glue@sst2"):
        assert is_hub_name(name), name
    for path in ("./x", "/x/y", "~/x", "prompts.jsonl", "data/p.json", "org/name.jsonl:x", "a/b.jsonl@x", ""):
        assert not is_hub_name(path), path
