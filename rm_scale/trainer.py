"""`RewardTrainer`: TRL's public API on transformers' `Trainer`, correct under DeepSpeed ZeRO-1/2/3.

The only module that touches the Accelerator / DeepSpeed engine. Per step it runs ONE forward over chosen and rejected
concatenated (under ZeRO-3 every forward all-gathers every parameter: two forwards would double that traffic), and it
divides the loss once by the number of pairs in the whole optimizer step, counted across micro-batches and ranks.
"""

from __future__ import annotations

import json
import logging
import os
import time
import shutil
from pathlib import Path
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel, Trainer
from transformers.trainer_utils import EvalLoopOutput, EvalPrediction

from rm_scale import checkpoint as ckpt
from rm_scale.config import RewardConfig
from rm_scale.data import RewardDataCollatorWithPadding, prepare_dataset
from rm_scale.distributed import all_gather_rows, all_reduce_max, all_reduce_sum
from rm_scale.loss import BatchMoments, GlobalTerms, bradley_terry_sums, global_terms, global_terms_value, total_loss
from rm_scale.model import (
    SCORE_HEAD_NAMES,
    base_model,
    disable_dropout,
    forward_packed_rewards,
    forward_rewards,
    load_reward_model,
)
from rm_scale.preemption import (
    PreemptionCallback,
    TrainingPreempted,
    exit_on_signal_from_now_on,
    slurm_requeue,
)
from rm_scale.stream import PairFiles, PairStream, computed_tokens, padding_batch, stream_config

logger = logging.getLogger(__name__)

# Training reward histogram: fixed bins (so counts from ranks and steps simply add), plus under- and overflow.
HIST_EDGES = [x / 2 for x in range(-16, 17)]  # -8.0 .. 8.0 by 0.5

# Order of the per-step metric sums kept on device and reduced once per logging step.
_SUM_KEYS = ("pairs", "bt", "center", "correct", "margin", "chosen", "chosen_sq", "rejected", "rejected_sq",
             "real_tokens", "padded_tokens")


