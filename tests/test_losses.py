"""IPS-family losses pinned on hand-computed tensors: values and gradients, and the KL term's gradient."""

import math

import pytest
import torch

from pipeline.losses import IPSLossConfig, ips_loss

POLICY = [[-1.0, -2.0], [-0.5, -3.0]]
REF = [[-1.2, -1.5], [-0.3, -2.0]]
MASK = [[1, 1], [1, 0]]  # the second sample has one response token
REWARDS = [1.0, -0.5]


def run(**cfg):
    policy = torch.tensor(POLICY, dtype=torch.float64, requires_grad=True)
    loss, stats = ips_loss(policy, torch.tensor(REF, dtype=torch.float64), torch.tensor(MASK),
                           torch.tensor(REWARDS, dtype=torch.float64), IPSLossConfig(**cfg))  # fmt: skip
    loss.backward()
    return loss.item(), policy.grad.tolist(), stats


def by_hand(weights, kl_coef=0.5, discount=0.5, estimator="k1"):
    """Loss and gradient written out element by element for this 2×2 example."""
    p, q, r = POLICY, REF, REWARDS
    # KL(π_ref ‖ πθ) per token from samples of π_ref, a = log πθ, b = log π_ref
    k = (lambda a, b: b - a) if estimator == "k1" else (lambda a, b: math.exp(a - b) - 1 - (a - b))
    dk = (lambda a, b: -1.0) if estimator == "k1" else (lambda a, b: math.exp(a - b) - 1)
    w = [kl_coef, kl_coef * discount]  # sample 1 has a negative reward
    l0 = (r[0] * weights[0][0] * -p[0][0] + r[0] * weights[0][1] * -p[0][1]) / 2 + w[0] * (
        k(p[0][0], q[0][0]) + k(p[0][1], q[0][1])) / 2  # fmt: skip
    l1 = r[1] * weights[1][0] * -p[1][0] + w[1] * k(p[1][0], q[1][0])
    grad = [
        [0.5 * (-r[0] * weights[0][0] / 2 + w[0] * dk(p[0][0], q[0][0]) / 2),
         0.5 * (-r[0] * weights[0][1] / 2 + w[0] * dk(p[0][1], q[0][1]) / 2)],
        [0.5 * (-r[1] * weights[1][0] + w[1] * dk(p[1][0], q[1][0])), 0.0],
    ]  # fmt: skip
    return (l0 + l1) / 2, grad


RHO = [[math.exp(0.2), math.exp(-0.5)], [math.exp(-0.2), math.exp(-1.0)]]


@pytest.mark.parametrize(
    ("cfg", "weights"),
    [
        ({"loss_type": "ips"}, [[1.2, RHO[0][1]], [RHO[1][0], 0]]),  # ρ clipped from above at 1.2
        ({"loss_type": "ips", "is_clip_min": 0.7, "is_clip_max": None}, [[RHO[0][0], 0.7], [RHO[1][0], 0]]),
        (
            {"loss_type": "topr"},
            [[1.0, 1.0], [RHO[1][0], 0]],
        ),  # no weight for r >= 0; clip(ρ, 0, 1) for r < 0
        ({"loss_type": "rwr"}, [[1.0, 1.0], [1.0, 0]]),
        ({"loss_type": "ips", "kl_estimator": "k3"}, [[1.2, RHO[0][1]], [RHO[1][0], 0]]),
    ],
)
def test_loss_value_and_gradient(cfg, weights):
    loss, grad, _ = run(**cfg)
    expected_loss, expected_grad = by_hand(weights, estimator=cfg.get("kl_estimator", "k1"))
    assert loss == pytest.approx(expected_loss, abs=1e-12)
    for got_row, want_row in zip(grad, expected_grad, strict=True):
        assert got_row == pytest.approx(want_row, abs=1e-12)


def test_ips_value_spelled_out():
    # one number computed on paper, so a wrong formula shared by code and helper cannot hide
    loss, _, _ = run(loss_type="ips")
    l0 = 0.5 * (1.2 * 1.0 + math.exp(-0.5) * 2.0) + 0.5 * (-0.2 + 0.5) / 2
    l1 = -0.5 * math.exp(-0.2) * 0.5 + 0.25 * (0.5 - 0.3)
    assert loss == pytest.approx((l0 + l1) / 2, abs=1e-12)


