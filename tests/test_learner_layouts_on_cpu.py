"""1 and N learner workers make the same update, checked where it is decided: the gradient of
one minibatch. Each rank's share is run by a ``LearnerCore`` in this process (the code a Ray
Train worker runs) and the ranks' gradients are averaged as DDP averages them; that must be
the one-process gradient, for every loss option, on fixed batches built to hold the edge cases
(rows left out by ppo.truncated=mask, responses of 1-2 tokens, ragged lengths, an odd row count
per rank). No Ray, no vLLM: the end-to-end run over real DDP is in test_ppo_learning_on_cpu.py.

Tolerance: both layouts add the same float32 terms (a few hundred per gradient element here)
in another order, so they differ by rounding only, ~1e-7 of the gradient's size on any CPU;
1e-5 leaves two orders of magnitude for another machine's kernels, and a wrong normalisation
(a per-rank mean, below) differs by more than 1e-2."""
import itertools
from contextlib import contextmanager

import pytest
import torch

import rlhf_ray.actors.learner as learner_module
from rlhf_ray.actors.learner import LearnerCore
from rlhf_ray.algo.masked import Aggregation
from rlhf_ray.batch import Samples, pad_samples
from rlhf_ray.config import load_config

from conftest import ROOT

TOL = 1e-5
# Response lengths, with None: a row cut at the limit that ppo.truncated=mask leaves out (its
# tokens are there, its action mask is 0). 10 rows: each of 2 ranks holds an odd count, 5.
LENGTHS = [7, 1, None, 2, 11, 5, None, 1, 9, 3]


def _cfg(model_dir, tmp_path, *overrides):
    return load_config(ROOT / "configs" / "tiny_cpu.yaml", [
        f"model.path={model_dir}", f"output.dir={tmp_path}", "learner.epochs=1", "learner.minibatch_prompts=5", "ppo.prompts_per_step=5", "rollout.samples_per_prompt=2",
        "rollout.max_new_tokens=12", "learner.max_grad_norm=1000", *overrides])


