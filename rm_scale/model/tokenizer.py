"""The tokenizer of a reward model, set up as TRL's RewardConfig describes: its end-of-turn and padding tokens and
its chat template (a Jinja file, or taken from another tokenizer with its special tokens)."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from rm_scale.model.reward import base_model, ensure_pad_token


def configure_tokenizer(tokenizer: Any, model: nn.Module, *, eos_token: str | None = None,
                        pad_token: str | None = None, chat_template_path: str | None = None) -> None:
    """Set ``eos_token``, the chat template and the pad token (given, else the tokenizer's, else its eos token) on
    ``tokenizer``, and mirror the token ids onto the model config (sequence-classification heads read
    ``pad_token_id``). A token that is not in the vocabulary is a ValueError naming it."""
    config = base_model(model).config
    if eos_token is not None:
        _check_in_vocab(tokenizer, eos_token, "eos_token")
        tokenizer.eos_token = eos_token
        config.eos_token_id = tokenizer.eos_token_id
    if chat_template_path is not None:
        _set_chat_template(tokenizer, model, chat_template_path)
    if pad_token is not None:
        tokenizer.pad_token = pad_token
    ensure_pad_token(tokenizer)
    _check_in_vocab(tokenizer, tokenizer.pad_token, "pad_token")
    config.pad_token_id = tokenizer.pad_token_id


def _check_in_vocab(tokenizer: Any, token: str, name: str) -> None:
    if token not in tokenizer.get_vocab():
        raise ValueError(f"The specified `{name}` ({token!r}) is not found in the vocabulary of the given "
                         f"`processing_class` ({type(tokenizer).__name__}): add it to the tokenizer first, or pick a "
                         "token the vocabulary has.")


def _set_chat_template(tokenizer: Any, model: nn.Module, path: str) -> None:
    """A .jinja / .j2 file is the template itself; anything else names a tokenizer (folder or hub name) whose template,
    eos token and extra special tokens are taken over (new tokens get embedding rows)."""
    if os.path.isfile(path) and path.endswith((".jinja", ".j2")):
        with open(path, encoding="utf-8") as f:
            tokenizer.chat_template = f.read()
        return
    from transformers import AutoTokenizer  # lazy: only with chat_template_path set to a tokenizer

    source = AutoTokenizer.from_pretrained(path)
    if not source.chat_template:
        raise ValueError(f"chat_template_path={path!r}: that tokenizer has no chat template; pass a .jinja file.")
    extra = [t for t in getattr(source, "additional_special_tokens", None) or [] if t not in tokenizer.get_vocab()]
    new = extra + ([source.eos_token] if source.eos_token and source.eos_token not in tokenizer.get_vocab() else [])
    if new:
        tokenizer.add_special_tokens({"additional_special_tokens": new})
        base_model(model).resize_token_embeddings(len(tokenizer))
    if source.eos_token:
        tokenizer.eos_token = source.eos_token
        base_model(model).config.eos_token_id = tokenizer.eos_token_id
    tokenizer.chat_template = source.chat_template
