"""The RL maths against plain-Python loops written here, independently of rlhf_ray.algo."""
import math
import random
import subprocess
import sys

import pytest
import torch

from rlhf_ray.algo import (
    AdaptiveKLController,
    entropy_from_logits,
    gae,
    kl_penalty,
    kl_shaped_rewards,
    logprobs_from_logits,
    pairwise_reward_loss,
    policy_loss,
    ppo_loss,
    sampled_token_logprobs,
    truncation_mask,
    value_loss,
    whiten,
)


def _padded_mask(batch, time, seed=0):
    """Rows with a prompt prefix of zeros, a response of ones, right padding of zeros."""
    rng = random.Random(seed)
    mask = torch.zeros(batch, time)
    for b in range(batch):
        start = rng.randint(0, time // 3)
        length = rng.randint(1, time - start)
        mask[b, start:start + length] = 1.0
    return mask


def _rand(batch, time, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, time, generator=g, dtype=torch.float64)


def _loop_mean(values, mask):
    tot, n = 0.0, 0
    for row_v, row_m in zip(values, mask):
        for v, m in zip(row_v, row_m):
            if m:
                tot += v
                n += 1
    return tot / n


# ---------- GAE ----------

def _loop_gae(rewards, values, mask, gamma, lam):
    adv = [[0.0] * len(r) for r in rewards]
    for b in range(len(rewards)):
        idx = [t for t in range(len(rewards[b])) if mask[b][t]]
        running = 0.0
        for j in reversed(range(len(idx))):
            t = idx[j]
            v_next = values[b][idx[j + 1]] if j + 1 < len(idx) else 0.0
            delta = rewards[b][t] + gamma * v_next - values[b][t]
            running = delta + gamma * lam * running
            adv[b][t] = running
    return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 1.0), (0.99, 0.0)])
def test_gae_matches_loop(gamma, lam):
    r, v = _rand(5, 12, 1), _rand(5, 12, 2)
    mask = _padded_mask(5, 12, seed=3)
    adv, ret = gae(r, v, mask, gamma, lam)
    expected = _loop_gae(r.tolist(), v.tolist(), mask.tolist(), gamma, lam)
    assert torch.allclose(adv, torch.tensor(expected, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(ret, adv + v)


def test_gae_skips_holes_in_mask():
    # A hole in the middle of a response (e.g. a tool output) must be skipped, not bridged with V=0.
    r = torch.tensor([[0.0, 1.0, 5.0, 2.0]], dtype=torch.float64)
    v = torch.tensor([[0.5, 0.3, 9.0, 0.1]], dtype=torch.float64)
    mask = torch.tensor([[0.0, 1.0, 0.0, 1.0]])
    adv, _ = gae(r, v, mask, 1.0, 1.0)
    # t=3: 2 - 0.1 = 1.9; t=1: (1 + 0.1 - 0.3) + 1.9 = 2.7
    assert adv[0].tolist() == pytest.approx([0.0, 2.7, 0.0, 1.9])


def test_gae_all_zero_mask_is_zero_not_nan():
    adv, ret = gae(_rand(2, 4, 0), _rand(2, 4, 1), torch.zeros(2, 4), 1.0, 0.95)
    assert torch.count_nonzero(adv) == 0 and not torch.isnan(ret).any()


def test_gae_shape_mismatch_is_clear():
    with pytest.raises(ValueError, match="shape mismatch"):
        gae(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3), 1.0, 1.0)


# ---------- policy loss ----------

def _loop_policy(lp, old, adv, mask, eps):
    losses, clipped, kls = [], [], []
    for b in range(len(lp)):
        for t in range(len(lp[b])):
            if not mask[b][t]:
                continue
            ratio = math.exp(lp[b][t] - old[b][t])
            a = adv[b][t]
            unc = -a * ratio
            clp = -a * min(max(ratio, 1 - eps), 1 + eps)
            losses.append(max(unc, clp))
            clipped.append(1.0 if clp > unc else 0.0)
            kls.append((ratio - 1) - math.log(ratio))
    n = len(losses)
    return sum(losses) / n, sum(clipped) / n, sum(kls) / n


def test_policy_loss_matches_loop():
    lp, old, adv = _rand(4, 10, 4) * 0.3, _rand(4, 10, 5) * 0.3, _rand(4, 10, 6)
    mask = _padded_mask(4, 10, seed=7)
    loss, stats = policy_loss(lp, old, adv, mask, 0.2)
    e_loss, e_clip, e_kl = _loop_policy(lp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.2)
    assert loss.item() == pytest.approx(e_loss, abs=1e-10)
    assert stats["clip_frac"].item() == pytest.approx(e_clip)
    assert stats["approx_kl"].item() == pytest.approx(e_kl, abs=1e-10)
    assert 0 < e_clip < 1  # the random draw exercises both branches


def test_policy_loss_at_clip_boundaries():
    eps = 0.2
    old = torch.zeros(1, 4, dtype=torch.float64)
    # ratios exactly 1-eps, 1+eps, and just beyond each
    ratios = torch.tensor([[1 - eps, 1 + eps, 1 + eps + 1e-3, 1 - eps - 1e-3]], dtype=torch.float64)
    lp = torch.log(ratios).requires_grad_(True)
    adv = torch.tensor([[-1.0, 1.0, 1.0, -1.0]], dtype=torch.float64)
    mask = torch.ones(1, 4)
    loss, stats = policy_loss(lp, old, adv, mask, eps)
    # On the boundary the terms are equal (not clipped); beyond it positive/negative
    # advantages are clipped, and their gradient is zero.
    assert stats["clip_frac"].item() == pytest.approx(0.5)
    loss.backward()
    assert lp.grad[0, 2].item() == 0.0 and lp.grad[0, 3].item() == 0.0
    assert lp.grad[0, 0].item() != 0.0 and lp.grad[0, 1].item() != 0.0


def test_policy_loss_zero_mask_defined_and_padding_inf_ignored():
    lp = torch.zeros(2, 3)
    lp[:, 2] = float("-inf")  # padding positions may hold -inf log-probs
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    loss, stats = policy_loss(lp, torch.zeros(2, 3), torch.ones(2, 3), mask, 0.2)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(-1.0)
    loss0, stats0 = policy_loss(lp, torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2, 3), 0.2)
    assert loss0.item() == 0.0 and stats0["clip_frac"].item() == 0.0


