"""Bad input fails before any actor starts, as a ConfigError or DataError naming the file,
key or line (issue #12, item 6): generated configs and records thrown at the config loader and
the data loaders (Hypothesis, derandomized so CI sees the same examples every run), and the
model checks (vocabulary, LoRA targets, output directory) on the tiny model."""
import dataclasses
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhf_ray.config import Config, ConfigError, load_config
from rlhf_ray.data.loaders import DataError, load_preferences, load_prompts, load_sft

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_cpu.yaml"
SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(Config)}
KEYS = {name: [f.name for f in dataclasses.fields(cls)] for name, cls in SECTIONS.items()}


def _settings(n: int):
    # A load_config takes ~0.1 s on 2 slow cores (OmegaConf); the counts keep the file near 30 s.
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("inputs")


# -- generated configs ------------------------------------------------------------------------
# Text without surrogates: YAML cannot write them, and no config file can hold them.
text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
odd_text = st.sampled_from(["???", "${nosuch.key}", "${", "${oc.env:NO_SUCH_VAR_X}", "", " ", "a\x00b", "yes",
                            "1e999", "nan", "-inf", "[1", "{a: 1}", "~", "0x10", "é 好", "/", ".."])
huge = st.sampled_from([2 ** 63, -(2 ** 70), 10 ** 400, 2 ** 31, -1])
scalar = st.one_of(st.none(), st.booleans(), st.integers(), huge, st.floats(), text, odd_text)
value = st.one_of(scalar, st.lists(scalar, max_size=3), st.lists(st.lists(scalar, max_size=2), max_size=2),
                  st.dictionaries(text, scalar, max_size=2))
key_names = st.one_of(st.sampled_from(sorted({k for ks in KEYS.values() for k in ks})), text,
                      st.integers(), st.booleans())


@st.composite
def section_bodies(draw, name):
    known = st.sampled_from(KEYS[name]) if name in KEYS else key_names
    return draw(st.one_of(
        st.dictionaries(st.one_of(known, key_names), value, max_size=4),  # mostly a mapping
        st.dictionaries(known, value, max_size=3),
        value,  # a list or scalar where a mapping goes
    ))


@st.composite
def raw_configs(draw):
    names = draw(st.lists(st.one_of(st.sampled_from(list(SECTIONS)), key_names), max_size=4, unique_by=repr))
    return {n: draw(section_bodies(n)) for n in names}


def _override(draw_key, draw_value) -> str:
    return f"{draw_key}={draw_value}"


overrides = st.lists(st.one_of(
    st.builds(_override, st.sampled_from([f"{s}.{k}" for s, ks in KEYS.items() for k in ks]),
              st.one_of(text, odd_text, st.integers().map(str), st.floats().map(str), st.sampled_from(
                  ["[a, b]", "[[1]]", "{x: 1}", "null", "true", "[1", "2020-01-01", "9" * 5000]))),
    st.builds(_override, st.sampled_from(list(SECTIONS)), st.sampled_from(["3", "[1, 2]", "x", "null", "{}"])),
    text,  # anything at all, with or without '='
), max_size=3)


def _dump(raw) -> str:
    try:
        return yaml.safe_dump(raw, allow_unicode=True)
    except yaml.YAMLError:
        return yaml.safe_dump(repr(raw))  # a key YAML cannot write: the file is then a bare string


def _load_or_config_error(path, ovs):
    """The loaded Config, or None after a ConfigError that names where the problem is."""
    try:
        cfg = load_config(path, ovs)
    except ConfigError as e:
        msg = str(e)
        assert msg.strip(), "empty ConfigError"
        assert msg.startswith(str(path) if path is not None else "<defaults>"), msg
        assert msg.count(": ") >= 1, msg  # "<file>: <key or what>: <problem>"
        return None
    assert isinstance(cfg, Config)
    return cfg


@_settings(80)
@given(raw=raw_configs(), ovs=overrides)
def test_generated_configs_load_or_raise_config_error(scratch, raw, ovs):
    path = scratch / "generated.yaml"
    path.write_text(_dump(raw), encoding="utf-8")
    _load_or_config_error(path, ovs)


@_settings(25)
@given(content=st.one_of(st.binary(max_size=60), text.map(str.encode),
                         st.sampled_from([b"\xff\xfe\x00", b"ppo: [1, 2\n", b"a: &x [*x]\n",
                                          b"ppo:\n  x: !!python/tuple [1]\n",
                                          b"ppo: {steps: 1}\nppo: {steps: 2}\n", b"? [a]\n: 1\n",
                                          b"ppo:\n  steps: " + b"9" * 5000 + b"\n", b"\xef\xbb\xbfppo: {steps: 3}\n"])))
