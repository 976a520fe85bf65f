"""Preference rows → token ids → padded pair batches.

Formats recognised per row (first match wins):
- pre-tokenised (the seed's): `input_ids_chosen`, `attention_mask_chosen`, `input_ids_rejected`, `attention_mask_rejected`
- TRL's pre-tokenised: `chosen_ids`, `rejected_ids`
- conversational: `chosen`/`rejected` (and optional `prompt`) are lists of `{"role", "content"}` messages, rendered
  by the chat template (without one: TRL's error for a data set given to the trainer; files read through a mapping or
  preset join the turns by a blank line)
- text with an explicit `prompt`: `prompt`, `chosen`, `rejected` strings
- text with an implicit prompt: `chosen`, `rejected` are whole transcripts sharing their beginning (as hh-rlhf)
An optional `margin` column passes through to the loss.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

PRETOKENIZED = ("input_ids_chosen", "attention_mask_chosen", "input_ids_rejected", "attention_mask_rejected")


def detect_format(columns: Sequence[str], example: Mapping[str, Any] | None = None) -> str:
    """Name the format of a data set from its columns (and one example, to tell text from messages)."""
    cols = set(columns)
    if set(PRETOKENIZED) <= cols:
        return "pretokenized"
    if {"chosen_ids", "rejected_ids"} <= cols:
        return "ids"
    if {"chosen", "rejected"} <= cols:
        if example is not None and isinstance(example["chosen"], list):
            return "conversational"
        return "prompt" if "prompt" in cols else "implicit_prompt"
    raise ValueError(
        f"Cannot tell the preference format from the columns {sorted(cols)}. Expected one of: "
        f"{list(PRETOKENIZED)}; chosen_ids/rejected_ids; chosen/rejected (text or messages) with optional prompt. "
        "Rename your columns to these names."
    )


def _ensure_eos(ids: list[int], eos_id: int | None) -> list[int]:
    # The reward is read at the last real token; ending every response with EOS makes that token the same kind of
    # position for every pair (as TRL does for text input).
    if eos_id is not None and (not ids or ids[-1] != eos_id):
        return ids + [eos_id]
    return ids


def tokenize_pair(row: Mapping[str, Any], tokenizer: Any, *, fmt: str) -> dict[str, list[int]]:
    """Turn one row of format ``fmt`` into the seed's four pre-tokenised columns (plus ``margin`` when present)."""
    eos = tokenizer.eos_token_id
    if fmt == "pretokenized":
        out = {k: list(row[k]) for k in PRETOKENIZED}
    elif fmt == "ids":
        chosen, rejected = list(row["chosen_ids"]), list(row["rejected_ids"])
        prompt = list(row.get("prompt_ids") or [])
        out = _pair_columns(prompt + chosen, prompt + rejected)
    elif fmt in ("conversational", "prompt", "implicit_prompt"):
        prompt = None if fmt == "implicit_prompt" else row.get("prompt")
        out = _pair_columns(*responses_ids(prompt, [row["chosen"], row["rejected"]], tokenizer,
                                           **(template_kwargs(row) if fmt == "conversational" else {})))
    else:
        raise ValueError(f"Unknown preference format {fmt!r}.")
    if "margin" in row and row["margin"] is not None:
        out["margin"] = float(row["margin"])
    return out


def text_ids(texts: list[str], tokenizer: Any) -> list[list[int]]:
    """Token ids of whole texts (prompt and response joined as given, as TRL joins them): the tokenizer's special
    tokens, and an EOS at the end when the text does not end with one."""
    encoded = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    return [_ensure_eos(list(ids), tokenizer.eos_token_id) for ids in encoded]


def responses_ids(prompt: Any, responses: Sequence[Any], tokenizer: Any, **template: Any) -> list[list[int]]:
    """Token ids of each response with its prompt: message lists as one conversation through the chat template
    (the prompt's turns, then the response's), text joined to the prompt as given (TRL; no prompt: the response alone
    is the whole text)."""
    if isinstance(responses[0], list):
        turns = list(prompt or [])
        return [conversation_ids(turns + list(r), tokenizer, **template) for r in responses]
    return text_ids([(prompt or "") + r for r in responses], tokenizer)


PLAIN_SEPARATOR = "\n\n"  # between the turns of a conversation when the tokenizer has no chat template


def template_kwargs(row: Mapping[str, Any]) -> dict[str, Any]:
    """A row's own chat-template arguments, as TRL reads them: ``tools`` (a list, or JSON text) and the
    ``chat_template_kwargs`` mapping."""
    tools = row.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    return {**({"tools": tools} if tools else {}), **(row.get("chat_template_kwargs") or {})}


def conversation_ids(messages: list[Mapping[str, Any]], tokenizer: Any, **template: Any) -> list[int]:
    """Token ids of a conversation: the tokenizer's chat template, or (without one) the turns' contents joined with
    a blank line and ended with EOS."""
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **template))
    text = PLAIN_SEPARATOR.join(str(m["content"]) for m in messages)
    return _ensure_eos(tokenizer(text, add_special_tokens=True)["input_ids"], tokenizer.eos_token_id)