# ---------- value loss ----------

def test_value_loss_matches_loop():
    v, old, ret = _rand(3, 8, 8), _rand(3, 8, 9), _rand(3, 8, 10)
    mask = _padded_mask(3, 8, seed=11)
    eps = 0.2
    got = value_loss(v, old, ret, mask, eps)
    terms = []
    for b in range(3):
        for t in range(8):
            if mask[b, t]:
                vc = old[b, t].item() + min(max(v[b, t].item() - old[b, t].item(), -eps), eps)
                terms.append(max((v[b, t].item() - ret[b, t].item()) ** 2, (vc - ret[b, t].item()) ** 2))
    assert got.item() == pytest.approx(0.5 * sum(terms) / len(terms), abs=1e-10)
    assert value_loss(v, old, ret, torch.zeros(3, 8), eps).item() == 0.0


def test_value_loss_at_clip_boundary_equals_unclipped():
    old = torch.zeros(1, 2, dtype=torch.float64)
    v = torch.tensor([[0.2, -0.2]], dtype=torch.float64)
    ret = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    got = value_loss(v, old, ret, torch.ones(1, 2), 0.2)
    assert got.item() == pytest.approx(0.5 * ((0.8 ** 2) + (1.2 ** 2)) / 2)


# ---------- entropy, log-probs ----------

def test_entropy_and_logprobs_match_loop():
    g = torch.Generator().manual_seed(12)
    logits = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    mask = _padded_mask(2, 5, seed=13)
    ents = []
    for b in range(2):
        for t in range(5):
            if mask[b, t]:
                z = logits[b, t].tolist()
                mz = max(z)
                s = sum(math.exp(x - mz) for x in z)
                ps = [math.exp(x - mz) / s for x in z]
                ents.append(-sum(p * math.log(p) for p in ps))
    assert entropy_from_logits(logits, mask).item() == pytest.approx(sum(ents) / len(ents), abs=1e-6)
    assert entropy_from_logits(logits, torch.zeros(2, 5)).item() == 0.0
    labels = torch.randint(0, 7, (2, 5), generator=g)
    lp = logprobs_from_logits(logits, labels)
    b, t = 1, 3
    z = logits[b, t].tolist()
    expected = z[labels[b, t]] - math.log(sum(math.exp(x) for x in z))
    assert lp[b, t].item() == pytest.approx(expected, abs=1e-6)


