"""Evaluation on streamed files: each rank reads its shard of the evaluation files (nothing is materialised), the
ranks run their forwards in lockstep (a rank whose shard is done runs weight-zero padding batches: under ZeRO-3
every forward is a collective), and the metrics are computed once over every rank's pairs — each pair counted once,
whatever the world size.

The trainer runs transformers' evaluation loop over `LockstepBatches` (so DeepSpeed's inference set-up, callbacks and
logging stay transformers'), records each batch's rewards in an `EvalRows`, and gathers them at the end
(`gather_rows`) for `metrics.pair_set_metrics`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch

from rm_scale.data.collate import padding_batch
from rm_scale.data.stream import PairStream
from rm_scale.distributed import all_gather_objects, all_reduce_max


@dataclass
class StreamedEvalSet:
    """An evaluation set read as a stream: this rank's `PairStream` over the evaluation files."""

    stream: PairStream


class LockstepBatches(torch.utils.data.IterableDataset):
    """This rank's evaluation batches, then padding batches (``"_pad"``) until no rank has a batch left (agreed
    with one tiny all-reduce per batch, on ``device``)."""

    def __init__(self, stream: PairStream, tokenizer: Any, device: torch.device) -> None:
        super().__init__()
        self.stream, self.tokenizer, self.device = stream, tokenizer, device

    def __iter__(self) -> Iterator[dict[str, Any]]:
        batches = iter(self.stream)
        while True:
            batch = next(batches, None)
            if all_reduce_max(torch.tensor([float(batch is not None)], device=self.device)).item() == 0:
                return
            if batch is None:
                yield padding_batch(self.tokenizer)
                continue
            batch.pop("_state", None)
            yield batch


SAMPLES = 8  # pairs whose token ids are kept for the W&B sample table


@dataclass
class EvalRows:
    """This rank's rewards, margins and subsets of one evaluation, batch by batch, and the token ids of its first
    `SAMPLES` pairs (``samples``: rows i of rank 0's come first in the gathered rewards)."""

    chosen: list[float] = field(default_factory=list)
    rejected: list[float] = field(default_factory=list)
    margin: list[float] = field(default_factory=list)
    subset: list[str | None] = field(default_factory=list)
    samples: list[dict[str, list[int]]] = field(default_factory=list)
    groups: list[tuple[list[float], list[int], str | None]] = field(default_factory=list)  # rewards, tiers, subset
    ties: list[tuple[float, str | None]] = field(default_factory=list)  # |reward gap| of each tie edge, subset

    def add(self, rewards: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor, batch: dict[str, Any]) -> None:
        """One batch's pairs (a group batch's preference edges) and, for groups, each group and tie edge: the batch's
        every reward, and its pairs' chosen and rejected ones."""
        n = chosen.shape[0]
        if len(self.samples) < SAMPLES:
            self.samples += pair_ids(batch)[: SAMPLES - len(self.samples)]
        self.chosen += chosen.detach().float().cpu().tolist()
        self.rejected += rejected.detach().float().cpu().tolist()
        subsets = list(batch.get("_subsets") or [])
        if "response_index" in batch:  # response groups (collate.pack_group_batch)
            self._add_groups(rewards.detach().float().cpu(), batch, subsets)
            return
        margin = batch.get("margin")
        self.margin += margin.float().cpu().tolist() if margin is not None else [0.0] * n
        self.subset += subsets or [None] * n

    def _add_groups(self, rewards: torch.Tensor, batch: dict[str, Any], subsets: list[str | None]) -> None:
        group, tier = batch["response_group"].cpu(), batch["response_tier"].cpu()
        better, worse, tie = batch["edge_better"].cpu(), batch["edge_worse"].cpu(), batch["edge_tie"].cpu().bool()

        def name(g: int) -> str | None:
            return subsets[g] if subsets else None

        margin = batch.get("edge_margin")
        self.margin += margin.cpu()[~tie].tolist() if margin is not None else [0.0] * int((~tie).sum())
        self.subset += [name(int(group[i])) for i in better[~tie]]
        self.ties += [(abs(float(rewards[i] - rewards[j])), name(int(group[i]))) for i, j in zip(better[tie], worse[tie])]
        for g in range(int(group.max()) + 1 if group.numel() else 0):
            mine = group == g
            self.groups.append((rewards[mine].tolist(), tier[mine].tolist(), name(g)))


def gather_groups(rows: EvalRows) -> tuple[list[tuple[list[float], list[int], str | None]], list[tuple[float, Any]]]:
    """Every rank's groups and tie edges, rank after rank (a collective)."""
    parts = all_gather_objects((rows.groups, rows.ties))
    return [g for p in parts for g in p[0]], [t for p in parts for t in p[1]]


def gather_rows(rows: EvalRows) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    """Every rank's rows, rank after rank (a collective): ``(pairs, 2)`` rewards (chosen, rejected), the margins and
    the subsets."""
    parts = all_gather_objects((rows.chosen, rows.rejected, rows.margin, rows.subset))
    rewards = np.array([[c, r] for p in parts for c, r in zip(p[0], p[1])], dtype=np.float64).reshape(-1, 2)
    margin = np.array([x for p in parts for x in p[2]], dtype=np.float64)
    return rewards, margin, [x for p in parts for x in p[3]]


def pair_ids(batch: dict[str, Any]) -> list[dict[str, list[int]]]:
    """The token ids of each pair of a padded, packed or shared-prefix micro-batch (a group batch: of each preference
    edge), in pair order."""
    if "response_index" in batch:  # response groups
        pref = ~batch["edge_tie"].bool()
        index, span = batch["response_index"], batch["response_span"]
        return [{"input_ids_chosen": _span_ids(batch["packed_input_ids"], index[i], span[i]),
                 "input_ids_rejected": _span_ids(batch["packed_input_ids"], index[j], span[j])}
                for i, j in zip(batch["edge_better"][pref].tolist(), batch["edge_worse"][pref].tolist())]
    out = []
    for i in range(batch["chosen_index" if "chosen_index" in batch else "input_ids_chosen"].shape[0]):
        out.append({f"input_ids_{side}": _side_ids(batch, side, i) for side in ("chosen", "rejected")})
    return out


def _side_ids(batch: dict[str, Any], side: str, i: int) -> list[int]:
    if "packed_input_ids" not in batch:
        ids, mask = batch[f"input_ids_{side}"][i], batch[f"attention_mask_{side}"][i]
        return ids[mask.bool()].tolist()
    ids = batch["packed_input_ids"]
    row, col = batch[f"{side}_index"][i].tolist()
    if f"{side}_span" in batch:  # the shared prefix, then this side's own tokens
        return _span_ids(ids, batch[f"{side}_index"][i], batch[f"{side}_span"][i])
    length = int(batch["packed_position_ids"][row, col]) + 1
    return ids[row, col - length + 1 : col + 1].tolist()


def _span_ids(ids: torch.Tensor, index: torch.Tensor, span: torch.Tensor) -> list[int]:
    """A shared-prefix sequence's tokens: its group's prefix, then its own tokens up to the read token."""
    (row, col), (start, prefix_end, own) = index.tolist(), span.tolist()
    return ids[row, start:prefix_end].tolist() + ids[row, own : col + 1].tolist()
