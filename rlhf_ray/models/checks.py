"""Checks of a run's model, tokenizer and output directory that need no weights, made on the
driver before any Ray actor or worker starts: each failure would otherwise surface minutes
later inside a vLLM engine, a PEFT call on a worker, or the first save, naming no setting."""
from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path
from typing import Sequence

from ..config import Config, ConfigError

# The layers PEFT wraps with LoRA and vLLM serves it on; transformers' Conv1D is GPT-2's linear.
_LINEAR_TYPES = ("Linear", "Conv1D")


def check_inputs(cfg: Config, model_path: str, tokenizer, *, key: str = "model.path", lora: bool = True,
                 targets: Sequence[str] | None = None, targets_key: str = "lora.target_modules",
                 head: str = "causal_lm", reward_path: str | None = None,
                 outputs: Sequence[tuple[str, str | Path]] = ()) -> None:
    """Raise :class:`ConfigError` if ``output.dir`` (or another ``(key, dir)`` of ``outputs``)
    is not writable, a tracker of ``output.trackers`` is not installed, ``tokenizer`` has more tokens than ``model_path``'s embedding has rows,
    or (``lora``: an adapter method) an entry of ``targets`` (default ``lora.target_modules``; the
    setting ``targets_key``) matches no linear layer of the model with
    ``head`` (``causal_lm`` or ``seq_cls``). ``key`` is the setting that chose ``model_path``.
    ``reward_path`` (a reward model; None: the reward uses none) is checked against its own
    tokenizer: the reward role reads the policy's decoded text and tokenizes it again."""
    check_writable("output.dir", cfg.output.dir)
    from ..tracking import check_trackers

    check_trackers(cfg.output.trackers)
    for out_key, path in outputs:
        check_writable(out_key, path)
    config = model_config(model_path, key)
    check_vocab(config, model_path, tokenizer, key)
    if lora:
        check_lora_targets(config, model_path, cfg.lora.target_modules if targets is None else targets, key, head,
                           targets_key)
    if reward_path is not None:
        from .loading import load_tokenizer

        try:
            reward_tokenizer = load_tokenizer(reward_path)
        except (OSError, ValueError) as e:
            raise ConfigError(f"reward.path={reward_path!r}: cannot load its tokenizer ({_first_line(e)})") from None
        reward_config = model_config(reward_path, "reward.path")
        check_vocab(reward_config, reward_path, reward_tokenizer, "reward.path")
        from .reward import class_index

        try:
            class_index(reward_config, cfg.reward.label)
        except ValueError as e:
            raise ConfigError(f"{e} (reward model at {reward_path})") from None


def check_writable(key: str, path: str | Path) -> None:
    """Create ``path`` if needed and write (then remove) a file in it."""
    p = Path(path).expanduser()
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=p, prefix=".rlhf_ray_write_check_")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        where = f" ({e.filename})" if e.filename and str(e.filename) != str(p) else ""
        raise ConfigError(f"{key}={str(path)!r}: not a writable directory: {e.strerror or e}{where}") from None


def model_config(model_path: str, key: str):
    """The model's ``config.json`` as a transformers config (no weights read)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError, KeyError) as e:  # missing file, unknown model_type, bad JSON
        raise ConfigError(f"{key}: cannot read the model config at {model_path} ({_first_line(e)})") from None


def check_vocab(config, model_path: str, tokenizer, key: str) -> None:
    """A token id at or past the embedding's rows fails only when some sample first holds it
    (an index error inside a forward, or garbage from a vLLM engine); more rows than tokens
    is normal (vocabularies padded to a multiple of 64)."""
    rows = getattr(config.get_text_config(), "vocab_size", None)
    if rows is None:
        return  # an architecture that does not say; its loading will
    n = len(tokenizer)
    if n > rows:
        tok_path = getattr(tokenizer, "name_or_path", "") or "(in memory)"
        raise ConfigError(
            f"{key}: the tokenizer at {tok_path} has {n} tokens but the model at {model_path} has vocab_size="
            f"{rows} embedding rows: token ids {rows}..{n - 1} have no embedding; "
            "use the tokenizer saved with the model")


def linear_modules(config, head: str = "causal_lm") -> list[str]:
    """Dotted names of the model's linear layers, from a build on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    with torch.device("meta"):
        if head == "seq_cls":
            config = copy.deepcopy(config)  # the caller's config stays as read
            config.num_labels = 1
            net = AutoModelForSequenceClassification.from_config(config)
        elif getattr(config, "is_encoder_decoder", False):
            from transformers import AutoModelForSeq2SeqLM

            net = AutoModelForSeq2SeqLM.from_config(config)
        else:
            net = AutoModelForCausalLM.from_config(config)
    return [name for name, m in net.named_modules()
            if isinstance(m, torch.nn.Linear) or type(m).__name__ in _LINEAR_TYPES]


def check_lora_targets(config, model_path: str, targets: Sequence[str], key: str, head: str = "causal_lm",
                       targets_key: str = "lora.target_modules") -> None:
    """Every entry must match a linear layer the way PEFT matches a list: the module's full
    name, or a suffix of it after a dot (``q_proj``, ``self_attn.q_proj``). PEFT itself raises
    only on the worker, and only if no entry at all matches; one unmatched entry of several
    is silently ignored there and the adapter is smaller than configured."""
    names = linear_modules(config, head)
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ConfigError(f"{targets_key}: {missing} match no linear layer of the model at {model_path} "
                          f"({key}); its linear layers are {leaves}")


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