def _batch(tokenizer, seed=0):
    """Fixed prompts and responses (not sampled), with old, reference and behaviour log-probs,
    advantages, returns, old values and importance weights drawn from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    s = Samples()
    texts = ["the film was", "a quiet story about", "i did not expect", "the plot", "this book",
             "every scene of the", "the acting in it", "we watched", "an old", "what a"]
    for text, n in zip(texts, LENGTHS):
        s.prompt_ids.append(tokenizer(text)["input_ids"])
        s.response_ids.append(torch.randint(5, 400, (n or 12,), generator=g).tolist())
        s.logprobs.append([0.0] * (n or 12))
    b = pad_samples(s, tokenizer.pad_token_id)
    for i, n in enumerate(LENGTHS):
        if n is None:
            b.action_mask[i] = 0.0
    m = b.action_mask
    noise = lambda scale: torch.randn(m.shape, generator=g) * scale * m  # noqa: E731
    return b, m, noise, g


def _fill(b, m, noise, g, logprobs, critic, tis):
    # old = current + noise: ratios away from 1, so some tokens (sequences) are clipped.
    b.old_logprobs = (logprobs + noise(0.3)) * m
    b.ref_logprobs = (logprobs + noise(0.5)) * m
    b.advantages = noise(1.0)
    b.returns = noise(1.0) if critic else None
    b.old_values = noise(1.0) if critic else None
    b.is_weights = (0.5 + 1.5 * torch.rand(m.shape, generator=g)) * m if tis else None
    return b


def _cores(cfg, model_dir, world):
    """``world`` cores, one per rank, the adapter and value head set to the same random values
    (LoRA's B starts at 0, which would leave A's gradient 0)."""
    cores = [LearnerCore(cfg, model_dir, rank, world) for rank in range(world)]
    for core in cores:
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for p in core.params:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        core.module.train()
    return cores


def _gradient(cores, batch, kl_coef):
    """The gradient DDP hands every rank (the mean of the ranks' own), and the loss parts as the
    driver averages them."""
    grads, parts = None, []
    for core in cores:
        core.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        core.minibatch_backward(batch, torch.arange(len(batch)), kl_coef, sums)
        g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in core.params])
        grads = g if grads is None else grads + g
        parts.append(sums)
    mean = {k: sum(p[k] for p in parts) / len(parts) for k in parts[0]}
    return grads / len(cores), mean


OPTIONS = list(itertools.product(["gae", "grpo"], ["token", "sequence"], ["reward", "loss"],
                                 ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"], [False, True]))


@pytest.fixture(scope="module")
def layouts(tiny_model_dir, tmp_path_factory):
    """Per critic choice: a one-process core (whole minibatches) and two rank cores (micro-batches
    of one row, gradients accumulated), built once; each test sets the loss options on them."""
    from rlhf_ray.models import load_tokenizer

    out = {}
    for estimator in ("gae", "grpo"):
        one = _cores(_cfg(tiny_model_dir, tmp_path_factory.mktemp("l"), f"ppo.estimator={estimator}",
                          "learner.micro_batch_size=10"), tiny_model_dir, 1)
        two = _cores(_cfg(tiny_model_dir, tmp_path_factory.mktemp("l"), f"ppo.estimator={estimator}",
                          "learner.micro_batch_size=1", "learner.num_workers=2"), tiny_model_dir, 2)
        out[estimator] = (one, two)
    return out, load_tokenizer(tiny_model_dir)


def _with_ppo(cores, **ppo):
    import dataclasses

    for core in cores:
        core.cfg = dataclasses.replace(core.cfg, ppo=dataclasses.replace(core.cfg.ppo, **ppo))


def _compare(layouts, estimator, ratio_level, kl_in, loss_agg, tis):
    (one, two), tokenizer = layouts[0][estimator], layouts[1]
    options = dict(ratio_level=ratio_level, kl_in=kl_in, loss_agg=loss_agg, kl_estimator="k3",
                   entropy_coef=0.01, clip_eps_high=0.28)
    _with_ppo(one + two, **options)
    b, m, noise, g = _batch(tokenizer)
    with torch.no_grad():
        logprobs = one[0].evaluate(b)["old_logprobs"]
    b = _fill(b, m, noise, g, logprobs, critic=estimator == "gae", tis=tis)
    kl_coef = 0.5 if kl_in == "loss" else 0.0
    g1, parts1 = _gradient(one, b, kl_coef)
    g2, parts2 = _gradient(two, b, kl_coef)
    return g1, g2, parts1, parts2


@pytest.mark.parametrize("estimator,ratio_level,kl_in,loss_agg,tis", OPTIONS,
                         ids=["-".join(str(x) for x in o).replace("True", "tis").replace("False", "no_tis")
                              for o in OPTIONS])
def test_ranks_average_to_the_one_process_gradient(layouts, estimator, ratio_level, kl_in, loss_agg, tis):
    g1, g2, parts1, parts2 = _compare(layouts, estimator, ratio_level, kl_in, loss_agg, tis)
    rel = ((g2 - g1).norm() / g1.norm()).item()
    print(f"|g2 - g1| / |g1| = {rel:.2e}, |g1| = {g1.norm():.3f}")
    assert g1.norm() > 1e-3 and torch.isfinite(g2).all()
    assert rel < TOL, f"|g2 - g1| / |g1| = {rel:.2e}"
    for k in ("loss", "policy_loss", "value_loss", "kl_loss", "entropy"):
        assert parts2[k] == pytest.approx(parts1[k], rel=TOL, abs=1e-7), k
    assert (parts1["value_loss"] > 0) == (estimator == "gae") and (parts1["kl_loss"] != 0) == (kl_in == "loss")
    assert parts1["clip_frac"] > 0  # the clipped branch is exercised


@contextmanager
def _per_rank_means():
    """The bug the rank-wide totals prevent: each rank dividing by its own token and row counts."""
    real = learner_module.Aggregation
    learner_module.Aggregation = lambda mode, tokens, rows, horizon: Aggregation(mode, horizon=horizon)
    try:
        yield
    finally:
        learner_module.Aggregation = real


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean_token_mean"])
def test_a_per_rank_mean_is_caught(layouts, loss_agg):
    """The comparison can fail: with per-rank means the ranks' shares no longer add up."""
    with _per_rank_means():
        g1, g2, _, _ = _compare(layouts, "grpo", "token", "reward", loss_agg, False)
    assert ((g2 - g1).norm() / g1.norm()).item() > 1e-2


def test_a_micro_batch_with_no_response_token_still_backpropagates(layouts):
    """Critic-free, one row per micro-batch, the row left out by ppo.truncated=mask: the loss is
    0 with a graph (zero gradients), so backward() works and every DDP rank joins the all-reduce."""
    (_, two), tokenizer = layouts[0]["grpo"], layouts[1]
    _with_ppo(two, ratio_level="token", kl_in="reward", loss_agg="token_mean", tis_cap=None)
    b, m, noise, g = _batch(tokenizer)
    b = _fill(b, m, noise, g, torch.zeros_like(m), critic=False, tis=False)
    row = b.select(torch.tensor([LENGTHS.index(None)]))
    core = two[0]
    core.optimizer.zero_grad(set_to_none=True)
    core.world = 1
    try:
        core.minibatch_backward(row, torch.arange(1))
    finally:
        core.world = 2
    assert all(p.grad is not None and not p.grad.any() for p in core.params)
