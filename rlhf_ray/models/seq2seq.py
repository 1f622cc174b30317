"""Encoder-decoder policies (T5, BART-style) in the decoder-only layout every role shares.

A sample is still prompt + response ids in one row of a ``TokenBatch``; here the prompt goes to
the encoder and the response to the decoder (after the model's decoder start token). The
decoder's hidden states are then put back where a decoder-only model would have them: the state
at sequence index ``t`` predicts token ``t + 1``. So the log-probs, values and entropies of
``models.policy`` (chunked logits, the sampling distribution, the value head) work unchanged.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch


def is_encoder_decoder(path: str) -> bool:
    """Whether the model at ``path`` (a directory with config.json, or a cached hub id) is an
    encoder-decoder model, as its config says."""
    p = Path(path) / "config.json"
    if p.is_file():
        return bool(json.loads(p.read_text()).get("is_encoder_decoder", False))
    from transformers import AutoConfig

    return bool(getattr(AutoConfig.from_pretrained(path), "is_encoder_decoder", False))


def load_policy_lm(path: str, dtype: str = "float32", device=None):
    """The policy's language model: ``AutoModelForSeq2SeqLM`` for an encoder-decoder config,
    else ``AutoModelForCausalLM``."""
    from .loading import load_causal_lm, load_pretrained

    if is_encoder_decoder(path):
        from transformers import AutoModelForSeq2SeqLM

        model = load_pretrained(AutoModelForSeq2SeqLM, path, dtype, device)
        # Checked once here, not per forward: the log-probs are hidden @ lm_head.weight.T, no bias.
        bias = getattr(model, "final_logits_bias", None)
        if bias is not None and bool(bias.abs().sum() > 0):
            raise ValueError(f"{path}: {type(model).__name__} has a non-zero final_logits_bias, which the "
                             "learner's log-probs do not add; not supported")
        return model
    return load_causal_lm(path, dtype, device)


def decoder_start_id(config) -> int:
    start = getattr(config, "decoder_start_token_id", None)
    if start is None:
        raise ValueError(f"{type(config).__name__}: no decoder_start_token_id in config.json")
    return int(start)


def split_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, action_mask: torch.Tensor,
               pad_id: int, start_id: int):
    """Encoder and decoder inputs of right-padded prompt + response rows.

    The prompt of a row ends where its action mask starts; a row with no action (left out of
    the loss) is all prompt. Returns (encoder ids, encoder mask, decoder ids = start + response,
    decoder mask, prompt lengths, response lengths)."""
    lengths = attention_mask.sum(dim=1)
    acts = action_mask.bool()
    has = acts.any(dim=1)
    first = acts.float().argmax(dim=1)
    plen = torch.where(has, first + 1, lengths)
    rlen = lengths - plen
    p_max, r_max = int(plen.max()), int(rlen.max())
    ar_p = torch.arange(p_max, device=input_ids.device)
    enc_mask = (ar_p[None] < plen[:, None]).long()
    enc_ids = torch.where(enc_mask.bool(), input_ids[:, :p_max], torch.full_like(input_ids[:, :p_max], pad_id))
    ar_r = torch.arange(r_max, device=input_ids.device)
    idx = (plen[:, None] + ar_r[None]).clamp(max=input_ids.shape[1] - 1)
    resp_mask = ar_r[None] < rlen[:, None]
    resp = torch.where(resp_mask, input_ids.gather(1, idx), torch.full_like(idx, pad_id))
    start = torch.full((len(input_ids), 1), start_id, dtype=input_ids.dtype, device=input_ids.device)
    dec_ids = torch.cat([start, resp], dim=1)
    dec_mask = torch.cat([torch.ones_like(start), resp_mask.long()], dim=1)
    return enc_ids, enc_mask, dec_ids, dec_mask, plen, rlen


def aligned_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   action_mask: torch.Tensor) -> torch.Tensor:
    """The decoder's last hidden states of an encoder-decoder ``model`` (transformers, PEFT
    layers injected or not) in the decoder-only layout: shape (batch, seq, hidden), the state
    that predicts response token j at the sequence index before it, zeros elsewhere. T5's
    rescaling before its output layer is applied, so ``hidden @ lm_head.weight.T`` are the
    model's logits (``load_policy_lm`` refuses a model with a logits bias)."""
    config = model.config
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    enc_ids, enc_mask, dec_ids, dec_mask, plen, rlen = split_rows(input_ids, attention_mask, action_mask, pad,
                                                                  decoder_start_id(config))
    enc = model.get_encoder()(input_ids=enc_ids, attention_mask=enc_mask).last_hidden_state
    dec = model.get_decoder()(input_ids=dec_ids, attention_mask=dec_mask, encoder_hidden_states=enc,
                              encoder_attention_mask=enc_mask, use_cache=False).last_hidden_state
    if getattr(config, "scale_decoder_outputs", False):
        dec = dec * (config.d_model ** -0.5)
    r_max = dec_ids.shape[1] - 1
    ar_r = torch.arange(r_max, device=input_ids.device)
    rows, js = (ar_r[None] < rlen[:, None]).nonzero(as_tuple=True)
    out = dec.new_zeros(input_ids.shape[0], input_ids.shape[1], dec.shape[-1])
    return out.index_put((rows, plen[rows] - 1 + js), dec[rows, js])