def test_uniform_entropy_is_log_vocab():
    assert entropy_from_logits(torch.zeros(1, 1, 11), torch.ones(1, 1)).item() == pytest.approx(math.log(11))


# ---------- KL ----------

def test_kl_estimators_match_loop():
    lp, ref = _rand(2, 6, 14) * 0.5, _rand(2, 6, 15) * 0.5
    for kind, fn in {
        "k1": lambda a, b: a - b,
        "k2": lambda a, b: 0.5 * (a - b) ** 2,
        "k3": lambda a, b: (math.exp(b - a) - 1) - (b - a),
    }.items():
        got = kl_penalty(lp, ref, kind)
        for i in range(2):
            for j in range(6):
                assert got[i, j].item() == pytest.approx(fn(lp[i, j].item(), ref[i, j].item()), abs=1e-10)
    assert (kl_penalty(lp, ref, "k3") >= 0).all() and (kl_penalty(lp, ref, "k2") >= 0).all()
    with pytest.raises(ValueError, match="unknown KL estimator 'k9'"):
        kl_penalty(lp, ref, "k9")


def test_kl_shaped_rewards_places_score_on_last_response_token():
    lp = torch.tensor([[0.0, -1.0, -2.0, 0.0], [0.0, -1.0, 0.0, 0.0]])
    ref = torch.tensor([[0.0, -1.5, -1.0, 0.0], [0.0, -2.0, 0.0, 0.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    rewards, kl = kl_shaped_rewards(torch.tensor([3.0, -1.0]), lp, ref, mask, 0.1, "k1")
    assert kl.flatten().tolist() == pytest.approx([0, 0.5, -1.0, 0, 0, 1.0, 0, 0])
    assert rewards.flatten().tolist() == pytest.approx([0, -0.05, 0.1 + 3.0, 0, 0, -0.1 - 1.0, 0, 0])
    with pytest.raises(ValueError, match="no response tokens"):
        kl_shaped_rewards(torch.zeros(2), lp, ref, torch.tensor([[0.0] * 4, [1.0] * 4]), 0.1)


def test_adaptive_kl_controller_matches_formula():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    beta = 0.2
    for kl, n in [(12.0, 64), (6.0, 64), (3.0, 128), (5.0, 32), (100.0, 256)]:
        err = min(max(kl / 6.0 - 1, -0.2), 0.2)
        beta *= 1 + err * n / 10000
        assert ctl.update(kl, n) == pytest.approx(beta)
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=0.0, horizon=10)


# ---------- whitening ----------

def test_whiten_matches_loop():
    x = _rand(3, 7, 16)
    mask = _padded_mask(3, 7, seed=17)
    vals = [x[b, t].item() for b in range(3) for t in range(7) if mask[b, t]]
    mean = sum(vals) / len(vals)
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    w = whiten(x, mask)
    w_noshift = whiten(x, mask, shift_mean=False)
    for b in range(3):
        for t in range(7):
            if mask[b, t]:
                assert w[b, t].item() == pytest.approx((x[b, t].item() - mean) / math.sqrt(var + 1e-8), abs=1e-8)
                assert w_noshift[b, t].item() == pytest.approx(w[b, t].item() + mean, abs=1e-8)
            else:
                assert w[b, t].item() == 0.0
    assert _loop_mean(w.tolist(), mask.tolist()) == pytest.approx(0.0, abs=1e-9)


def test_whiten_needs_two_elements():
    with pytest.raises(ValueError, match="at least 2 unmasked"):
        whiten(torch.ones(2, 3), torch.zeros(2, 3))


# ---------- reward-model loss ----------

def test_pairwise_reward_loss_matches_loop():
    c, r = _rand(1, 9, 18)[0], _rand(1, 9, 19)[0]
    m = torch.rand(9, generator=torch.Generator().manual_seed(20), dtype=torch.float64)

    def loop(margins):
        return sum(-math.log(1 / (1 + math.exp(-(a - b - mg)))) for a, b, mg in zip(c.tolist(), r.tolist(), margins)) / 9

    assert pairwise_reward_loss(c, r).item() == pytest.approx(loop([0.0] * 9), abs=1e-10)
    assert pairwise_reward_loss(c, r, m).item() == pytest.approx(loop(m.tolist()), abs=1e-10)
    assert pairwise_reward_loss(c, r, 0.5).item() == pytest.approx(loop([0.5] * 9), abs=1e-10)
    # A margin asks for a larger gap, so the same rewards cost more.
    assert pairwise_reward_loss(c, r, 1.0) > pairwise_reward_loss(c, r)
    with pytest.raises(ValueError, match="at least one pair"):
        pairwise_reward_loss(torch.zeros(0), torch.zeros(0))


# ---------- the combined loss ----------

def test_ppo_loss_is_sum_of_parts_and_differentiable():
    g = torch.Generator().manual_seed(21)
    logits = torch.randn(2, 6, 9, generator=g, requires_grad=True)
    labels = torch.randint(0, 9, (2, 6), generator=g)
    lp = logprobs_from_logits(logits, labels)
    old = lp.detach() + 0.1 * torch.randn(2, 6, generator=g)
    adv, v, old_v, ret = (torch.randn(2, 6, generator=g) for _ in range(4))
    v = v.requires_grad_(True)
    mask = _padded_mask(2, 6, seed=22)
    _, ent = sampled_token_logprobs(logits, labels, with_entropy=True)
    loss, parts = ppo_loss(lp, old, adv, v, old_v, ret, mask, entropy=ent,
                           clip_eps=0.2, value_clip_eps=0.3, vf_coef=0.5, entropy_coef=0.01)
    pg, _ = policy_loss(lp, old, adv, mask, 0.2)
    expected = pg + 0.5 * value_loss(v, old_v, ret, mask, 0.3) - 0.01 * entropy_from_logits(logits, mask)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert set(parts) == {"policy_loss", "value_loss", "entropy", "kl_loss", "clip_frac", "approx_kl"}
    loss.backward()
    assert torch.isfinite(logits.grad).all() and v.grad.abs().sum() > 0


def test_ppo_loss_with_global_normalizer_weighs_every_token_the_same():
    """Two shards of one minibatch, each divided by the minibatch's total token count, sum to
    the loss of the whole minibatch: what DDP's gradient average needs (times world size)."""
    g = torch.Generator().manual_seed(5)
    lp, old, adv, v, old_v, ret = (torch.randn(4, 7, generator=g) for _ in range(6))
    mask = torch.zeros(4, 7)
    for row, n in enumerate([7, 1, 2, 5]):  # shards [0, 1] and [2, 3]: 8 and 7 tokens
        mask[row, :n] = 1
    kw = dict(clip_eps=0.2, value_clip_eps=0.2, vf_coef=0.3, entropy_coef=0.0)
    whole, _ = ppo_loss(lp, old, adv, v, old_v, ret, mask, **kw)
    total = float(mask.sum())
    parts = [ppo_loss(*(t[s] for t in (lp, old, adv, v, old_v, ret, mask)), normalizer=total, **kw)[0]
             for s in (slice(0, 2), slice(2, 4))]
    assert (parts[0] + parts[1]).item() == pytest.approx(whole.item(), abs=1e-6)
    # A per-shard mean averaged over shards is not the same thing here.
    local = [ppo_loss(*(t[s] for t in (lp, old, adv, v, old_v, ret, mask)), **kw)[0] for s in (slice(0, 2), slice(2, 4))]
    assert abs(((local[0] + local[1]) / 2).item() - whole.item()) > 1e-4


def test_ppo_loss_without_critic_has_no_value_term():
    g = torch.Generator().manual_seed(6)
    lp, old, adv = (torch.randn(2, 5, generator=g) for _ in range(3))
    mask = torch.ones(2, 5)
    loss, parts = ppo_loss(lp, old, adv, None, None, None, mask, clip_eps=0.2, value_clip_eps=0.2,
                           vf_coef=1.0, entropy_coef=0.0)
    assert parts["value_loss"].item() == 0.0 and loss.item() == pytest.approx(parts["policy_loss"].item())


# ---------- the sampling distribution the learner models ----------

def _vllm_rule(z, k, p):
    """vLLM's top-k/top-p rule, written out row by row in plain Python."""
    out = []
    for row in z.tolist():
        order = sorted(range(len(row)), key=lambda i: row[i])  # ascending
        kept = set(range(len(row)))
        if 0 < k < len(row):
            kth = sorted(row, reverse=True)[k - 1]
            kept = {i for i in kept if row[i] >= kth}
        if p < 1:
            live = [i for i in order if i in kept]
            m = max(row[i] for i in live)
            w = [math.exp(row[i] - m) for i in live]
            tot, cum = sum(w), 0.0
            for j, i in enumerate(live):
                cum += w[j] / tot
                if cum <= 1 - p and j < len(live) - 1:
                    kept.discard(i)
        out.append(kept)
    return out


@pytest.mark.parametrize("k,p", [(0, 0.9), (3, 1.0), (4, 0.7), (0, 0.3)])
def test_truncation_mask_matches_the_engines_rule(k, p):
    z = torch.randn(6, 10, generator=torch.Generator().manual_seed(k * 10 + int(p * 10)))
    mask = truncation_mask(z, k, p)
    expect = _vllm_rule(z, k, p)
    for row in range(6):
        assert {i for i in range(10) if mask[row, i]} == expect[row]


def test_sampled_token_logprobs_renormalise_over_the_kept_set():
    z = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]])
    lp, ent = sampled_token_logprobs(z, torch.tensor([1]), temperature=0.5, top_k=2, with_entropy=True)
    kept = torch.tensor([4.0, 2.0])  # z / 0.5 for the two largest
    assert lp.item() == pytest.approx((kept[1] - torch.logsumexp(kept, 0)).item(), abs=1e-6)
    probs = torch.softmax(kept, 0)
    assert ent.item() == pytest.approx(float(-(probs * probs.log()).sum()), abs=1e-6)
    # No truncation: the plain tempered softmax.
    lp_full, _ = sampled_token_logprobs(z, torch.tensor([3]), temperature=0.5)
    assert lp_full.item() == pytest.approx(torch.log_softmax(z / 0.5, -1)[0, 3].item(), abs=1e-6)


