"""Offline importance-sampling losses (IPS family), and PPO's pieces (below the IPS loss), in one place.

Per sample i with reward r_i and response tokens t (mask m_t, |y_i| = Σ_t m_t), policy log-probs
log πθ(y_t) (with gradient), stored reference log-probs log π_ref(y_t) and, where the data's sampler is
known (`pipeline collect` stores it), the behaviour log-probs log μ(y_t) (else μ = π_ref):

    ρ_t      = exp(log πθ(y_t) − log μ(y_t))                           (no gradient flows through ρ)
    ρ̃_t      = clip(ρ_t, is_clip_min, is_clip_max)                     loss_type "ips"  (defaults: none, 1.2)
             = 1 if r_i ≥ 0,  min(1, Π_t ρ_t) if r_i < 0                "topr" (arXiv 2503.14286: the sequence
                                                                        ratio πθ(y|x)/π_ref(y|x), truncated)
             = 1 if r_i ≥ 0,  min(1, ρ_t) if r_i < 0                    "topr_token" (per-token variant)
             = 1                                                        "rwr"  (no importance weight)
    L_i      = (1/|y_i|) Σ_t m_t · r_i · ρ̃_t · (−log πθ(y_t))
    KL_i     = (1/|y_i|) Σ_t m_t · k_t,   k1: k_t = log π_ref − log πθ
                                          k3: k_t = ρ_t − 1 − log ρ_t   (ρ_t with gradient here)
    w_i      = kl_coef · (kl_neg_discount if r_i < 0 else 1)
    loss     = mean_i (L_i + w_i · KL_i)

KL_i estimates KL(π_ref ‖ πθ) from the logged responses, which were sampled from (roughly) the reference:
under y ~ π_ref both k1 and k3 are unbiased, and k3 is never negative. (The other direction's estimator,
log πθ − log π_ref, has a gradient that lowers the likelihood of every logged token without bound when
minimized on these samples: it is not offered.) The KL term is computed from the same policy log-probs
as L_i and *then* added, so it reaches the gradient (the original code added it before computing it, so
it never did). Rows with no response token contribute 0. TOPR's paper weights −log πθ(y|x), the sequence's
sum; here every loss takes the per-token mean (1/|y_i|), so TOPR's weights are the paper's and its per-sample
scale is that of the other losses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_TYPES = ("ips", "topr", "topr_token", "rwr")
KL_ESTIMATORS = ("k1", "k3")


@dataclass
class IPSLossConfig:
    loss_type: str = "ips"
    is_clip_min: float | None = None
    is_clip_max: float | None = 1.2
    kl_coef: float = 0.5
    kl_estimator: str = "k1"
    kl_neg_discount: float = 0.5


def importance_weights(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    cfg: IPSLossConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ρ̃, truncated, ρ) per token [B, T], all without gradient: the weight of the loss, where the loss
    type cut a ratio down (or up), and the plain per-token ratio. mask [B, T]; rewards [B]."""
    log_rho = (policy_logps.detach() - ref_logps) * mask
    rho = torch.exp(log_rho)
    negative = (rewards < 0)[:, None].expand_as(rho)
    ones = torch.ones_like(rho)
    if cfg.loss_type == "ips":
        unclipped = cfg.is_clip_min is None and cfg.is_clip_max is None
        weight = rho if unclipped else rho.clamp(min=cfg.is_clip_min, max=cfg.is_clip_max)
        truncated = weight != rho
    elif cfg.loss_type == "topr":
        sequence = log_rho.sum(1, keepdim=True).expand_as(rho)  # log πθ(y|x) − log π_ref(y|x)
        weight = torch.where(negative, torch.exp(sequence.clamp(max=0.0)), ones)
        truncated = negative & (sequence > 0)
    elif cfg.loss_type == "topr_token":
        weight = torch.where(negative, rho.clamp(max=1.0), ones)
        truncated = negative & (rho > 1)
    elif cfg.loss_type == "rwr":
        weight, truncated = ones, torch.zeros_like(negative)
    else:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {cfg.loss_type!r}")
    return weight, truncated, rho


