"""PPO math for language models: masked statistics, KL estimators, per-token rewards, GAE, losses.

Every function here is small, pure and tested against hand-computed numbers
(tests/test_ppo_core.py). Shapes: B = rollouts, T = response positions (right-padded);
``mask`` (B, T) is 1 on real response tokens (up to and including EOS), 0 on padding.

The reward of token t (DESIGN.md decision 3), assembled in :func:`assemble_rewards` only:

    sequence mode:  r_t = -beta * KL_t                  (t < n)      r_n = R - beta * KL_n
    token mode:     r_t = s * rm_t - beta * KL_t        s = 1 (raw) or 1/T (mean, so sum r = Eq. 1)

then GAE (Schulman et al. 2015), ``delta_t = r_t + gamma * V_{t+1} - V_t`` and
``A_t = delta_t + gamma * lambda * A_{t+1}``, with V = 0 after the last token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


# ----------------------------------------------------------------------------- masked statistics
def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1 (0 where the mask is empty)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return masked_sum(x, mask) / mask.sum().clamp(min=1.0)
    return masked_sum(x, mask, dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries (Bessel-corrected when ``unbiased`` and more than one entry)."""
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over masked entries; ``shift_mean=False`` keeps the mean (reward whitening)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


# ----------------------------------------------------------------------------- log-probs, entropy, KL
def logprobs_from_logits(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids) under ``logits``: (B, T, V), (B, T) -> (B, T).

    As logit(id) - logsumexp(logits), which never materialises the (B, T, V) log-softmax.
    """
    logits = logits.float()
    return logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical at each position: (B, T, V) -> (B, T)."""
    logits = logits.float()
    p = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(-1)


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled token's log-probs (Schulman's k1, k3).

    With log r = log pi_ref(a) - log pi(a) for a ~ pi:
      k1 = -log r                 (unbiased, can be negative per token)
      k3 = (r - 1) - log r        (unbiased, always >= 0, lower variance)
    """
    log_ratio = ref_logprobs - logprobs  # (B, T) log r
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r} (k1 or k3)")


# ----------------------------------------------------------------------------- rewards
def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row of a right-padded mask: (B, T) -> (B,); 0 if empty."""
    lengths = mask.long().sum(-1)
    return (lengths - 1).clamp(min=0)


