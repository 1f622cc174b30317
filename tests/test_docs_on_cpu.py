"""The docs stay true to the code: the generated config reference, the troubleshooting page's
errors, the README's size and links."""
import ast
import dataclasses
import re
from pathlib import Path

from rlhf_ray import config as C
from rlhf_ray import config_doc

ROOT = Path(__file__).resolve().parents[1]


def _all_keys() -> list[str]:
    out = []
    for name, cls in C._sections().items():
        for f in dataclasses.fields(cls):
            out.append(f"{name}.{f.name}")
            item = C._record_item(cls, f.name)
            if item is not None:
                out += [f"{name}.{f.name}[].{g.name}" for g in dataclasses.fields(item)]
    return out


def test_config_reference_is_current_and_explains_every_key():
    text = (ROOT / "docs" / "config-reference.md").read_text()
    assert text == config_doc.markdown(), "docs/config-reference.md is out of date: run `make docs`"
    documented = {k.key: k for k in config_doc.keys()}
    for key in _all_keys():
        assert f"| `{key}` |" in text, f"{key} is missing from docs/config-reference.md"
        assert len(documented[key].doc) >= 8, f"{key} has no comment in rlhf_ray/config.py"
    for old, new in C.RENAMED_KEYS.items():
        assert f"| `{old}` | `{new}` |" in text


def test_explain_reads_the_comment_beside_above_and_under_a_key():
    docs = {k.key: k for k in config_doc.keys("rollout")}
    assert docs["rollout.num_engines"].doc.startswith("generator actors")  # beside
    assert "Asynchronous rollouts" in docs["rollout.max_staleness"].doc  # the block above
    assert docs["rollout.kv_cache_mib"].doc.endswith("after weights and activations")  # continued under
    assert docs["rollout.kv_cache_mib"].unit == "MiB" and docs["rollout.kv_cache_mib"].type == "int or null"
    assert set(k.split(".")[0] for k in map(lambda d: d.key, config_doc.keys("ppo"))) == {"ppo"}
    assert "[guard]" in config_doc.explain("guard") and "guard.patience = 3  (int)" in config_doc.explain("guard")


def _string_constants() -> list[str]:
    """Every string literal in rlhf_ray, and the literal parts of every f-string."""
    out = []
    for path in (ROOT / "rlhf_ray").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                out.append(node.value)
    return out


def test_every_error_on_the_troubleshooting_page_is_one_the_code_prints():
    page = (ROOT / "docs" / "troubleshooting.md").read_text()
    fragments = re.findall(r"^### `(.+)`\s*$", page, flags=re.M)
    assert len(fragments) >= 10, "docs/troubleshooting.md lists too few errors"
    strings = _string_constants()
    for frag in fragments:
        assert any(frag in s for s in strings), f"docs/troubleshooting.md: no message in rlhf_ray contains {frag!r}"


def test_readme_is_short_and_its_links_exist():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    # No commit hashes: dated figures and history live in BENCHMARKS.md and CHANGELOG.md.
    hashes = re.findall(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b", readme)
    assert not hashes, f"README.md names commits {hashes}"
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", readme):
        assert (ROOT / target).exists(), f"README.md links to {target}, which does not exist"