def kl_per_token(policy_logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str) -> torch.Tensor:
    log_ratio = policy_logps - ref_logps  # log ρ, with gradient
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        return torch.exp(log_ratio) - 1 - log_ratio
    raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def ips_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    cfg: IPSLossConfig,
    behaviour_logps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss above and per-batch statistics. policy/ref/behaviour logps and mask: [B, T]; rewards: [B].
    Without behaviour logps, μ is the reference."""
    mask = mask.to(policy_logps.dtype)
    lengths = mask.sum(1).clamp(min=1)
    mu = ref_logps if behaviour_logps is None else behaviour_logps
    weight, truncated, rho = importance_weights(policy_logps, mu, mask, rewards, cfg)
    policy_term = (rewards[:, None] * weight * -policy_logps * mask).sum(1) / lengths
    kl = (kl_per_token(policy_logps, ref_logps, cfg.kl_estimator) * mask).sum(1) / lengths
    kl_weight = cfg.kl_coef * torch.where(rewards < 0, cfg.kl_neg_discount, 1.0).to(policy_logps.dtype)
    per_sample = policy_term + kl_weight * kl
    loss = per_sample.mean()

    with torch.no_grad():
        tokens = mask.bool()
        rho_tokens = rho[tokens] if tokens.any() else torch.zeros(1, device=rho.device)
        clipped = truncated[tokens].float() if tokens.any() else torch.zeros(1, device=rho.device)
        positive, negative = rewards >= 0, rewards < 0
        stats = {
            "policy_loss": policy_term.mean(),
            "policy_loss_pos": policy_term[positive].mean() if positive.any() else torch.tensor(float("nan")),
            "policy_loss_neg": policy_term[negative].mean() if negative.any() else torch.tensor(float("nan")),
            "kl": kl.mean(),
            "rho_mean": rho_tokens.mean(),
            "rho_max": rho_tokens.max(),
            "clipped_frac": clipped.mean(),
            "reward_mean": rewards.float().mean(),
        }
    return loss, stats


# ------------------------------------------------------------------------------------------------ PPO pieces
#
# Shapes: [B, T] over response tokens, `mask` 1 on real response tokens (up to and including EOS), 0 after.


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    count = mask.sum()
    if unbiased and count > 1:  # Bessel's correction over the masked entries only
        var = var * count / (count - 1)
    return var


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(x − mean) / std over the masked entries (mean and std ignore masked-out ones); entries outside the
    mask are returned as 0. `shift_mean=False` only rescales (keeps the mean), as for per-token rewards."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(values.dtype)


def policy_kl_per_token(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(πθ ‖ π_ref) from tokens sampled from πθ (PPO's online direction):
    k1 = log πθ − log π_ref (unbiased, can be negative); k3 = r − 1 − log r with r = π_ref/πθ (unbiased,
    never negative, lower variance). The IPS estimators with the two distributions' roles swapped."""
    return kl_per_token(ref_logps, logps, estimator)


def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over response tokens. Returns (advantages, returns = A + V).

    δ_t = r_t + γ·V_{t+1} − V_t with V after the last real token taken as 0 (the episode ends there);
    A_t = δ_t + γλ·A_{t+1}. Entries outside the mask are 0."""
    mask = mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(values)
    next_advantage = torch.zeros_like(values[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


def ppo_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate: mean over tokens of max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)), ρ = πθ/π_old.
    Stats: clip fraction (tokens where the clipped term is taken) and approx-KL ½·(log ρ)²."""
    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "policy_clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: ½ · mean over tokens of max((V − R)², (V_clip − R)²), where
    V_clip = V_old + clip(V − V_old, −ε, ε)."""
    clipped_values = old_values + (values - old_values).clamp(-clip_range, clip_range)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    with torch.no_grad():
        stats = {"value_clipfrac": masked_mean((clipped_error > unclipped_error).float(), mask)}
    return loss, stats


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 − Var(R − V) / Var(R) over masked tokens: 1 is a perfect critic, 0 no better than a constant."""
    return 1.0 - masked_var(returns - values, mask) / masked_var(returns, mask).clamp(min=1e-8)


@dataclass
class KLController:
    """The KL penalty coefficient: fixed, or adaptive (Ziegler et al. 2019) — nudged towards a target KL
    per sequence: β ← β · (1 + clip(KL/target − 1, −0.2, 0.2) · n/horizon) after n sequences."""

    value: float
    target: float | None = None
    horizon: int = 10000

    def update(self, observed_kl: float, num_sequences: int) -> None:
        if self.target is None:
            return
        error = min(max(observed_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * num_sequences / self.horizon
