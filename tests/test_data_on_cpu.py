"""The generated task, the judge, and the loaders' shapes and error paths (no Ray, no models)."""
import json
import re

import pytest

from rlhf_ray.config import load_config
from rlhf_ray.data import task
from rlhf_ray.data.loaders import DataError, load_preferences, load_prompts, load_sft
from rlhf_ray.data.prompts import load_prompt_texts


def _jsonl(path, lines):
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return path


# -- the task and its judge ------------------------------------------------------------------
def test_judge_wants_positive_fluent_text():
    assert task.judge(" great. the story was lovely and good.").score == 1.0
    assert task.judge(" awful. the story was dull and bad.").score == 0.0
    assert task.judge(" great. the story was dull and bad.").score == 0.0  # 1 positive vs 2 negative
    assert task.judge(" great. thestory was lovely.").score == 0.0  # a broken word
    assert task.judge(" great great <s>").score == 0.0
    assert task.judge("").score == 0.0


def test_preference_pairs_prefer_the_target_property():
    pairs = task.preference_pairs(400, seed=3)
    assert all(task.judge(p["chosen"]).score == 1.0 for p in pairs)
    assert all(task.judge(p["rejected"]).score == 0.0 for p in pairs)
    assert {p["margin"] for p in pairs} == {0.5, 1.0}
    assert all(p["chosen"] != p["rejected"] for p in pairs)


def test_heldout_subjects_never_reach_reward_model_or_ppo():
    held = set(task.HELDOUT_SUBJECTS)
    assert held and not held & set(task.TRAIN_SUBJECTS)
    words = lambda text: set(text.replace(".", " ").split())
    for p in task.task_prompts(300, split="train"):
        assert not words(p.text) & held
    for p in task.preference_pairs(300, split="train"):
        assert not words(p["prompt"]) & held
    assert all(p.subject in held for p in task.task_prompts(50, split="heldout"))


def test_sft_text_is_positive_about_half_the_time_and_follows_the_lead():
    recs = task.sft_records(2000, seed=1)
    rate = sum(task.judge(r["response"]).score for r in recs) / len(recs)
    assert 0.4 < rate < 0.6
    led = [r for r in recs if "." in r["prompt"]]  # prompts that start with a leaning sentence
    agree = [task.judge(r["prompt"].split(".")[0]).score == task.judge(r["response"]).score for r in led]
    assert len(led) > 1000 and 0.7 < sum(agree) / len(agree) < 0.9  # FOLLOW_LEAD = 0.8


# -- loaders ---------------------------------------------------------------------------------
def test_preferences_bad_records_are_counted_with_file_and_line(tmp_path):
    f = _jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "p", "chosen": " a", "rejected": " b", "margin": 2},
        "{not json",
        {"prompt": "p", "chosen": " a"},
        {"prompt": "p", "chosen": " same", "rejected": " same"},
        {"prompt": "p", "chosen": " a", "rejected": " b", "margin": "big"},
        "[1, 2]",
        {"prompt": "p", "chosen": " c", "rejected": " d"},
    ])
    pairs, report = load_preferences(str(f), "rm.data_path", "skip")
    assert [p["chosen"] for p in pairs] == [" a", " c"]
    assert pairs[0]["margin"] == 2.0 and pairs[1]["margin"] is None
    assert report.read == 7 and report.kept == 2 and sum(report.dropped.values()) == 5
    assert report.first_problems[0].startswith(f"{f}:2: not valid JSON")
    assert report.first_problems[1] == f"{f}:3: missing key 'rejected' (has ['chosen', 'prompt'])"
    assert f"{f}:4: chosen and rejected are identical" in report.first_problems
    assert "kept 2, dropped 5: " in report.summary() and "1 chosen and rejected are identical" in report.summary()
    with pytest.raises(DataError, match=f"{f}:2: not valid JSON"):
        load_preferences(str(f), "rm.data_path", "error")


def test_preferences_dialogue_and_message_shapes(tmp_path):
    hh = {"chosen": "\n\nHuman: is it good?\n\nAssistant: yes, very.",
          "rejected": "\n\nHuman: is it good?\n\nAssistant: no."}
    msgs = {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"}],
            "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go away"}]}
    mismatch = {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"}
    f = _jsonl(tmp_path / "hh.jsonl", [hh, msgs, mismatch])
    pairs, report = load_preferences(str(f), "rm.data_path", "skip")
    assert pairs[0] == {"prompt": "\n\nHuman: is it good?\n\nAssistant:", "chosen": " yes, very.",
                        "rejected": " no.", "margin": None}
    assert pairs[1]["prompt"] == "\n\nHuman: hi\n\nAssistant:" and pairs[1]["chosen"] == " hello!"
    assert report.kept == 2 and report.first_problems == [f"{f}:3: no 'prompt' key, and chosen and "
                                                          "rejected do not share a prompt"]


def test_datasets_directory_and_json_array(tmp_path):
    import datasets

    rows = task.preference_pairs(20)
    d = tmp_path / "prefs"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(d))
    pairs, report = load_preferences(str(d), "rm.data_path", "skip")
    assert len(pairs) == 20 and report.dropped == {}
    arr = tmp_path / "sft.json"
    arr.write_text(json.dumps([{"prompt": "p", "completion": " c"}, {"text": "whole text"}, {"prompt": "p"}]))
    recs, report = load_sft(str(arr), "sft.data_path", "skip")
    assert recs == [{"prompt": "p", "response": " c"}, {"prompt": "", "response": "whole text"}]
    assert report.first_problems == [f"{arr}[record 2]: missing key 'response' (has ['prompt'])"]


