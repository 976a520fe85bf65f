"""Build, read and export reward models. Knows nothing of ranks or losses.

A reward is the score head's output at the last real token (rightmost attention-mask 1) of each sequence. Reading it
from the mask, not from the first pad token, keeps it right for left padding and when pad == eos (transformers#35909).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from rm_scale.model.last_layer import uses_sparse_last_layer
from rm_scale.model.packed_attention import (
    segments_given,
    segments_from_groups,
    segments_from_position_ids,
    uses_packed_attention,
)

logger = logging.getLogger(__name__)

SCORE_HEAD_NAMES = ("score", "classifier", "v_head")


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under PEFT / DeepSpeed / DDP wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP, DeepSpeed engine
        model = model.module
    if hasattr(model, "get_base_model"):  # PEFT
        model = model.get_base_model()
    return model


def score_head(model: nn.Module) -> nn.Module:
    """The module that maps hidden states to the scalar reward (`score` for decoder LMs)."""
    inner = base_model(model)
    for name in SCORE_HEAD_NAMES:
        head = getattr(inner, name, None)
        if isinstance(head, nn.Module):
            return head
    raise ValueError(
        f"{type(inner).__name__} has no score head ({', '.join(SCORE_HEAD_NAMES)}): load the model with "
        "AutoModelForSequenceClassification.from_pretrained(..., num_labels=1)."
    )


def last_real_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the rightmost position whose mask is 1, per row (works for left and right padding)."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * attention_mask.to(positions.dtype)).argmax(-1)


@contextlib.contextmanager
def _capture_output(module: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    store: dict[str, torch.Tensor] = {}

    def hook(_mod: nn.Module, _inp: Any, out: Any) -> None:
        store["out"] = out[0] if isinstance(out, tuple) else out

    handle = module.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def forward_rewards(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One forward; returns the reward of each row, shape ``(batch,)``.

    Decoder models apply the score head to every position and pool at the last non-pad token by ``pad_token_id``;
    we capture the per-token scores with a hook and pool at the last attention-mask 1 instead. Encoder models whose
    head sees one pooled vector per row return it as is.
    """
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    cols = last_real_index(attention_mask).to(input_ids.device)
    extra = {"reward_positions": (rows, cols)} if uses_sparse_last_layer(base_model(model)) else {}
    with _capture_output(score_head(model)) as cap:
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra)
    per_token = cap.get("out")
    if per_token is not None and per_token.dim() == 3 and per_token.shape[1] == input_ids.shape[1]:
        return per_token[rows.to(per_token.device), cols.to(per_token.device), 0]
    logits = out["logits"] if isinstance(out, dict) else out[0]
    return logits[:, 0]