def test_sampled_token_is_never_impossible():
    """A label outside the learner's nucleus (the engine's logits differ by ~1e-7 and can put a
    boundary token on the other side) keeps a finite log-prob."""
    z = torch.tensor([[5.0, 0.0, -5.0]])
    lp, _ = sampled_token_logprobs(z, torch.tensor([2]), top_p=0.5)
    assert torch.isfinite(lp).all() and lp.item() < -5


def test_algo_imports_no_distributed_stack():
    code = ("import sys, rlhf_ray.algo; bad = [m for m in ('ray', 'vllm', 'peft') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_truncation_modes():
    from rlhf_ray.algo import apply_truncation

    scores, finished = torch.tensor([0.5, 2.0, -0.3]), torch.tensor([True, False, True])
    s, keep = apply_truncation(scores, finished, "score")
    assert s.tolist() == scores.tolist() and keep.all()
    s, keep = apply_truncation(scores, finished, "penalty", -1.5)
    assert s.tolist() == pytest.approx([0.5, -1.5, -0.3]) and keep.all()
    s, keep = apply_truncation(scores, finished, "mask")
    assert s.tolist() == pytest.approx([0.5, 0.0, -0.3]) and keep.tolist() == [True, False, True]


def test_entropy_gradient_is_finite_under_truncation():
    """Truncated tokens sit at -inf: the entropy's backward must not produce 0 * -inf = nan."""
    z = torch.randn(4, 50, generator=torch.Generator().manual_seed(3), requires_grad=True)
    labels = z.detach().argmax(-1)
    lp, ent = sampled_token_logprobs(z, labels, temperature=0.7, top_k=10, top_p=0.8, with_entropy=True)
    (lp.sum() + ent.sum()).backward()
    assert torch.isfinite(z.grad).all() and torch.isfinite(ent).all() and (ent > 0).all()


# ---------- critic-free estimators, loss aggregations, clip-higher, GSPO, KL loss ----------

from rlhf_ray.algo import ESTIMATORS, estimate_advantages  # noqa: E402
from rlhf_ray.algo.masked import Aggregation  # noqa: E402


def _scores_at_end(scores, width=3):
    """Rows whose whole response is the last two tokens, the score on the last one."""
    rewards = torch.zeros(len(scores), width, dtype=torch.float64)
    rewards[:, -1] = torch.tensor(scores, dtype=torch.float64)
    mask = torch.zeros(len(scores), width, dtype=torch.float64)
    mask[:, 1:] = 1.0
    return rewards, mask


@pytest.mark.parametrize("name,expected", [
    # R = [1, 3 | 2, 2]: group 0 has mean 2 and unbiased std sqrt(2); group 1 has no spread.
    ("grpo", [-1 / math.sqrt(2), 1 / math.sqrt(2), 0.0, 0.0]),
    ("dr_grpo", [-1.0, 1.0, 0.0, 0.0]),
    ("rloo", [1 - 3, 3 - 1, 0.0, 0.0]),
])
def test_group_estimators_by_hand(name, expected):
    rewards, mask = _scores_at_end([1.0, 3.0, 2.0, 2.0])
    adv, _ = estimate_advantages(name, rewards, None, mask, gamma=1.0, lam=1.0,
                                 groups=torch.tensor([0, 0, 1, 1]))
    for b, e in enumerate(expected):
        assert adv[b, 0] == 0.0  # prompt token
        assert adv[b, 1:].tolist() == pytest.approx([e, e], abs=1e-5)


def test_group_estimators_with_three_samples_and_a_left_out_row():
    # R = [1, 2, 6] plus a 4th row of the same prompt whose mask is empty (ppo.truncated=mask):
    # it must neither count in the group's statistics nor receive advantage.
    rewards, mask = _scores_at_end([1.0, 2.0, 6.0, 100.0])
    mask[3] = 0.0
    groups = torch.tensor([5, 5, 5, 5])
    std = math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2)
    cases = {"grpo": [(r - 3) / std for r in (1, 2, 6)], "dr_grpo": [-2.0, -1.0, 3.0],
             "rloo": [1 - 4.0, 2 - 3.5, 6 - 1.5]}
    for name, expected in cases.items():
        adv, _ = estimate_advantages(name, rewards, None, mask, gamma=1.0, lam=1.0, groups=groups)
        assert adv[:3, -1].tolist() == pytest.approx(expected, abs=1e-5), name
        assert adv[3].abs().sum() == 0.0, name


