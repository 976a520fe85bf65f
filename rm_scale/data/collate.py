"""Token-id pairs → micro-batches for ONE forward: padded (chosen and rejected to one common length) or packed
(padding-free rows), plus the zero-weight padding batch of a rank whose shard ran out."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from rm_scale.data.formats import PRETOKENIZED, shared_prefix_length


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
    """Like `pack_pairs`, but each pair is one *group*: the prefix both sides share, then the chosen side's own
    tokens, then the rejected side's own tokens, with positions continuing from the prefix end on both sides. The
    forward (rm_scale.model.packed_attention) lets each side attend to the prefix and to its own earlier tokens only,
    so the prefix is computed once. ``packed_groups`` holds (row, start, prefix, chosen own, rejected own) per group
    (a row's padding tail is a group with no prefix and no rejected part); ``chosen_span`` / ``rejected_span`` the
    keys of each read token: (group start, prefix end, own start). ``row_length`` None: all groups in one row."""
    items = [(i, p["input_ids_chosen"], p["input_ids_rejected"]) for i, p in enumerate(pairs)]
    shared = [shared_prefix_length(c, r) for _, c, r in items]
    sizes = {i: len(c) + len(r) - shared[i] for i, c, r in items}
    rows, fill = _narrowest_rows([i for i, _, _ in items], row_length or sum(sizes.values()), sizes.__getitem__)
    width = max(fill)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    spans = {side: torch.zeros((len(pairs), 3), dtype=torch.long) for side in ("chosen", "rejected")}
    index = {side: torch.zeros((len(pairs), 2), dtype=torch.long) for side in ("chosen", "rejected")}
    groups = []
    for r, row in enumerate(rows):
        col = 0
        for i in row:
            _, chosen, rejected = items[i]
            p, end = shared[i], col + len(chosen) + len(rejected) - shared[i]
            ids[r, col : col + len(chosen)] = torch.as_tensor(chosen, dtype=torch.long)
            ids[r, col + len(chosen) : end] = torch.as_tensor(rejected[p:], dtype=torch.long)
            pos[r, col : col + len(chosen)] = torch.arange(len(chosen))
            pos[r, col + len(chosen) : end] = torch.arange(p, len(rejected))
            index["chosen"][i] = torch.tensor([r, col + len(chosen) - 1])
            index["rejected"][i] = torch.tensor([r, end - 1])
            spans["chosen"][i] = torch.tensor([col, col + p, col + p])
            spans["rejected"][i] = torch.tensor([col, col + p, col + len(chosen)])
            groups.append((r, col, p, len(chosen) - p, len(rejected) - p))
            col = end
        if col < width:  # the row's tail padding: a sequence of its own
            pos[r, col:] = torch.arange(width - col)
            groups.append((r, col, 0, width - col, 0))
    out = {"packed_input_ids": ids, "packed_position_ids": pos, "chosen_index": index["chosen"],
           "rejected_index": index["rejected"], "packed_real_tokens": torch.tensor(sum(fill)),
           "packed_pair_tokens": torch.tensor(sum(len(c) + len(r) for _, c, r in items)),
           "packed_groups": torch.tensor(groups, dtype=torch.long), "chosen_span": spans["chosen"],
           "rejected_span": spans["rejected"]}
    if "margin" in pairs[0]:
        out["margin"] = torch.tensor([float(p["margin"]) for p in pairs], dtype=torch.float)
    return out


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
