"""The shared losses and metrics: soft Bradley-Terry, the DPO margin, GAE, the clipped PPO losses, the
KL controller and calibration, each checked against its definition written out in the test."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cai.losses import (
    AdaptiveKL,
    dpo_margin,
    expected_calibration_error,
    gae,
    ppo_policy_loss,
    ppo_value_loss,
    preference_metrics,
    preference_report,
    reliability_bins,
    soft_bt_loss,
)


def test_soft_bt_loss_reduces_to_the_hard_forms_at_zero_and_one():
    m = torch.linspace(-4, 4, 17)
    assert torch.allclose(soft_bt_loss(m, torch.ones_like(m)), (-F.logsigmoid(m)).mean())
    assert torch.allclose(soft_bt_loss(m, torch.zeros_like(m)), (-F.logsigmoid(-m)).mean())
    # Swapping the pair (negating the margin) and the label (1 - p) leaves the loss unchanged.
    p = torch.rand(17)
    assert torch.allclose(soft_bt_loss(m, p), soft_bt_loss(-m, 1 - p))


@pytest.mark.parametrize("p", [0.55, 0.7, 0.9])
def test_soft_bt_loss_is_minimised_where_sigmoid_of_the_margin_is_p(p):
    best = math.log(p / (1 - p))
    m = torch.tensor([best], requires_grad=True)
    soft_bt_loss(m, torch.tensor([p])).backward()
    assert abs(float(m.grad)) < 1e-6
    grid = torch.linspace(-5, 5, 2001)
    losses = torch.stack([soft_bt_loss(g.view(1), torch.tensor([p])) for g in grid])
    assert abs(float(grid[losses.argmin()]) - best) < 0.01


def test_soft_bt_gradient_scales_with_the_distance_of_the_label_from_a_coin_flip():
    grads = {}
    for p in (0.7, 1.0):
        m = torch.zeros(1, requires_grad=True)
        soft_bt_loss(m, torch.tensor([p])).backward()
        grads[p] = float(m.grad)
    assert grads[0.7] < 0 and grads[1.0] < 0  # both push the margin up
    assert grads[0.7] / grads[1.0] == pytest.approx((0.7 - 0.5) / (1.0 - 0.5))


def test_dpo_margin_sign_and_scale():
    pc, pr, rc, rr = torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]), torch.tensor([-11.0])
    m = dpo_margin(pc, pr, rc, rr, beta=0.1)
    assert float(m) == pytest.approx(0.1 * ((-10 + 11) - (-12 + 11)))
    assert float(m) > 0  # the policy favours chosen more than the reference does
    assert float(dpo_margin(pr, pc, rr, rc, beta=0.1)) == pytest.approx(-float(m))
    assert float(dpo_margin(pc, pr, rc, rr, beta=0.5)) == pytest.approx(5 * float(m))
    # A shift of the reference shared by both responses cancels.
    assert float(dpo_margin(pc, pr, rc + 3, rr + 3, beta=0.1)) == pytest.approx(float(m))


def _gae_by_hand(rewards, values, lengths, gamma, lam):
    """GAE written from its definition, row by row over the unpadded part only."""
    B, T = rewards.shape
    adv = torch.zeros(B, T)
    for b in range(B):
        n = lengths[b]
        running = 0.0
        for t in reversed(range(n)):
            next_v = float(values[b, t + 1]) if t + 1 < n else 0.0
            delta = float(rewards[b, t]) + gamma * next_v - float(values[b, t])
            running = delta + gamma * lam * running
            adv[b, t] = running
    return adv


def test_gae_matches_the_definition_and_ignores_padding():
    torch.manual_seed(0)
    lengths = [5, 3]
    rewards, values = torch.randn(2, 5), torch.randn(2, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    gamma, lam = 0.9, 0.8
    adv, ret = gae(rewards, values, mask, gamma, lam)
    expected = _gae_by_hand(rewards, values, lengths, gamma, lam)
    assert torch.allclose(adv, expected, atol=1e-6)
    assert torch.allclose(ret * mask, (expected + values) * mask, atol=1e-6)
    assert torch.all(adv[1, 3:] == 0)
    # Garbage in the padding changes nothing.
    r2, v2 = rewards.clone(), values.clone()
    r2[1, 3:], v2[1, 3:] = 100.0, -100.0
    adv2, _ = gae(r2, v2, mask, gamma, lam)
    assert torch.allclose(adv2, adv)


def test_gae_with_lambda_one_and_gamma_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.2, 0.4, 0.6, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = gae(rewards, values, mask, 1.0, 1.0)
    togo = torch.flip(torch.cumsum(torch.flip(rewards[:, :3], [1]), 1), [1])
    assert torch.allclose(adv[:, :3], togo - values[:, :3])
    assert torch.allclose(ret[:, :3], togo)


def test_ppo_policy_loss_clips_only_in_the_direction_that_would_overshoot():
    clip = 0.2
    mask = torch.ones(1, 4)
    old = torch.zeros(1, 4)
    # ratios: 1.5 with positive advantage (clipped), 1.5 with negative (not clipped: the loss stays
    # pessimistic), 0.5 with negative (clipped), 1.0 (inside the range).
    logp = torch.log(torch.tensor([[1.5, 1.5, 0.5, 1.0]]))
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0]])
    loss, clipfrac = ppo_policy_loss(logp, old, adv, mask, clip)
    per_token = torch.tensor([-(1 + clip) * 1.0, 1.5, (1 - clip) * 1.0, -1.0])
    assert float(loss) == pytest.approx(float(per_token.mean()))
    assert float(clipfrac) == pytest.approx(2 / 4)
    # Gradients stop flowing through the clipped tokens.
    lp = logp.clone().requires_grad_(True)
    ppo_policy_loss(lp, old, adv, mask, clip)[0].backward()
    assert lp.grad[0, 0] == 0 and lp.grad[0, 2] == 0
    assert lp.grad[0, 1] != 0 and lp.grad[0, 3] != 0
    # Masked tokens do not count.
    loss_m, _ = ppo_policy_loss(logp, old, adv, torch.tensor([[0, 0, 0, 1]]), clip)
    assert float(loss_m) == pytest.approx(-1.0)


def test_ppo_value_loss_takes_the_worse_of_plain_and_clipped_error():
    clip = 0.2
    old = torch.tensor([[0.0, 0.0]])
    returns = torch.tensor([[1.0, 1.0]])
    values = torch.tensor([[1.0, 0.1]])  # the first moved past the clip range, the second did not
    loss = ppo_value_loss(values, old, returns, torch.ones(1, 2), clip)
    first = max((1.0 - 1.0) ** 2, (clip - 1.0) ** 2)
    second = max((0.1 - 1.0) ** 2, (0.1 - 1.0) ** 2)
    assert float(loss) == pytest.approx(0.5 * (first + second) / 2)
    v = values.clone().requires_grad_(True)
    ppo_value_loss(v, old, returns, torch.ones(1, 2), clip).backward()
    assert v.grad[0, 0] == 0  # clipped: no pull toward the return beyond the clip range


def test_adaptive_kl_is_fixed_without_target_and_moves_toward_the_target_with_one():
    fixed = AdaptiveKL(coef=0.1)
    assert fixed.update(kl=50.0, n_steps=100) == 0.1
    high = AdaptiveKL(coef=0.1, target=1.0, horizon=100)
    assert high.update(kl=3.0, n_steps=10) > 0.1  # KL above target: penalise more
    low = AdaptiveKL(coef=0.1, target=1.0, horizon=100)
    assert low.update(kl=0.2, n_steps=10) < 0.1  # KL below target: penalise less
    # The proportional error is clipped, so a huge KL moves the coefficient no more than +20% of n/h.
    capped = AdaptiveKL(coef=0.1, target=1.0, horizon=100)
    assert capped.update(kl=1e6, n_steps=10) == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))


def test_ece_is_zero_when_calibrated_and_positive_when_over_confident():
    # Two bins whose outcome rates equal their predictions exactly.
    probs = torch.tensor([0.25] * 4 + [0.75] * 4)
    outcomes = torch.tensor([1, 0, 0, 0] + [1, 1, 1, 0], dtype=torch.float)
    assert expected_calibration_error(probs, outcomes) == pytest.approx(0.0)
    # Predicting 0.95 for events that happen 75% of the time.
    over = expected_calibration_error(torch.full((4,), 0.95), outcomes[4:])
    assert over == pytest.approx(0.95 - 0.75)
    assert math.isnan(expected_calibration_error(torch.zeros(0), torch.zeros(0)))


def test_reliability_bins_hold_each_bins_mean_prediction_and_outcome():
    probs = torch.tensor([0.05, 0.12, 0.18, 0.95, 0.97, 1.0])
    outcomes = torch.tensor([0, 0, 1, 1, 1, 0], dtype=torch.float)
    cells = reliability_bins(probs, outcomes, bins=5)
    # empty bins are left out; 1.0 falls in the last bin, not an eleventh
    assert [(c["low"], c["high"], c["n"]) for c in cells] == [(0.0, 0.2, 3), (0.8, 1.0, 3)]
    assert cells[0]["p"] == pytest.approx((0.05 + 0.12 + 0.18) / 3) and cells[0]["target"] == pytest.approx(1 / 3)
    assert cells[1]["p"] == pytest.approx((0.95 + 0.97 + 1.0) / 3) and cells[1]["target"] == pytest.approx(2 / 3)
    # the ECE is the count-weighted gap of these same bins
    gap = sum(c["n"] / 6 * abs(c["p"] - c["target"]) for c in cells)
    assert expected_calibration_error(probs, outcomes, bins=5) == pytest.approx(gap)
    assert reliability_bins(torch.zeros(0), torch.zeros(0)) == []


def test_preference_metrics_count_ties_half_and_report_groups_separately():
    margins = torch.tensor([2.0, -1.0, 0.0, 3.0])
    p = torch.tensor([1.0, 1.0, 0.7, 0.7])
    m = preference_metrics(margins, p)
    assert m["n"] == 4 and m["accuracy"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert m["loss"] == pytest.approx(float(soft_bt_loss(margins, p)))
    rep = preference_report(margins, p, ["human", "human", "ai", "ai"])
    assert rep["human"]["accuracy"] == pytest.approx(0.5) and rep["ai"]["accuracy"] == pytest.approx(0.75)
    assert preference_report(margins, p, ["ai"] * 4)["human"] is None
    # A margin that says exactly the label is calibrated in both orders.
    exact = torch.logit(torch.tensor([0.7, 0.7, 0.7]))
    assert preference_metrics(exact, torch.full((3,), 0.7))["ece"] == pytest.approx(0.0, abs=1e-6)
    # its reliability bins, both orders: 0.3 against 0.3 and 0.7 against 0.7, three pairs each
    bins = preference_metrics(exact, torch.full((3,), 0.7))["reliability"]
    assert [(c["n"], round(c["p"], 6), round(c["target"], 6)) for c in bins] == [(3, 0.3, 0.3), (3, 0.7, 0.7)]
