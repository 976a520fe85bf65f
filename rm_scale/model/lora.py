"""LoRA adapters on a reward model: the score head is trained and saved with the adapter."""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn
from transformers.integrations import is_deepspeed_zero3_enabled

from rm_scale.model.reward import SCORE_HEAD_NAMES, base_model

logger = logging.getLogger(__name__)


GENERATION_TASKS = ("CAUSAL_LM", "SEQ_2_SEQ_LM")  # peft's TaskType is a str enum: its members equal these


def add_lora(model: nn.Module, peft_config: Any, *, checkpointing: bool, new_token_ids: list[int] = (),
             deepspeed: bool = False) -> nn.Module:
    """``get_peft_model`` with the score head in ``modules_to_save``; the caller's ``peft_config`` is not changed.
    The embedding rows of ``new_token_ids`` (tokens a cloned chat template added) are trained too, as in TRL.

    With ``checkpointing`` (activation checkpointing on) the inputs of the base model require grad: PEFT + ZeRO-3 +
    non-reentrant checkpointing raises CheckpointError (trl#2514), so the trainer uses reentrant checkpointing, which
    needs them."""
    from peft import PeftModel, get_peft_model  # lazy: peft is only needed with peft_config

    if isinstance(model, PeftModel):
        raise ValueError("The model is already a PEFT model: pass peft_config=None, or pass the base model.")
    inner = base_model(model)
    head = next(name for name in SCORE_HEAD_NAMES if isinstance(getattr(inner, name, None), nn.Module))
    peft_config = copy.deepcopy(peft_config)
    if getattr(peft_config, "task_type", None) in GENERATION_TASKS:
        # TRL's `--use_peft` alone gives TaskType.CAUSAL_LM (ModelConfig's default), whose PeftModel wraps a generating
        # model: on a reward model it fails (no prepare_inputs_for_generation), in TRL too.
        logger.warning("LoRA: task_type %s is for generation; a reward model is trained as SEQ_CLS.",
                       peft_config.task_type)
        peft_config.task_type = "SEQ_CLS"
    # The score head must be trained and saved with the adapter (TaskType.SEQ_CLS adds it; other task types don't).
    modules_to_save = list(peft_config.modules_to_save or [])
    if head not in modules_to_save:
        logger.info("LoRA: the score head %r is trained and saved with the adapter (added to modules_to_save; TRL "
                    "leaves it frozen for task types other than SEQ_CLS).", head)
        peft_config.modules_to_save = modules_to_save + [head]
    if new_token_ids:
        _check_trainable_tokens_supported()
        indices = dict(peft_config.trainable_token_indices or {})
        indices["embed_tokens"] = sorted({*indices.get("embed_tokens", []), *new_token_ids})
        peft_config.trainable_token_indices = indices
    if checkpointing:
        inner.enable_input_require_grads()
    # Without DeepSpeed, adapters in fp32 over a bf16/fp16 model, as TRL (peft's default: their small updates
    # survive). Under DeepSpeed, the model's dtype: ZeRO-3's coalesced all-gather breaks on mixed dtypes (trl#6089,
    # DeepSpeed#8072) and ZeRO-1/2 fail in the forward (fp32 adapters next to a bf16 score head; measured, 2 CPU
    # ranks); DeepSpeed's optimizer keeps fp32 master weights of them where bf16 is on.
    return get_peft_model(model, peft_config, autocast_adapter_dtype=not deepspeed)


def _check_trainable_tokens_supported() -> None:
    # peft's trainable tokens under ZeRO-3 gather the rows on a CUDA device only (peft#2603; saving them under
    # ZeRO-3 is peft#2946): fail before training rather than in get_peft_model's traceback.
    if is_deepspeed_zero3_enabled() and not torch.cuda.is_available():
        raise ValueError("chat_template_path added tokens to the vocabulary, and LoRA must train their embedding rows "
                         "(peft trainable_token_indices), which peft supports under ZeRO-3 on CUDA devices only "
                         "(https://github.com/huggingface/peft/issues/2603). Fix: train with ZeRO-2 or one process, "
                         "or without LoRA, or pass chat_template_path a .jinja file that uses tokens the vocabulary has.")
