"""Reward role: scores prompt + response text in batches with every reward component of the
run (a reward model, a rule, user functions, a remote scorer; see ``rlhf_ray/rewards.py``)."""
from __future__ import annotations

import time
from typing import Optional

import torch

from ..config import Config
from ..devices import role_device
from ..logs import redirect_output
from ..rewards import Component, Score, call_function, combine, load_function, post_scores
from ..telemetry import MemorySampler


def reward_components(cfg: Config, reward_path: Optional[str]) -> list[Component]:
    """The run's reward components, in the order they are logged."""
    r = cfg.reward
    out = []
    if reward_path is not None:
        out.append(Component("model", "model", r.model_weight, reward_path))
    if r.rule is not None:
        out.append(Component(r.rule, "rule", 1.0, r.rule))
    for f in r.functions:
        out.append(Component(f.label, "function", f.weight, f.path))
    if r.url is not None:
        out.append(Component("remote", "remote", r.url_weight, r.url))
    return out


class RewardScorer:
    role = "reward"

    def __init__(self, cfg: Config, reward_path: Optional[str], sources: Optional[dict[str, str]] = None):
        """``sources``: the text of each function file, read by the driver (see ``read_source``)."""
        redirect_output(self.role)  # before vLLM / transformers print anything
        torch.set_num_threads(1)
        self.cfg = cfg
        self.memory = MemorySampler()
        self.components = reward_components(cfg, reward_path)
        self.weights = {c.name: c.weight for c in self.components}
        self.functions = {}
        for i, c in enumerate(self.components):
            if c.kind == "rule":
                from ..rules import RULES

                self.functions[c.name] = _pairwise(RULES[c.target])
            elif c.kind == "function":
                self.functions[c.name] = load_function(c.target, f"reward.functions[{i}].path",
                                                       (sources or {}).get(c.target))
        self.model = None
        if reward_path is not None:
            from ..models.reward import load_reward_model
            from ..stages.rm import load_normalizer

            self.device = role_device(self.role, cfg.reward.num_gpus, f"reward.num_gpus={cfg.reward.num_gpus:g}",
                                      rehearse=cfg.cluster.rehearse)
            self.model, self.tokenizer, self.label_index = load_reward_model(reward_path, cfg.model.dtype,
                                                                             device=self.device, label=cfg.reward.label)
            self.tokenizer.padding_side = "right"
            # Unit-scale rewards (train-rm's statistics), so ppo.kl_coef means the same for any RM.
            norm = load_normalizer(reward_path) or {"mean": 0.0, "std": 1.0}
            self.shift, self.scale = norm["mean"], norm["std"]

    @torch.no_grad()
    def _model_scores(self, prompts: list[str], responses: list[str]) -> list[float]:
        from ..stages.rm import reward_text

        # A classifier judges the response alone (is this summary hateful?), as it was trained.
        texts = responses if self.label_index is not None else [reward_text(p, r) for p, r in zip(prompts, responses)]
        scores: list[float] = []
        bs = self.cfg.reward.batch_size
        for i in range(0, len(texts), bs):
            enc = self.tokenizer(texts[i:i + bs], return_tensors="pt", padding=True, truncation=True).to(self.device)
            logits = self.model(**enc).logits.float().cpu()
            if self.label_index is None:
                raw = logits[:, 0]
            elif self.cfg.reward.label_score == "prob":
                raw = logits.softmax(dim=-1)[:, self.label_index]
            else:
                raw = logits[:, self.label_index]
            scores += ((raw - self.shift) / self.scale).tolist()
        return scores

    def components_of(self, prompts: list[str], responses: list[str], columns: Optional[list[dict]] = None, *,
                      step: int = -1, where: Optional[list[str]] = None) -> dict[str, list[Score]]:
        """Each component's scores (None: that component gave none)."""
        columns = columns if columns is not None else [{} for _ in prompts]
        where = where or [f"sample {i}" for i in range(len(prompts))]
        r = self.cfg.reward
        out: dict[str, list[Score]] = {}
        for c in self.components:
            if c.kind == "model":
                out[c.name] = self._model_scores(prompts, responses)
            elif c.kind == "remote":
                out[c.name] = post_scores(c.target, prompts, responses, columns, timeout_s=r.timeout_s,
                                          retries=r.retries, step=step)
            else:
                out[c.name] = call_function(self.functions[c.name], c.name, prompts, responses, columns,
                                            timeout_s=r.timeout_s, step=step, where=where)
        return out

    def score(self, prompts: list[str], responses: list[str], columns: Optional[list[dict]] = None, *,
              step: int = -1, where: Optional[list[str]] = None) -> list[float]:
        return combine(self.components_of(prompts, responses, columns, step=step, where=where), self.weights)

    def score_timed(self, prompts: list[str], responses: list[str], columns: Optional[list[dict]] = None, *,
                    step: int = -1, where: Optional[list[str]] = None) -> tuple[list[float], dict[str, list[Score]], float]:
        """(reward per response, each component's scores, seconds spent inside this actor)."""
        t = time.perf_counter()
        parts = self.components_of(prompts, responses, columns, step=step, where=where)
        return combine(parts, self.weights), parts, time.perf_counter() - t

    def memory_stats(self) -> dict:
        return {"role": self.role, "name": "reward", **self.memory.stats()}


def _pairwise(rule):
    """A built-in rule (prompt, response) -> float as a batch function."""
    def score(prompts: list[str], responses: list[str]) -> list[float]:
        return [float(rule(p, r)) for p, r in zip(prompts, responses)]
    return score
