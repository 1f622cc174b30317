"""Experiment trackers, without Ray: what a stage logs is read back from each tracker's own
files (TensorBoard's event reader, wandb's offline run file, MLflow's local file store) and
compared with the jsonl record it came from."""
import json
import math
import struct

import pytest

from rlhf_ray.config import ConfigError, load_config
from rlhf_ray.tracking import Trackers, check_trackers, flat_config, scalars

RECORDS = [
    {"loss": 2.5, "lr": 1e-3, "time_s": {"generate": 0.5, "train": 0.25}, "update_skipped": False,
     "generated_with_version": [0], "memory": {"rollout-0": {"pid": 123, "rss_bytes": 1e9, "node_id": "ab"}}},
    {"loss": 1.75, "lr": 9e-4, "time_s": {"generate": 0.4, "train": 0.2}, "update_skipped": True,
     "kl": float("nan"), "memory": {"rollout-0": {"pid": 123, "rss_bytes": 1.1e9, "node_id": "ab"}}},
]


def test_scalars_are_the_numeric_leaves_named_by_their_path():
    flat = scalars(RECORDS[1], "ppo")
    assert flat == {"ppo/loss": 1.75, "ppo/lr": 9e-4, "ppo/time_s/generate": 0.4, "ppo/time_s/train": 0.2,
                    "ppo/update_skipped": 1.0, "ppo/memory/rollout-0/rss_bytes": 1.1e9}
    assert flat_config({"a": {"b": [1, 2], "c": None, "d": 0.5}}) == {"a.b": "[1, 2]", "a.c": "null", "a.d": 0.5}


def test_unknown_or_missing_trackers_fail_naming_the_key(monkeypatch):
    with pytest.raises(ConfigError, match=r"output\.trackers.*'neptune'"):
        load_config(None, ["output.trackers=[jsonl,neptune]"])
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"output\.trackers: not installed here: wandb \(pip install"):
        check_trackers(["jsonl", "wandb"])


def _tensorboard_scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}, acc


def _wandb_records(run_file):
    """The records of a wandb offline run file (LevelDB log format: 32 KiB blocks of records,
    each with a 7-byte header of checksum, length, type), decoded with wandb's protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = run_file.read_bytes(), 32768
    pos, out, part = 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:
            pos += left
            continue
        part += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # a whole record, or the last piece of one
            rec = pb.Record()
            rec.ParseFromString(part)
            out.append(rec)
            part = b""
    return out


def test_every_tracker_holds_what_the_jsonl_file_holds(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(None, [f"output.dir={tmp_path}", "output.name=t", "ppo.clip_eps=0.3",
                             "output.trackers=[jsonl,tensorboard,wandb,mlflow]"])
    run_dir = cfg.output.run_dir
    tr = Trackers(cfg, "sft", run_dir, jsonl=run_dir / "sft_metrics.jsonl")
    assert tr.names == ["jsonl", "tensorboard", "wandb", "mlflow"]
    for step, rec in enumerate(RECORDS, 1):
        tr.log(rec, step)
    tr.log({"judge_score": 0.75, "examples": [{"prompt": "x"}], "label": "after"}, 2, prefix="eval")
    mlflow_run = tr._backends["mlflow"].run_id
    tr.close()

    lines = [json.loads(x) for x in (run_dir / "sft_metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 2] and lines[1]["loss"] == 1.75 and lines[2]["judge_score"] == 0.75
    expected: dict[str, list] = {}
    for line in lines:
        prefix = "eval" if "judge_score" in line else "sft"
        for k, v in scalars({k: v for k, v in line.items() if k != "step"}, prefix).items():
            expected.setdefault(k, []).append((line["step"], v))
    assert expected["sft/loss"] == [(1, 2.5), (2, 1.75)] and "sft/kl" not in expected

    tb, acc = _tensorboard_scalars(run_dir / "tensorboard" / "sft")
    assert tb.keys() == expected.keys()
    for k, v in expected.items():
        assert [s for s, _ in tb[k]] == [s for s, _ in v] and all(
            math.isclose(a, b, rel_tol=1e-6) for (_, a), (_, b) in zip(tb[k], v)), k
    assert "config/text_summary" in acc.Tags()["tensors"]  # the config, as text

    run_file = next((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    records = _wandb_records(run_file)
    history: dict[str, list] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for k, v in items.items():
                if not k.startswith("_"):
                    history.setdefault(k, []).append((items["_step"], v))
    assert history == expected
    config = {u.key or "/".join(u.nested_key): json.loads(u.value_json) for r in records if r.WhichOneof("record_type") == "run"
              for u in r.run.config.update}
    assert config["ppo"]["clip_eps"] == 0.3

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    run = client.get_run(mlflow_run)
    assert run.info.run_name == "t-sft" and run.data.params["ppo.clip_eps"] == "0.3"
    for k, v in expected.items():
        got = sorted((m.step, m.value) for m in client.get_metric_history(mlflow_run, k))
        assert len(got) == len(v) and all(s == t and math.isclose(a, b, rel_tol=1e-9)
                                          for (s, a), (t, b) in zip(got, v)), k


def test_a_failing_tracker_is_dropped_and_the_others_go_on(tmp_path, caplog):
    cfg = load_config(None, [f"output.dir={tmp_path}", "output.trackers=[jsonl,tensorboard]"])
    tr = Trackers(cfg, "ppo", cfg.output.run_dir, jsonl=cfg.output.run_dir / "m.jsonl")

    class Broken:
        def log(self, *a):
            raise OSError("disk full")

        def close(self):
            pass

    tr._backends["tensorboard"] = Broken()
    tr.log(RECORDS[0], 0)
    tr.log(RECORDS[1], 1)
    tr.close()
    assert len((cfg.output.run_dir / "m.jsonl").read_text().splitlines()) == 2
    assert sum("tracker tensorboard failed (OSError: disk full)" in r.message for r in caplog.records) == 1


def test_going_back_to_a_checkpoint_starts_the_trackers_over_there(tmp_path, monkeypatch):
    """Steps 0-3, back to the checkpoint of step 2, steps 2-3 again: TensorBoard shows one
    future (the abandoned steps purged), wandb gets a second run for the continuation."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = load_config(None, [f"output.dir={tmp_path}", "output.name=t", "output.trackers=[tensorboard,wandb]"])
    tr = Trackers(cfg, "ppo", cfg.output.run_dir)
    for step in range(4):
        tr.log({"reward_mean": float(step)}, step)
    tr.rewind(2)
    for step in (2, 3):
        tr.log({"reward_mean": 10.0 + step}, step)
    tr.close()
    tb, _ = _tensorboard_scalars(cfg.output.run_dir / "tensorboard" / "ppo")
    assert tb["ppo/reward_mean"] == [(0, 0.0), (1, 1.0), (2, 12.0), (3, 13.0)]
    runs = sorted((cfg.output.run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    names = [r.run.display_name for f in runs for r in _wandb_records(f) if r.WhichOneof("record_type") == "run"]
    assert sorted(set(names)) == ["t-ppo", "t-ppo-from-step-2"]
