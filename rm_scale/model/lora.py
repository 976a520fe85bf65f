"""LoRA adapters on a reward model: the score head is trained and saved with the adapter."""

from __future__ import annotations

import copy
import logging
from typing import Any

from torch import nn

from rm_scale.model.reward import SCORE_HEAD_NAMES, base_model

logger = logging.getLogger(__name__)


def add_lora(model: nn.Module, peft_config: Any, *, checkpointing: bool) -> nn.Module:
    """``get_peft_model`` with the score head in ``modules_to_save``; the caller's ``peft_config`` is not changed.

    With ``checkpointing`` (activation checkpointing on) the inputs of the base model require grad: PEFT + ZeRO-3 +
    non-reentrant checkpointing raises CheckpointError (trl#2514), so the trainer uses reentrant checkpointing, which
    needs them."""
    from peft import PeftModel, get_peft_model  # lazy: peft is only needed with peft_config

    if isinstance(model, PeftModel):
        raise ValueError("The model is already a PEFT model: pass peft_config=None, or pass the base model.")
    inner = base_model(model)
    head = next(name for name in SCORE_HEAD_NAMES if isinstance(getattr(inner, name, None), nn.Module))
    peft_config = copy.deepcopy(peft_config)
    # The score head must be trained and saved with the adapter (TaskType.SEQ_CLS adds it; other task types don't).
    modules_to_save = list(peft_config.modules_to_save or [])
    if head not in modules_to_save:
        logger.info("LoRA: the score head %r is trained and saved with the adapter (added to modules_to_save; TRL "
                    "leaves it frozen for task types other than SEQ_CLS).", head)
        peft_config.modules_to_save = modules_to_save + [head]
    if checkpointing:
        inner.enable_input_require_grads()
    # autocast_adapter_dtype=False: mixed adapter dtypes break ZeRO-3's all-gather (trl#6089).
    return get_peft_model(model, peft_config, autocast_adapter_dtype=False)
