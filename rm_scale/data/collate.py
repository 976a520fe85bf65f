"""Token-id pairs → micro-batches for ONE forward: padded (chosen and rejected to one common length) or packed
(padding-free rows), plus the zero-weight padding batch of a rank whose shard ran out."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from rm_scale.data.formats import PRETOKENIZED


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
    seqs = [(i, side, pair[f"input_ids_{side}"]) for i, pair in enumerate(pairs) for side in ("chosen", "rejected")]
    longest, total = max(len(s) for _, _, s in seqs), sum(len(s) for _, _, s in seqs)
    rows, fill = _first_fit(seqs, max(row_length or longest, longest))
    # Rows as few as at row_length, but as short as possible: narrow them until a sequence would need another row,
    # so the last row is not mostly padding.
    width = max(longest, -(-total // len(rows)))
    while True:
        narrow = _first_fit(seqs, width)
        if len(narrow[0]) <= len(rows):
            rows, fill = narrow
            break
        width += max(1, width // 64)
    width = max(fill)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    index = {"chosen": torch.zeros((len(pairs), 2), dtype=torch.long),
             "rejected": torch.zeros((len(pairs), 2), dtype=torch.long)}
    for r, row in enumerate(rows):
        col = 0
        for i, side, seq in row:
            ids[r, col : col + len(seq)] = torch.as_tensor(seq, dtype=torch.long)
            pos[r, col : col + len(seq)] = torch.arange(len(seq))
            index[side][i] = torch.tensor([r, col + len(seq) - 1])
            col += len(seq)
        pos[r, col:] = torch.arange(width - col)  # the row's tail padding is a sequence of its own
    out = {"packed_input_ids": ids, "packed_position_ids": pos, "chosen_index": index["chosen"],
           "rejected_index": index["rejected"], "packed_real_tokens": torch.tensor(sum(fill))}
    if "margin" in pairs[0]:
        out["margin"] = torch.tensor([float(p["margin"]) for p in pairs], dtype=torch.float)
    return out


def _first_fit(seqs: list[tuple[int, str, list[int]]], capacity: int) -> tuple[list[list[Any]], list[int]]:
    """First-fit decreasing bin packing of sequences into rows of ``capacity`` tokens."""
    rows: list[list[Any]] = []
    fill: list[int] = []
    for item in sorted(seqs, key=lambda x: -len(x[2])):
        n = len(item[2])
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
