"""Pairwise (Bradley-Terry) loss terms as pure tensor math.

Every function returns SUMS over the pairs it is given; the caller divides once by the number of pairs in the whole
optimizer step (across micro-batches and ranks). That is what makes the loss independent of how a global batch is cut
into micro-batches and ranks. No torch.distributed, accelerate or deepspeed here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PairLossSums:
    """Per-micro-batch sums; divide by the global pair count to get means."""

    bt: torch.Tensor  # sum of -logsigmoid(r_c - r_r - margin)
    center: torch.Tensor  # sum of (r_c + r_r)^2  (TRL / Eisenstein et al. 2023)
    correct: torch.Tensor  # sum of 1[r_c > r_r] + 0.5 * 1[r_c == r_r]
    margin: torch.Tensor  # sum of (r_c - r_r)
    num_pairs: int


def bradley_terry_sums(
    rewards_chosen: torch.Tensor,
    rewards_rejected: torch.Tensor,
    *,
    margin: torch.Tensor | None = None,
) -> PairLossSums:
    """Loss sums for a micro-batch of pairs. ``rewards_*`` are shape ``(n,)``; ``margin`` (Llama 2) is optional."""
    assert rewards_chosen.shape == rewards_rejected.shape and rewards_chosen.dim() == 1
    diff = rewards_chosen - rewards_rejected
    logits = diff if margin is None else diff - margin.to(diff.dtype)
    return PairLossSums(
        bt=-F.logsigmoid(logits).sum(),
        center=((rewards_chosen + rewards_rejected) ** 2).sum(),
        correct=correct_pairs(diff.detach()),
        margin=diff.detach().sum(),
        num_pairs=rewards_chosen.numel(),
    )


def correct_pairs(diff: torch.Tensor) -> torch.Tensor:
    """Pairs ranked right from ``r_chosen - r_rejected``: 1 each when positive, a tie counts half (the one definition
    of accuracy, in training, evaluation and rm-scale eval)."""
    return (diff > 0).to(diff.dtype).sum() + 0.5 * (diff == 0).to(diff.dtype).sum()


def total_loss(sums: PairLossSums, *, num_pairs: float | torch.Tensor, center_coef: float | None) -> torch.Tensor:
    """The training objective for this micro-batch's share of a step over ``num_pairs`` pairs in total."""
    loss = sums.bt
    if center_coef:
        loss = loss + center_coef * sums.center
    return loss / num_pairs


@dataclass
class BatchMoments:
    """Sums over every reward (chosen and rejected) of the whole optimizer step, all ranks: detached numbers."""

    count: float
    total: float  # sum of rewards
    total_sq: float  # sum of squared rewards

    @property
    def mean(self) -> float:
        return self.total / max(self.count, 1.0)

    @property
    def var(self) -> float:
        return max(self.total_sq / max(self.count, 1.0) - self.mean**2, 0.0)


@dataclass
class GlobalTerms:
    """Weights of the loss terms defined on the whole step's rewards (0 = off)."""

    batch_mean: float = 0.0  # coef * (mean of all rewards in the step)^2
    variance: float = 0.0  # coef * variance of all rewards in the step
    target_std: float | None = None  # with target_std_coef: coef * (std - target_std)^2
    target_std_coef: float = 0.0

    @property
    def enabled(self) -> bool:
        return bool(self.batch_mean or self.variance or (self.target_std_coef and self.target_std is not None))


def global_terms(rewards: torch.Tensor, moments: BatchMoments, terms: GlobalTerms) -> tuple[torch.Tensor, dict[str, float]]:
    """This micro-batch's share of the whole-step terms, and the terms' values.

    The terms are functions of the step's mean M and variance V over N rewards, which span micro-batches and ranks.
    Their exact gradient w.r.t. each reward is linear in that reward given (M, V), so each micro-batch back-propagates
    a surrogate sum with (M, V) held fixed: sum over ranks and micro-batches of the surrogates' gradients equals the
    gradient of the terms. Values are for logging only.
    """
    n, m, v = max(moments.count, 1.0), moments.mean, moments.var
    r = rewards.float()
    linear, quadratic = r.sum(), (r * r - 2.0 * m * r).sum()  # d/dr_i: 1 and 2 (r_i - M)
    surrogate = r.new_zeros(())
    values: dict[str, float] = {}
    if terms.batch_mean:
        surrogate = surrogate + terms.batch_mean * 2.0 * m * linear / n  # d(M^2)/dr_i = 2M/N
        values["loss_batch_mean"] = m * m
    if terms.variance:
        surrogate = surrogate + terms.variance * quadratic / n  # dV/dr_i = 2(r_i - M)/N
        values["loss_variance"] = v
    if terms.target_std_coef and terms.target_std is not None:
        std = max(v, 1e-12) ** 0.5
        scale = (std - terms.target_std) / std  # d(std - t)^2/dr_i = 2(std - t)(r_i - M)/(N std)
        surrogate = surrogate + terms.target_std_coef * scale * quadratic / n
        values["loss_target_std"] = (std - terms.target_std) ** 2
    return surrogate, values


def global_terms_value(moments: BatchMoments, terms: GlobalTerms) -> float:
    """The weighted sum of the whole-step terms (what they add to the loss)."""
    m, v = moments.mean, moments.var
    value = terms.batch_mean * m * m + terms.variance * v
    if terms.target_std_coef and terms.target_std is not None:
        value += terms.target_std_coef * (max(v, 1e-12) ** 0.5 - terms.target_std) ** 2
    return value
