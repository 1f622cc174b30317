"""Objective questions (rlhf_ray/data/objective.py): records in the four FewCLUE shapes asked as
questions, the label-match judge, accuracy per set, the generated task and the converter."""
import json
import subprocess
import sys

import pytest

from rlhf_ray.config import load_config
from rlhf_ray.data import objective
from rlhf_ray.data.objective import SHAPES, by_set, convert, generated_sets, label_match, question

# One record of each shape, as the published FewCLUE files hold them (invented text).
FEWCLUE = {
    "eprstmt": {"id": 7, "sentence": "做工很好，物流也快", "label": "Positive"},
    "tnews": {"label": "103", "label_desc": "news_sports", "sentence": "主队在加时赛中获胜", "keywords": ""},
    "ocnli": {"sentence1": "他买了三本书。", "sentence2": "他买了书。", "label": "entailment", "genre": "news"},
    "bustm": {"id": 1, "sentence1": "怎么修自行车", "sentence2": "自行车怎么修理", "label": "1"},
}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_fewclue_records_become_questions_with_their_label_word(name):
    text, answer = question(FEWCLUE[name], SHAPES[name])
    assert answer == {"eprstmt": "positive", "tnews": "sports", "ocnli": "yes", "bustm": "yes"}[name]
    for f in SHAPES[name].fields:
        assert FEWCLUE[name][f] in text
    assert text.endswith("answer:")


def test_label_words_and_template_are_the_users():
    shape = objective.shape_with(SHAPES["eprstmt"], {"Positive": "正面", "Negative": "负面"})
    text, answer = question(FEWCLUE["eprstmt"], shape, "评论：{sentence} 情感是{options}？答：")
    assert (text, answer) == ("评论：做工很好，物流也快 情感是正面, 负面？答：", "正面")
    assert label_match("正面。", {"answer": "正面"}).score == 1.0  # CJK words match too


def test_unlabelled_and_broken_records_are_counted_not_asked():
    records = [FEWCLUE["ocnli"], {**FEWCLUE["ocnli"], "label": "-"}, {"sentence1": "只有一句"},
               {**FEWCLUE["ocnli"], "label": "maybe"}]
    sft, prompts, counts = convert(records, "ocnli", SHAPES["ocnli"])
    assert counts == {"read": 4, "kept": 1, "missing_column": 1, "no_label": 2}
    assert sft == [{"prompt": prompts[0]["prompt"], "response": " yes"}] and prompts[0]["set"] == "ocnli"


def test_tnews_options_are_the_sets_own_labels():
    recs = [FEWCLUE["tnews"], {**FEWCLUE["tnews"], "label_desc": "news_tech"}]
    _, prompts, _ = convert(recs, "tnews", SHAPES["tnews"])
    assert "sports, tech" in prompts[0]["prompt"] and [p["answer"] for p in prompts] == ["sports", "tech"]


@pytest.mark.parametrize("response,score", [(" positive.", 1.0), ("Positive, clearly", 1.0), (" negative", 0.0),
                                            ("", 0.0), (" positively", 0.0), ("  ", 0.0)])
def test_label_match_takes_the_first_word(response, score):
    assert label_match(response, {"answer": "positive"}).score == score
    assert label_match(response, {}).score == 0.0  # no answer: never right


def test_accuracy_per_set():
    assert by_set([1.0, 0.0, 1.0, 1.0], [{"set": "a"}, {"set": "a"}, {"set": "b"}, {}]) == {
        "a": 0.5, "all": 1.0, "b": 1.0}


def test_generated_task_has_every_shape_and_holds_its_words_out():
    train, held = generated_sets(50, 0, "train"), generated_sets(50, 0, "heldout")
    for name, shape in SHAPES.items():
        for rec in train[name] + held[name]:
            question(rec, shape)  # every generated record is a well-formed record of its shape
    names = lambda recs: {r["sentence1"].split()[0] for r in recs}  # noqa: E731
    assert not names(train["ocnli"]) & names(held["ocnli"])
    prompts = objective.prompts(64, 0, "heldout")
    assert {c["set"] for _, c in prompts} == set(SHAPES) and all(c["answer"] for _, c in prompts)
    sft, asked = objective.sft_records(400, 0), objective.prompts(400, 0, "all")  # the same questions, in order
    assert [r["prompt"] for r in sft] == [p for p, _ in asked]
    right = sum(label_match(r["response"], c).score for r, (_, c) in zip(sft, asked)) / len(sft)
    assert 0.5 < right < 0.8  # the noisy demonstrator: room for PPO
    pairs = objective.preference_pairs(40, 0)
    assert all(p["chosen"] != p["rejected"] and p["margin"] == 1.0 for p in pairs)


def test_the_task_and_judge_are_config_choices():
    cfg = load_config(None, ["data.task=objective", "eval.judge=label_match", "model.tiny_corpus=objective"])
    assert (cfg.data.task, cfg.eval.judge, cfg.model.tiny_corpus) == ("objective", "label_match", "objective")


def test_objective_data_command(tmp_path):
    src = tmp_path / "bustm.json"
    src.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [FEWCLUE["bustm"], {"sentence1": "x"}]))
    cmd = [sys.executable, "-m", "rlhf_ray.cli", "objective-data", "--shape", "bustm", "--input", str(src),
           "--output", str(tmp_path / "out"), "--labels", "1=是,0=否"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "read 2, kept 1 (1 missing a column" in r.stdout
    rows = [json.loads(x) for x in (tmp_path / "out" / "bustm_prompts.jsonl").read_text().splitlines()]
    assert rows == [{"prompt": rows[0]["prompt"], "answer": "是", "set": "bustm"}]
    bad = subprocess.run(cmd + ["--template", "{sentence} ?"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--template" in bad.stderr and "{sentence1}" in bad.stderr


def test_report_has_accuracy_per_set_before_and_after():
    from rlhf_ray.report import _by_set_table

    judged = lambda a, b: {"judge_by_set": {"bustm": a, "ocnli": b}, "judge_sets_mean": (a + b) / 2}  # noqa: E731
    text = _by_set_table({"judge_before": judged(0.5, 0.25), "judge_after": judged(0.75, 0.5)},
                         {"eval": {"before": judged(0.7, 0.5), "after": judged(1.0, 0.5)}})
    lines = text.splitlines()
    assert lines[0] == "| set | before SFT | after SFT | before PPO | after PPO |"
    assert lines[2] == "| bustm | 50.0% | 75.0% | 70.0% | 100.0% |" and lines[-1].startswith("| mean over sets | 37.5%")
    assert _by_set_table({"judge_before": {"judge_score": 0.5}}, None) == ""  # no sets: no table
