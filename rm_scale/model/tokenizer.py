"""The tokenizer of a reward model, set up as TRL's RewardConfig describes: its end-of-turn and padding tokens and
its chat template (a Jinja file, or taken from another tokenizer with its special tokens)."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from rm_scale.model.reward import base_model, ensure_pad_token


def configure_tokenizer(tokenizer: Any, model: nn.Module, *, eos_token: str | None = None,
                        pad_token: str | None = None, chat_template_path: str | None = None) -> list[int]:
    """Set ``eos_token``, the chat template and the pad token (given, else the tokenizer's, else its eos token) on
    ``tokenizer``, and mirror the token ids onto the model config (sequence-classification heads read
    ``pad_token_id``). A token that is not in the vocabulary is a ValueError naming it. Returns the ids of tokens
    added from ``chat_template_path``'s tokenizer (LoRA makes their embedding rows trainable)."""
    config = base_model(model).config
    if eos_token is not None:
        _check_in_vocab(tokenizer, eos_token, "eos_token")
        tokenizer.eos_token = eos_token
        config.eos_token_id = tokenizer.eos_token_id
    added = _set_chat_template(tokenizer, model, chat_template_path) if chat_template_path is not None else []
    if pad_token is not None:
        tokenizer.pad_token = pad_token
    ensure_pad_token(tokenizer)
    _check_in_vocab(tokenizer, tokenizer.pad_token, "pad_token")
    config.pad_token_id = tokenizer.pad_token_id
    return added


def _check_in_vocab(tokenizer: Any, token: str, name: str) -> None:
    if token not in tokenizer.get_vocab():
        raise ValueError(f"The specified `{name}` ({token!r}) is not found in the vocabulary of the given "
                         f"`processing_class` ({type(tokenizer).__name__}): add it to the tokenizer first, or pick a "
                         "token the vocabulary has.")


def _set_chat_template(tokenizer: Any, model: nn.Module, path: str) -> list[int]:
    """A .jinja / .j2 file is the template itself; anything else names a tokenizer (folder or hub name) whose template,
    eos token and added tokens are taken over, as TRL's ``clone_chat_template`` does: the embeddings grow to a
    multiple of 64 rows (under ZeRO-3 transformers gathers them to resize), filled up with ``<extra_id_N>`` tokens so
    tokenizer and embedding agree. Returns the ids of the tokens added (those filler tokens too, as TRL does)."""
    if os.path.isfile(path) and path.endswith((".jinja", ".j2")):
        with open(path, encoding="utf-8") as f:
            tokenizer.chat_template = f.read()
        return []
    from transformers import AddedToken, AutoTokenizer  # lazy: only with chat_template_path set to a tokenizer

    source = AutoTokenizer.from_pretrained(path)
    if not source.chat_template:
        raise ValueError(f"chat_template_path={path!r}: that tokenizer has no chat template; pass a .jinja file.")
    tokenizer.chat_template = source.get_chat_template()
    new = [t for t in source.added_tokens_decoder.values() if t.content not in tokenizer.get_vocab()]
    tokenizer.add_tokens(new)
    tokenizer.eos_token = source.eos_token
    inner = base_model(model)
    inner.config.eos_token_id = tokenizer.eos_token_id
    inner.resize_token_embeddings(len(tokenizer.get_vocab()), pad_to_multiple_of=64)
    names, index = [t.content for t in new], 0
    while inner.get_input_embeddings().num_embeddings > len(tokenizer.get_vocab()):
        if tokenizer.add_tokens(AddedToken(f"<extra_id_{index}>")) == 1:
            names.append(f"<extra_id_{index}>")
        index += 1
    return tokenizer.convert_tokens_to_ids(names)
