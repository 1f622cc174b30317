"""Loading base models, tokenizers and LoRA adapters: one path for a local directory,
a hub id, or the locally built tiny model."""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import LoraConfig, ModelConfig, first_line

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def resolve_model_path(cfg: ModelConfig) -> str:
    """The directory (or hub id) to load. With ``model.path`` unset, builds the tiny model."""
    if cfg.path is None:
        from .tiny import build_tiny_model

        # Absolute: Ray workers and jobs do not share the driver's working directory.
        return str(build_tiny_model(
            Path(cfg.tiny_dir).resolve(), layers=cfg.tiny_layers, hidden=cfg.tiny_hidden, heads=cfg.tiny_heads,
            vocab_size=cfg.tiny_vocab, max_positions=cfg.tiny_max_positions, seed=cfg.seed,
            corpus_name=cfg.tiny_corpus, arch=cfg.tiny_arch,
        ))
    return resolve_path(cfg.path, "model.path")


SHAPES_ONLY = Path(__file__).resolve().parents[2] / "configs" / "shapes_only"


def shape_path(cfg: ModelConfig) -> str:
    """A directory whose config.json has the model's architecture, for ``plan`` and
    ``--rehearse`` (which need no weights): model.path when it is local or a cached hub id,
    else the shipped ``configs/shapes_only/<hub id>`` if there is one."""
    if cfg.path is not None and not Path(cfg.path).expanduser().exists() and (SHAPES_ONLY / cfg.path / "config.json").is_file():
        import huggingface_hub

        cached = huggingface_hub.try_to_load_from_cache(cfg.path, "config.json")
        return str(Path(cached).parent) if isinstance(cached, str) else str(SHAPES_ONLY / cfg.path)
    return resolve_model_path(cfg)


def resolve_path(path: str, key: str) -> str:
    """A model directory (made absolute) or a hub id (checked: in the cache, or downloadable);
    FileNotFoundError naming ``key`` otherwise."""
    p = Path(path)
    looks_local = path.startswith((".", "/", "~")) or p.exists()
    if looks_local and not (p.expanduser() / "config.json").is_file():
        raise FileNotFoundError(f"{key}={path!r}: no config.json in that directory")
    if looks_local:
        return str(p.expanduser().resolve())
    check_hub_model(path, key)
    return path  # a hub id still: each node loads it from its own cache


def check_hub_model(name: str, key: str) -> None:
    """Raise a one-line FileNotFoundError unless the hub model ``name`` has its config.json in the
    local Hugging Face cache or downloadable (the weights come later, on each node)."""
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        # The cache first: a machine without the hub (and without HF_HUB_OFFLINE) would
        # otherwise wait out the download's retries (~25 s) on every check.
        if isinstance(huggingface_hub.try_to_load_from_cache(name, "config.json"), str):
            return
        huggingface_hub.hf_hub_download(name, "config.json")
        return
    except GatedRepoError:
        why = "gated: accept its licence on the hub and log in with `hf auth login`"
    except RepositoryNotFoundError:
        why = "no such repository, or a private one"
    except LocalEntryNotFoundError:
        why = ("offline: HF_HUB_OFFLINE is set" if huggingface_hub.constants.HF_HUB_OFFLINE
               else "the hub cannot be reached") + ", and config.json is not in the local cache"
    except Exception as e:  # an invalid repo id (HFValidationError), a network or HTTP error
        why = first_line(e)
    raise FileNotFoundError(
        f"{key}={name!r}: not a local directory, and the Hugging Face hub cannot provide it ({why}); download "
        f"it where the hub is reachable (`hf download {name} --local-dir DIR`) and set {key}=DIR")


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:  # Llama-2's tokenizer ships without one
        tok.pad_token = tok.eos_token
    return tok


def load_pretrained(auto_class, path: str, dtype: str = "float32", device: "torch.device | str | None" = None,
                    **kwargs):
    """``auto_class.from_pretrained`` in ``dtype``; on a GPU ``device`` loaded straight onto it
    (no full host-memory copy per process, which 8 ranks of a 7B model could not afford)."""
    if device is not None and torch.device(device).type != "cpu":
        kwargs["device_map"] = {"": str(device)}
    return auto_class.from_pretrained(path, dtype=torch_dtype(dtype), **kwargs)


def load_causal_lm(path: str, dtype: str = "float32", device: "torch.device | str | None" = None):
    from transformers import AutoModelForCausalLM

    return load_pretrained(AutoModelForCausalLM, path, dtype, device)


def peft_lora_config(cfg: LoraConfig, *, init_lora_weights: bool = True, task_type: str = "CAUSAL_LM"):
    """PEFT's LoraConfig for the policy. ``init_lora_weights=False`` gives a random
    (non-identity) adapter, which tests use to see that an adapter changes outputs.
    ``task_type="SEQ_CLS"`` (reward models) also trains and saves the score head."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        task_type=task_type,
        modules_to_save=["score"] if task_type == "SEQ_CLS" else None,
        init_lora_weights=init_lora_weights,
    )


def add_lora(model, cfg: LoraConfig, *, init_lora_weights: bool = True, task_type: str = "CAUSAL_LM"):
    from peft import get_peft_model

    return get_peft_model(model, peft_lora_config(cfg, init_lora_weights=init_lora_weights, task_type=task_type))
