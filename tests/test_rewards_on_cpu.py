"""Reward components in the reward role's own class (no Ray: a role class is a plain class):
user functions by file and by module, weights and the mix with a reward model, None scores, a
function that raises or hangs, the remote reward against a server this test starts, and the
checks made before any actor starts."""
from __future__ import annotations

import json
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from rlhf_ray.actors.reward import RewardScorer
from rlhf_ray.config import ConfigError, load_config
from rlhf_ray.rewards import (RewardError, check_reward_functions, combine, component_metrics, load_function,
                              post_scores)

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Ann has 2 pens and gets 3 more. How many pens does Ann have?",
           "Ben has 7 cups and gives away 4. How many cups are left?"]
RESPONSES = [" 2 + 3 = 5. #### 5", " 7 - 4 = 2. #### 2"]
COLUMNS = [{"answer": "2 + 3 = 5. #### 5"}, {"answer": "7 - 4 = 3. #### 3"}]


def _cfg(*overrides):
    return load_config(None, ["reward.timeout_s=2", "reward.retries=1", *overrides])


def _file(tmp_path, body: str, name: str = "my_reward.py") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(body))
    return p


def test_the_shipped_math_function_scores_by_the_answer_column():
    cfg = _cfg(f"reward.functions=[{ROOT}/examples/rewards/math_answer.py:reward]")
    scorer = RewardScorer(cfg, None, check_reward_functions(cfg, COLUMNS))
    total, parts, _ = scorer.score_timed(PROMPTS, RESPONSES, COLUMNS, step=0)
    assert parts == {"reward": [1.0, 0.0]} and total == [1.0, 0.0]
    # A record without an answer is not scored: None, counted apart, 0 in the sum.
    total, parts, _ = scorer.score_timed(PROMPTS, RESPONSES, [COLUMNS[0], {"answer": None}], step=0)
    assert parts["reward"] == [1.0, None] and total == [1.0, 0.0]
    assert component_metrics(parts) == {"reward/reward": 1.0, "reward/reward/unscored": 1.0}


