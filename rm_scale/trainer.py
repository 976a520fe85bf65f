"""`RewardTrainer`: TRL's public API on transformers' `Trainer`, correct under DeepSpeed ZeRO-1/2/3.

The only module that touches the Accelerator / DeepSpeed engine. Per step it runs ONE forward over chosen and rejected
concatenated (under ZeRO-3 every forward all-gathers every parameter: two forwards would double that traffic), and it
divides the loss once by the number of pairs in the whole optimizer step, counted across micro-batches and ranks.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel, Trainer
from transformers.trainer_utils import EvalPrediction

from rm_scale.config import RewardConfig
from rm_scale.data import RewardDataCollatorWithPadding, prepare_dataset
from rm_scale.loss import bradley_terry_sums, total_loss
from rm_scale.model import SCORE_HEAD_NAMES, base_model, disable_dropout, forward_rewards, load_reward_model

logger = logging.getLogger(__name__)

# Order of the per-step metric sums kept on device and reduced once per logging step.
_SUM_KEYS = ("pairs", "bt", "center", "correct", "margin", "chosen", "chosen_sq", "rejected", "rejected_sq")


def compute_reward_metrics(eval_pred: EvalPrediction) -> dict[str, float]:
    """Accuracy (ties count half), mean margin and reward statistics from ``predictions[:, (chosen, rejected)]``."""
    preds = np.asarray(eval_pred.predictions, dtype=np.float64)
    chosen, rejected = preds[:, 0], preds[:, 1]
    diff = chosen - rejected
    both = np.concatenate([chosen, rejected])
    return {
        "accuracy": float(((diff > 0) + 0.5 * (diff == 0)).mean()),
        "margin": float(diff.mean()),
        "rewards_chosen_mean": float(chosen.mean()),
        "rewards_rejected_mean": float(rejected.mean()),
        "rewards_mean": float(both.mean()),
        "rewards_std": float(both.std()),
    }


class RewardTrainer(Trainer):
    """Trains a pairwise (Bradley-Terry) reward model; a drop-in for `trl.RewardTrainer`."""

    def __init__(
        self,
        model: PreTrainedModel | nn.Module | str | None = None,
        args: RewardConfig | None = None,
        data_collator: Callable | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        tokenizer: Any = None,
        model_init: Callable | None = None,
        compute_metrics: Callable[[EvalPrediction], dict] | None = None,
        callbacks: list | None = None,
        optimizers: tuple = (None, None),
        preprocess_logits_for_metrics: Callable | None = None,
        peft_config: Any = None,
    ) -> None:
        if args is None:
            args = RewardConfig(output_dir="rm_scale_output")
        elif not isinstance(args, RewardConfig):
            raise ValueError(
                f"RewardTrainer needs args=RewardConfig(...), got {type(args).__name__}. RewardConfig accepts every "
                "TrainingArguments field: RewardConfig(**training_args.to_dict())."
            )
        if tokenizer is not None and processing_class is not None and tokenizer is not processing_class:
            raise ValueError("Pass the tokenizer once: tokenizer= or processing_class=, not two different objects.")
        processing_class = processing_class if processing_class is not None else tokenizer
        if model is None:
            raise ValueError("RewardTrainer needs model= (a model or a path / hub name).")
        if isinstance(model, str):
            if processing_class is None:
                from transformers import AutoTokenizer

                processing_class = AutoTokenizer.from_pretrained(model)
            model = load_reward_model(model, score_head_seed=args.score_head_seed)
        if processing_class is None:
            raise ValueError("RewardTrainer needs the tokenizer: pass tokenizer= (or processing_class=).")

        _set_pad_token(processing_class, model)
        base_model(model).config.use_cache = False  # no KV cache in training; some heads reject the kwarg
        if args.disable_dropout:
            disable_dropout(model)
        if peft_config is not None:
            model = _apply_peft(model, peft_config, args)

        train_dataset = self._tokenize(train_dataset, processing_class, args, "train")
        if isinstance(eval_dataset, Mapping):
            eval_dataset = {k: self._tokenize(v, processing_class, args, f"eval {k}") for k, v in eval_dataset.items()}
        else:
            eval_dataset = self._tokenize(eval_dataset, processing_class, args, "eval")

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator or RewardDataCollatorWithPadding(processing_class),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            model_init=model_init,
            compute_metrics=compute_metrics or compute_reward_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
        # compute_loss already divides by the pairs of the whole step: no further division by GAS.
        self.loss_is_scaled_for_ga = True
        self._sums: torch.Tensor | None = None

    @staticmethod
    def _tokenize(dataset: Any, tokenizer: Any, args: RewardConfig, name: str) -> Any:
        if dataset is None or not hasattr(dataset, "map") or not hasattr(dataset, "__len__"):
            return dataset
        before = len(dataset)
        with args.main_process_first(desc=f"tokenising the {name} data"):
            dataset = prepare_dataset(dataset, tokenizer, max_length=args.max_length, num_proc=args.dataset_num_proc)
        dropped = before - len(dataset)
        if dropped:
            logger.warning(
                "%s data: dropped %d of %d pairs with a side longer than max_length=%s tokens.",
                name, dropped, before, args.max_length,
            )
        if len(dataset) == 0:
            raise ValueError(f"The {name} data set is empty after dropping pairs longer than max_length.")
        return dataset

    # ---- loss -------------------------------------------------------------------------------------------------

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        """Pairs in the whole optimizer step: all micro-batches of this rank, summed over ranks. One collective."""
        if not batch_samples:
            return None
        count = torch.tensor(sum(int(b["input_ids_chosen"].shape[0]) for b in batch_samples), device=device)
        if self.args.world_size > 1:
            count = self.accelerator.reduce(count, reduction="sum")
        return count

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n = inputs["input_ids_chosen"].shape[0]
        input_ids = torch.cat([inputs["input_ids_chosen"], inputs["input_ids_rejected"]], dim=0)
        attention_mask = torch.cat([inputs["attention_mask_chosen"], inputs["attention_mask_rejected"]], dim=0)
        rewards = forward_rewards(model, input_ids, attention_mask)
        chosen, rejected = rewards[:n], rewards[n:]
        sums = bradley_terry_sums(chosen, rejected, margin=inputs.get("margin"))
        if num_items_in_batch is None:  # evaluation: a plain mean over this batch
            loss = total_loss(sums, num_pairs=n, center_coef=self.args.center_rewards_coefficient)
        else:
            # DeepSpeed and DDP average gradients over ranks; multiplying by the world size undoes that, so the
            # gradient is the one of sum(all pairs) / pairs-in-step, whatever the layout of the job.
            loss = total_loss(sums, num_pairs=num_items_in_batch, center_coef=self.args.center_rewards_coefficient)
            loss = loss * self.accelerator.num_processes
        if model.training:
            self._accumulate(sums, chosen.detach(), rejected.detach())
        if return_outputs:
            return loss, {"rewards_chosen": chosen, "rewards_rejected": rejected}
        return loss

    def _accumulate(self, sums: Any, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        # Kept as device tensors: no host sync per micro-step; reduced across ranks once per logging step.
        step = torch.stack(
            [
                torch.tensor(float(sums.num_pairs), device=chosen.device),
                sums.bt.detach().float(),
                sums.center.detach().float(),
                sums.correct.float(),
                sums.margin.float(),
                chosen.float().sum(),
                (chosen.float() ** 2).sum(),
                rejected.float().sum(),
                (rejected.float() ** 2).sum(),
            ]
        )
        self._sums = step if self._sums is None else self._sums + step

    # ---- evaluation -------------------------------------------------------------------------------------------

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, out = self.compute_loss(model, inputs, return_outputs=True)
        loss = loss.detach()
        if prediction_loss_only:
            return loss, None, None
        logits = torch.stack([out["rewards_chosen"], out["rewards_rejected"]], dim=1).float()
        # Labels are unused; transformers only calls compute_metrics when they are not None.
        return loss, logits, torch.zeros(logits.shape[0], device=logits.device)

    # ---- logging ----------------------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._sums is not None and "loss" in logs and "learning_rate" in logs:
            sums = self._sums
            if self.args.world_size > 1:
                sums = self.accelerator.reduce(sums, reduction="sum")
            logs.update(_pair_metrics(dict(zip(_SUM_KEYS, sums.tolist())), self.args.center_rewards_coefficient))
            self._sums = None
        super().log(logs, start_time)
        if self.is_world_process_zero():
            os.makedirs(self.args.output_dir, exist_ok=True)
            with open(os.path.join(self.args.output_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps({"step": self.state.global_step, **logs}) + "\n")


def _pair_metrics(s: dict[str, float], center_coef: float | None) -> dict[str, float]:
    n = max(s["pairs"], 1.0)
    out = {
        "loss_bt": s["bt"] / n,
        "accuracy": s["correct"] / n,
        "margin": s["margin"] / n,
        "rewards_chosen_mean": s["chosen"] / n,
        "rewards_rejected_mean": s["rejected"] / n,
        "rewards_chosen_std": max(s["chosen_sq"] / n - (s["chosen"] / n) ** 2, 0.0) ** 0.5,
        "rewards_rejected_std": max(s["rejected_sq"] / n - (s["rejected"] / n) ** 2, 0.0) ** 0.5,
        "pairs": s["pairs"],
    }
    if center_coef:
        out["loss_center"] = s["center"] / n
    out["loss_exact"] = out["loss_bt"] + (center_coef or 0.0) * s["center"] / n
    return out


def _set_pad_token(tokenizer: Any, model: nn.Module) -> None:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("The tokenizer has neither a pad nor an eos token: set tokenizer.pad_token.")
        # Safe: rewards are read by attention mask, not by the first pad token.
        tokenizer.pad_token = tokenizer.eos_token
    base_model(model).config.pad_token_id = tokenizer.pad_token_id


def _apply_peft(model: nn.Module, peft_config: Any, args: RewardConfig) -> nn.Module:
    from peft import PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        raise ValueError("The model is already a PEFT model: pass peft_config=None, or pass the base model.")
    inner = base_model(model)
    head = next(name for name in SCORE_HEAD_NAMES if isinstance(getattr(inner, name, None), nn.Module))
    # The score head must be trained and saved with the adapter (TaskType.SEQ_CLS adds it; other task types don't).
    modules_to_save = list(peft_config.modules_to_save or [])
    if head not in modules_to_save:
        peft_config.modules_to_save = modules_to_save + [head]
    if args.activation_checkpointing:
        # PEFT + ZeRO-3 + non-reentrant checkpointing raises CheckpointError (trl#2514): use reentrant, which needs
        # inputs that require grad. (`gradient_checkpointing*` are transformers' deprecated mirrors of these names.)
        if args.activation_checkpointing_kwargs is None:
            args.activation_checkpointing_kwargs = args.gradient_checkpointing_kwargs = {"use_reentrant": True}
        inner.enable_input_require_grads()
    # autocast_adapter_dtype=False: mixed adapter dtypes break ZeRO-3's all-gather (trl#6089).
    return get_peft_model(model, peft_config, autocast_adapter_dtype=False)
