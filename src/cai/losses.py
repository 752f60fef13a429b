"""Losses and metrics shared by the training stages, as small pure functions on tensors.

- `soft_bt_loss`: Bradley-Terry cross-entropy against a soft target (preference model, DPO).
- `dpo_margin`: the DPO implicit-reward margin, fed to `soft_bt_loss` (soft-label DPO).
- `gae`, `ppo_policy_loss`, `ppo_value_loss`, `AdaptiveKL`: PPO with a KL penalty.
- `expected_calibration_error`, `reliability_bins`: calibration of predicted preference
  probabilities, as one number and as a reliability diagram.
- `preference_metrics`, `preference_report`: held-out accuracy, loss and calibration of a
  preference scorer (the preference model, DPO's implicit reward), per label source.

Every masked reduction goes through `masked_mean`, so padding never enters a loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


def soft_bt_loss(margin: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy between the Bradley-Terry probability sigmoid(margin) and the target `p`
    (the probability that the first item is preferred). At p=1 it is -log sigmoid(margin), the
    hard-label loss; for a soft p it is minimised where sigmoid(margin) = p."""
    p = p.to(margin.dtype)
    return -(p * F.logsigmoid(margin) + (1 - p) * F.logsigmoid(-margin)).mean()


def dpo_margin(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
               ref_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """beta times the difference of the policy-to-reference log-ratios of chosen and rejected
    (sequence log-probabilities). Soft-label DPO is `soft_bt_loss(dpo_margin(...), p)`."""
    return beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise `x` to unit variance over the masked entries (and zero mean unless told not to)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each label under `logits` (same leading shape; no shifting here)."""
    return torch.gather(F.log_softmax(logits.float(), dim=-1), -1, labels.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens (B, T); positions where `mask` is 0 are
    padding after the response and carry no value. Returns (advantages, returns)."""
    mask = mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    adv = torch.zeros_like(values)
    last = torch.zeros_like(values[:, 0])
    T = values.shape[1]
    for t in reversed(range(T)):
        next_v = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = delta + gamma * lam * last * (mask[:, t + 1] if t + 1 < T else 0.0)
        adv[:, t] = last * mask[:, t]
    return adv, adv + values


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                    clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped surrogate loss; returns (loss, fraction of tokens where the clip was active)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).to(logp.dtype), mask)
    return loss, clipfrac


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip: float) -> torch.Tensor:
    """Clipped value loss: the worse of the plain and the clipped squared error, halved."""
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2), mask)


@dataclass
class AdaptiveKL:
    """KL coefficient: fixed when `target` is None, else moved toward the target KL each step with
    a proportional controller (error clipped to +-20%, scaled by n_steps / horizon)."""

    coef: float
    target: float | None = None
    horizon: int = 10000

    def update(self, kl: float, n_steps: int) -> float:
        if self.target is not None:
            err = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.coef *= 1.0 + err * n_steps / self.horizon
        return self.coef


def reliability_bins(probs: torch.Tensor, outcomes: torch.Tensor, bins: int = 10) -> list[dict[str, float]]:
    """The reliability diagram of binary predictions: `probs` are P(outcome = 1), `outcomes` are 0/1
    (or soft targets). Equal-width bins; each non-empty one as {low, high, n, p (mean prediction),
    target (mean outcome)}. A calibrated predictor has p = target in every bin."""
    probs = probs.detach().double().flatten()
    outcomes = outcomes.detach().double().flatten()
    idx = (probs * bins).long().clamp(min=0, max=bins - 1)
    out = []
    for b in range(bins):
        sel = idx == b
        if sel.any():
            out.append({"low": b / bins, "high": (b + 1) / bins, "n": int(sel.sum()),
                        "p": float(probs[sel].mean()), "target": float(outcomes[sel].mean())})
    return out


def expected_calibration_error(probs: torch.Tensor, outcomes: torch.Tensor, bins: int = 10) -> float:
    """ECE of binary predictions: `probs` are P(outcome = 1), `outcomes` are 0/1 (or soft targets,
    in which case each bin's accuracy is the mean target). Equal-width bins (`reliability_bins`),
    weighted by count."""
    cells = reliability_bins(probs, outcomes, bins)
    total = sum(c["n"] for c in cells)
    if not total:
        return float("nan")
    return sum(c["n"] / total * abs(c["p"] - c["target"]) for c in cells)


def pairwise_accuracy(margins: torch.Tensor) -> torch.Tensor:
    """The share of pairs a scorer ranks right from its margins (chosen minus rejected): a positive
    margin counts 1, a tie counts half, a negative margin 0."""
    margins = margins.detach()
    return ((margins > 0).double() + 0.5 * (margins == 0).double()).mean()


def preference_metrics(margins: torch.Tensor, p: torch.Tensor, bins: int = 10) -> dict[str, Any]:
    """Held-out metrics of a preference scorer from its margins (score of chosen minus score of
    rejected) and labels `p` = P(chosen is better): `accuracy` (a tie counts half), mean
    `soft_bt_loss`, mean `margin`, and the `ece` of sigmoid(margin) against `p`. Each pair enters the
    ECE in both orders (sigmoid(-margin) against 1 - p too): labels are all >= 0.5 as stored, and
    one-sided bins would hide over-confidence toward the rejected answer. `reliability` holds the
    same bins (`reliability_bins`), for a reliability diagram (the run report draws it)."""
    margins = margins.detach().double().flatten()
    p = p.detach().double().flatten()
    acc = pairwise_accuracy(margins)
    probs = torch.cat([torch.sigmoid(margins), torch.sigmoid(-margins)])
    targets = torch.cat([p, 1 - p])
    return {"n": int(margins.numel()), "accuracy": float(acc), "loss": float(soft_bt_loss(margins, p)),
            "margin": float(margins.mean()), "ece": expected_calibration_error(probs, targets, bins),
            "reliability": reliability_bins(probs, targets, bins)}


def preference_report(margins: torch.Tensor, p: torch.Tensor, sources: list[str]) -> dict[str, dict | None]:
    """`preference_metrics` over all pairs and separately for AI and human labels (`sources`);
    a group without pairs is None."""
    out: dict[str, dict | None] = {}
    for group in ("overall", "ai", "human"):
        sel = [i for i, s in enumerate(sources) if group == "overall" or s == group]
        out[group] = preference_metrics(margins[sel], p[sel]) if sel else None
    return out