def test_kl_term_reaches_the_gradient():
    # the original code added the KL penalty before computing it, so kl never changed a gradient
    _, grad_without, _ = run(kl_coef=0.0)
    _, grad_with, _ = run(kl_coef=0.5)
    diff = [
        [a - b for a, b in zip(ra, rb, strict=True)] for ra, rb in zip(grad_with, grad_without, strict=True)
    ]
    # d/dp of 0.5·KL (k1 = log π_ref − log πθ) over the batch: −0.5 · 1/|y| · 1/B, ×0.5 for the negative sample
    assert diff[0] == pytest.approx([-0.5 * 0.5 / 2, -0.5 * 0.5 / 2], abs=1e-12)
    assert diff[1] == pytest.approx([-0.25 * 0.5, 0.0], abs=1e-12)
    _, grad_discount, _ = run(kl_coef=0.5, kl_neg_discount=1.0)
    assert grad_discount[1][0] != pytest.approx(grad_with[1][0])


def test_rho_carries_no_gradient_and_stats():
    _, grad, stats = run(loss_type="ips")
    # if ρ were differentiated, d/dp of ρ·(−p) would add −ρ·p terms; the hand gradient above excludes them
    assert stats["clipped_frac"].item() == pytest.approx(1 / 3)  # one of three response tokens clipped
    assert stats["rho_max"].item() == pytest.approx(math.exp(0.2))
    assert stats["reward_mean"].item() == pytest.approx(0.25)
    assert stats["policy_loss_pos"].item() > 0 > stats["policy_loss_neg"].item()
    assert grad[1][1] == 0.0  # a masked token gets no gradient


def test_topr_truncates_the_sequence_ratio_on_negatives():
    """TOPR (arXiv 2503.14286): weight 1 on r >= 0; min(1, πθ(y|x)/π_ref(y|x)) on r < 0, the ratio of the
    whole sequence (the product of the token ratios), the same for every token of the sample."""
    policy = torch.tensor([[-1.0, -2.0], [-0.4, -1.7], [-0.9, -1.1]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-1.2, -1.5], [-1.0, -1.5], [-0.6, -0.6]], dtype=torch.float64)
    mask, rewards = torch.ones(3, 2), torch.tensor([1.0, -1.0, -0.5], dtype=torch.float64)
    # log ratios: sample 1 (+0.6, −0.2): sequence e^0.4 > 1 -> 1; sample 2 (−0.3, −0.5): sequence e^−0.8
    seq = [[1.0, 1.0], [1.0, 1.0], [math.exp(-0.8)] * 2]
    tok = [[1.0, 1.0], [1.0, math.exp(-0.2)], [math.exp(-0.3), math.exp(-0.5)]]
    for loss_type, weights, truncated in (("topr", seq, 2 / 6), ("topr_token", tok, 1 / 6)):
        cfg = IPSLossConfig(loss_type=loss_type, kl_coef=0.0)
        p = policy.detach().clone().requires_grad_(True)
        loss, stats = ips_loss(p, ref, mask, rewards, cfg)
        loss.backward()
        want = sum(rewards[i].item() * sum(weights[i][t] * -policy[i, t].item() for t in range(2)) / 2
                   for i in range(3)) / 3  # fmt: skip
        assert loss.item() == pytest.approx(want, abs=1e-12), loss_type
        want_grad = [[-rewards[i].item() * weights[i][t] / 2 / 3 for t in range(2)] for i in range(3)]
        assert p.grad.tolist() == [pytest.approx(row, abs=1e-12) for row in want_grad], loss_type
        assert stats["clipped_frac"].item() == pytest.approx(truncated), loss_type


def test_behaviour_logps_set_the_weights_and_the_reference_keeps_the_kl():
    """With the sampler's log-probs μ stored, ρ = πθ/μ; the KL term is still to π_ref (by hand)."""
    mu = [[-0.8, -2.5], [-0.6, -9.0]]
    policy = torch.tensor(POLICY, dtype=torch.float64, requires_grad=True)
    loss, stats = ips_loss(policy, torch.tensor(REF, dtype=torch.float64), torch.tensor(MASK),
                           torch.tensor(REWARDS, dtype=torch.float64), IPSLossConfig(loss_type="ips"),
                           torch.tensor(mu, dtype=torch.float64))  # fmt: skip
    loss.backward()
    rho = [[math.exp(-1.0 + 0.8), math.exp(-2.0 + 2.5)], [math.exp(-0.5 + 0.6), 0]]
    weights = [[min(rho[0][0], 1.2), min(rho[0][1], 1.2)], [min(rho[1][0], 1.2), 0]]
    expected_loss, expected_grad = by_hand(weights)  # KL from REF, as without μ
    assert loss.item() == pytest.approx(expected_loss, abs=1e-12)
    for got_row, want_row in zip(policy.grad.tolist(), expected_grad, strict=True):
        assert got_row == pytest.approx(want_row, abs=1e-12)
    assert stats["rho_mean"].item() == pytest.approx((rho[0][0] + rho[0][1] + rho[1][0]) / 3, abs=1e-12)
