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
    with torch.no_grad():
        correct = (diff > 0).to(diff.dtype).sum() + 0.5 * (diff == 0).to(diff.dtype).sum()
    return PairLossSums(
        bt=-F.logsigmoid(logits).sum(),
        center=((rewards_chosen + rewards_rejected) ** 2).sum(),
        correct=correct,
        margin=diff.detach().sum(),
        num_pairs=rewards_chosen.numel(),
    )


def total_loss(sums: PairLossSums, *, num_pairs: float | torch.Tensor, center_coef: float | None) -> torch.Tensor:
    """The training objective for this micro-batch's share of a step over ``num_pairs`` pairs in total."""
    loss = sums.bt
    if center_coef:
        loss = loss + center_coef * sums.center
    return loss / num_pairs
