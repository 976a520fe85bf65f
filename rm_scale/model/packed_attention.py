"""Attention for packed rows that computes each sequence's causal block only (variable-length attention with SDPA).

A packed row (rm_scale.data.collate.pack_pairs) holds several sequences end to end; each may attend only to itself. With
stock `sdpa`, transformers builds the row's block-diagonal causal mask from the restarting position_ids and SDPA then
computes the whole row x row score matrix and throws most of it away: for rows of 512 tokens holding sequences of ~120,
~4/5 of the attention work is masked out. This implementation gets the same numbers by running SDPA once per sequence
(`is_causal=True`, no mask) on that sequence's slice of the row -- what flash-attention's varlen kernels do on GPUs with
`cu_seqlens`, without needing them.

It is registered with transformers as ``"rm_scale_packed_sdpa"`` (an `AttentionInterface` function plus the `sdpa` mask
function) and is a plain `sdpa` for every call that does not carry ``packed_segments``: evaluation, padded batches and
generation are unchanged. `RewardTrainer` switches a model from `sdpa` to it when `batching="packed"`;
`rm_scale.model.reward.forward_packed_rewards` passes ``packed_segments`` (each row's sequence boundaries, from the
position_ids) when the model uses it. The implementation name is not saved with the model (transformers keeps it out of
config.json), so a saved model loads with whatever attention its user picks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

NAME = "rm_scale_packed_sdpa"

Segments = tuple[tuple[tuple[int, int], ...], ...]  # per row: (start, end) of each sequence, covering the whole row


def segments_from_position_ids(position_ids: torch.Tensor) -> Segments:
    """Each row's sequences as (start, end) column ranges: a sequence starts where position_ids is 0. The ranges cover
    the whole row (a row's padding tail is a sequence of its own, see pack_pairs), so every output position is set."""
    pos = position_ids.detach().to("cpu")
    width = pos.shape[1]
    out = []
    for row in pos:
        starts = torch.nonzero(row == 0).flatten().tolist()
        if not starts or starts[0] != 0:
            starts = [0, *starts]
        ends = [*starts[1:], width]
        out.append(tuple(zip(starts, ends)))
    return tuple(out)


def packed_sdpa_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    packed_segments: Segments | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: query (B, H, T, D), key/value (B, H_kv, T, D) -> output (B, T, H, D)."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if packed_segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if len(packed_segments) != query.shape[0]:
        raise ValueError(f"packed_segments has {len(packed_segments)} rows, the batch {query.shape[0]}")
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    rows = []
    for r, segments in enumerate(packed_segments):
        q, k, v = query[r : r + 1], key[r : r + 1], value[r : r + 1]
        parts = [
            F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], dropout_p=dropout,
                                           is_causal=True, scale=scaling)
            for a, b in segments
        ]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    out = rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register the implementation with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, packed_sdpa_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


def use_packed_attention(model: torch.nn.Module) -> bool:
    """Switch ``model`` (and its wrapped base model) from `sdpa` to the packed implementation. True when it uses it
    now; False (left unchanged) when it uses another implementation (eager, flash-attention, flex) or none."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current == NAME:
        return True
    if current != "sdpa":
        return False
    register()
    config._attn_implementation = NAME
    for sub in model.modules():  # submodels with their own config objects (PEFT wrappers share the base's)
        sub_config = getattr(sub, "config", None)
        if sub_config is not None and sub_config is not config and getattr(sub_config, "_attn_implementation", None) == "sdpa":
            sub_config._attn_implementation = NAME
    return True


def uses_packed_attention(model: torch.nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == NAME
