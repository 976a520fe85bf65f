"""Token-id pairs → micro-batches for ONE forward: padded (chosen and rejected to one common length) or packed
(padding-free rows), plus the zero-weight padding batch of a rank whose shard ran out."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from rm_scale.data.formats import PRETOKENIZED, common_prefix_length
from rm_scale.data.groups import edge_margins, ranking_tiers


@dataclass
class RewardDataCollatorWithPadding:
    """Pads the chosen and rejected sides of a batch of pairs to ONE common length.

    One common length lets the trainer run chosen and rejected through the model in one concatenated forward.
    Padding follows ``tokenizer.padding_side`` (left or right); the trainer reads each reward at the last token whose
    attention mask is 1, so both sides work, and so does pad == eos.
    """

    tokenizer: Any
    padding: bool | str = True
    max_length: int | None = None
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"

    def __call__(self, features: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("RewardDataCollatorWithPadding got an empty batch.")
        missing = [k for k in PRETOKENIZED if k not in features[0]]
        if missing:
            raise ValueError(
                f"RewardDataCollatorWithPadding needs the columns {list(PRETOKENIZED)}; missing {missing}. "
                "Tokenise text with rm_scale.data.prepare_dataset (RewardTrainer does this for you)."
            )
        longest = max(max(len(f["input_ids_chosen"]), len(f["input_ids_rejected"])) for f in features)
        if self.max_length is not None and longest > self.max_length:
            raise ValueError(
                f"A pair in this batch has {longest} tokens, more than max_length={self.max_length}. "
                "Drop or truncate long pairs before collating."
            )
        length = longest
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            raise ValueError("The tokenizer has no pad token: set tokenizer.pad_token (RewardTrainer does this).")
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        batch: dict[str, torch.Tensor] = {}
        for side in ("chosen", "rejected"):
            ids = torch.full((len(features), length), pad_id, dtype=torch.long)
            mask = torch.zeros((len(features), length), dtype=torch.long)
            for i, f in enumerate(features):
                seq = torch.as_tensor(f[f"input_ids_{side}"], dtype=torch.long)
                att = torch.as_tensor(f[f"attention_mask_{side}"], dtype=torch.long)
                n = seq.numel()
                sl = slice(length - n, length) if left else slice(0, n)
                ids[i, sl] = seq
                mask[i, sl] = att
            batch[f"input_ids_{side}"] = ids
            batch[f"attention_mask_{side}"] = mask
        if "margin" in features[0]:
            batch["margin"] = torch.tensor([float(f["margin"]) for f in features], dtype=torch.float)
        batch["return_loss"] = True
        return batch


def computed_tokens(batch: dict[str, Any]) -> int:
    """Token positions a micro-batch's forward computes, padding included: from its shapes (padded: chosen + rejected
    rows; packed: the packed rows), so no device sync."""
    if "packed_input_ids" in batch:
        return int(batch["packed_input_ids"].numel())
    return int(batch["input_ids_chosen"].numel() + batch["input_ids_rejected"].numel())


def pack_pairs(pairs: list[dict[str, Any]], *, row_length: int | None, pad_id: int) -> dict[str, Any]:
    """Padding-free micro-batch: every chosen and rejected sequence laid end to end in rows of at most
    ``row_length`` tokens (first fit, longest first), ``position_ids`` restarting at 0 for each sequence.

    transformers builds a block-diagonal causal mask from restarting position_ids when no attention mask is given
    (and no KV cache is used), so each sequence attends only to itself. ``chosen_index`` / ``rejected_index`` hold the
    (row, column) of each sequence's last token, where its reward is read.
    """
    seqs = [pair[f"input_ids_{side}"] for pair in pairs for side in ("chosen", "rejected")]
    packed = pack_sequences(seqs, row_length=row_length, pad_id=pad_id)
    out = {"packed_input_ids": packed["packed_input_ids"], "packed_position_ids": packed["packed_position_ids"],
           "chosen_index": packed["index"][0::2], "rejected_index": packed["index"][1::2],
           "packed_real_tokens": packed["packed_real_tokens"]}
    if "margin" in pairs[0]:
        out["margin"] = torch.tensor([float(p["margin"]) for p in pairs], dtype=torch.float)
    return out


def pack_groups(pairs: list[dict[str, Any]], *, row_length: int | None, pad_id: int) -> dict[str, Any]:
    """Like `pack_pairs`, but each pair is one *group* (`pack_response_groups` with K = 2): the prefix both sides
    share, then the chosen side's own tokens, then the rejected side's, positions continuing from the prefix end on
    both sides, so the prefix is computed once. ``packed_groups`` holds (row, start, prefix, chosen own, rejected own)
    per group; ``chosen_span`` / ``rejected_span`` the keys of each read token: (group start, prefix end, own start)."""
    packed = pack_response_groups([[p["input_ids_chosen"], p["input_ids_rejected"]] for p in pairs],
                                  row_length=row_length, pad_id=pad_id)
    index, spans, tokens = packed.pop("index"), packed.pop("spans"), packed.pop("packed_sequence_tokens")
    out = {**packed, "chosen_index": index[0::2], "rejected_index": index[1::2], "chosen_span": spans[0::2],
           "rejected_span": spans[1::2], "packed_pair_tokens": tokens}
    if "margin" in pairs[0]:
        out["margin"] = torch.tensor([float(p["margin"]) for p in pairs], dtype=torch.float)
    return out


def pack_group_batch(groups: list[dict[str, Any]], *, row_length: int | None, pad_id: int) -> dict[str, Any]:
    """A micro-batch of tokenised response groups (rm_scale.data.groups) for one forward: the packed rows of
    `pack_response_groups`, each response's ``response_index`` / ``response_span``, and what the loss reads (indices
    into the batch's responses, group by group): ``edge_better``, ``edge_worse``, ``edge_tie``, ``edge_margin`` (when
    a group has margins), ``response_group`` and ``response_tier`` (ranking_tiers; -1 for a group whose edges
    contradict each other), and the counts ``group_edges`` (preferences), ``group_ties`` and ``group_ranked``
    (groups with more than one tier) that normalise the step's loss."""
    packed = pack_response_groups([g["input_ids"] for g in groups], row_length=row_length, pad_id=pad_id)
    better, worse, tie, group, tier, margins = [], [], [], [], [], []
    offset, ranked, pair_tokens = 0, 0, 0
    for n, g in enumerate(groups):
        k = len(g["input_ids"])
        for i, j, t in g["edges"]:
            better.append(offset + i)
            worse.append(offset + j)
            tie.append(bool(t))
            pair_tokens += 0 if t else len(g["input_ids"][i]) + len(g["input_ids"][j])
        margins += edge_margins(g)
        tiers = ranking_tiers(k, g["edges"])
        ranked += tiers is not None and len(set(tiers)) > 1
        tier += tiers if tiers is not None else [-1] * k
        group += [n] * k
        offset += k
    tie_t = torch.tensor(tie, dtype=torch.bool)
    out = {"packed_input_ids": packed["packed_input_ids"], "packed_position_ids": packed["packed_position_ids"],
           "packed_groups": packed["packed_groups"], "packed_real_tokens": packed["packed_real_tokens"],
           "response_index": packed["index"], "response_span": packed["spans"],
           # what the same preferences cost as independent pairs (both sides whole, unpadded; ties are no pair)
           "packed_pair_tokens": torch.tensor(pair_tokens),
           "edge_better": torch.tensor(better, dtype=torch.long), "edge_worse": torch.tensor(worse, dtype=torch.long),
           "edge_tie": tie_t, "response_group": torch.tensor(group, dtype=torch.long),
           "response_tier": torch.tensor(tier, dtype=torch.long),
           "group_edges": torch.tensor(int((~tie_t).sum())), "group_ties": torch.tensor(int(tie_t.sum())),
           "group_ranked": torch.tensor(ranked)}
    if any("margins" in g or "margin" in g for g in groups):
        out["edge_margin"] = torch.tensor(margins, dtype=torch.float)
    return out


