"""A small Llama and a BPE tokenizer built locally, with no hub access.

Both are saved with ``save_pretrained`` into one directory, which transformers, PEFT and
vLLM then load exactly as they would a downloaded model.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional

import torch

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
_MARKER = "rlhf_ray_tiny.json"


def build_tokenizer(texts: Iterable[str], vocab_size: int):
    """Byte-level BPE trained on ``texts``; prepends BOS like Llama's tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)


def build_tiny_model(
    out_dir: str | Path,
    *,
    layers: int = 2,
    hidden: int = 128,
    heads: int = 2,
    vocab_size: int = 512,
    max_positions: int = 256,
    seed: int = 0,
    texts: Optional[Iterable[str]] = None,
    like: Optional[str | Path] = None,
    corpus_name: str = "reviews",
) -> Path:
    """Build (or reuse, if built with the same settings) a tiny Llama + tokenizer in ``out_dir``.
    With ``like`` (a directory with a config.json, e.g. Llama-3.1-8B's shape facts), a tiny
    model of that family instead: its architecture, rotary settings and KV-head grouping,
    at this size.

    The weights are random: the model is a stand-in with the real architecture, so every
    code path (HF, PEFT, vLLM, LoRA hot swap) runs on it as on Llama-2-7B.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    from ..data import math_task, objective, synthetic

    out = Path(out_dir)
    settings = dict(layers=layers, hidden=hidden, heads=heads, vocab_size=vocab_size,
                    max_positions=max_positions, seed=seed, custom_texts=texts is not None,
                    **({"corpus": corpus_name} if corpus_name != "reviews" else {}),
                    like=json.loads((Path(like) / "config.json").read_text()) if like else None)
    marker = out / _MARKER
    if texts is None and marker.is_file() and json.loads(marker.read_text()) == settings:
        return out

    out.mkdir(parents=True, exist_ok=True)
    corpus = {"reviews": synthetic.corpus, "math": math_task.corpus, "objective": objective.corpus}[corpus_name]
    tokenizer = build_tokenizer(texts if texts is not None else corpus(seed=seed), vocab_size)
    tokenizer.model_max_length = max_positions
    sizes = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    if like is None:
        config = LlamaConfig(**sizes)
    else:
        config = AutoConfig.from_pretrained(str(like))
        # Keep the family's query/KV head ratio (grouped-query attention stays grouped).
        ratio = config.num_attention_heads // getattr(config, "num_key_value_heads", config.num_attention_heads)
        sizes["num_key_value_heads"] = max(1, heads // max(1, ratio))
        sizes["head_dim"] = hidden // heads
        for k, v in sizes.items():
            setattr(config, k, v)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    marker.write_text(json.dumps(settings))
    return out
