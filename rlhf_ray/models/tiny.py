"""A small Llama and a BPE tokenizer built locally, with no hub access.

Both are saved with ``save_pretrained`` into one directory, which transformers, PEFT and
vLLM then load exactly as they would a downloaded model.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional

import torch

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
_MARKER = "rlhf_ray_tiny.json"


def build_tokenizer(texts: Iterable[str], vocab_size: int, *, style: str = "llama"):
    """Byte-level BPE trained on ``texts``; prepends BOS like Llama's tokenizer, or with
    ``style="t5"`` appends EOS and has no BOS (pad 0, EOS 1, unk 2), like T5's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    t5 = style == "t5"
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, EOS, UNK] if t5 else [PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    if t5:
        tok.post_processor = processors.TemplateProcessing(
            single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, tok.token_to_id(EOS))])
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, unk_token=UNK)
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
    arch: str = "llama",
) -> Path:
    """Build (or reuse, if built with the same settings) a tiny Llama + tokenizer in ``out_dir``.
    With ``like`` (a directory with a config.json, e.g. Llama-3.1-8B's shape facts), a tiny
    model of that family instead: its architecture, rotary settings and KV-head grouping,
    at this size.

    The weights are random: the model is a stand-in with the real architecture, so every
    code path (HF, PEFT, vLLM, LoRA hot swap) runs on it as on Llama-2-7B. ``arch="t5"``: an
    encoder-decoder T5 (Flan-T5's v1.1 layout: gated-GELU, untied output layer) instead.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    from ..data import dialogue, math_task, objective, synthetic

    out = Path(out_dir)
    settings = dict(layers=layers, hidden=hidden, heads=heads, vocab_size=vocab_size,
                    max_positions=max_positions, seed=seed, custom_texts=texts is not None,
                    **({"corpus": corpus_name} if corpus_name != "reviews" else {}),
                    **({"arch": arch} if arch != "llama" else {}),
                    like=json.loads((Path(like) / "config.json").read_text()) if like else None)
    marker = out / _MARKER
    if texts is None and marker.is_file() and json.loads(marker.read_text()) == settings:
        return out

    out.mkdir(parents=True, exist_ok=True)
    corpus = {"reviews": synthetic.corpus, "math": math_task.corpus, "objective": objective.corpus,
              "dialogue": dialogue.corpus}[corpus_name]
    tokenizer = build_tokenizer(texts if texts is not None else corpus(seed=seed), vocab_size, style=arch)
    tokenizer.model_max_length = max_positions
    if arch == "t5":
        _save_t5(out, tokenizer, layers=layers, hidden=hidden, heads=heads, seed=seed)
        marker.write_text(json.dumps(settings))
        return out
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


def _save_t5(out: Path, tokenizer, *, layers: int, hidden: int, heads: int, seed: int) -> None:
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=len(tokenizer), d_model=hidden, d_kv=hidden // heads, d_ff=hidden * 2, num_layers=layers,
        num_decoder_layers=layers, num_heads=heads, relative_attention_num_buckets=16,
        relative_attention_max_distance=64, feed_forward_proj="gated-gelu", dropout_rate=0.0,
        tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id, torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(config)
    with torch.no_grad():  # an untied output layer at T5's init gives logits of std ~sqrt(d_model); start near 1
        model.lm_head.weight.mul_(hidden ** -0.5)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