def test_sft_messages_and_all_bad(tmp_path):
    f = _jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"}]}])
    (rec,), _ = load_sft(str(f), "sft.data_path", "skip")
    assert rec == {"prompt": "\n\nSystem: be kind\n\nHuman: hi\n\nAssistant:", "response": " hello"}
    bad = _jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}, {"foo": 1}])
    with pytest.raises(DataError, match=r"sft.data_path=.*no usable records.*dropped 2: ") as e:
        load_sft(str(bad), "sft.data_path", "skip")
    assert f"{bad}:1: the last message of 'messages' is not the assistant's reply" in str(e.value)
    with pytest.raises(DataError, match="sft.data_path='/nope.jsonl' does not exist"):
        load_sft("/nope.jsonl", "sft.data_path", "skip")


def test_classification_set_becomes_prompts(tmp_path):
    f = _jsonl(tmp_path / "sst.jsonl", [
        {"sentence": "the acting was wooden and the plot dragged on", "label": 0},
        {"sentence": "a warm funny film", "label": 1},
        {"sentence": "dull from start to end", "label": 0},
        {"sentence": "", "label": 0},
        {"idx": 4, "label": 0},
    ])
    cfg = load_config(None, ["data.keep_labels=[0]", "data.prompt_words=4"]).data
    texts, report = load_prompts(cfg, str(f))
    assert texts == ["the acting was wooden", "dull from start to"]
    assert report.filtered == {"label not in data.keep_labels": 1}
    assert report.dropped == {"empty 'sentence'": 1, "no text column": 1}
    # The generated task is used when no path is given; the held-out split is its own.
    assert load_prompt_texts(cfg, None, num=3) == [p.text for p in task.task_prompts(3)]


def test_loader_config_is_checked():
    from rlhf_ray.config import ConfigError

    with pytest.raises(ConfigError, match="data.on_bad_record: must be 'skip' or 'error'"):
        load_config(None, ["data.on_bad_record=ignore"])
    with pytest.raises(ConfigError, match="sft.method: must be one of 'full', 'lora', 'dora', 'ia3', 'ssf'"):
        load_config(None, ["sft.method=qlora"])
    with pytest.raises(ConfigError, match="eval.judge: must be one of"):
        load_config(None, ["eval.judge=gpt4"])


def test_drops_are_printed_with_their_lines(tmp_path, caplog):
    caplog.set_level("INFO", logger="rlhf_ray")
    f = _jsonl(tmp_path / "p.jsonl", [{"prompt": "the film was"}, "oops", {"prompt": ""}])
    cfg = load_config(None, []).data
    assert load_prompt_texts(cfg, str(f)) == ["the film was"]
    out = caplog.text
    assert "data.prompts_path: " in out and "kept 1, dropped 2: 1 not valid JSON, 1 empty 'prompt'" in out
    assert f"{f}:2: not valid JSON" in out and f"{f}:3: empty 'prompt'" in out


def test_unreadable_text_is_a_bad_record_at_its_line(tmp_path):
    """Each of these ended the load with a UnicodeDecodeError, RecursionError, ValueError,
    OverflowError or TypeError naming no file, or (a lone surrogate) loaded and broke the tokenizer."""
    f = tmp_path / "mixed.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + b"\n".join([
        b'{"prompt": "p", "chosen": " a", "rejected": " b"}',  # after a byte-order mark: fine
        b'{"prompt": "caf\xe9", "chosen": " a", "rejected": " b"}',
        b"[" * 5000 + b"]" * 5000,
        b'{"prompt": "p", "chosen": " a", "rejected": " b", "margin": ' + b"9" * 5000 + b"}",
        b'{"prompt": "p", "chosen": " a", "rejected": " b", "margin": 1' + b"0" * 400 + b"}",
        b'{"prompt": "p\\ud800", "chosen": " a", "rejected": " b"}',
    ]) + b"\n")
    pairs, report = load_preferences(str(f), "rm.data_path", "skip")
    assert len(pairs) == 1 and report.read == 6
    problems = "\n".join(report.first_problems)
    assert f"{f}:2: not UTF-8 text (byte 0xe9 at character 16)" in problems
    assert f"{f}:3: not valid JSON (maximum recursion depth" in problems
    assert f"{f}:4: not valid JSON (Exceeds the limit (4300 digits)" in problems
    assert f"{f}:5: 'margin' is not a finite number: 1000" in problems
    assert f"{f}:6: 'prompt' is not valid Unicode ('\\ud800' at character 2)" in problems
    with pytest.raises(DataError, match=r"mixed\.jsonl:2: not UTF-8 text"):
        load_preferences(str(f), "rm.data_path", "error")
    roles = _jsonl(tmp_path / "roles.jsonl", [{"chosen": [{"role": ["user"], "content": "x"}], "rejected": []}])
    with pytest.raises(DataError, match=r"roles\.jsonl:1: chosen\[0\] is not a \{'role'"):
        load_preferences(str(roles), "rm.data_path", "error")
    arr = tmp_path / "latin1.json"
    arr.write_bytes(b'[\n{"text": "ok"},\n{"text": "caf\xe9"}]')
    with pytest.raises(DataError, match=r"latin1\.json:3: not UTF-8 text \(byte 0xe9\)"):
        load_sft(str(arr), "sft.data_path", "skip")