def forward_packed_rewards(
    model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor, index: torch.Tensor, *,
    groups: torch.Tensor | None = None, spans: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rewards of packed sequences (see rm_scale.data.collate.pack_pairs): one forward, no attention mask — restarting
    position_ids make transformers attend within each sequence only — read at ``index`` = (row, column) pairs.

    With the packed attention implementation (rm_scale.model.packed_attention, set by RewardTrainer for batching="packed")
    the sequences' boundaries go along, and attention computes each sequence's own block only. Shared-prefix groups
    (collate.pack_groups: ``groups``, and ``spans`` = (group start, prefix end, own start) of each read token) need it."""
    extra: dict[str, Any] = {}
    inner = base_model(model)
    if uses_packed_attention(inner):
        rows = input_ids.shape[0]
        extra["packed_segments"] = (segments_from_groups(groups, rows) if groups is not None
                                    else segments_from_position_ids(position_ids))
    elif groups is not None:
        raise ValueError("Shared-prefix batches need rm_scale's packed attention (a model on 'sdpa' attention with "
                         "packed_attention on); set shared_prefix: false for this model.")
    if uses_sparse_last_layer(inner):  # each read token attends to its own sequence (or group part) up to itself
        rows, cols = index[:, 0].to(input_ids.device), index[:, 1].to(input_ids.device)
        if spans is None:
            starts = cols - position_ids.to(input_ids.device)[rows, cols]
            spans = torch.stack([starts, starts, starts], dim=1)
        spans = spans.to(input_ids.device)
        extra["reward_positions"] = (rows, cols, spans[:, 0], spans[:, 1], spans[:, 2])
    given = segments_given() if "packed_segments" in extra else contextlib.nullcontext()
    with _capture_output(score_head(model)) as cap, given:
        model(input_ids=input_ids, position_ids=position_ids, use_cache=False, **extra)
    per_token = cap.get("out")
    if per_token is None or per_token.dim() != 3 or per_token.shape[1] != input_ids.shape[1]:
        raise ValueError(
            f"batching='packed' needs a decoder model whose score head sees every position; "
            f"{type(base_model(model)).__name__} does not. Use batching='token_budget' instead."
        )
    index = index.to(per_token.device)
    return per_token[index[:, 0], index[:, 1], 0]


def _gathered(params: list[nn.Parameter]) -> contextlib.AbstractContextManager:
    # Under ZeRO-3 a partitioned parameter is an empty placeholder on each rank; writing to it directly is a no-op or
    # an error. GatheredParameters(modifier_rank=0) materialises it and scatters rank 0's values back afterwards.
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    return contextlib.nullcontext()


def init_score_head(model: nn.Module, *, seed: int = 0) -> None:
    """Initialise the score head ~ N(0, 1/(H+1)) with a private generator: independent of world size and zero.Init."""
    head = score_head(model)
    params = list(head.parameters())
    with _gathered(params), torch.no_grad():
        gen = torch.Generator(device="cpu").manual_seed(seed)
        for p in params:
            if p.dim() >= 2:
                std = 1.0 / (p.shape[-1] + 1)
                p.copy_((torch.randn(p.shape, generator=gen, dtype=torch.float32) * std).to(p.dtype))
            else:
                p.zero_()


DTYPES = ("float32", "bfloat16", "float16", "auto")  # the strings TRL's model_init_kwargs take


def _torch_dtype(dtype: Any) -> Any:
    """A torch dtype, "auto" or None as given; TRL's strings turned into dtypes; anything else TRL's ValueError."""
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype
    if dtype in DTYPES:
        return getattr(torch, dtype)
    raise ValueError("Invalid `dtype` passed to the config. Expected either 'auto' or a string representing a valid "
                     f"`torch.dtype` (e.g., 'float32'), but got {dtype}.")


def load_reward_model(
    name_or_path: str,
    *,
    dtype: torch.dtype | str = torch.float32,
    score_head_seed: int = 0,
    trust_remote_code: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """`AutoModelForSequenceClassification.from_pretrained(..., num_labels=1)`, with a deterministic fresh head.

    Call it after `RewardConfig` exists so that under ZeRO-3 the weights load partitioned (zero.Init).
    """
    from transformers import AutoModelForSequenceClassification

    dtype = _torch_dtype(dtype)
    model, info = AutoModelForSequenceClassification.from_pretrained(
        name_or_path,
        num_labels=1,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        output_loading_info=True,
        **kwargs,
    )
    head_names = {f"{n}." for n in SCORE_HEAD_NAMES}
    if any(any(k.startswith(h) or f".{h}" in k for h in head_names) for k in info.get("missing_keys", [])):
        logger.info("No score head in %s: initialising a fresh one (seed %d).", name_or_path, score_head_seed)
        init_score_head(model, seed=score_head_seed)
    return model


def disable_dropout(model: nn.Module) -> None:
    """Zero every dropout probability: rewards become deterministic and train/eval agree."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        # attention implementations keep their dropout as a float attribute copied from the config at build time
        for attr in ("attention_dropout", "dropout"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)


# Reward statistics of the final evaluation, exported with the model so rewards can be normalised later:
# (reward - rm_scale_reward_mean) / rm_scale_reward_std. A full model keeps them in config.json (model.config); a PEFT
# adapter folder has no config.json of the base model, so they go to reward_stats.json beside the adapter.
REWARD_STATS_PREFIX = "rm_scale_"
REWARD_STATS_FILE = "reward_stats.json"


def set_reward_stats(model: nn.Module, stats: dict[str, float]) -> None:
    """Put ``stats`` (keys starting with ``rm_scale_``) in the model config; `save_pretrained` writes them out."""
    assert all(k.startswith(REWARD_STATS_PREFIX) for k in stats), stats
    config = base_model(model).config
    for key, value in stats.items():
        setattr(config, key, value)


def read_reward_stats(model_dir: str) -> dict[str, float]:
    """The reward statistics saved with a model folder (full model or PEFT adapter); empty when there are none."""
    for name in (REWARD_STATS_FILE, "config.json"):
        path = os.path.join(model_dir, name)
        if os.path.exists(path):
            with open(path) as f:
                stats = {k: v for k, v in json.load(f).items() if k.startswith(REWARD_STATS_PREFIX)}
            if stats:
                return stats
    return {}


def ensure_pad_token(tokenizer: Any) -> None:
    """Give a tokenizer without a pad token its eos token as pad. Safe for rewards: they are read at the last
    attention-mask 1, not at the first pad token."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("The tokenizer has neither a pad nor an eos token: set tokenizer.pad_token.")
        tokenizer.pad_token = tokenizer.eos_token