def test_arbitrary_config_bytes_raise_config_error(scratch, content):
    path = scratch / "bytes.yaml"
    path.write_bytes(content)
    _load_or_config_error(path, [])


@_settings(20)
@given(name=st.sampled_from(list(SECTIONS)),
       body=st.one_of(st.lists(scalar, max_size=3), st.integers(), st.floats(allow_nan=False), text, st.booleans()))
def test_section_not_a_mapping_names_file_and_section(scratch, name, body):
    path = scratch / "section.yaml"
    path.write_text(_dump({name: body}), encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: {name}: must be a mapping of {name}'s keys"), err.value
    ov = f"{name}={json.dumps(body)}"
    with pytest.raises(ConfigError) as err:
        load_config(None, [ov])
    assert f"override {ov!r}: {name}:" in str(err.value), err.value


# Valid values per key, and the value load_config must then hold.
VALID = {
    "ppo.clip_eps": st.floats(0.01, 1.0), "ppo.gamma": st.floats(0.0, 1.0), "ppo.steps": st.integers(1, 10 ** 6),
    "ppo.kl_target": st.one_of(st.none(), st.floats(0.1, 100.0)), "ppo.estimator": st.sampled_from(["gae"]),
    "lora.rank": st.integers(1, 16), "lora.alpha": st.floats(0.5, 64.0),
    "lora.target_modules": st.lists(st.sampled_from(["q_proj", "k_proj", "v_proj", "o_proj"]), min_size=1, max_size=4),
    "rollout.temperature": st.floats(0.1, 2.0), "rollout.top_k": st.integers(0, 100),
    "data.seed": st.integers(0, 2 ** 31 - 1),
    "data.keep_labels": st.one_of(st.none(), st.lists(st.text("abc01 ", max_size=4), max_size=2)),
    "output.name": st.text("abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=10),
    "cluster.address": st.one_of(st.none(), st.sampled_from(["auto", "127.0.0.1:6379"])),
}


@_settings(30)
@given(picked=st.fixed_dictionaries({}, optional=VALID), empty=st.lists(st.sampled_from(list(SECTIONS)), max_size=2))
def test_valid_generated_configs_load_with_their_values(scratch, picked, empty):
    raw: dict = {name: None for name in empty}  # a section with every key commented out
    for dotted, v in picked.items():
        section, key = dotted.split(".")
        raw[section] = {**(raw.get(section) or {}), key: v}
    path = scratch / "valid.yaml"
    path.write_text(_dump(raw), encoding="utf-8")
    cfg = load_config(path)
    for dotted, v in picked.items():
        section, key = dotted.split(".")
        assert getattr(getattr(cfg, section), key) == v, dotted


# -- generated records ------------------------------------------------------------------------
json_value = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
                          lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                          max_leaves=8)
message = st.fixed_dictionaries({}, optional={"role": st.one_of(st.sampled_from(["user", "assistant", "system", "gpt",
                                                                                 "bot"]), json_value),
                                              "content": st.one_of(st.text(max_size=10), json_value)})
field_value = st.one_of(st.text(max_size=12), st.sampled_from(["", " ", "\ud800x", "same"]), json_value,
                        st.lists(message, max_size=3), huge, st.floats())
record = st.one_of(
    st.fixed_dictionaries({}, optional={k: field_value for k in (
        "prompt", "response", "completion", "text", "messages", "chosen", "rejected", "margin", "sentence", "label")}),
    json_value,
)


def _line(rec) -> bytes:
    return json.dumps(rec).encode("utf-8", "surrogatepass")  # NaN/Infinity written as JSON's extensions


lines = st.lists(st.one_of(record.map(_line), st.binary(max_size=12), st.sampled_from(
    [b"", b"   ", b"{not json", b"\xff\xfe", b"[" * 2000, b'{"prompt": ' + b"9" * 5000 + b"}", b"\xef\xbb\xbf{}"])),
    max_size=6)


def _write_records(scratch: Path, body: list[bytes], as_array: bool) -> Path:
    if as_array:
        path = scratch / "records.json"
        path.write_bytes(b"[" + b",".join(body) + b"]" if body else b"")
    else:
        path = scratch / "records.jsonl"
        path.write_bytes(b"\n".join(body))
    return path


def _load(which: str, path: Path, on_bad: str, data_cfg):
    if which == "sft":
        return load_sft(str(path), "sft.data_path", on_bad)
    if which == "preferences":
        return load_preferences(str(path), "rm.data_path", on_bad)
    return load_prompts(dataclasses.replace(data_cfg, on_bad_record=on_bad), str(path))


DATA_CFGS = [load_config(None, ovs).data for ovs in (
    [], ["data.keep_labels=[0, neg]"], ["data.text_field=sentence", "data.prompt_words=2"], ["data.label_field=x"])]


@_settings(200)
@given(body=lines, as_array=st.booleans(), which=st.sampled_from(["sft", "preferences", "prompts"]),
       on_bad=st.sampled_from(["skip", "error"]), data_cfg=st.sampled_from(DATA_CFGS))
def test_generated_records_load_or_raise_data_error(scratch, body, as_array, which, on_bad, data_cfg):
    if as_array:  # a .json array holds values, not lines of bytes: keep the ones that are JSON
        body = [b for b in body if _is_json(b)]
    path = _write_records(scratch, body, as_array)
    try:
        out, report = _load(which, path, on_bad, data_cfg)
    except DataError as e:
        assert str(e).strip() and str(path) in str(e), e
        return
    assert out and report.kept == len(out)
    for item in out:  # what is kept is what the stages expect, text a tokenizer accepts
        texts = [item] if which == "prompts" else [item[k] for k in item if k != "margin"]
        assert all(isinstance(t, str) and t.encode("utf-8") is not None for t in texts), item
        if which == "preferences":
            assert item["margin"] is None or math.isfinite(item["margin"])


def _is_json(b: bytes) -> bool:
    try:
        json.loads(b.decode("utf-8"))
        return True
    except (ValueError, RecursionError):
        return False


@_settings(30)
@given(good=st.integers(0, 4), blanks=st.integers(0, 2),
       bad=st.sampled_from([b"{not json", b"\xff\xfe", b'{"prompt": 3}', b"[1]", b'{"prompt": ""}',
                            b'{"prompt": "\\udc80"}']))
def test_first_bad_record_is_named_by_its_line(scratch, good, bad, blanks):
    body = [b'{"prompt": "the film was", "response": " good."}'] * good + [b""] * blanks + [bad]
    path = _write_records(scratch, body, as_array=False)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:{good + blanks + 1}: "):
        load_sft(str(path), "sft.data_path", "error")


def test_empty_and_blank_files_name_key_and_file(scratch):
    for name, content, what in [("empty.jsonl", b"", "the file is empty"),
                                ("blank.jsonl", b"\n  \n\n", "holds no records"),
                                ("blank.json", b" \n", "the file is empty")]:
        path = scratch / name
        path.write_bytes(content)
        for which in ("sft", "preferences", "prompts"):
            with pytest.raises(DataError, match=what) as err:
                _load(which, path, "skip", DATA_CFGS[0])
            assert str(path) in str(err.value)


# -- model, tokenizer and output directory -----------------------------------------------------
@pytest.fixture(scope="module")
def model_cfg(tiny_model_dir, tmp_path_factory):
    def make(*overrides):
        return load_config(TINY, [f"model.path={tiny_model_dir}", f"output.dir={tmp_path_factory.mktemp('out')}",
                                  *overrides])
    return make


def test_tiny_model_passes_and_output_dir_is_created(model_cfg, tiny_model_dir, tmp_path):
    from rlhf_ray.models import load_tokenizer
    from rlhf_ray.models.checks import check_inputs

    out = tmp_path / "new" / "runs"
    cfg = model_cfg(f"output.dir={out}", "lora.target_modules=[self_attn.q_proj, v_proj, down_proj]")
    check_inputs(cfg, tiny_model_dir, load_tokenizer(tiny_model_dir))
    assert out.is_dir() and not list(out.iterdir())  # the probe file is gone


def test_tokenizer_larger_than_embedding_names_both(model_cfg, tiny_model_dir, tmp_path):
    from rlhf_ray.models import load_tokenizer
    from rlhf_ray.models.checks import check_inputs

    tok = load_tokenizer(tiny_model_dir)
    rows = len(tok)
    tok.add_tokens([f"<extra_{i}>" for i in range(3)])
    tok.save_pretrained(tmp_path / "tok")
    other = load_tokenizer(str(tmp_path / "tok"))
    with pytest.raises(ConfigError) as err:
        check_inputs(model_cfg(), tiny_model_dir, other, key="ppo.base")
    msg = str(err.value)
    assert msg.startswith("ppo.base: ") and f"{rows + 3} tokens" in msg and f"vocab_size={rows}" in msg, msg
    assert str(tmp_path / "tok") in msg and tiny_model_dir in msg, msg


def test_lora_targets_absent_from_the_model(model_cfg, tiny_model_dir):
    from rlhf_ray.models import load_tokenizer
    from rlhf_ray.models.checks import check_inputs

    tok = load_tokenizer(tiny_model_dir)
    # PEFT would train q_proj alone without a word about the typo; a block (self_attn) is no linear layer.
    for targets, missing in [("[q_proj, qproj]", "['qproj']"),
                             ("[self_attn, all-linear]", "['self_attn', 'all-linear']")]:
        with pytest.raises(ConfigError) as err:
            check_inputs(model_cfg(f"lora.target_modules={targets}"), tiny_model_dir, tok)
        msg = str(err.value)
        assert msg.startswith(f"lora.target_modules: {missing} match no linear layer"), msg
        assert "'q_proj'" in msg and "'down_proj'" in msg and tiny_model_dir in msg, msg
    # Without an adapter method (sft.method=full) the targets are not used, so not checked.
    check_inputs(model_cfg("lora.target_modules=[nosuch]"), tiny_model_dir, tok, lora=False)


def test_output_dir_not_writable(model_cfg, tiny_model_dir, tmp_path):
    from rlhf_ray.models import load_tokenizer
    from rlhf_ray.models.checks import check_inputs

    blocker = tmp_path / "a_file"
    blocker.write_text("")  # a file where a directory must go: fails for root too, unlike chmod
    tok = load_tokenizer(tiny_model_dir)
    with pytest.raises(ConfigError, match=rf"^output\.dir='{re.escape(str(blocker))}/runs': not a writable directory"):
        check_inputs(model_cfg(f"output.dir={blocker}/runs"), tiny_model_dir, tok)
    with pytest.raises(ConfigError, match=rf"^sft\.output_dir='{re.escape(str(blocker))}': not a writable directory"):
        check_inputs(model_cfg(), tiny_model_dir, tok, outputs=[("sft.output_dir", str(blocker))])


def test_reward_model_vocab_is_checked_against_its_own_tokenizer(model_cfg, tiny_model_dir, untrained_rm, tmp_path):
    from rlhf_ray.models import load_tokenizer
    from rlhf_ray.models.checks import check_inputs

    tok = load_tokenizer(tiny_model_dir)
    check_inputs(model_cfg(), tiny_model_dir, tok, reward_path=untrained_rm)
    check_inputs(model_cfg(), tiny_model_dir, tok, reward_path=None)  # rules and functions alone: no model
    bad = tmp_path / "rm"
    shutil.copytree(untrained_rm, bad)
    rm_tok = load_tokenizer(str(bad))
    rm_tok.add_tokens(["<extra>"])
    rm_tok.save_pretrained(bad)
    with pytest.raises(ConfigError, match=r"^reward.path: the tokenizer at .* has \d+ tokens"):
        check_inputs(model_cfg(), tiny_model_dir, tok, reward_path=str(bad))


@pytest.mark.parametrize("stage,overrides", [
    ("sft", ["sft.method=lora", "lora.target_modules=[q_proj, nosuch]"]),
    ("rm", ["rm.base=model", "rm.method=lora", "lora.target_modules=[lm_head]"]),  # a reward model has a score head
    ("sft", ["output.dir=/dev/null/runs"]),
    ("sft", ["sft.method=ssf", "peft.target_modules=[q_proj, nosuch]"]),  # named peft.target_modules
])
def test_stages_check_before_starting_ray(model_cfg, monkeypatch, stage, overrides):
    from rlhf_ray.stages import rm, sft

    module = {"sft": sft, "rm": rm}[stage]

    def no_ray(*_, **__):
        raise AssertionError("the stage reached Ray Train: its local checks passed")

    monkeypatch.setattr(module, "train_stage", no_ray)
    cfg = model_cfg("sft.num_examples=40", "rm.num_pairs=40", *overrides)
    run = sft.run_sft if stage == "sft" else rm.run_train_rm
    with pytest.raises(ConfigError):
        run(cfg, progress=False)
