"""The scoring contract: how a saved reward model's rewards are read, written beside every export (`scoring.json`) and
read back by every scorer (rm_scale.scoring), so that scoring tokenises and reads exactly as training did.

The usual ways a reward model goes wrong at scoring time are all facts of training that a scorer must repeat: which
token the reward is read at, the pad / EOS / BOS ids, whether an EOS ends the text, the chat template, the length
limit and which end is kept, and the statistics to normalise with. They live here, with a hash of the chat template
so that a scorer loading another tokenizer (or a changed template) fails loudly instead of scoring different text.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

CONTRACT_FILE = "scoring.json"
CONTRACT_VERSION = 1
# How rm_scale.data.formats tokenises, stated for readers of the file (the scorer calls the same functions).
READ_AT = "last_real_token"  # the score head's output at the rightmost attention-mask 1 of the whole sequence
TEXT_RULE = ("prompt + response joined as given (no separator), tokenised with the tokenizer's special tokens, "
             "EOS appended when the text does not end with it")
MESSAGES_RULE = {"chat_template": "the tokenizer's chat template over prompt + response messages, as rendered",
                 "blank_line": "the turns' contents joined by a blank line, tokenised with special tokens, EOS appended"}


def template_hash(tokenizer: Any) -> str | None:
    """sha256 of the tokenizer's chat template (None without one)."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    if not isinstance(template, str):  # several named templates
        template = json.dumps(template, sort_keys=True)
    return hashlib.sha256(template.encode("utf-8")).hexdigest()


def scoring_contract(tokenizer: Any, *, max_length: int | None, truncation: str,
                     reward_stats: dict[str, float] | None = None) -> dict[str, Any]:
    """The contract of a model trained with ``tokenizer``, ``max_length`` and ``truncation`` (rm_scale.config)."""
    stats = reward_stats or {}
    return {
        "format": "rm_scale.scoring",
        "version": CONTRACT_VERSION,
        "read_at": READ_AT,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "append_eos": True,
        "add_special_tokens": True,
        "text": TEXT_RULE,
        "messages": "chat_template" if template_hash(tokenizer) else "blank_line",
        "chat_template_sha256": template_hash(tokenizer),
        "max_length": max_length,
        "truncation": truncation,
        # scoring keeps the last max_length tokens of a longer text (where the reward is read) and counts it
        "scoring_truncation": "keep_end",
        "reward_mean": stats.get("rm_scale_reward_mean"),
        "reward_std": stats.get("rm_scale_reward_std"),
        "reward_stats_pairs": stats.get("rm_scale_eval_pairs"),
    }


def write_contract(folder: str, contract: dict[str, Any]) -> str:
    path = os.path.join(folder, CONTRACT_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(contract, f, indent=2)
    os.replace(tmp, path)
    return path


def read_contract(folder: str) -> dict[str, Any] | None:
    """The folder's contract, or None when it has none (a model not exported by rm_scale, or an older export)."""
    path = os.path.join(folder, CONTRACT_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        contract = json.load(f)
    if contract.get("format") != "rm_scale.scoring" or contract.get("version", 0) > CONTRACT_VERSION:
        raise ValueError(f"{path}: not a scoring contract this rm_scale can read (format {contract.get('format')!r}, "
                         f"version {contract.get('version')!r}; this rm_scale reads version {CONTRACT_VERSION}). "
                         "Upgrade rm_scale or re-export the model.")
    return contract


def check_tokenizer(contract: dict[str, Any], tokenizer: Any, *, where: str) -> None:
    """Raise when ``tokenizer`` would not tokenise as training did (other special ids or another chat template)."""
    wrong = [f"{key} is {getattr(tokenizer, key)!r}, the model was trained with {contract[key]!r}"
             for key in ("pad_token_id", "eos_token_id", "bos_token_id") if getattr(tokenizer, key) != contract[key]]
    if template_hash(tokenizer) != contract["chat_template_sha256"]:
        wrong.append("the chat template differs from the one the model was trained with (sha256 "
                     f"{str(template_hash(tokenizer))[:12]}… vs {str(contract['chat_template_sha256'])[:12]}…)")
    if wrong:
        raise ValueError(f"{where}: the tokenizer does not match the model's scoring contract ({CONTRACT_FILE}): "
                         + "; ".join(wrong) + ". Score with the tokenizer saved in the model folder.")


def assumed_contract(tokenizer: Any, *, max_length: int | None) -> dict[str, Any]:
    """What a scorer assumes for a folder without a contract: rm_scale's training rules with this tokenizer."""
    return scoring_contract(tokenizer, max_length=max_length, truncation="keep_end")


def assumption_note(contract: dict[str, Any]) -> str:
    return (f"no {CONTRACT_FILE} in the model folder: assuming rm_scale's training rules: reward at the last real "
            f"token; text = {TEXT_RULE}; messages = {MESSAGES_RULE[contract['messages']]}; pad id "
            f"{contract['pad_token_id']}, EOS id {contract['eos_token_id']}; max_length {contract['max_length']} "
            "(longer texts keep their end); no reward statistics (normalize unavailable). Export with rm_scale "
            "to record the real ones.")