def test_function_by_module_weights_and_names(tmp_path, monkeypatch):
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "scores.py").write_text("def length(prompts, responses):\n    return [len(r) for r in responses]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    f = _file(tmp_path, "def one(responses, **columns):\n    return [1.0] * len(responses)\n")
    cfg = _cfg(f"reward.functions=[{{path: mypkg.scores:length, weight: 0.5}}, {{path: {f}:one, weight: -2, name: bias}}]")
    scorer = RewardScorer(cfg, None, check_reward_functions(cfg, COLUMNS))
    total, parts, _ = scorer.score_timed(PROMPTS, RESPONSES, COLUMNS, step=3)
    assert list(parts) == ["length", "bias"]
    assert total == [0.5 * len(r) - 2.0 for r in RESPONSES]
    sys.modules.pop("mypkg.scores", None)
    sys.modules.pop("mypkg", None)


def test_functions_mix_with_a_reward_model(untrained_rm, tmp_path):
    f = _file(tmp_path, "def bonus(prompts, responses):\n    return [10.0 if '5' in r else 0.0 for r in responses]\n")
    alone = RewardScorer(_cfg(f"reward.path={untrained_rm}"), untrained_rm)
    model = alone.score(PROMPTS, RESPONSES)
    cfg = _cfg(f"reward.path={untrained_rm}", "reward.model_weight=0.5", f"reward.functions=[{f}:bonus]")
    mixed = RewardScorer(cfg, untrained_rm, check_reward_functions(cfg, COLUMNS))
    total, parts, _ = mixed.score_timed(PROMPTS, RESPONSES, COLUMNS)
    assert parts["model"] == pytest.approx(model, rel=1e-6) and parts["bonus"] == [10.0, 0.0]
    assert total == pytest.approx([0.5 * model[0] + 10.0, 0.5 * model[1]], rel=1e-6)
    assert cfg.reward.uses_model and not _cfg(f"reward.functions=[{f}:bonus]").reward.uses_model


def test_a_raising_function_names_itself_the_step_and_the_record(tmp_path):
    f = _file(tmp_path, """
        def picky(prompts, responses, answer):
            return [1 / 0 if int(a.split('####')[1]) == 3 else 1.0 for a in answer]
    """)
    cfg = _cfg(f"reward.functions=[{f}:picky]")
    scorer = RewardScorer(cfg, None, check_reward_functions(cfg, COLUMNS))
    with pytest.raises(RewardError, match=r"reward function 'picky' at step 7 on data.jsonl:12 .*Ben has 7 cups.*"
                                          r"ZeroDivisionError"):
        scorer.score(PROMPTS, RESPONSES, COLUMNS, step=7, where=["data.jsonl:11", "data.jsonl:12"])


def test_a_hanging_function_is_stopped_by_the_timeout(tmp_path):
    f = _file(tmp_path, "import time\ndef slow(prompts, responses):\n    time.sleep(30)\n")
    cfg = _cfg(f"reward.functions=[{f}:slow]", "reward.timeout_s=0.5")
    scorer = RewardScorer(cfg, None, check_reward_functions(cfg, COLUMNS))
    t = time.monotonic()
    with pytest.raises(RewardError, match=r"'slow' at step 2: no answer within reward.timeout_s=0.5"):
        scorer.score(PROMPTS, RESPONSES, COLUMNS, step=2)
    assert time.monotonic() - t < 5


@pytest.mark.parametrize("body, message", [
    ("def f(prompts, responses):\n    return [1.0]\n", "returned 1 scores for 2 responses"),
    ("def f(prompts, responses):\n    return ['a', 1]\n", "returned 'a' for response 0"),
    ("def f(prompts, responses):\n    return [float('nan'), 1]\n", "not a finite number"),
    ("def f(prompts, responses):\n    return 1.0\n", "returned float, not a list"),
])
def test_a_bad_answer_is_an_error(tmp_path, body, message):
    cfg = _cfg(f"reward.functions=[{_file(tmp_path, body)}:f]")
    with pytest.raises(RewardError, match=message):
        RewardScorer(cfg, None).score(PROMPTS, RESPONSES, COLUMNS)


def test_bad_functions_fail_before_any_actor_starts(tmp_path):
    f = _file(tmp_path, "def needs_label(prompts, responses, label):\n    return [0.0] * len(responses)\n")
    cases = [
        (f"{tmp_path}/absent.py:f", r"reward.functions\[0\].path=.*no file"),
        (f"{f}:missing", r"no function 'missing' in .*my_reward.py \(it has \['needs_label'\]\)"),
        ("no_such_module_here:f", r"cannot import 'no_such_module_here'"),
        (f"{f}:needs_label", r"'needs_label' needs \['label'\], which the prompt records do not have"),
        (f"{_file(tmp_path, 'raise RuntimeError(1)', 'broken.py')}:f", r"the file raised RuntimeError when loaded"),
    ]
    for target, message in cases:
        with pytest.raises(ConfigError, match=message):
            check_reward_functions(_cfg(f"reward.functions=[{target}]"), COLUMNS)
    with pytest.raises(ConfigError, match=r"functions\[0\].path: 'x.py' is not 'file.py:function'"):
        _cfg("reward.functions=[x.py]")


def test_a_function_file_runs_from_its_text_where_the_file_is_absent(tmp_path):
    """What a reward actor on another node does: the driver read the file, the actor runs the text."""
    f = _file(tmp_path, "def two(prompts, responses):\n    return [2.0] * len(responses)\n")
    source = f.read_text()
    f.unlink()
    assert load_function(f"{f}:two", "reward.functions[0].path", source)(PROMPTS, RESPONSES) == [2.0, 2.0]


class _Server:
    """A scorer on 127.0.0.1 (a free port): answers per ``mode``, counting requests."""

    def __init__(self):
        self.mode, self.requests, self.bodies = "ok", 0, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                outer.requests += 1
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.bodies.append(body)
                if outer.mode == "500" or (outer.mode == "flaky" and outer.requests == 1):
                    self.send_response(500)
                    self.end_headers()
                    self.wfile.write(b"model not loaded")
                    return
                if outer.mode == "slow":
                    time.sleep(3)
                out = json.dumps({"scores": [float(len(r)) for r in body["responses"]]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/score"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def test_remote_reward_posts_batches_with_columns(server):
    cfg = _cfg(f"reward.url={server.url}", "reward.url_weight=2")
    total, parts, _ = RewardScorer(cfg, None).score_timed(PROMPTS, RESPONSES, COLUMNS, step=0)
    assert parts == {"remote": [float(len(r)) for r in RESPONSES]} and total == [2.0 * len(r) for r in RESPONSES]
    assert server.bodies[0] == {"prompts": PROMPTS, "responses": RESPONSES,
                                "columns": {"answer": [c["answer"] for c in COLUMNS]}}


def test_remote_reward_retries_a_500_then_reports_status_and_body(server):
    server.mode = "flaky"  # one 500, then an answer: the retry gets it
    assert post_scores(server.url, PROMPTS, RESPONSES, COLUMNS, timeout_s=2, retries=2, step=0,
                       backoff_s=0.01) == [float(len(r)) for r in RESPONSES]
    server.mode, server.requests = "500", 0
    with pytest.raises(RewardError, match=r"step 4: failed after 3 attempt\(s\); last: HTTP 500 .*'model not loaded'"):
        post_scores(server.url, PROMPTS, RESPONSES, COLUMNS, timeout_s=2, retries=2, step=4, backoff_s=0.01)
    assert server.requests == 3


def test_remote_reward_timeout(server):
    server.mode = "slow"
    with pytest.raises(RewardError, match=r"failed after 2 attempt\(s\); last: no answer within reward.timeout_s=0.5"):
        post_scores(server.url, PROMPTS, RESPONSES, COLUMNS, timeout_s=0.5, retries=1, step=1, backoff_s=0.01)


def test_combine_counts_none_as_zero():
    parts = {"a": [1.0, None, 3.0], "b": [None, None, 1.0]}
    assert combine(parts, {"a": 2.0, "b": -1.0}) == [2.0, 0.0, 5.0]
    assert component_metrics(parts) == {"reward/a": 2.0, "reward/a/unscored": 1.0, "reward/b": 1.0,
                                         "reward/b/unscored": 2.0}


@pytest.mark.integration
def test_a_function_error_in_a_reward_actor_reaches_the_driver_as_itself(tmp_path):
    """Through a real actor: the driver gets the RewardError (function, step, record), not a
    role failure that Ray Train or the role restarts would retry."""
    import ray

    from rlhf_ray.launch import call

    f = _file(tmp_path, "def bad(prompts, responses):\n    raise KeyError('answer')\n")
    cfg = _cfg(f"reward.functions=[{f}:bad]")
    actor = ray.remote(RewardScorer).options(num_cpus=0).remote(cfg, None, check_reward_functions(cfg, COLUMNS))
    try:
        with pytest.raises(RewardError, match=r"reward function 'bad' at step 5 on a.jsonl:1 .*KeyError: 'answer'"):
            call("reward", actor.score_timed.remote(PROMPTS, RESPONSES, COLUMNS, step=5,
                                                    where=["a.jsonl:1", "a.jsonl:2"]), 60)
    finally:
        ray.kill(actor)