def test_grpo_sums_kl_shaped_token_rewards():
    # With the KL in the reward, a row's return is its score plus every token's -beta * KL.
    rewards = torch.tensor([[0.0, -0.5, 1.0], [0.0, 0.0, 2.0]], dtype=torch.float64)
    mask = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    adv, _ = estimate_advantages("dr_grpo", rewards, None, mask, gamma=1.0, lam=1.0, groups=torch.tensor([0, 0]))
    assert adv[:, -1].tolist() == pytest.approx([0.5 - 1.25, 2.0 - 1.25])


def test_reinforce_pp_by_hand():
    rewards = torch.tensor([[0.0, -0.1, 1.0], [-0.2, 0.0, 2.0]], dtype=torch.float64)
    mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    adv, returns = estimate_advantages("reinforce_pp", rewards, None, mask, gamma=1.0, lam=1.0)
    assert returns.flatten().tolist() == pytest.approx([0.0, 0.9, 1.0, 1.8, 2.0, 2.0])
    flat = [0.9, 1.0, 1.8, 2.0, 2.0]
    mean = sum(flat) / 5
    std = math.sqrt(sum((x - mean) ** 2 for x in flat) / 4)
    expect = [[0.0] + [(x - mean) / std for x in flat[:2]], [(x - mean) / std for x in flat[2:]]]
    assert adv.tolist()[0] == pytest.approx(expect[0], abs=1e-6)
    assert adv.tolist()[1] == pytest.approx(expect[1], abs=1e-6)
    # gamma < 1 discounts the later rewards
    _, disc = estimate_advantages("reinforce_pp", rewards, None, mask, gamma=0.5, lam=1.0)
    assert disc[1].tolist() == pytest.approx([-0.2 + 0.5 * (0.0 + 0.5 * 2.0), 1.0, 2.0])


