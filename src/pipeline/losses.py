"""Offline importance-sampling losses (IPS family), in one place.

Per sample i with reward r_i and response tokens t (mask m_t, |y_i| = Σ_t m_t), policy log-probs
log πθ(y_t) (with gradient) and stored reference log-probs log π_ref(y_t):

    ρ_t      = exp(log πθ(y_t) − log π_ref(y_t))                       (no gradient flows through ρ)
    ρ̃_t      = clip(ρ_t, is_clip_min, is_clip_max)                     loss_type "ips"  (defaults: none, 1.2)
             = 1 if r_i ≥ 0,  clip(ρ_t, 0, 1) if r_i < 0                loss_type "topr" (arXiv 2503.14286)
             = 1                                                        loss_type "rwr"  (no importance weight)
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
it never did). Rows with no response token contribute 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_TYPES = ("ips", "topr", "rwr")
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
    policy_logps: torch.Tensor, ref_logps: torch.Tensor, rewards: torch.Tensor, cfg: IPSLossConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ρ̃, ρ) per token, both without gradient. Shapes [B, T]; rewards [B]."""
    rho = torch.exp(policy_logps.detach() - ref_logps)
    if cfg.loss_type == "ips":
        unclipped = cfg.is_clip_min is None and cfg.is_clip_max is None
        weight = rho if unclipped else rho.clamp(min=cfg.is_clip_min, max=cfg.is_clip_max)
    elif cfg.loss_type == "topr":
        negative = (rewards < 0)[:, None]
        weight = torch.where(negative, rho.clamp(0.0, 1.0), torch.ones_like(rho))
    elif cfg.loss_type == "rwr":
        weight = torch.ones_like(rho)
    else:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {cfg.loss_type!r}")
    return weight, rho


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
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss above and per-batch statistics. policy/ref logps and mask: [B, T]; rewards: [B]."""
    mask = mask.to(policy_logps.dtype)
    lengths = mask.sum(1).clamp(min=1)
    weight, rho = importance_weights(policy_logps, ref_logps, rewards, cfg)
    policy_term = (rewards[:, None] * weight * -policy_logps * mask).sum(1) / lengths
    kl = (kl_per_token(policy_logps, ref_logps, cfg.kl_estimator) * mask).sum(1) / lengths
    kl_weight = cfg.kl_coef * torch.where(rewards < 0, cfg.kl_neg_discount, 1.0).to(policy_logps.dtype)
    per_sample = policy_term + kl_weight * kl
    loss = per_sample.mean()

    with torch.no_grad():
        tokens = mask.bool()
        rho_tokens = rho[tokens] if tokens.any() else torch.zeros(1, device=rho.device)
        clipped = (weight != rho)[tokens].float() if tokens.any() else torch.zeros(1, device=rho.device)
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
