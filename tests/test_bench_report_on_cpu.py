"""BENCHMARKS.md is generated from benchmarks/results/*.json (no measuring here)."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import report  # noqa: E402


def test_benchmarks_md_is_what_the_results_make():
    assert (ROOT / "BENCHMARKS.md").read_text() == report.render(), "out of date: run `rlhf-ray bench report`"


def test_each_result_names_its_date_commit_machine_and_goals(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({
        "benchmark": "x", "date": "2026-01-01T10:00:00", "git_commit": "abc1234+dirty",
        "machine": {"cpus": 2, "cpu_model": "CPU", "gpu": None},
        "results": {"targets": {"t": {"value": 2.0, "goal": ">= 1", "met": True},
                                "u": {"value": 0.5, "goal": ">= 1", "met": False}}},
        "table": "a  b"}))
    text = report.render(tmp_path)
    assert "abc1234 (uncommitted)" in text and "2 CPUs (CPU), no GPU" in text
    assert "| t | 2 | >= 1 | yes |" in text and "| u | 0.5 | >= 1 | NO |" in text and "| 1/2 |" in text
    assert "```\na  b\n```" in text


def test_bench_all_refuses_an_uncommitted_tree_unless_allowed(monkeypatch, capsys):
    from benchmarks import common

    from rlhf_ray import cli

    monkeypatch.setattr(common, "git_commit", lambda: "abc1234+dirty")
    ran = []
    monkeypatch.setattr(cli, "run_bench", lambda cfg, args, trainer=None: ran.append(args.name))
    monkeypatch.setattr(report, "write", lambda: "BENCHMARKS.md")
    assert cli.main(["bench", "all"]) == 1 and ran == []
    assert "uncommitted changes" in capsys.readouterr().err
    assert cli.main(["bench", "all", "--allow-dirty"]) == 0
    assert ran == cli.BENCH_ALL
