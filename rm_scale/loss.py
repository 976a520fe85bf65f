"""Pairwise (Bradley-Terry) loss terms as pure tensor math.

Every function returns SUMS over the pairs it is given; the caller divides once by the number of pairs in the whole
optimizer step (across micro-batches and ranks). That is what makes the loss independent of how a global batch is cut
into micro-batches and ranks. No torch.distributed, accelerate or deepspeed here.
"""

from __future__ import annotations

import math
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


def total_loss(sums: PairLossSums, *, num_pairs: float | torch.Tensor, center_coef: float | None,
               objective: torch.Tensor | None = None) -> torch.Tensor:
    """The training objective for this micro-batch's share of a step over ``num_pairs`` pairs (or loss units: edges,
    groups) in total: ``objective`` (default: the pairs' Bradley-Terry sum) plus the centring term."""
    loss = sums.bt if objective is None else objective
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


# ---- groups: one prompt, K >= 2 responses --------------------------------------------------------------------------
# A micro-batch holds the rewards of every response of its groups, (N,). Preferences are edges into those rewards
# (pairwise labels, votes or score gaps) or each response's tier in its group's ranking (0 = best; equal tiers are
# tied). The functions return sums, as above: the caller divides by the global count of edges or groups.


@dataclass
class EdgeLossSums:
    """Per-micro-batch sums over a group's edges; divide by the global edge count."""

    loss: torch.Tensor  # sum of -log P(observed outcome): a preference, or a tie under the tie model
    correct: torch.Tensor  # preference edges ranked right (equal rewards count half)
    num_edges: int  # preference edges
    num_ties: int  # tie edges in the loss (0 when ties are dropped)


def edge_sums(
    rewards: torch.Tensor,
    better: torch.Tensor,
    worse: torch.Tensor,
    *,
    margin: torch.Tensor | None = None,
    tie: torch.Tensor | None = None,
    tie_strength: float | None = None,
) -> EdgeLossSums:
    """Bradley-Terry over edges ``rewards[better[e]] > rewards[worse[e]]``; with ``tie`` (E,) bool, the marked edges
    are ties between their two responses. ``tie_strength`` None: ties carry no loss (dropped). ``tie_strength`` ν > 0:
    Davidson's (1970) extension, P(i > j) = π_i / D, P(tie) = ν √(π_i π_j) / D, D = π_i + π_j + ν √(π_i π_j),
    π = exp(reward); ν = 0 is Bradley-Terry, and the three outcomes' probabilities sum to 1. ``margin`` (E,) is
    subtracted from a preference edge's reward gap (Llama 2), as in `bradley_terry_sums`."""
    tie = torch.zeros_like(better, dtype=torch.bool) if tie is None else tie.to(torch.bool)
    diff = rewards[better] - rewards[worse]
    logits = diff if margin is None else diff - margin.to(diff.dtype)
    pref = ~tie
    if tie_strength is None:
        loss = -F.logsigmoid(logits[pref]).sum()
        ties = 0
    else:
        if not tie_strength > 0:
            raise ValueError(f"tie_strength must be > 0 (Davidson's nu), got {tie_strength}")
        log_nu = torch.full_like(logits, math.log(tie_strength))
        half = torch.where(pref, logits, diff) / 2
        log_norm = torch.logsumexp(torch.stack([half, -half, log_nu]), dim=0)
        loss = (log_norm - torch.where(pref, half, log_nu)).sum()
        ties = int(tie.sum())
    return EdgeLossSums(loss=loss, correct=correct_pairs(diff.detach()[pref]), num_edges=int(pref.sum()),
                        num_ties=ties)


def plackett_luce_sums(rewards: torch.Tensor, group: torch.Tensor, tier: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The negative log Plackett-Luce likelihood of each group's ranking, summed, and the number of groups ranked.

    ``group`` (N,) names each response's group, ``tier`` (N,) its place (0 = best). Each response in turn is chosen
    from those not yet chosen: -log P = sum over responses of logsumexp(rewards of its tier and worse) - reward.
    Responses of one tier are tied (Breslow's approximation: each is chosen from its tier and the worse ones); the
    worst tier is chosen from nothing and adds no term. K = 2 without a tie is Bradley-Terry."""
    same = group[:, None] == group[None, :]
    pool = same & (tier[None, :] >= tier[:, None])  # row i: the responses still to choose from when i is chosen
    _, index = torch.unique(group, return_inverse=True)
    worst = torch.zeros(int(index.max()) + 1, dtype=tier.dtype, device=tier.device)
    ranked = tier < worst.scatter_reduce(0, index, tier, reduce="amax", include_self=False)[index]
    masked = rewards[None, :].masked_fill(~pool, float("-inf"))
    terms = torch.logsumexp(masked, dim=1) - rewards
    return terms[ranked].sum(), int(torch.unique(group[ranked]).numel())


def best_of_k_correct(rewards: torch.Tensor, group: torch.Tensor, tier: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Groups whose one best response (tier 0, not tied) out-scores every other response of the group, and the number
    of such groups (RewardBench 2 scores its 1-correct-vs-3 subsets this way). A tie for the top reward counts as
    1 / (responses sharing it)."""
    best = tier == 0
    ids, per_group = torch.unique(group, return_inverse=True)
    n = ids.numel()
    top_count = torch.zeros(n, dtype=torch.long, device=rewards.device).scatter_add(0, per_group, best.long())
    top = torch.full((n,), float("-inf"), dtype=rewards.dtype, device=rewards.device)
    top = top.scatter_reduce(0, per_group, rewards.detach(), reduce="amax")
    at_top = rewards.detach() == top[per_group]
    sharing = torch.zeros(n, dtype=rewards.dtype, device=rewards.device).scatter_add(0, per_group, at_top.to(rewards.dtype))
    won = torch.zeros(n, dtype=rewards.dtype, device=rewards.device).scatter_add(
        0, per_group, (best & at_top).to(rewards.dtype))
    scored = top_count == 1
    return (won[scored] / sharing[scored]).sum(), int(scored.sum())


def group_loss_sums(rewards: torch.Tensor, better: torch.Tensor, worse: torch.Tensor, tie: torch.Tensor, *,
                    group: torch.Tensor, tier: torch.Tensor, margin: torch.Tensor | None, loss_type: str,
                    tie_strength: float | None) -> tuple[torch.Tensor, PairLossSums]:
    """(objective sum, the preference edges as pairs) of a micro-batch of groups (rm_scale.data.collate
    .pack_group_batch). ``bradley_terry``: over the preference edges, ties by Davidson's model when ``tie_strength``
    is given (`edge_sums`); ``plackett_luce``: each ranked group's listwise term (groups with tier -1, whose edges do
    not rank them, add none; margins do not apply). The pairs give accuracy, margins, reward statistics and the
    centring term, as for pair batches."""
    pref = ~tie.to(torch.bool)
    pairs = bradley_terry_sums(rewards[better[pref]], rewards[worse[pref]],
                               margin=None if margin is None else margin[pref])
    if loss_type == "plackett_luce":
        ranked = tier >= 0
        if not bool(ranked.any()):
            return rewards.sum() * 0.0, pairs
        return plackett_luce_sums(rewards[ranked], group[ranked], tier[ranked])[0], pairs
    if tie_strength is not None:
        return edge_sums(rewards, better, worse, margin=margin, tie=tie, tie_strength=tie_strength).loss, pairs
    return pairs.bt, pairs
