"""One micro-batch → its rewards and its loss sums, from ONE forward: padded or packed pairs, or response groups
(rm_scale.data.collate.pack_group_batch: a prompt's K responses, the prompt computed once).

The trainer divides the sums once by the step's count of loss units over all micro-batches and ranks (`loss_units`):
pairs; for groups the preference edges (plus the tie edges under the tie model) with Bradley-Terry, or the ranked
groups with Plackett-Luce. A group's preference edges are its pairs everywhere else (accuracy, margin, reward
statistics, the centring term), so a group of two with one edge is exactly a pair.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rm_scale.data.collate import computed_tokens
from rm_scale.loss import PairLossSums, bradley_terry_sums, group_loss_sums
from rm_scale.model.reward import forward_packed_rewards, forward_rewards


@dataclass
class BatchRewards:
    rewards: torch.Tensor  # every sequence's reward, each once (what the whole-step terms' moments count)
    chosen: torch.Tensor  # per pair (a group's preference edges)
    rejected: torch.Tensor
    tokens: torch.Tensor  # [placed tokens, computed tokens, the pairs' tokens]


def is_group_batch(batch: Mapping[str, Any]) -> bool:
    return "response_index" in batch


def forward_batch(model: nn.Module, inputs: Mapping[str, Any]) -> BatchRewards:
    """The rewards of a padded, packed or group micro-batch (placed = the pairs' tokens unless a shared prefix is
    computed once)."""
    if "packed_input_ids" in inputs:
        ids, pos = inputs["packed_input_ids"], inputs["packed_position_ids"]
        if is_group_batch(inputs):
            index, spans = inputs["response_index"], inputs["response_span"]
        else:
            index = torch.cat([inputs["chosen_index"], inputs["rejected_index"]])
            spans = torch.cat([inputs["chosen_span"], inputs["rejected_span"]]) if "chosen_span" in inputs else None
        rewards = forward_packed_rewards(model, ids, pos, index, groups=inputs.get("packed_groups"), spans=spans)
        real = inputs["packed_real_tokens"].reshape(()).float()
        pair_tokens = inputs.get("packed_pair_tokens", inputs["packed_real_tokens"]).reshape(()).float()
    else:
        ids = torch.cat([inputs["input_ids_chosen"], inputs["input_ids_rejected"]], dim=0)
        mask = torch.cat([inputs["attention_mask_chosen"], inputs["attention_mask_rejected"]], dim=0)
        rewards = forward_rewards(model, ids, mask)
        real = mask.sum().float()
        pair_tokens = real
    computed = torch.tensor(float(computed_tokens(inputs)), device=real.device)
    tokens = torch.stack([real, computed, pair_tokens.to(real.device)])
    if is_group_batch(inputs):
        pref = ~inputs["edge_tie"].to(rewards.device)
        better, worse = inputs["edge_better"].to(rewards.device), inputs["edge_worse"].to(rewards.device)
        return BatchRewards(rewards, rewards[better[pref]], rewards[worse[pref]], tokens)
    n = rewards.shape[0] // 2
    return BatchRewards(rewards, rewards[:n], rewards[n:], tokens)


def batch_loss_sums(out: BatchRewards, inputs: Mapping[str, Any], args: Any) -> tuple[torch.Tensor, PairLossSums]:
    """(objective sum, the pairs' sums) of one micro-batch under ``args``' loss_type / ties / tie_strength."""
    if not is_group_batch(inputs):
        sums = bradley_terry_sums(out.chosen, out.rejected, margin=inputs.get("margin"))
        return sums.bt, sums
    device = out.rewards.device
    margin = inputs.get("edge_margin")
    return group_loss_sums(
        out.rewards, inputs["edge_better"].to(device), inputs["edge_worse"].to(device), inputs["edge_tie"].to(device),
        group=inputs["response_group"].to(device), tier=inputs["response_tier"].to(device),
        margin=None if margin is None else margin.to(device), loss_type=args.loss_type,
        tie_strength=args.tie_strength if args.ties == "tie_model" else None,
    )


def loss_units(batch: Mapping[str, Any], args: Any) -> int:
    """What one micro-batch adds to the step's divisor (0 for a rank's padding batch)."""
    if batch.get("_pad", False):
        return 0
    if is_group_batch(batch):
        if args.loss_type == "plackett_luce":
            return int(batch["group_ranked"])
        return int(batch["group_edges"]) + (int(batch["group_ties"]) if args.ties == "tie_model" else 0)
    return int(batch["chosen_index" if "chosen_index" in batch else "input_ids_chosen"].shape[0])