def test_blank_and_white_space_files_say_so(tmp_path):
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n \n\n")
    with pytest.raises(DataError, match=r"^sft.data_path='.*blank\.jsonl': holds no records \(blank lines only\)"):
        load_sft(str(blank), "sft.data_path", "skip")
    ws = tmp_path / "ws.json"
    ws.write_text("  \n")
    with pytest.raises(DataError, match=r"^rm.data_path='.*ws\.json': the file is empty \(white space only\)"):
        load_preferences(str(ws), "rm.data_path", "skip")


def test_files_are_read_whole_unless_the_user_caps_them(tmp_path, caplog):
    """num_prompts/num_examples/num_pairs size the generated data only: a user's 300 records all
    train, whatever they are; a cap is the user's own key, and the load report says what it left."""
    from rlhf_ray.data.prompts import prompt_records
    from rlhf_ray.stages.rm import preference_data
    from rlhf_ray.stages.sft import sft_examples

    caplog.set_level("INFO", logger="rlhf_ray")
    qa = _jsonl(tmp_path / "qa.jsonl", [{"question": f"q{i}?", "answer": f"{i} #### {i}"} for i in range(300)])
    pairs = _jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"p{i}", "chosen": " good", "rejected": " bad"}
                                              for i in range(300)])
    small = ["data.num_prompts=5", "sft.num_examples=5", "rm.num_pairs=5"]
    cfg = load_config(None, [*small, f"sft.data_path={qa}", f"rm.data_path={pairs}"])
    assert load_prompt_texts(cfg.data, str(qa)) == [f"q{i}?" for i in range(300)]
    assert len(sft_examples(cfg)[0]) == 300 and sft_examples(cfg)[0][7] == {"prompt": "q7?", "response": " 7 #### 7"}
    train, held, _ = preference_data(cfg)
    assert len(train) + len(held) == 300
    capped = load_config(None, [*small, "data.max_prompts=10", f"sft.data_path={qa}", "sft.max_examples=20"])
    assert len(load_prompt_texts(capped.data, str(qa), cap=capped.data.max_prompts)) == 10 and len(sft_examples(capped)[0]) == 20
    assert "read 300, kept 10, left out 290: 290 over the cap of 10" in caplog.text
    # Each prompt keeps its record's other columns, and where it came from, through the fitting.
    from rlhf_ray.models import load_tokenizer
    from rlhf_ray.models.tiny import build_tiny_model

    tok = load_tokenizer(str(build_tiny_model(tmp_path / "m")))
    ps = prompt_records(capped.data, str(qa), tok, cap=3, max_new_tokens=8, max_model_len=256)
    assert ps.columns == [{"answer": f"{i} #### {i}"} for i in range(3)] and ps.where == [f"{qa}:{i}" for i in (1, 2, 3)]


def test_the_math_task_and_its_judge():
    from rlhf_ray.data import math_task

    train, held = math_task.math_problems(200, 0, "train"), math_task.math_problems(50, 0, "heldout")
    assert all(p["question"].split()[0] not in math_task.HELDOUT_NAMES for p in train)
    assert all(p["question"].split()[0] in math_task.HELDOUT_NAMES for p in held)
    for p in train:
        a, b = (int(x) for x in re.findall(r"\d+", p["question"])[:2])
        assert p["answer"].endswith(f"#### {a + b if 'more' in p['question'] else a - b}")
    judge = task.JUDGES["exact_match"]
    assert judge(" 3 + 4 = 7. #### 7", {"answer": "3 + 4 = 7. #### 7"}).score == 1.0
    assert judge(" 3 + 4 = 7. #### 8", {"answer": "#### 7"}).score == 0.0
    assert judge(" the answer is 7", {"answer": "#### 7"}).score == 1.0  # no ####: the last number
    assert judge(" no number", {"answer": "#### 7"}).score == 0.0 and judge("7", {}).score == 0.0
    with pytest.raises(ValueError, match="data.task=math has no generated preference pairs"):
        from rlhf_ray.stages.rm import preference_data

        preference_data(load_config(None, ["data.task=math"]))
