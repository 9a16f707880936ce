"""PPO's arithmetic (thann.recipes.ppo.losses) against references written out step by step here,
on small tensors, with plain Python loops and floats."""

import math

import pytest
import torch

from thann.recipes.ppo import losses

torch.manual_seed(0)
# Three rollouts of six positions; the response tokens of each (mask) start after its prompt.
MASK = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 0, 0]], dtype=torch.float64)
REWARDS = torch.randn(3, 6, dtype=torch.float64) * MASK
VALUES = torch.randn(3, 6, dtype=torch.float64)


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)])
def test_gae_follows_its_recursion_over_the_response_tokens(gamma, lam):
    advantages, returns = losses.gae(REWARDS, VALUES, MASK, gamma, lam)
    for r in range(3):
        positions = [t for t in range(6) if MASK[r, t]]
        expected = {}
        following = 0.0
        for i in reversed(range(len(positions))):
            t = positions[i]
            next_value = VALUES[r, positions[i + 1]].item() if i + 1 < len(positions) else 0.0
            delta = REWARDS[r, t].item() + gamma * next_value - VALUES[r, t].item()
            following = delta + gamma * lam * following
            expected[t] = following
        for t in range(6):
            assert advantages[r, t].item() == pytest.approx(expected.get(t, 0.0), abs=1e-12)
            want_return = expected[t] + VALUES[r, t].item() if t in expected else 0.0
            assert returns[r, t].item() == pytest.approx(want_return, abs=1e-12)
    # with λ = 1 and γ = 1 the advantage is the sum of the rewards to go minus the value
    if gamma == lam == 1.0:
        r, t = 1, 2
        to_go = sum(REWARDS[r, u].item() for u in range(t, 6))
        assert advantages[r, t].item() == pytest.approx(to_go - VALUES[r, t].item(), abs=1e-12)


def test_whitening_gives_the_masked_entries_mean_0_and_variance_1():
    values = torch.randn(3, 6, dtype=torch.float64) * 5 + 3
    white = losses.whiten(values, MASK)
    chosen = [values[r, t].item() for r in range(3) for t in range(6) if MASK[r, t]]
    mean = sum(chosen) / len(chosen)
    std = math.sqrt(sum((v - mean) ** 2 for v in chosen) / len(chosen))
    for r in range(3):
        for t in range(6):
            want = (values[r, t].item() - mean) / std if MASK[r, t] else 0.0
            assert white[r, t].item() == pytest.approx(want, rel=1e-6, abs=1e-9)


def test_the_three_kl_estimators():
    logp, ref = torch.tensor([-1.0, -2.5, -0.1]), torch.tensor([-1.5, -2.0, -0.1])
    for estimator, formula in {
        "k1": lambda p, q: p - q,
        "k2": lambda p, q: 0.5 * (q - p) ** 2,
        "k3": lambda p, q: math.exp(q - p) - 1 - (q - p),
    }.items():
        got = losses.kl_estimate(logp, ref, estimator)
        for i in range(3):
            assert got[i].item() == pytest.approx(formula(logp[i].item(), ref[i].item()), rel=1e-6, abs=1e-7)
    # k1 and k3 average to the true KL over samples of π (k3 never negative)
    p = torch.tensor([0.7, 0.2, 0.1])
    q = torch.tensor([0.4, 0.4, 0.2])
    true_kl = (p * (p / q).log()).sum().item()
    for estimator in ("k1", "k3"):
        expected = (p * losses.kl_estimate(p.log(), q.log(), estimator)).sum().item()
        assert expected == pytest.approx(true_kl, rel=1e-6)
    assert (losses.kl_estimate(p.log(), q.log(), "k3") >= 0).all()


def test_group_baselines():
    scores = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0], dtype=torch.float64)  # two prompts, three samples each
    grpo = losses.group_advantages(scores, 3, "grpo")
    rloo = losses.group_advantages(scores, 3, "rloo")
    for g in range(2):
        group = [scores[3 * g + i].item() for i in range(3)]
        mean = sum(group) / 3
        std = math.sqrt(sum((s - mean) ** 2 for s in group) / 2)  # sample standard deviation
        for i in range(3):
            assert grpo[3 * g + i].item() == pytest.approx((group[i] - mean) / (std + 1e-6), rel=1e-9)
            others = [group[j] for j in range(3) if j != i]
            assert rloo[3 * g + i].item() == pytest.approx(group[i] - sum(others) / 2, rel=1e-9)