def test_reinforce_pp_baseline_by_hand():
    rewards, mask = _scores_at_end([1.0, 3.0, 2.0, 4.0])
    adv, centred = estimate_advantages("reinforce_pp_baseline", rewards, None, mask, gamma=1.0, lam=1.0,
                                       groups=torch.tensor([0, 0, 1, 1]))
    assert centred[:, -1].tolist() == pytest.approx([-1.0, 1.0, -1.0, 1.0])
    # 8 tokens of +-1: mean 0, unbiased std sqrt(8/7)
    assert adv[:, -1].tolist() == pytest.approx([x / math.sqrt(8 / 7) for x in (-1, 1, -1, 1)], abs=1e-6)


def test_estimators_registry_and_errors():
    assert {"gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"} <= set(ESTIMATORS)
    assert ESTIMATORS["gae"].needs_critic and not ESTIMATORS["grpo"].needs_critic
    assert ESTIMATORS["dr_grpo"].loss_agg == "seq_mean_token_sum_norm"
    rewards, mask = _scores_at_end([1.0, 2.0])
    with pytest.raises(ValueError, match="needs groups"):
        estimate_advantages("grpo", rewards, None, mask, gamma=1.0, lam=1.0)
    with pytest.raises(ValueError, match="critic's values"):
        estimate_advantages("gae", rewards, None, mask, gamma=1.0, lam=1.0)