def assemble_rewards(kl: torch.Tensor, mask: torch.Tensor, kl_coef: float, *, score: torch.Tensor | None = None,
                     token_rewards: torch.Tensor | None = None, terminal_bonus: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards of a batch (STYLE.md habit 4): the ONE place they are put together.

    kl:             (B, T) per-token KL estimate (see :func:`kl_estimate`)
    mask:           (B, T) response mask
    score:          (B,)   sequence reward, added at the last response token   (sequence mode)
    token_rewards:  (B, T) per-token reward, already scaled, 0 on padding       (token mode)
    terminal_bonus: (B,)   added at the last token in either mode (e.g. minus the missing-EOS penalty)
    Returns (rewards, non_score_rewards), both (B, T) and 0 on padding, where
    non_score_rewards = -kl_coef * kl.
    """
    if (score is None) == (token_rewards is None):
        raise ValueError("give exactly one of score (sequence mode) or token_rewards (token mode)")
    mask = mask.to(kl.dtype)
    non_score = -kl_coef * kl * mask
    rewards = non_score.clone()
    last = last_token_index(mask).unsqueeze(1)  # (B, 1)
    if score is not None:
        rewards.scatter_add_(1, last, score.to(kl.dtype).unsqueeze(1))
    else:
        rewards = rewards + token_rewards.to(kl.dtype) * mask
    if terminal_bonus is not None:
        rewards.scatter_add_(1, last, terminal_bonus.to(kl.dtype).unsqueeze(1))
    return rewards * mask, non_score


def scale_token_rewards(token_rewards: torch.Tensor, mask: torch.Tensor, scale: str,
                        n_scored: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token PPO rewards from the RM's r_t (B, T); ``mask`` marks each row's response tokens (a prefix).

    ``raw``: r_t as is. ``mean``: r_t / T, so that a response's rewards sum to Eq. 1's mean.
    ``prefix``: the change token t makes to the mean of the rewards so far, c (mu_t - mu_{t-1}) with
    mu_t = (r_1 + ... + r_t) / t and mu_0 = 0. These also sum to Eq. 1's mean (they telescope to
    c mu_T), but each depends on the tokens up to t only: under ``mean`` the 1/T of every earlier
    token is set by where the response ends, which no advantage after those tokens sees, so
    writing one more sentence is credited its r_t / T and not its effect on the mean (a bias
    towards longer answers whenever r_t > 0).

    ``n_scored`` (B,) is T as the reward model counted it (response tokens + closing token);
    defaults to the number of policy tokens. ``prefix``'s c = policy tokens / ``n_scored`` (1 when
    the two count alike) makes its sum Eq. 1's mean exactly.
    """
    if scale == "raw":
        return token_rewards * mask
    n_policy = mask.sum(-1).to(token_rewards.dtype)
    n = (n_scored.to(token_rewards.dtype) if n_scored is not None else n_policy).clamp(min=1.0)
    if scale == "mean":
        return token_rewards * mask / n.unsqueeze(1)
    if scale == "prefix":
        x = token_rewards * mask
        mu = x.cumsum(-1) / mask.cumsum(-1).clamp(min=1.0)
        step = torch.diff(mu, dim=-1, prepend=torch.zeros_like(mu[:, :1]))
        return step * mask * (n_policy / n).unsqueeze(1)
    raise ValueError(f"unknown token reward scale {scale!r} (raw, mean or prefix)")


# ----------------------------------------------------------------------------- advantages
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded responses.

    rewards, values, mask: (B, T). V is taken as 0 after each response's last token
    (the episode ends there). Returns (advantages, returns), (B, T), 0 on padding;
    returns = advantages + values (the value targets).
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_values = values[:, t + 1] if t + 1 < T else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last_gae = (delta + gamma * lam * last_gae) * mask[:, t]
        advantages[:, t] = last_gae
    returns = (advantages + values) * mask
    return advantages, returns


# ----------------------------------------------------------------------------- losses
@dataclass
class PolicyLossOut:
    loss: torch.Tensor        # scalar, differentiable
    clipfrac: torch.Tensor    # share of tokens where the clipped branch is active
    approx_kl: torch.Tensor   # 0.5 * E[(log ratio)^2] between the rollout policy and the current one


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cliprange: float) -> PolicyLossOut:
    """Clipped surrogate: mean over tokens of max(-A * ratio, -A * clip(ratio, 1-eps, 1+eps))."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(loss_unclipped, loss_clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((loss_clipped > loss_unclipped).float(), mask)
        approx_kl = 0.5 * masked_mean(log_ratio ** 2, mask)
    return PolicyLossOut(loss, clipfrac, approx_kl)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss 0.5 * mean(max((V - G)^2, (V_clip - G)^2)), V_clip = old + clip(V - old, +-eps).

    Returns (loss, clipfrac). ``cliprange_value=None`` gives the plain squared error.
    """
    err = (values - returns) ** 2
    if cliprange_value is None:
        return 0.5 * masked_mean(err, mask), torch.zeros((), device=values.device)
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    err_clipped = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(err, err_clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((err_clipped > err).float(), mask)
    return loss, clipfrac


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[G - V] / Var[G] over masked tokens (1 = perfect, 0 = no better than a constant)."""
    var_returns = masked_var(returns, mask, unbiased=False)
    if var_returns <= 0:
        return torch.tensor(float("nan"))
    return 1.0 - masked_var(returns - values, mask, unbiased=False) / var_returns


# ----------------------------------------------------------------------------- KL coefficient
class FixedKLController:
    """A constant KL coefficient beta."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. (2019): beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon).

    ``current_kl`` is the mean over rollouts of the summed per-token KL; ``n_steps`` the
    number of rollouts in the step (all processes).
    """

    def __init__(self, kl_coef: float, target: float, horizon: int):
        super().__init__(kl_coef)
        self.target, self.horizon = float(target), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


# ----------------------------------------------------------------------------- reward normalisation
class RunningMoments:
    """Running mean and variance of rewards over all steps (Chan et al.'s parallel update).

    ``normalise`` standardises sequence scores; ``scale`` only divides by the std, for
    per-token rewards (shifting each token would change what a token is rewarded for).
    """

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().flatten()
        n = x.numel()
        if n == 0:
            return
        b_mean, b_var = x.mean().item(), x.var(unbiased=False).item()
        total = self.count + n
        delta = b_mean - self.mean
        m2 = self.var * self.count + b_var * n + delta ** 2 * self.count * n / total
        self.mean += delta * n / total
        self.var, self.count = m2 / total, total

    @property
    def std(self) -> float:
        return max(self.var, 1e-12) ** 0.5

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.std

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), int(state["count"])