@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_the_clipped_policy_loss(dual_clip):
    logp = torch.tensor([-1.0, -1.0, -1.0, -1.0, -3.0, 0.5])
    old = torch.tensor([-1.0, -1.5, -0.5, -1.5, -1.0, -2.0])
    adv = torch.tensor([1.0, 1.0, -2.0, -2.0, 0.5, -1.0])
    low, high = 0.2, 0.28
    loss, ratio, clipped = losses.clipped_policy_loss(logp, old, adv, low, high, dual_clip)
    for i in range(6):
        r = math.exp(logp[i].item() - old[i].item())
        a = adv[i].item()
        plain, capped_ratio = -a * r, -a * min(max(r, 1 - low), 1 + high)
        want = max(plain, capped_ratio)
        if dual_clip is not None and a < 0:
            want = min(want, -dual_clip * a)
        assert ratio[i].item() == pytest.approx(r, rel=1e-6)
        assert loss[i].item() == pytest.approx(want, rel=1e-6)
        assert clipped[i].item() == float(capped_ratio > plain)
    assert clipped.sum() > 0


def test_the_clipped_value_loss():
    values = torch.tensor([1.0, 3.0, -2.0, 0.05])
    old = torch.tensor([0.0, 0.0, 0.0, 0.0])
    returns = torch.tensor([2.0, 0.1, 0.5, 0.0])
    got = losses.clipped_value_loss(values, old, returns, clip=0.2)
    for i in range(4):
        v, o, g = values[i].item(), old[i].item(), returns[i].item()
        v_clip = o + min(max(v - o, -0.2), 0.2)
        assert got[i].item() == pytest.approx(0.5 * max((v - g) ** 2, (v_clip - g) ** 2), rel=1e-6)


def test_log_probabilities_of_the_sampling_distribution_leave_out_padding_and_ids_without_a_token():
    logits = torch.randn(2, 3, 7)
    logits[..., 5:] = 50.0  # padding columns a tensor-parallel vocabulary adds: never sampled
    logits[..., 2] = 40.0  # an id without a token (unused_ids): never sampled either
    real = [0, 1, 3, 4]
    tokens = torch.tensor(real)[torch.randint(0, 4, (2, 3))]
    for temperature in (1.0, 0.7):
        got = losses.policy_logprobs(logits, tokens, temperature, vocab_size=5, unused_ids=(2,))
        for b in range(2):
            for s in range(3):
                row = {v: logits[b, s, v].item() / temperature for v in real}
                log_z = math.log(sum(math.exp(x) for x in row.values()))
                assert got[b, s].item() == pytest.approx(row[tokens[b, s].item()] - log_z, rel=1e-5, abs=1e-6)
        probs = [math.exp(logits[0, 0, v].item() / temperature) for v in real]
        z = sum(probs)
        want_entropy = -sum(p / z * math.log(p / z) for p in probs)
        log_softmax = losses.sampling_log_softmax(logits, temperature, 5, (2,))
        assert losses.entropy(log_softmax)[0, 0].item() == pytest.approx(want_entropy, rel=1e-5)
        assert torch.equal(losses.token_logprobs(log_softmax, tokens), got)  # what the update computes


def test_explained_variance_and_the_adaptive_kl_controller():
    returns = torch.tensor([1.0, 2.0, 3.0, 9.0])
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0])
    assert losses.explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert losses.explained_variance(torch.full((4,), 2.0), returns, mask) == pytest.approx(0.0, abs=1e-6)
    controller = losses.KLController(0.1, target=6.0, horizon=1000)
    controller.update(kl_per_response=12.0, responses=100)  # error clipped to +0.2
    assert controller.coef == pytest.approx(0.1 * (1 + 0.2 * 100 / 1000))
    fixed = losses.KLController(0.1, target=None, horizon=1000)
    fixed.update(50.0, 100)
    assert fixed.coef == 0.1