def test_loss_aggregations_by_hand_and_over_shards():
    x = torch.tensor([[1.0, 2.0, 0.0], [3.0, 5.0, 7.0], [9.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    assert float(Aggregation("token_mean").mean(x, mask)) == pytest.approx(27 / 6)
    assert float(Aggregation("seq_mean_token_mean").mean(x, mask)) == pytest.approx((1.5 + 5.0 + 9.0) / 3)
    assert float(Aggregation("seq_mean_token_sum_norm", horizon=4).mean(x, mask)) == pytest.approx(27 / (3 * 4))
    for mode in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"):
        whole = Aggregation(mode, horizon=4).mean(x, mask)
        glob = Aggregation(mode, tokens=6.0, rows=3.0, horizon=4)
        shards = glob.mean(x[:2], mask[:2]) + glob.mean(x[2:], mask[2:])
        assert float(shards) == pytest.approx(float(whole)), mode
    with pytest.raises(ValueError, match="loss aggregation"):
        Aggregation("mean")


def test_clip_higher_lets_a_positive_advantage_ratio_grow_further():
    lp = torch.log(torch.tensor([[1.25]], dtype=torch.float64))
    old, adv, mask = torch.zeros(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64), torch.ones(1, 1)
    loss, stats = policy_loss(lp, old, adv, mask, 0.2)
    assert float(loss) == pytest.approx(-1.2) and float(stats["clip_frac"]) == 1.0
    loss, stats = policy_loss(lp, old, adv, mask, 0.2, clip_eps_high=0.28)
    assert float(loss) == pytest.approx(-1.25) and float(stats["clip_frac"]) == 0.0
    # the lower side is unchanged: a negative advantage still clips at 1 - eps
    low = torch.log(torch.tensor([[0.7]], dtype=torch.float64))
    loss, _ = policy_loss(low, old, -adv, mask, 0.2, clip_eps_high=0.28)
    assert float(loss) == pytest.approx(0.8)


def test_sequence_level_ratio_gspo():
    lp = torch.tensor([[0.0, 0.1, 0.3], [0.0, -0.2, 0.0]], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(2, 3, dtype=torch.float64)
    mask = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    adv = torch.tensor([[0.0, 1.0, 1.0], [0.0, -1.0, -1.0]], dtype=torch.float64)
    agg = Aggregation("seq_mean_token_mean")
    loss, _ = policy_loss(lp, old, adv, mask, 0.5, ratio_level="sequence", agg=agg)
    s0, s1 = math.exp(0.2), math.exp(-0.1)  # exp of each row's mean log-ratio, inside the clip range
    assert float(loss) == pytest.approx((-s0 + s1) / 2)
    loss.backward()
    # d/d lp_t of row i: -A_i * s_i / (rows * tokens_i) on its response tokens, 0 elsewhere
    assert lp.grad.flatten().tolist() == pytest.approx([0.0, -s0 / 4, -s0 / 4, 0.0, s1 / 4, s1 / 4])
    with pytest.raises(ValueError, match="ratio_level"):
        policy_loss(lp, old, adv, mask, 0.5, ratio_level="row")


def test_ppo_loss_kl_term_is_k3_to_the_reference():
    lp = _rand(3, 4, 1).requires_grad_(True)
    ref, old, adv = _rand(3, 4, 2), _rand(3, 4, 3), _rand(3, 4, 4)
    mask = _padded_mask(3, 4, seed=5).double()
    kw = dict(clip_eps=0.2, value_clip_eps=0.2, vf_coef=0.0, entropy_coef=0.0)
    base, _ = ppo_loss(lp, old, adv, None, None, None, mask, **kw)
    with_kl, parts = ppo_loss(lp, old, adv, None, None, None, mask, ref_logprobs=ref, kl_coef=0.5, **kw)
    k3 = _loop_mean([[math.exp(r - x) - (r - x) - 1 for x, r in zip(rl, rr)]
                     for rl, rr in zip(lp.tolist(), ref.tolist())], mask.tolist())
    assert float(parts["kl_loss"]) == pytest.approx(k3)
    assert float(with_kl - base) == pytest.approx(0.5 * k3)
    with pytest.raises(ValueError, match="ref_logprobs"):
        ppo_loss(lp, old, adv, None, None, None, mask, kl_coef=0.5, **kw)


# -- off-policy correction (asynchronous rollouts) ---------------------------------------------
def test_truncated_is_weights_by_hand():
    from rlhf_ray.algo import truncated_is_weights

    old = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-1.0, -1.0, 0.0, 0.0]])
    beh = torch.tensor([[-1.0, -3.0, -0.1, 9.0], [-1.5, -0.9, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    w = truncated_is_weights(old, beh, mask, cap=2.0)
    # exp(0)=1; exp(1)=2.72 -> capped at 2; exp(-0.4); padding 0 | exp(0.5)=1.65; exp(-0.1)
    want = torch.tensor([[1.0, 2.0, math.exp(-0.4), 0.0], [math.exp(0.5), math.exp(-0.1), 0.0, 0.0]])
    assert torch.allclose(w, want, atol=1e-6)
    # Sequence level: every token of a row takes min(exp(sum of its log-ratios), cap).
    ws = truncated_is_weights(old, beh, mask, cap=2.0, level="sequence")
    row0, row1 = min(math.exp(0.0 + 1.0 - 0.4), 2.0), min(math.exp(0.5 - 0.1), 2.0)
    assert torch.allclose(ws, torch.tensor([[row0] * 3 + [0.0], [row1] * 2 + [0.0, 0.0]]), atol=1e-6)
    old.requires_grad_(True)
    assert not truncated_is_weights(old, beh, mask, cap=2.0).requires_grad  # a weight, not a gradient path
    with pytest.raises(ValueError, match="cap must be > 0"):
        truncated_is_weights(old, beh, mask, cap=0.0)


def test_correction_stats_and_staleness_histogram_by_hand():
    from rlhf_ray.algo import correction_stats, staleness_histogram

    old = torch.tensor([[-1.0, -2.0, 0.0]])
    beh = torch.tensor([[-1.0, -3.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    st = correction_stats(old, beh, mask, cap=2.0)
    assert st["is_weight_mean"] == pytest.approx((1.0 + math.e) / 2)  # before the cap
    assert st["is_weight_max"] == pytest.approx(math.e)
    assert st["is_capped_frac"] == pytest.approx(0.5)
    assert st["mismatch_kl"] == pytest.approx((0.0 - 1.0) / 2)  # mean(behaviour - old)
    assert st["mismatch_k3"] == pytest.approx((0.0 + (math.e - 1 - 1)) / 2)
    same = correction_stats(old, old, mask, cap=2.0)  # on-policy: no correction at all
    assert same["is_weight_mean"] == same["is_weight_max"] == 1.0 and same["mismatch_kl"] == 0.0
    assert same["is_capped_frac"] == 0.0
    assert staleness_histogram([5, 5, 4, 3, 5], current=5) == {0: 3, 1: 1, 2: 1}


def test_policy_loss_with_importance_weights_by_hand():
    lp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    old = torch.tensor([[-1.0, -2.0]])
    adv = torch.tensor([[1.0, -2.0]])
    mask = torch.ones(1, 2)
    w = torch.tensor([[0.5, 2.0]])
    loss, _ = policy_loss(lp, old, adv, mask, clip_eps=0.2, is_weights=w)
    # ratio 1 everywhere: the terms are -A, weighted: mean(-0.5 * 1, -2 * -2) = 1.75
    assert float(loss) == pytest.approx((-0.5 + 4.0) / 2)
    loss.backward()
    assert torch.allclose(lp.grad, torch.tensor([[-0.5 * 1.0, 2.0 * 2.0]]) / 2)
    plain, _ = policy_loss(lp.detach(), old, adv, mask, clip_eps=0.2, is_weights=torch.ones(1, 2))
    assert float(plain) == float(policy_loss(lp.detach(), old, adv, mask, clip_eps=0.2)[0])