def pack_response_groups(groups: list[list[list[int]]], *, row_length: int | None, pad_id: int) -> dict[str, Any]:
    """K >= 2 responses of one prompt per group (token ids of prompt + response each): the prefix they all share once,
    then each response's own tokens, positions continuing from the prefix end for each. The forward
    (rm_scale.model.packed_attention) lets each response attend to the prefix and its own earlier tokens only, so
    the rewards are those of K separate sequences. Groups pack first fit into rows of ``row_length`` (None: one row).

    ``index`` / ``spans``: per response, group by group, the (row, column) of its last token and its keys (group
    start, prefix end, own start). ``packed_groups``: (row, start, prefix, own_1, ..., own_K) per group, zero-padded
    to the widest group (a row's padding tail is a group of its own with no prefix)."""
    shared = [common_prefix_length(g) for g in groups]
    sizes = [sum(map(len, g)) - (len(g) - 1) * p for g, p in zip(groups, shared)]
    rows, fill = _narrowest_rows(list(range(len(groups))), row_length or sum(sizes), sizes.__getitem__)
    width, parts = max(fill), max(map(len, groups))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    starts = [0, *itertools.accumulate(map(len, groups))]
    index, spans = torch.zeros((starts[-1], 2), dtype=torch.long), torch.zeros((starts[-1], 3), dtype=torch.long)
    layout = []
    for r, row in enumerate(rows):
        col = 0
        for g in row:
            p, own = shared[g], [len(s) - shared[g] for s in groups[g]]
            ids[r, col : col + p] = torch.as_tensor(groups[g][0][:p], dtype=torch.long)
            pos[r, col : col + p] = torch.arange(p)
            at = col + p
            for k, seq in enumerate(groups[g]):
                ids[r, at : at + own[k]] = torch.as_tensor(seq[p:], dtype=torch.long)
                pos[r, at : at + own[k]] = torch.arange(p, len(seq))
                index[starts[g] + k] = torch.tensor([r, at + own[k] - 1])
                spans[starts[g] + k] = torch.tensor([col, col + p, at if k else col + p])
                at += own[k]
            layout.append([r, col, p, *own, *[0] * (parts - len(own))])
            col = at
        if col < width:  # the row's tail padding: a sequence of its own
            pos[r, col:] = torch.arange(width - col)
            layout.append([r, col, 0, width - col, *[0] * (parts - 1)])
    return {"packed_input_ids": ids, "packed_position_ids": pos, "index": index, "spans": spans,
            "packed_groups": torch.tensor(layout, dtype=torch.long), "packed_real_tokens": torch.tensor(sum(fill)),
            "packed_sequence_tokens": torch.tensor(sum(len(s) for g in groups for s in g))}