def tokenize_canonical(pair: Mapping[str, Any], tokenizer: Any) -> dict[str, Any]:
    """Token ids of a canonical pair from rm_scale.data.sources.to_pairs (``prompt`` None means implicit)."""
    row = {k: v for k, v in pair.items() if not (k == "prompt" and v is None) and k != "subset"}
    out = tokenize_pair(row, tokenizer, fmt=detect_format(list(row), row))
    if "subset" in pair:
        out["subset"] = pair["subset"]
    return out


def _pair_columns(chosen: list[int], rejected: list[int]) -> dict[str, list[int]]:
    return {
        "input_ids_chosen": chosen,
        "attention_mask_chosen": [1] * len(chosen),
        "input_ids_rejected": rejected,
        "attention_mask_rejected": [1] * len(rejected),
    }


LEGACY_IDS = {"chosen_input_ids": "chosen_ids", "rejected_input_ids": "rejected_ids"}  # TRL's pre-1.0 names
PASSED_ON = ("margin", "subset")


def prepare_dataset(
    dataset: Any, tokenizer: Any, *, max_length: int | None, num_proc: int | None = None, truncation: str = "drop"
) -> Any:
    """Tokenise a `datasets.Dataset` or `datasets.IterableDataset` (lazily, as it is read) of any recognised format,
    and drop pairs longer than ``max_length`` (or keep their ends). Tokenised sets pass through: idempotent.

    Returns the tokenised data set; the number of dropped pairs is logged by the caller from the length difference.
    """
    iterable = not hasattr(dataset, "__len__")
    columns = list(dataset.column_names or []) if not iterable or dataset.column_names else []
    first = next(iter(dataset), None) if iterable else (dataset[0] if len(dataset) else None)
    columns = columns or list(first or {})
    if set(LEGACY_IDS) <= set(columns) and not {"chosen_ids", "rejected_ids"} & set(columns):
        warnings.warn("Detected legacy dataset columns `chosen_input_ids`/`rejected_input_ids`; they are deprecated "
                      "(TRL): use `chosen_ids`/`rejected_ids`.", FutureWarning, stacklevel=3)
        dataset = dataset.rename_columns(LEGACY_IDS)
        columns = [LEGACY_IDS.get(c, c) for c in columns]
        first = {LEGACY_IDS.get(k, k): v for k, v in (first or {}).items()}
    fmt = detect_format(columns, first)
    if fmt == "conversational" and not getattr(tokenizer, "chat_template", None):
        # As TRL (transformers raises it there): messages without a template would lose their roles.
        raise ValueError("The data set holds conversations (lists of messages), but tokenizer.chat_template is not "
                         "set. Fix: pass chat_template_path (a .jinja file, or a tokenizer folder whose template to "
                         "use) in RewardConfig, or set tokenizer.chat_template, or give the rows as text.")
    map_kwargs = {} if iterable else {"num_proc": num_proc}
    if fmt != "pretokenized":
        dataset = dataset.map(
            tokenize_pair,
            fn_kwargs={"tokenizer": tokenizer, "fmt": fmt},
            remove_columns=[c for c in columns if c not in PASSED_ON],
            **map_kwargs, **({} if iterable else {"desc": f"Tokenising ({fmt})"}),
        )
    if max_length is not None and truncation == "keep_end":
        return dataset.map(truncate_pair, fn_kwargs={"limit": max_length}, **map_kwargs)
    if max_length is not None:
        dataset = dataset.filter(
            lambda r: len(r["input_ids_chosen"]) <= max_length and len(r["input_ids_rejected"]) <= max_length,
            **map_kwargs,
        )
    return dataset


def truncate_pair(pair: dict[str, Any], limit: int) -> dict[str, Any]:
    """Keep the last ``limit`` tokens of each side: the response end (where the reward is read) and the prompt tail."""
    out = dict(pair)
    for side in ("chosen", "rejected"):
        out[f"input_ids_{side}"] = pair[f"input_ids_{side}"][-limit:]
        out[f"attention_mask_{side}"] = pair[f"attention_mask_{side}"][-limit:]
    return out


def pair_length(pair: dict[str, Any]) -> int:
    """Tokens of the longer side of a tokenised pair."""
    return max(len(pair["input_ids_chosen"]), len(pair["input_ids_rejected"]))


def shared_prefix_length(chosen: list[int], rejected: list[int]) -> int:
    """Tokens the two sides share at their start (token ids: exact for every format), leaving each side at least
    one token of its own (its reward is read at its last token, which must come after the shared part)."""
    return common_prefix_length([chosen, rejected])


def common_prefix_length(seqs: Sequence[list[int]]) -> int:
    """Tokens all of ``seqs`` (a prompt's responses) share at their start, leaving each at least one of its own."""
    limit = min(map(len, seqs)) - 1
    first = seqs[0]
    n = 0
    while n < limit and all(s[n] == first[n] for s in seqs):
        n += 1
    return n


def group_length(pair: dict[str, Any]) -> int:
    """Tokens a pair costs with its shared prefix computed once."""
    chosen, rejected = pair["input_ids_chosen"], pair["input_ids_rejected"]
    return len(chosen) + len(rejected) - shared_prefix_length(chosen, rejected)


def group_cost(group: Mapping[str, Any]) -> int:
    """Tokens a tokenised group costs in a packed row: the shared prefix once, then each response's own tokens."""
    seqs = group["input_ids"]
    return sum(map(len, seqs)) - (len(seqs) - 1) * common_prefix_length(seqs)
