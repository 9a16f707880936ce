"""The arithmetic of PPO, as pure functions on tensors (tests/test_ppo_losses.py checks each
against a step-by-step reference).

Shapes: R rollouts (sequences), S positions. Per-token arrays are indexed by the position of the
token they concern (a response token's log-probability sits where the token sits, computed from
the logits one position earlier); ``mask_RS`` is 1 on response tokens.
"""

import math

import torch

from thann.inference.sampling import without_unused


def sampling_log_softmax(logits, temperature: float, vocab_size: int, unused_ids: tuple[int, ...] = ()):
    """The sampling distribution's log-probabilities: softmax of the logits over the real
    vocabulary (not the padding added for tensor parallelism, nor ids without a token, which the
    generator never chooses) divided by the temperature."""
    return torch.log_softmax(without_unused(logits[..., :vocab_size].float(), unused_ids) / temperature, dim=-1)


def policy_logprobs(logits, tokens, temperature: float, vocab_size: int, unused_ids: tuple[int, ...] = ()):
    """log π(token) under the sampling distribution: the one function the rollout (its
    KV-cached logits) and the update (a full forward) both use."""
    return token_logprobs(sampling_log_softmax(logits, temperature, vocab_size, unused_ids), tokens)


def token_logprobs(log_softmax, tokens):
    return log_softmax.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy(log_softmax):
    """Entropy of a distribution at each position, from its log-probabilities (0 log 0 = 0)."""
    return -(log_softmax.exp() * log_softmax.nan_to_num(neginf=0.0)).sum(-1)


def kl_estimate(logp, ref_logp, estimator: str):
    """Per-token estimate of KL(π || π_ref) from samples of π (Schulman, "Approximating KL
    divergence"): k1 = log r⁻¹, k2 = ½ (log r)², k3 = r - 1 - log r with r = π_ref / π. k1 is
    unbiased but can be negative, k3 unbiased and never negative, k2 biased, low variance."""
    log_ratio = ref_logp - logp  # log r
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio ** 2
    if estimator == "k3":
        return log_ratio.exp() - 1 - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}")


def gae(rewards_RS, values_RS, mask_RS, gamma: float, lam: float):
    """Generalised advantage estimates and returns over each sequence's response tokens, the
    value after the last one taken as 0: δ_t = r_t + γ V_{t+1} - V_t, A_t = δ_t + γλ A_{t+1}."""
    R, S = rewards_RS.shape
    advantages = torch.zeros_like(rewards_RS)
    running = torch.zeros(R, dtype=rewards_RS.dtype, device=rewards_RS.device)
    next_value = torch.zeros_like(running)
    for t in reversed(range(S)):
        m = mask_RS[:, t]
        delta = rewards_RS[:, t] + gamma * next_value - values_RS[:, t]
        running = torch.where(m > 0, delta + gamma * lam * running, running)
        advantages[:, t] = running * m
        next_value = torch.where(m > 0, values_RS[:, t], next_value)
    return advantages, (advantages + values_RS) * mask_RS


def group_advantages(scores_R, group_size: int, baseline: str, eps: float = 1e-6):
    """Sequence advantages from the other samples of the same prompt (rollouts of one prompt
    are consecutive): ``grpo`` (score - group mean) / (group std + eps), DeepSeekMath's;
    ``rloo`` score - mean of the group's other scores (leave one out)."""
    groups = scores_R.view(-1, group_size)
    if baseline == "grpo":
        advantages = (groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + eps)
    elif baseline == "rloo":
        advantages = groups - (groups.sum(1, keepdim=True) - groups) / (group_size - 1)
    else:
        raise ValueError(f"unknown group baseline {baseline!r}")
    return advantages.reshape(-1)


def whiten(values, mask, eps: float = 1e-8):
    """(values - mean) / std over the masked entries (the mean is kept at 0 on the others)."""
    count = mask.sum()
    mean = (values * mask).sum() / count
    variance = (((values - mean) * mask) ** 2).sum() / count
    return (values - mean) * torch.rsqrt(variance + eps) * mask


def clipped_policy_loss(logp, old_logp, advantages, clip_low: float, clip_high: float,
                        dual_clip: float | None = None):
    """Per-token PPO-clip loss -min(r A, clip(r, 1-ε_low, 1+ε_high) A) with r = π/π_old
    (asymmetric clipping as DAPO's "clip-higher"); with ``dual_clip`` c, the loss of a negative
    advantage is also capped at -c·A (Ye et al., dual-clip PPO). Returns (loss, ratio, clipped),
    ``clipped`` 1 where the clipped term decided the loss."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    was_clipped = (clipped > unclipped).float()
    if dual_clip is not None:
        capped = torch.minimum(loss, -dual_clip * advantages)
        loss = torch.where(advantages < 0, capped, loss)
    return loss, ratio, was_clipped


def clipped_value_loss(values, old_values, returns, clip: float):
    """Per-token ½ max((V - G)², (V_clip - G)²), V_clip = V_old + clip(V - V_old, ±clip)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)


def explained_variance(values, returns, mask) -> float:
    """1 - Var(G - V) / Var(G) over the masked entries (1: the critic predicts the returns)."""
    count = mask.sum()
    mean = (returns * mask).sum() / count
    variance = (((returns - mean) * mask) ** 2).sum() / count
    error = returns - values
    error_mean = (error * mask).sum() / count
    error_variance = (((error - error_mean) * mask) ** 2).sum() / count
    return (1 - error_variance / variance).item() if variance > 0 else math.nan


class KLController:
    """The KL penalty's coefficient: fixed, or adapted towards a target KL per response
    (Ziegler et al., as OpenRLHF's AdaptiveKLController): β ← β·(1 + clip(KL/target - 1, ±0.2)·n/horizon)
    after each iteration of n responses."""

    def __init__(self, coef: float, target: float | None, horizon: int):
        self.coef, self.target, self.horizon = coef, target, horizon

    def update(self, kl_per_response: float, responses: int) -> None:
        if self.target is not None:
            error = min(max(kl_per_response / self.target - 1, -0.2), 0.2)
            self.coef *= 1 + error * responses / self.horizon
