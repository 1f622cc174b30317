"""Models: HF + PEFT loading, the tiny local model factory."""
from .loading import add_lora, load_causal_lm, load_tokenizer, peft_lora_config, resolve_model_path
from .tiny import build_tiny_model, build_tokenizer

__all__ = ["add_lora", "load_causal_lm", "load_tokenizer", "peft_lora_config", "resolve_model_path",
           "build_tiny_model", "build_tokenizer"]
