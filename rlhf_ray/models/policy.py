"""The learner's model: base + PEFT LoRA + a scalar value head, and the shared
log-prob computation used by the learner and the reference role alike."""
from __future__ import annotations

import torch
from torch import nn

from ..algo import logprobs_from_logits


def action_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  temperature: float = 1.0, output_hidden_states: bool = False):
    """Logits predicting tokens 1..seq-1: shape (batch, seq - 1, vocab), divided by the
    sampling temperature so they describe the distribution the generator sampled from."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=output_hidden_states)
    logits = out.logits[:, :-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    return logits, out


@torch.no_grad()
def sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """Log-probs of each next token under ``model``. Shape (batch, seq - 1)."""
    logits, _ = action_logits(model, input_ids, attention_mask, temperature)
    return logprobs_from_logits(logits, input_ids[:, 1:])


class PolicyWithValue(nn.Module):
    """``forward`` returns action logits (batch, seq-1, vocab) and values (batch, seq-1):
    the value at action index t is V of the state that token t+1 is generated from."""

    def __init__(self, peft_model, temperature: float = 1.0):
        super().__init__()
        self.policy = peft_model
        self.temperature = temperature
        hidden = peft_model.get_base_model().config.hidden_size
        self.value_head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        logits, out = action_logits(self.policy, input_ids, attention_mask, self.temperature,
                                    output_hidden_states=True)
        values = self.value_head(out.hidden_states[-1][:, :-1].float()).squeeze(-1)
        return logits, values
