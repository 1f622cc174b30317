"""Exact parameter counts of a model from its ``config.json`` alone: the model is built on
the meta device (no weights, no memory), so a 7B plan runs on a laptop, offline."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ModelShape:
    total_params: int
    lora_params: int  # trainable LoRA parameters for the configured rank and target modules
    lora_targets: int  # how many Linear modules the adapter wraps
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int
    # (last name, in, out) of every Linear layer but the output head: what any method's count needs
    linears: tuple[tuple[str, int, int], ...] = field(default=(), repr=False)

    def method_params(self, spec) -> int:
        """Trainable parameters of a fine-tuning method (``models.methods.MethodSpec``) on this
        model: every parameter for ``full``, else the method's own on its target layers."""
        from ..models.methods import method_params

        return self.total_params if spec.method == "full" else method_params(self.linears, spec)

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V of every layer for one token."""
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


def _config_path(model: str) -> Path:
    p = Path(model).expanduser()
    return p / "config.json" if p.is_dir() else p


def model_shape(model: str, lora_rank: int, target_modules: list[str]) -> ModelShape:
    """``model``: a model directory or its config.json.

    Raises:
        FileNotFoundError: no config.json there.
        ValueError: a LoRA target module that the model does not have.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    path = _config_path(model)
    if not path.is_file():
        raise FileNotFoundError(f"{model}: no config.json (the planner reads only the model's config.json)")
    config = AutoConfig.from_pretrained(str(path.parent))
    encdec = bool(getattr(config, "is_encoder_decoder", False))
    with torch.device("meta"):
        net = (AutoModelForSeq2SeqLM if encdec else AutoModelForCausalLM).from_config(config)
    total = sum(p.numel() for p in net.parameters())
    head, inputs = net.get_output_embeddings(), net.get_input_embeddings()
    if (encdec and json.loads(path.read_text()).get("tie_word_embeddings") is False and head is not None
            and head.weight is inputs.weight):
        # transformers 5 builds T5 with its output layer tied to the embedding, and unties it on
        # loading a checkpoint that holds both (Flan-T5 and every T5 v1.1 do): count the second copy.
        total += head.weight.numel()
    lora = targets = 0
    found: set[str] = set()
    linears = []
    for name, module in net.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.Linear) and leaf != "lm_head":
            linears.append((leaf, module.in_features, module.out_features))
        if isinstance(module, torch.nn.Linear) and leaf in target_modules:
            lora += lora_rank * (module.in_features + module.out_features)
            targets += 1
            found.add(leaf)
    missing = sorted(set(target_modules) - found)
    if missing:
        raise ValueError(f"lora.target_modules: {missing} are not Linear modules of {path}")
    heads = config.num_attention_heads
    return ModelShape(
        total_params=total, lora_params=lora, lora_targets=targets, layers=config.num_hidden_layers,
        hidden=config.hidden_size, intermediate=getattr(config, "intermediate_size", None) or getattr(config, "d_ff"),
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads, vocab=config.vocab_size,
        # T5's positions are relative: n_positions is the length it was trained at
        max_positions=getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 0),
        linears=tuple(linears))
