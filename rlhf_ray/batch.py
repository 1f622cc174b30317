"""Typed carriers for one step's samples, understood by every role."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch


@dataclass
class Samples:
    """What the generators return: ragged lists, cheap to ship through Ray."""

    prompt_ids: list[list[int]] = field(default_factory=list)
    response_ids: list[list[int]] = field(default_factory=list)
    logprobs: list[list[float]] = field(default_factory=list)  # behaviour log-probs of response tokens
    versions: list[int] = field(default_factory=list)  # adapter version each sample came from
    finished: list[bool] = field(default_factory=list)  # ended with EOS/stop (False: cut at max_new_tokens)
    prompt_index: list[int] = field(default_factory=list)  # which prompt of the step; a prompt's samples are adjacent
    prompts: list[str] = field(default_factory=list)
    responses: list[str] = field(default_factory=list)
    columns: list[dict] = field(default_factory=list)  # the prompt record's other columns (answer, label...)
    where: list[str] = field(default_factory=list)  # which record the prompt came from, for messages
    compute_s: float = 0.0  # time inside the engine; parts made in parallel keep the longest

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def extend(self, other: "Samples") -> None:
        for name in self.__dataclass_fields__:
            if name == "compute_s":
                self.compute_s = max(self.compute_s, other.compute_s)
            else:
                getattr(self, name).extend(getattr(other, name))

    @property
    def num_response_tokens(self) -> int:
        return sum(len(r) for r in self.response_ids)

    def reordered(self, order: list[int]) -> "Samples":
        out = Samples(compute_s=self.compute_s)
        for name in self.__dataclass_fields__:
            if name != "compute_s":
                setattr(out, name, [getattr(self, name)[i] for i in order])
        return out

    @property
    def truncation_rate(self) -> float:
        return (len(self) - sum(self.finished)) / len(self) if len(self) else 0.0


@dataclass
class TokenBatch:
    """Right-padded tensors for a learner or reference forward pass.

    ``input_ids``/``attention_mask`` have shape (batch, seq). Everything per *action*
    has shape (batch, seq - 1): position t holds the prediction of token t + 1, so the
    response token at sequence index i sits at action index i - 1.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    action_mask: torch.Tensor  # float, 1 at response tokens
    behaviour_logprobs: torch.Tensor  # from the generator, 0 where action_mask is 0
    # filled in as the step goes on
    old_logprobs: Optional[torch.Tensor] = None
    ref_logprobs: Optional[torch.Tensor] = None
    old_values: Optional[torch.Tensor] = None
    advantages: Optional[torch.Tensor] = None
    returns: Optional[torch.Tensor] = None
    is_weights: Optional[torch.Tensor] = None  # truncated importance weights (ppo.tis_cap); None = off

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: slice | torch.Tensor) -> "TokenBatch":
        """Rows ``index`` of every tensor field."""
        out = {}
        for name in self.__dataclass_fields__:
            v = getattr(self, name)
            out[name] = v[index] if v is not None else None
        return TokenBatch(**out)

    def to(self, device) -> "TokenBatch":
        return TokenBatch(**{name: (v.to(device) if v is not None else None)
                             for name in self.__dataclass_fields__ for v in [getattr(self, name)]})

    def trimmed(self) -> "TokenBatch":
        """Without the right padding that only longer rows of the whole batch needed."""
        seq = int(self.attention_mask.sum(dim=1).max())
        out = {}
        for name in self.__dataclass_fields__:
            v = getattr(self, name)
            out[name] = None if v is None else (v[:, :seq] if v.shape[1] == self.input_ids.shape[1] else v[:, :seq - 1])
        return TokenBatch(**out)

    def micro_batches(self, size: int, device) -> Iterator["TokenBatch"]:
        """Consecutive slices of ``size`` rows, trimmed, on ``device``: what one forward sees."""
        for i in range(0, len(self), size):
            yield self.select(slice(i, i + size)).trimmed().to(device)

    def shard(self, rank: int, world: int) -> "TokenBatch":
        """Rank's contiguous equal share (the caller makes the batch divisible by ``world``)."""
        n = len(self) // world
        return self.select(slice(rank * n, (rank + 1) * n))


def to_action_width(x: torch.Tensor, width: int) -> torch.Tensor:
    """A trimmed micro-batch's per-action tensor back to the batch's width, as fp32 on the CPU
    (what roles return to the driver)."""
    x = x.detach().float().cpu()
    return torch.nn.functional.pad(x, (0, width - x.shape[1]))


def pad_samples(samples: Samples, pad_id: int) -> TokenBatch:
    """Lay out prompt + response ids right-padded, with masks aligned to actions."""
    seqs = [p + r for p, r in zip(samples.prompt_ids, samples.response_ids)]
    if not seqs:
        raise ValueError("no samples to pad")
    seq_len = max(len(s) for s in seqs)
    b = len(seqs)
    input_ids = torch.full((b, seq_len), pad_id, dtype=torch.long)
    attention = torch.zeros(b, seq_len, dtype=torch.long)
    action_mask = torch.zeros(b, seq_len - 1)
    behaviour = torch.zeros(b, seq_len - 1)
    for i, (p, r, lp) in enumerate(zip(samples.prompt_ids, samples.response_ids, samples.logprobs)):
        n = len(p) + len(r)
        input_ids[i, :n] = torch.tensor(p + r)
        attention[i, :n] = 1
        start = len(p) - 1
        action_mask[i, start:start + len(r)] = 1.0
        behaviour[i, start:start + len(r)] = torch.tensor(lp, dtype=torch.float32)
    return TokenBatch(input_ids, attention, action_mask, behaviour)