def pack_sequences(seqs: list[list[int]], *, row_length: int | None, pad_id: int) -> dict[str, Any]:
    """Single sequences laid end to end as `pack_pairs` lays a pair's sides (first fit, longest first, restarting
    ``position_ids``); ``index`` holds the (row, column) of each sequence's last token, ``packed_groups`` each one as
    a group without prefix or second part (what rm_scale.model.packed_attention computes as a plain sequence)."""
    rows, fill = _narrowest_rows(list(range(len(seqs))), row_length, lambda i: len(seqs[i]))
    width = max(fill)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    index = torch.zeros((len(seqs), 2), dtype=torch.long)
    spans = torch.zeros((len(seqs), 3), dtype=torch.long)
    groups = []
    for r, row in enumerate(rows):
        col = 0
        for i in row:
            n = len(seqs[i])
            ids[r, col : col + n] = torch.as_tensor(seqs[i], dtype=torch.long)
            pos[r, col : col + n] = torch.arange(n)
            index[i] = torch.tensor([r, col + n - 1])
            spans[i] = torch.tensor([col, col, col])
            groups.append((r, col, 0, n, 0))
            col += n
        if col < width:
            pos[r, col:] = torch.arange(width - col)
            groups.append((r, col, 0, width - col, 0))
    return {"packed_input_ids": ids, "packed_position_ids": pos, "index": index, "spans": spans,
            "packed_groups": torch.tensor(groups, dtype=torch.long), "packed_real_tokens": torch.tensor(sum(fill))}


def _narrowest_rows(items: list[Any], row_length: int | None, size: Any) -> tuple[list[list[Any]], list[int]]:
    """First-fit rows of ``items`` (``size(item)`` tokens each), as few as at ``row_length`` (at least the longest
    item), but as narrow as possible: narrowed until an item would need another row, so the last row is not mostly
    padding."""
    longest, total = max(map(size, items)), sum(map(size, items))
    rows, fill = _first_fit(items, max(row_length or longest, longest), size)
    width = max(longest, -(-total // len(rows)))
    while True:
        narrow = _first_fit(items, width, size)
        if len(narrow[0]) <= len(rows):
            return narrow
        width += max(1, width // 64)


def _first_fit(items: list[Any], capacity: int, size: Any) -> tuple[list[list[Any]], list[int]]:
    """First-fit decreasing bin packing of items (``size(item)`` tokens each) into rows of ``capacity`` tokens."""
    rows: list[list[Any]] = []
    fill: list[int] = []
    for item in sorted(items, key=lambda x: -size(x)):
        n = size(item)
        row = next((r for r, used in enumerate(fill) if used + n <= capacity), None)
        if row is None:
            rows.append([])
            fill.append(0)
            row = len(rows) - 1
        rows[row].append(item)
        fill[row] += n
    return rows, fill


def padding_batch(tokenizer: Any) -> dict[str, Any]:
    """A one-pair batch of weight zero: a rank whose shard is exhausted runs it so that every rank still runs the same
    number of forwards (under ZeRO-3 each forward is a collective)."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
    ids = torch.tensor([[eos]], dtype=torch.long)
    ones = torch.ones_like(ids)
    return {"input_ids_chosen": ids, "attention_mask_chosen": ones, "input_ids_rejected": ids.clone(),
            "attention_mask_rejected": ones.clone(), "_pad": True}