class EvalRewards(NamedTuple):
    """What the latest evaluation loop saw: its metric prefix, its data set and ``rewards[:, (chosen, rejected)]``."""

    prefix: str
    dataset: Any
    rewards: np.ndarray | None


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
        if args.batching == "packed" and args.packed_attention:
            from rm_scale.packed_attention import use_packed_attention

            use_packed_attention(base_model(model))
        if args.sparse_last_layer:
            from rm_scale.last_layer import use_sparse_last_layer

            use_sparse_last_layer(base_model(model))

        self._stream: PairStream | None = None
        if isinstance(train_dataset, PairFiles):
            # Each rank streams its own shard; transformers/accelerate must neither shard nor skip batches again.
            self._stream = PairStream(
                stream_config(train_dataset.files, args),
                processing_class,
                rank=args.process_index,
                world_size=args.world_size,
            )
            args.ignore_data_skip = True
            if args.dataloader_num_workers > 1:
                raise ValueError(
                    "Streaming keeps batch order exact with dataloader_num_workers 0 or 1 (1 tokenises in the "
                    f"background); got {args.dataloader_num_workers}."
                )
            train_dataset = self._stream
        else:
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
        self._balance: torch.Tensor | None = None  # sums over the steps since the last log: mean, max rank tokens
        self._terms = GlobalTerms(
            batch_mean=args.batch_mean_coefficient,
            variance=args.reward_variance_coefficient,
            target_std=args.target_reward_std,
            target_std_coef=args.target_std_coefficient,
        )
        self._moments: BatchMoments | None = None  # of the current step, when the terms need a pre-pass
        self._term_values: dict[str, float] = {}  # whole-step term values summed over the steps of a logging window
        self._term_values_step = -1
        self._last_log_time: float | None = None  # for pairs/s and tokens/s between logging steps
        self._data_state: dict[str, Any] | None = None  # resume state after the last micro-batch consumed
        self.last_eval: EvalRewards | None = None  # rewards of the latest evaluation (W&B histograms, tables)
        if "wandb" in self.args.report_to:  # adds run id/group/resume, the recipe, reward histograms, sample pairs
            from rm_scale.wandb_logging import use_reward_wandb_callback

            use_reward_wandb_callback(self)
        # SIGUSR1/SIGTERM -> checkpoint at the next optimizer step, stop, exit 75 (rm_scale.preemption).
        self._preemption: PreemptionCallback | None = None
        if self.args.save_on_signal:
            self._preemption = PreemptionCallback()
            self.add_callback(self._preemption)

    @staticmethod
    def _tokenize(dataset: Any, tokenizer: Any, args: RewardConfig, name: str) -> Any:
        if dataset is None or not hasattr(dataset, "map") or not hasattr(dataset, "__len__"):
            return dataset
        before = len(dataset)
        with args.main_process_first(desc=f"tokenising the {name} data"):
            dataset = prepare_dataset(dataset, tokenizer, max_length=args.max_length, num_proc=args.dataset_num_proc,
                                      truncation=args.truncation)
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
        """Pairs in the whole optimizer step: all micro-batches of this rank, summed over ranks. One collective, which
        also brings every rank's computed (padded) tokens of the step, for `rank_balance`: under ZeRO-3 every
        collective waits for the busiest rank, so mean / busiest is the share of the step that is not waiting."""
        if not batch_samples:
            return None
        local = torch.tensor([float(sum(_real_pairs(b) for b in batch_samples)),
                              float(sum(computed_tokens(b) for b in batch_samples))], device=device)
        ranks = all_gather_rows(local)  # (world, 2): identical on every rank
        tokens = ranks[:, 1]
        balance = torch.stack([tokens.mean(), tokens.max()])  # device-side: no host sync here
        self._balance = balance if self._balance is None else self._balance + balance
        return ranks[:, 0].sum().to(torch.long)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        is_padding = bool(inputs.pop("_pad", False))
        chosen, rejected, tokens = _pair_rewards(model, inputs)
        n = chosen.shape[0]
        rewards = torch.cat([chosen, rejected])
        sums = bradley_terry_sums(chosen, rejected, margin=inputs.get("margin"))
        if num_items_in_batch is None:  # evaluation: a plain mean over this batch
            loss = total_loss(sums, num_pairs=n, center_coef=self.args.center_rewards_coefficient)
        else:
            # DeepSpeed and DDP average gradients over ranks; multiplying by the world size undoes that, so the
            # gradient is the one of sum(all pairs) / pairs-in-step, whatever the layout of the job.
            loss = total_loss(sums, num_pairs=num_items_in_batch, center_coef=self.args.center_rewards_coefficient)
            if self._terms.enabled:
                loss = loss + self._global_terms(rewards, is_padding)
            loss = loss * self.accelerator.num_processes
        if is_padding:
            # A rank whose shard ran out still runs the forward/backward (ZeRO-3 collectives), with weight zero.
            loss = loss * 0.0
        elif model.training:
            self._accumulate(sums, chosen.detach(), rejected.detach(), tokens)
        if return_outputs:
            return loss, {"rewards_chosen": chosen, "rewards_rejected": rejected}
        return loss

    def _global_terms(self, rewards: torch.Tensor, is_padding: bool) -> torch.Tensor:
        moments = self._moments
        if moments is None:  # one micro-batch per step: this forward has all of this rank's rewards of the step
            r = rewards.detach().float() * (0.0 if is_padding else 1.0)
            local = torch.stack([torch.tensor(0.0 if is_padding else float(r.numel()), device=r.device),
                                 r.sum(), (r * r).sum()])
            moments = BatchMoments(*all_reduce_sum(local).tolist())
        surrogate, values = global_terms(rewards, moments, self._terms)
        if self._term_values_step != self.state.global_step:  # once per optimizer step
            self._term_values_step = self.state.global_step
            for key, value in values.items():
                self._term_values[key] = self._term_values.get(key, 0.0) + value
            self._term_values["steps"] = self._term_values.get("steps", 0.0) + 1
            self._term_values["total"] = self._term_values.get("total", 0.0) + global_terms_value(moments, self._terms)
        return surrogate

    def _accumulate(self, sums: Any, chosen: torch.Tensor, rejected: torch.Tensor, tokens: torch.Tensor) -> None:
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
                tokens[0].float().to(chosen.device),
                tokens[1].float().to(chosen.device),
            ]
        )
        step = torch.cat([step, _histogram(chosen.float()), _histogram(rejected.float())])
        self._sums = step if self._sums is None else self._sums + step

    # ---- streaming data -------------------------------------------------------------------------------------------

    def get_train_dataloader(self) -> Any:
        if self._stream is None:
            return super().get_train_dataloader()
        # batch_size=None: the stream yields whole micro-batches. Not passed through accelerator.prepare: the
        # stream already reads only this rank's shard.
        return torch.utils.data.DataLoader(
            self._stream,
            batch_size=None,
            num_workers=self.args.dataloader_num_workers,
            prefetch_factor=self.args.dataloader_prefetch_factor if self.args.dataloader_num_workers else None,
        )

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> tuple[list, Any]:
        if self._stream is None:
            batches, num_pairs = super().get_batch_samples(epoch_iterator, num_batches, device)
        else:
            batches, num_pairs = self._stream_batch_samples(epoch_iterator, num_batches, device)
        self._moments = None
        if batches and self._terms.enabled and len(batches) > 1:
            self._moments = self._step_moments(batches)
        return batches, num_pairs

    def _step_moments(self, batches: list[dict[str, Any]]) -> BatchMoments:
        """Mean and variance of every reward of the step (all micro-batches, all ranks) for the whole-step loss terms.

        With gradient accumulation they are known only after every micro-batch ran: one no-grad forward per
        micro-batch first (the cost of these terms; with one micro-batch per step they come from the step's own
        forward instead). Every rank runs every forward, padding batches included: under ZeRO-3 a forward is a
        collective."""
        model = self.model_wrapped
        local = torch.zeros(3, device=self.args.device)
        with torch.no_grad():
            for batch in batches:
                inputs = self._prepare_inputs({k: v for k, v in batch.items() if k != "_pad"})
                chosen, rejected, _ = _pair_rewards(model, inputs)
                rewards = torch.cat([chosen, rejected]).float()
                if not batch.get("_pad", False):
                    local += torch.stack([torch.tensor(float(rewards.numel()), device=local.device),
                                          rewards.sum(), (rewards * rewards).sum()])
        return BatchMoments(*all_reduce_sum(local).tolist())

    def _stream_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> tuple[list, Any]:
        batches = []
        for _ in range(num_batches):
            batch = next(epoch_iterator, None)
            if batch is None:  # this rank's shard is done for the epoch; others may not be
                batch = padding_batch(self.processing_class)
            else:
                self._data_state = batch.pop("_state")
            batches.append(batch)
        num_pairs = self._get_num_items_in_batch(batches, device)
        if int(num_pairs) == 0:
            # Every rank is out of data (one agreed count, so no rank waits in a collective): end the epoch here and
            # start the next pass of the stream.
            self.control.should_epoch_stop = True
            if self._data_state is not None:
                self._stream.epoch = self._data_state["epoch"] + 1
            return [], None
        return batches, num_pairs

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        if self._stream is not None and self._data_state is not None:
            path = Path(output_dir) / f"rm_scale_data_rank{self.args.process_index}.json"
            path.write_text(json.dumps(self._data_state))

    def stream_report(self) -> list[dict[str, Any]] | None:
        """Each rank's stream counts (pairs, drops by reason, real and padded tokens). Collective: call on every rank."""
        if self._stream is None:
            return None
        from accelerate.utils import gather_object

        mine = (self._data_state or {}).get("stats", {})
        return gather_object([mine]) if self.args.world_size > 1 else [mine]

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> Any:
        """`Trainer.train`, plus: ``resume_from_checkpoint="auto"`` (the latest COMPLETE checkpoint of output_dir,
        else a fresh start; True needs one), and a signal-triggered checkpoint that ends in `TrainingPreempted`."""
        resume_from_checkpoint = ckpt.resolve_resume(resume_from_checkpoint, self.args.output_dir)
        if resume_from_checkpoint is not None:
            self._check_resume_world_size(resume_from_checkpoint)
            if self._stream is not None:
                path = Path(resume_from_checkpoint) / f"rm_scale_data_rank{self.args.process_index}.json"
                if not path.exists():
                    raise ValueError(
                        f"{path} is missing: the checkpoint has no data position for rank {self.args.process_index} "
                        "(saved with another world size?). Resume with the world size it was saved with."
                    )
                self._data_state = json.loads(path.read_text())
                self._stream.load_state_dict(self._data_state)
            if self.args.should_save:
                # The steps after the checkpoint are logged again: drop the first attempt's records of them.
                dropped = ckpt.truncate_metrics(self.args.output_dir, ckpt.resumed_step(resume_from_checkpoint))
                if dropped:
                    logger.info("metrics.jsonl: dropped %d records logged after %s.", dropped, resume_from_checkpoint)
        if self._stream is not None and self.args.strict_data:
            # strict: a bad row stops the run here, before any training step, with its file, line and field
            for _ in PairStream(self._stream.config, self.processing_class, rank=self._stream.rank,
                                world_size=self._stream.world_size):
                pass
        if self._preemption is not None:
            self._preemption.reset()
            self._preemption.install()
        try:
            output = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        finally:
            if self._preemption is not None:
                self._preemption.uninstall()
                if self._preemption.stopped:  # checkpoint complete: a further signal must not turn exit 75 into a kill
                    exit_on_signal_from_now_on()
        if self._preemption is not None and self._preemption.stopped:
            self._end_preempted()
        return output

    def _check_resume_world_size(self, checkpoint: str) -> None:
        per_rank = None
        if self._stream is not None:
            per_rank = "streamed data positions are per rank"
        elif self.is_deepspeed_enabled and getattr(self.accelerator.state.deepspeed_plugin, "zero_stage", None) == 3:
            per_rank = "ZeRO-3 shards are per rank"
        ckpt.check_world_size(checkpoint, self.args.world_size, per_rank=per_rank)

    def _end_preempted(self) -> None:
        """After the signal-triggered checkpoint: requeue (rank 0, Slurm, SIGUSR1), wait for every rank, raise."""
        pre = self._preemption
        folder = os.path.join(self.args.output_dir, f"checkpoint-{pre.stop_step}")
        requeued = False
        if self.is_world_process_zero() and pre.wants_requeue and self.args.requeue_on_signal:
            requeued = slurm_requeue()
        # No rank leaves before rank 0 has committed the checkpoint and requeued: a launcher that sees one worker exit
        # stops the others.
        self.accelerator.wait_for_everyone()
        raise TrainingPreempted(folder, pre.signal_names, requeued)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """transformers' save, committed atomically: marker and ``latest`` only once EVERY rank finished its part,
        rotation (save_total_limit) only after that, over complete checkpoints (rm_scale.checkpoint)."""
        run_dir = self._get_output_dir(trial=trial)
        folder = os.path.join(run_dir, f"checkpoint-{self.state.global_step}")
        if self.args.should_save and os.path.isdir(folder):
            # A save of this step cut short, or one of a run resumed from an earlier step: never mix two saves.
            shutil.rmtree(folder)
        self.accelerator.wait_for_everyone()
        limit = self.args.save_total_limit
        self.args.save_total_limit = None  # transformers would rotate before the save is committed
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()  # every rank has written its shards, RNG state and data position
        if self.args.should_save:
            from rm_scale.wandb_logging import STATE_KEY  # the W&B run id travels in trainer_state.json too

            wandb_state = (self.state.stateful_callbacks or {}).get(STATE_KEY) or {}
            ckpt.mark_complete(folder, {
                "step": self.state.global_step,
                "world_size": self.args.world_size,
                "streamed": self._stream is not None,
                "wandb_run_id": wandb_state.get("run_id"),
            })
            ckpt.rotate(run_dir, limit, keep=[folder, self.state.best_model_checkpoint])

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

    def evaluation_loop(
        self,
        dataloader: Any,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> EvalLoopOutput:
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        # The predictions are already gathered from every rank (in data-set order): keeping them costs nothing.
        self.last_eval = EvalRewards(metric_key_prefix, getattr(dataloader, "dataset", None), output.predictions)
        output.metrics.update(_subset_accuracy(self.last_eval))
        return output

    # ---- logging ----------------------------------------------------------------------------------------------

    def _throughput(self, totals: dict[str, float]) -> dict[str, float]:
        """Pairs/s and real tokens/s since the last log, padding efficiency, and the peak memory over ranks."""
        now = time.perf_counter()
        last, self._last_log_time = self._last_log_time, now
        peak = torch.tensor(_peak_memory_gb(self.args.device), device=self.args.device)
        peak = all_reduce_max(peak)
        out = {"padding_efficiency": totals["real_tokens"] / max(totals["padded_tokens"], 1.0),
               "peak_memory_gb": peak.item()}
        if last is not None:
            out["pairs_per_s"] = totals["pairs"] / (now - last)
            out["tokens_per_s"] = totals["real_tokens"] / (now - last)
        if self._balance is not None and self.accelerator.num_processes > 1:
            mean, busiest = self._balance.tolist()  # the same on every rank (from the step's all-gather)
            out["rank_balance"] = mean / max(busiest, 1.0)
        self._balance = None
        return out

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # The condition must not depend on this rank's data (a rank may have logged only padding batches):
        # every rank reaches this collective at the same step or none does.
        if "loss" in logs and "learning_rate" in logs:
            width = len(_SUM_KEYS) + 2 * (len(HIST_EDGES) + 1)
            sums = self._sums if self._sums is not None else torch.zeros(width, device=self.args.device)
            sums = all_reduce_sum(sums).tolist()
            totals = dict(zip(_SUM_KEYS, sums))
            bins = len(HIST_EDGES) + 1
            histogram = {"edges": HIST_EDGES, "chosen": sums[len(_SUM_KEYS):][:bins], "rejected": sums[-bins:]}
            logs.update(_pair_metrics(totals, self.args.center_rewards_coefficient))
            if self._term_values:
                steps = self._term_values.pop("steps")
                logs["loss_exact"] += self._term_values.pop("total") / steps
                logs.update({k: v / steps for k, v in self._term_values.items()})
                self._term_values = {}
            logs.update(self._throughput(totals))
            self._sums = None
        else:
            histogram = None
        super().log(logs, start_time)
        if self.is_world_process_zero():
            os.makedirs(self.args.output_dir, exist_ok=True)
            record = {"step": self.state.global_step, **logs}
            if histogram is not None:
                # counts of training rewards per bin since the last log; bin i is [edges[i-1], edges[i]), bin 0
                # and the last bin are under- and overflow
                record["rewards_histogram"] = histogram
            with open(os.path.join(self.args.output_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")


def _histogram(values: torch.Tensor) -> torch.Tensor:
    """Counts per HIST_EDGES bin, with under- and overflow bins: device-side, no host sync."""
    edges = torch.tensor(HIST_EDGES, device=values.device, dtype=values.dtype)
    index = torch.bucketize(values, edges, right=True)  # 0: below the first edge; len(edges): at or above the last
    return torch.bincount(index, minlength=len(HIST_EDGES) + 1).float()


def _subset_accuracy(ev: EvalRewards) -> dict[str, float]:
    """`<prefix>_accuracy_<subset>` for each value of a `subset` column (ties count half)."""
    columns = getattr(ev.dataset, "column_names", None) or []
    if ev.rewards is None or "subset" not in columns:
        return {}
    subsets = ev.dataset["subset"]
    if len(subsets) != len(ev.rewards):
        return {}
    preds = np.asarray(ev.rewards, dtype=np.float64)
    out = {}
    for name in sorted({s for s in subsets if s is not None}):
        rows = [i for i, s in enumerate(subsets) if s == name]
        diff = preds[rows, 0] - preds[rows, 1]
        out[f"{ev.prefix}_accuracy_{name}"] = float(((diff > 0) + 0.5 * (diff == 0)).mean())
    return out


def _peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory of this process, or its peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _real_pairs(batch: Mapping[str, Any]) -> int:
    if batch.get("_pad", False):
        return 0
    return int(batch["chosen_index" if "chosen_index" in batch else "input_ids_chosen"].shape[0])


def _pair_rewards(model: nn.Module, inputs: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen rewards, rejected rewards, [real tokens, computed tokens]) from ONE forward of a padded or a packed
    micro-batch."""
    if "packed_input_ids" in inputs:
        ids, pos = inputs["packed_input_ids"], inputs["packed_position_ids"]
        index = torch.cat([inputs["chosen_index"], inputs["rejected_index"]])
        rewards = forward_packed_rewards(model, ids, pos, index)
        tokens = torch.stack([inputs["packed_real_tokens"].reshape(()).float(),
                              torch.tensor(float(ids.numel()), device=ids.device)])
    else:
        ids = torch.cat([inputs["input_ids_chosen"], inputs["input_ids_rejected"]], dim=0)
        mask = torch.cat([inputs["attention_mask_chosen"], inputs["attention_mask_rejected"]], dim=0)
        rewards = forward_rewards(model, ids, mask)
        tokens = torch.stack([mask.sum().float(), torch.tensor(float(mask.numel()), device=mask.device)])
    n = rewards.shape[0] // 2
    return rewards[:n], rewards[n:], tokens


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
