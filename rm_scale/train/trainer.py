"""`RewardTrainer`: TRL's public API on transformers' `Trainer`, correct under DeepSpeed ZeRO-1/2/3.

The only module that touches the Accelerator / DeepSpeed engine. Per step it runs ONE forward over chosen and rejected
concatenated (under ZeRO-3 every forward all-gathers every parameter: two forwards would double that traffic), and it
divides the loss once by the whole optimizer step's count, across micro-batches and ranks: its pairs (response groups:
its preference edges, plus tie edges under the tie model, or its ranked groups under Plackett-Luce; batch_loss.py).

transformers hooks it relies on (tests/test_trainer.py fails if transformers stops calling them): `get_batch_samples`
(the step's pair count), `_save_checkpoint` (atomic commit), `_save_rng_state` (each rank's data position), `_save`
(the scoring contract beside the weights).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel, Trainer, set_seed
from transformers.trainer_utils import EvalLoopOutput, EvalPrediction

from rm_scale.config import RewardConfig
from rm_scale.data.collate import RewardDataCollatorWithPadding, computed_tokens, padding_batch
from rm_scale.data.formats import PRETOKENIZED, prepare_dataset
from rm_scale.data.stream import (
    PairFiles,
    PairStream,
    StreamStats,
    eval_stream_config,
    require_pairs,
    stream_config,
)
from rm_scale.distributed import (
    all_gather_objects,
    all_gather_rows,
    all_reduce_max,
    all_reduce_sum,
    leave_together_at_exit,
)
from rm_scale.dsconfig import gloo_defaults, on_gloo, scheduler_note
from rm_scale.loss import BatchMoments, GlobalTerms, global_terms, global_terms_value, total_loss
from rm_scale.model.last_layer import use_sparse_last_layer
from rm_scale.model.lean_layers import use_lean_layers
from rm_scale.model.card import write_model_card
from rm_scale.model.contract import scoring_contract, write_contract
from rm_scale.model.lora import add_lora
from rm_scale.model.packed_attention import use_packed_attention
from rm_scale.model.tokenizer import configure_tokenizer
from rm_scale.model.reward import (
    REWARD_STATS_PREFIX,
    base_model,
    disable_dropout,
    load_reward_model,
)
from rm_scale.train import checkpoint as ckpt
from rm_scale.train.batch_loss import batch_loss_sums, forward_batch, loss_units
from rm_scale.train.metrics import (
    EvalRewards,
    TrainMetrics,
    compute_reward_metrics,
    group_set_metrics,
    pair_set_metrics,
    subset_accuracy,
)
from rm_scale.train.stream_eval import EvalRows, LockstepBatches, StreamedEvalSet, gather_groups, gather_rows
from rm_scale.train.preemption import PreemptionCallback, TrainingPreempted, exit_on_signal_from_now_on, slurm_requeue
from rm_scale.train.wandb_logging import STATE_KEY, use_reward_wandb_callback

logger = logging.getLogger(__name__)

DATA_STATE_FILE = "rm_scale_data_rank{rank}.json"  # each rank's stream position, in every checkpoint


class RewardTrainer(Trainer):
    """Trains a pairwise (Bradley-Terry) reward model; a drop-in for `trl.RewardTrainer`.

    Neither ``args`` nor ``peft_config`` of the caller is changed: the trainer works on copies."""

    def __init__(
        self,
        model: PreTrainedModel | nn.Module | str | None = None,
        args: RewardConfig | None = None,
        data_collator: Callable | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        compute_metrics: Callable[[EvalPrediction], dict] | None = None,
        callbacks: list | None = None,
        optimizers: tuple = (None, None),
        optimizer_cls_and_kwargs: tuple[type, dict[str, Any]] | None = None,
        preprocess_logits_for_metrics: Callable | None = None,
        quantization_config: Any = None,
        peft_config: Any = None,
        *,
        tokenizer: Any = None,
        model_init: Callable | None = None,
    ) -> None:
        if train_dataset is None:
            raise ValueError("`train_dataset` is required")
        _check_train_dataset(train_dataset)
        if peft_config is not None:  # before the model loads
            _check_peft_config(peft_config)
        args = _setup_args(args, model)
        # As TRL: seeded before the model is built, so LoRA's random adapter init follows args.seed (a fresh score
        # head does not depend on it: rm_scale.model.reward.init_score_head has its own generator).
        set_seed(args.seed)
        processing_class = _one_tokenizer(tokenizer, processing_class)
        if quantization_config is not None:
            _add_quantization(args, model, quantization_config)
        model, processing_class = _setup_model(model, args, processing_class, peft_config)
        self._stream: PairStream | None = None
        train_dataset = self._setup_train_data(train_dataset, processing_class, args)
        eval_dataset = _setup_eval_data(eval_dataset, processing_class, args)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator or RewardDataCollatorWithPadding(
                processing_class, pad_to_multiple_of=args.pad_to_multiple_of),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            model_init=model_init,
            compute_metrics=(_with_batched_reward_metrics(compute_metrics) if args.batch_eval_metrics
                             else _with_reward_metrics(compute_metrics)),
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
        if args.n_gpu > 1:  # as TRL (after Trainer.__init__: a model split by device_map sets n_gpu to 1)
            raise ValueError(
                f"{type(self).__name__} does not support `nn.DataParallel`, which `Trainer` uses when several GPUs are "
                "visible to a single process. Launch the script with `accelerate launch` or `torchrun`, or make a "
                "single GPU visible with `CUDA_VISIBLE_DEVICES`.")
        self._setup_state()
        self._setup_callbacks()

    def _setup_train_data(self, dataset: Any, tokenizer: Any, args: RewardConfig) -> Any:
        self._data_description = _describe_data(dataset)  # for the model card
        if not isinstance(dataset, PairFiles):
            if args.response_groups:
                raise ValueError("response_groups (loss_type, ties or merge_prompt_pairs) reads groups from files: "
                                 "pass train_dataset=PairFiles([...]) (a data set of pairs is groups of two: train it "
                                 "with the defaults).")
            return _tokenize(dataset, tokenizer, args, "train")
        if args.dataloader_num_workers > 1:
            raise ValueError(
                "Streaming keeps batch order exact with dataloader_num_workers 0 or 1 (1 tokenises in the "
                f"background); got {args.dataloader_num_workers}."
            )
        # Each rank streams its own shard; transformers/accelerate must neither shard nor skip batches again.
        args.ignore_data_skip = True
        self._stream = PairStream(stream_config(dataset.files, args), tokenizer, rank=args.process_index,
                                  world_size=args.world_size)
        return self._stream

    def _setup_state(self) -> None:
        # compute_loss already divides by the pairs of the whole step: no further division by GAS.
        self.loss_is_scaled_for_ga = True
        self._metrics = TrainMetrics(center_coef=self.args.center_rewards_coefficient)
        self._terms = GlobalTerms(
            batch_mean=self.args.batch_mean_coefficient,
            variance=self.args.reward_variance_coefficient,
            target_std=self.args.target_reward_std,
            target_std_coef=self.args.target_std_coefficient,
        )
        self._moments: BatchMoments | None = None  # of the current step, when the terms need a pre-pass
        self._data_state: dict[str, Any] | None = None  # resume state after the last micro-batch consumed
        self._pass_epoch = 0  # the stream's epoch that every rank is in (an epoch ends for all at one step)
        self.last_eval: EvalRewards | None = None  # rewards of the latest evaluation (W&B histograms, tables)
        self._eval_rows: EvalRows | None = None  # this rank's rows while a streamed evaluation runs

    def _setup_callbacks(self) -> None:
        self._wandb_callback = None
        if "wandb" in self.args.report_to:  # adds run id/group/resume, the recipe, reward histograms, sample pairs
            self._wandb_callback = use_reward_wandb_callback(self.callback_handler.callbacks)
        # SIGUSR1/SIGTERM -> checkpoint at the next optimizer step, stop, exit 75 (rm_scale.train.preemption).
        self._preemption: PreemptionCallback | None = None
        if self.args.save_on_signal:
            self._preemption = PreemptionCallback()
            self.add_callback(self._preemption)

    # ---- loss -------------------------------------------------------------------------------------------------

    def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.args.activation_offloading:
            return super().training_step(*args, **kwargs)
        # the activations kept for the backward pass wait in (pinned) CPU memory
        with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
            return super().training_step(*args, **kwargs)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        is_padding = bool(inputs.pop("_pad", False))
        out = forward_batch(model, inputs)
        objective, sums = batch_loss_sums(out, inputs, self.args)
        center = self.args.center_rewards_coefficient
        if num_items_in_batch is None:
            if model.training:
                raise RuntimeError(
                    "RewardTrainer.compute_loss got no num_items_in_batch in training: transformers no longer passes "
                    "the step's pair count from get_batch_samples. Use the transformers version in constraints.txt."
                )
            # evaluation: this batch's mean
            loss = total_loss(sums, num_pairs=max(loss_units(inputs, self.args), 1), center_coef=center,
                              objective=objective)
        else:
            # DeepSpeed and DDP average gradients over ranks; multiplying by the world size undoes that, so the
            # gradient is the one of sum(all pairs) / pairs-in-step, whatever the layout of the job.
            loss = total_loss(sums, num_pairs=num_items_in_batch, center_coef=center, objective=objective)
            if self._terms.enabled:
                loss = loss + self._global_terms(out.rewards, is_padding)
            loss = loss * self.accelerator.num_processes
        if is_padding:
            # A rank whose shard ran out still runs the forward/backward (ZeRO-3 collectives), with weight zero.
            loss = loss * 0.0
        elif model.training:
            self._metrics.add_pairs(sums, out.chosen, out.rejected, out.tokens, objective=objective,
                                    units=loss_units(inputs, self.args))
        if return_outputs:
            return loss, {"rewards_chosen": out.chosen, "rewards_rejected": out.rejected}
        return loss

    def _global_terms(self, rewards: torch.Tensor, is_padding: bool) -> torch.Tensor:
        moments = self._moments
        if moments is None:  # one micro-batch per step: this forward has all of this rank's rewards of the step
            r = rewards.detach().float() * (0.0 if is_padding else 1.0)
            local = torch.stack([torch.tensor(0.0 if is_padding else float(r.numel()), device=r.device),
                                 r.sum(), (r * r).sum()])
            moments = BatchMoments(*all_reduce_sum(local).tolist())
        surrogate, values = global_terms(rewards, moments, self._terms)
        self._metrics.add_terms(self.state.global_step, values, global_terms_value(moments, self._terms))
        return surrogate

    # ---- the step's batches -----------------------------------------------------------------------------------

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
        """The step's micro-batches and its pair count over all micro-batches and ranks (transformers passes it to
        `compute_loss` as ``num_items_in_batch``)."""
        if 0 < self.args.max_steps <= self.state.global_step:
            # Resumed from a checkpoint at (or past) max_steps: the run is finished. transformers would still run one
            # more step before checking; train none.
            logger.warning("Resumed at step %d of max_steps=%d: the run is already finished; training no step.",
                           self.state.global_step, self.args.max_steps)
            self.control.should_training_stop = True
            return [], None
        batches = []
        for _ in range(num_batches):
            batch = next(epoch_iterator, None)
            if batch is None and self._stream is None:
                break
            if batch is None:  # this rank's shard is done for the epoch; others may not be
                batch = padding_batch(self.processing_class)
            elif self._stream is not None:
                self._data_state = batch.pop("_state")
                batch.pop("_subsets", None)
            batches.append(batch)
        num_pairs = self._count_step(batches, device) if batches else None
        if self._stream is not None and int(num_pairs) == 0:
            # Every rank is out of data (one agreed count, so no rank waits in a collective): end the epoch here and
            # start the next pass of the stream.
            self.control.should_epoch_stop = True
            self._pass_epoch += 1
            self._stream.start_epoch(self._pass_epoch)  # the main process's copy (a worker may do the iterating)
            self._log_skipped_rows(f"epoch {self._pass_epoch - 1}")
            return [], None
        self._moments = None
        if batches and self._terms.enabled and len(batches) > 1:
            self._moments = self._step_moments(batches)
        return batches, num_pairs

    def _count_step(self, batches: list, device: torch.device) -> torch.Tensor:
        """Pairs in the whole optimizer step: all micro-batches of this rank, summed over ranks. The same collective
        brings every rank's computed (padded) tokens of the step, for `rank_balance`: under ZeRO-3 every collective
        waits for the busiest rank, so mean / busiest is the share of the step that is not waiting."""
        local = torch.tensor([float(sum(loss_units(b, self.args) for b in batches)),
                              float(sum(computed_tokens(b) for b in batches))], device=device)
        ranks = all_gather_rows(local)  # (world, 2): identical on every rank
        self._metrics.add_balance(ranks[:, 1])
        return ranks[:, 0].sum().to(torch.long)

    def _step_moments(self, batches: list[dict[str, Any]]) -> BatchMoments:
        """Mean and variance of every reward of the step (all micro-batches, all ranks) for the whole-step loss terms.

        With gradient accumulation they are known only after every micro-batch ran: one no-grad forward per
        micro-batch first (the cost of these terms; with one micro-batch per step they come from the step's own
        forward instead). Every rank runs every forward, padding batches included: under ZeRO-3 a forward is a
        collective."""
        local = torch.zeros(3, device=self.args.device)
        with torch.no_grad():
            for batch in batches:
                inputs = self._prepare_inputs({k: v for k, v in batch.items() if k != "_pad"})
                rewards = forward_batch(self.model_wrapped, inputs).rewards.float()
                if not batch.get("_pad", False):
                    local += torch.stack([torch.tensor(float(rewards.numel()), device=local.device),
                                          rewards.sum(), (rewards * rewards).sum()])
        return BatchMoments(*all_reduce_sum(local).tolist())

    def _log_skipped_rows(self, when: str) -> None:
        """Rows skipped so far by reason, summed over ranks, in the log (collective: every rank calls it)."""
        dropped = skipped_rows(self.stream_report() or [])
        if dropped and self.is_world_process_zero():
            logger.warning("Streamed data, %s: skipped rows by reason, all ranks: %s", when, dropped)

    def stream_report(self, *, evaluation: bool = False) -> list[dict[str, Any]] | None:
        """Each rank's stream counts (pairs, drops by reason, real and padded tokens) of the training stream, or of
        the latest pass of a streamed evaluation set. Collective: call on every rank."""
        if evaluation:
            if not isinstance(self.eval_dataset, StreamedEvalSet):
                return None
            mine = dataclasses.asdict(self.eval_dataset.stream.stats)
        elif self._stream is None:
            return None
        else:
            mine = (self._data_state or {}).get("stats", {})
        return all_gather_objects(mine)

    # ---- train, resume, checkpoints -----------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> Any:
        """`Trainer.train`, plus: ``resume_from_checkpoint="auto"`` (the latest COMPLETE checkpoint of output_dir,
        else a fresh start; True needs one), and a signal-triggered checkpoint that ends in `TrainingPreempted`."""
        gloo = on_gloo(self.args.ddp_backend, self.args.world_size)
        if gloo:  # disarmed first: a rank that fails anywhere in here must not wait for the others at exit
            leave_together_at_exit(armed=False)
        resume_from_checkpoint = ckpt.resolve_resume(resume_from_checkpoint, self.args.output_dir)
        if resume_from_checkpoint is not None:
            self._prepare_resume(resume_from_checkpoint)
        if self._stream is not None:
            self._check_stream(resumed=resume_from_checkpoint is not None)
        if self._preemption is not None:
            self._preemption.reset()
            self._preemption.install()
        try:
            output = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
            if gloo:
                leave_together_at_exit(armed=True)
        finally:
            if self._preemption is not None:
                self._preemption.uninstall()
                if self._preemption.stopped:  # checkpoint complete: a further signal must not turn exit 75 into a kill
                    exit_on_signal_from_now_on()
        if self._preemption is not None and self._preemption.stopped:
            self._end_preempted()
        return output

    def _check_stream(self, *, resumed: bool) -> None:
        """Before the first step: data with no usable pair at all is an error (not 0 steps and an untrained model);
        with strict_data a bad row anywhere in this rank's shard stops EVERY rank (else the others wait in a
        collective until the launcher's grace time runs out)."""
        if not resumed:
            require_pairs(self._stream.config, self.processing_class)
        if not self.args.strict_data:
            return
        def check() -> None:
            for _ in PairStream(self._stream.config, self.processing_class, rank=self._stream.rank,
                                world_size=self._stream.world_size):
                pass

        self._agreed(check, "strict_data: another rank stopped at a bad row (its error names the file, line, field "
                     "and fix).")

    def _agreed(self, step: Callable[[], Any], other_failed: str) -> Any:
        """Run ``step`` on every rank and agree on its failure: a rank that raises re-raises, the others raise
        ValueError(``other_failed``) — nobody is left waiting in the next collective."""
        error, result = None, None
        try:
            result = step()
        except Exception as e:  # any error: the other ranks must not wait for this one
            error = e
        failed = all_reduce_max(torch.tensor(float(error is not None), device=self.args.device))
        if error is not None:
            raise error
        if failed.item() > 0:
            raise ValueError(other_failed)
        return result

    def _prepare_resume(self, checkpoint: str) -> None:
        """Refuse a checkpoint of another world size where positions or shards are per rank, load this rank's data
        position, and drop the metrics records logged after the checkpoint (those steps are logged again)."""
        ckpt.check_world_size(checkpoint, self.args.world_size, streamed=self._stream is not None,
                              zero_stage=self._zero_stage())
        if self._stream is not None:
            self._agreed(lambda: self._load_data_state(checkpoint),
                         f"another rank could not resume its data position from {checkpoint} (see its error)")
            # A rank whose last batch was in an earlier epoch has padded through this one: it starts this epoch.
            epoch = int(all_reduce_max(torch.tensor(float(self._stream.epoch), device=self.args.device)).item())
            if self._stream.epoch < epoch:
                self._stream.start_epoch(epoch)
            self._pass_epoch = epoch
            has_left = self._agreed(self._stream.has_batches_left,
                                    "another rank could not read its data (see its error)")
            left = all_reduce_max(torch.tensor(float(has_left), device=self.args.device))
            if left.item() == 0:
                # Saved at the last step of an epoch: no rank has a batch left in it. Start the next epoch, as the
                # uninterrupted run does (transformers would see an empty epoch and stop training).
                self._pass_epoch += 1
                self._stream.start_epoch(self._pass_epoch)
                logger.info("%s ends epoch %d on every rank: resuming with epoch %d.", checkpoint,
                            self._stream.epoch - 1, self._stream.epoch)
        if self.args.should_save:
            dropped = ckpt.truncate_metrics(self.args.output_dir, ckpt.resumed_step(checkpoint))
            if dropped:
                logger.info("metrics.jsonl: dropped %d records logged after %s.", dropped, checkpoint)

    def _load_data_state(self, checkpoint: str) -> None:
        """This rank's stream position from ``checkpoint``."""
        path = self._data_state_path(checkpoint)
        if not path.exists():
            raise ValueError(
                f"{path} is missing: the checkpoint has no data position for rank {self.args.process_index} "
                "(saved with another world size, or a run that was not streamed?). Resume with the world size and "
                "data it was saved with."
            )
        self._data_state = json.loads(path.read_text())
        self._stream.load_state_dict(self._data_state)

    def _data_state_path(self, checkpoint: str) -> Path:
        return Path(checkpoint) / DATA_STATE_FILE.format(rank=self.args.process_index)

    def _zero_stage(self) -> int | None:
        if not self.is_deepspeed_enabled:
            return None
        return getattr(self.accelerator.state.deepspeed_plugin, "zero_stage", None)

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
        rotation (save_total_limit) only after that, over complete checkpoints (rm_scale.train.checkpoint)."""
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
        ckpt.hold_point(f"checkpoint-{self.state.global_step}:written")
        if self.args.should_save:
            wandb_state = (self.state.stateful_callbacks or {}).get(STATE_KEY) or {}  # the W&B run id travels too
            ckpt.mark_complete(folder, {
                "step": self.state.global_step,
                "world_size": self.args.world_size,
                "streamed": self._stream is not None,
                "wandb_run_id": wandb_state.get("run_id"),
            })
            ckpt.rotate(run_dir, limit, keep=[folder, self.state.best_model_checkpoint])
        ckpt.hold_point(f"checkpoint-{self.state.global_step}:committed")

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """transformers' save of the model and tokenizer, plus the scoring contract (rm_scale.model.contract): how
        this model's rewards are read, for every scorer of the folder (full model or adapter, checkpoint or final)."""
        super()._save(output_dir, state_dict=state_dict)
        if self.args.should_save:
            config = base_model(self.model).config
            stats = {k: v for k, v in vars(config).items() if k.startswith(REWARD_STATS_PREFIX)}
            write_contract(output_dir or self.args.output_dir, scoring_contract(
                self.processing_class, max_length=self.args.max_length, truncation=self.args.truncation,
                reward_stats=stats))

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        if self._stream is not None:  # every rank writes one, also a rank that has only padded in this epoch
            state = self._data_state
            if state is None or state["epoch"] != self._pass_epoch:
                state = self._stream.start_state(epoch=self._pass_epoch)
            self._data_state_path(output_dir).write_text(json.dumps(state))

    def save_final_model(self, final_dir: str, *, reward_stats: dict[str, float], stats_file: str | None,
                         metrics: dict[str, Any] | None = None, data: list[str] | None = None) -> None:
        """Save the trained model (collective under ZeRO-3) to ``final_dir.partial`` with its model card, and move it
        into place whole. ``reward_stats`` go into the model config; with ``stats_file`` (adapters: no config.json of
        the model) into that file of the folder too."""
        staging = final_dir + ".partial"
        if self.is_world_process_zero() and os.path.isdir(staging):
            shutil.rmtree(staging)  # left by a run killed while saving
        self.accelerator.wait_for_everyone()
        self.save_model(staging)
        self.accelerator.wait_for_everyone()
        if self.is_world_process_zero():
            if reward_stats and stats_file:
                with open(os.path.join(staging, stats_file), "w") as f:
                    json.dump(reward_stats, f, indent=2)
            write_model_card(staging, base_model=str(base_model(self.model).config._name_or_path),
                             data=data or self._data_description, hyperparameters=self._card_settings(),
                             metrics=metrics or {}, adapter=stats_file is not None)
            ckpt.hold_point("final:staged")
            ckpt.publish(staging, final_dir)

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None,
                          tags: str | list[str] | None = None, **kwargs: Any) -> None:
        """TRL's signature (so ``push_to_hub(dataset_name=...)`` works): rm_scale's card in ``output_dir/README.md``
        (rank 0), naming ``dataset_name`` as the data when given, with the latest evaluation. transformers' other card
        fields are accepted and not used."""
        if not self.is_world_process_zero():
            return
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        evaluations = [h for h in self.state.log_history if any(k.endswith("_loss") and k != "loss" for k in h)]
        metrics = {k: v for k, v in (evaluations[-1] if evaluations else {}).items()
                   if k.startswith("eval_") and not k.endswith(("_runtime", "_per_second"))}
        os.makedirs(self.args.output_dir, exist_ok=True)
        write_model_card(self.args.output_dir, base_model=str(base_model(self.model).config._name_or_path),
                         data=[dataset_name] if dataset_name else self._data_description,
                         hyperparameters=self._card_settings(), metrics=metrics,
                         adapter=getattr(self.model, "peft_config", None) is not None, model_name=model_name, tags=tags)

    def _card_settings(self) -> dict[str, Any]:
        a = self.args
        out = {"steps": self.state.global_step, "learning_rate": a.learning_rate,
               "lr_scheduler_type": str(getattr(a.lr_scheduler_type, "value", a.lr_scheduler_type)),
               "per_device_train_batch_size": a.per_device_train_batch_size,
               "gradient_accumulation_steps": a.gradient_accumulation_steps, "world_size": a.world_size,
               "max_length": a.max_length, "center_rewards_coefficient": a.center_rewards_coefficient,
               "batching": a.batching, "bf16": a.bf16, "seed": a.seed,
               "deepspeed_zero_stage": self._zero_stage()}
        peft = getattr(self.model, "peft_config", None)
        if peft:
            lora = next(iter(peft.values()))
            out.update({"lora_r": getattr(lora, "r", None), "lora_alpha": getattr(lora, "lora_alpha", None)})
        return out

    # ---- evaluation -------------------------------------------------------------------------------------------

    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """`Trainer.evaluate`; a data set passed here (Dataset, IterableDataset, DatasetDict, or a dict of them:
        metrics ``eval_<name>_*``) is prepared as at init. A string names one of the init's eval sets."""
        if eval_dataset is not None and not isinstance(eval_dataset, str):
            eval_dataset = _setup_eval_data(eval_dataset, self.processing_class, self.args)
        getattr(self.compute_metrics, "reset", lambda: None)()
        return super().evaluate(eval_dataset=eval_dataset, ignore_keys=ignore_keys,
                                metric_key_prefix=metric_key_prefix)

    def get_eval_dataloader(self, eval_dataset: Any = None) -> Any:
        chosen = self.eval_dataset[eval_dataset] if isinstance(eval_dataset, str) else eval_dataset
        chosen = self.eval_dataset if chosen is None else chosen
        if not isinstance(chosen, StreamedEvalSet):
            return super().get_eval_dataloader(eval_dataset)
        # In the main process (num_workers 0): every batch is agreed with the other ranks. Not through accelerate:
        # the stream reads only this rank's shard already.
        chosen.stream.stats = StreamStats()  # the report counts this pass
        return torch.utils.data.DataLoader(LockstepBatches(chosen.stream, self.processing_class, self.args.device),
                                           batch_size=None, num_workers=0)

    def _set_signature_columns_if_needed(self) -> None:
        # remove_unused_columns (on by default, as in TRL) keeps the columns the collator reads, not the model's
        # forward arguments; `subset` stays for per-subset accuracy.
        if self._signature_columns is None:
            self._signature_columns = [*PRETOKENIZED, "margin", "subset"]

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        if self._eval_rows is not None:  # a streamed evaluation: rows kept per rank, metrics at the end
            is_padding = bool(inputs.pop("_pad", False))
            subsets = inputs.pop("_subsets", None)
            inputs = self._prepare_inputs(inputs)
            with torch.no_grad(), self.compute_loss_context_manager():
                out = forward_batch(model, inputs)
            if not is_padding:
                self._eval_rows.add(out.rewards, out.chosen, out.rejected, {**inputs, "_subsets": subsets})
            return None, None, None
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
        if isinstance(getattr(dataloader, "dataset", None), LockstepBatches):
            return self._streamed_evaluation_loop(dataloader, description, ignore_keys, metric_key_prefix)
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        # The predictions are already gathered from every rank (in data-set order): keeping them costs nothing.
        self.last_eval = EvalRewards(metric_key_prefix, getattr(dataloader, "dataset", None), output.predictions)
        if self._wandb_callback is not None:
            self._wandb_callback.last_eval = self.last_eval
        output.metrics.update(subset_accuracy(self.last_eval))
        return output

    def _streamed_evaluation_loop(self, dataloader: Any, description: str, ignore_keys: list[str] | None,
                                  prefix: str) -> EvalLoopOutput:
        rows = self._eval_rows = EvalRows()
        try:
            output = super().evaluation_loop(dataloader, description, True, ignore_keys, prefix)
        finally:
            self._eval_rows = None
        rewards, margin, subsets = gather_rows(rows)
        output.metrics.update(pair_set_metrics(rewards, margin, subsets, prefix=prefix,
                                               center_coef=self.args.center_rewards_coefficient))
        if self.args.response_groups:  # best-of-K and ties (a collective: every rank's groups)
            groups, ties = gather_groups(rows)
            output.metrics.update(group_set_metrics(groups, ties, prefix=prefix, tie_strength=self.args.tie_strength
                                                    if self.args.ties == "tie_model" else None))
        # rank 0's first pairs are the first rows of the gathered rewards: the W&B sample table's rows
        self.last_eval = EvalRewards(prefix, rows.samples if self.is_world_process_zero() else None, rewards)
        if self._wandb_callback is not None:
            self._wandb_callback.last_eval = self.last_eval
        return EvalLoopOutput(predictions=rewards, label_ids=None, metrics=output.metrics, num_samples=len(rewards))

    # ---- logging ----------------------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        histogram = None
        # The condition must not depend on this rank's data (a rank may have logged only padding batches):
        # every rank reaches this collective at the same step or none does.
        if "loss" in logs and "learning_rate" in logs:
            metrics, histogram = self._metrics.reduce(self.args.device, world_size=self.accelerator.num_processes)
            logs.update(metrics)
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


def _setup_args(args: RewardConfig | None, model: Any) -> RewardConfig:
    if args is None:  # as TRL: "<model name>-Reward"
        name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "model")
        return RewardConfig(output_dir=f"{str(name).rstrip('/').split('/')[-1]}-Reward")
    if not isinstance(args, RewardConfig):
        raise ValueError(
            f"RewardTrainer needs args=RewardConfig(...), got {type(args).__name__}. RewardConfig accepts every "
            "TrainingArguments field: RewardConfig(**training_args.to_dict())."
        )
    args = copy.copy(args)  # the trainer sets a few fields (ignore_data_skip, checkpointing kwargs) on its own copy
    args.accelerator_config = copy.copy(args.accelerator_config)  # and dispatch_batches (an IterableDataset)
    plugin = args.deepspeed_plugin  # DeepSpeed from `deepspeed=` or the accelerate config
    if plugin is not None:
        if on_gloo(args.ddp_backend, args.world_size):
            # under ZeRO-3: the gradient reduce in place, not through two full-size copies (see gloo_defaults)
            gloo_defaults(plugin.deepspeed_config)  # the dict the engine gets: the Trainer copies it on
        note = scheduler_note(plugin.deepspeed_config, args.lr_scheduler_type)
        if note and args.process_index == 0:
            logger.warning(note)
    return args


def _add_quantization(args: RewardConfig, model: Any, quantization_config: Any) -> None:
    if not isinstance(model, str):
        logger.warning("quantization_config is ignored: the model is already instantiated.")
        return
    if "quantization_config" in (args.model_init_kwargs or {}):
        raise ValueError("You set `quantization_config` both as a trainer argument and in `args.model_init_kwargs`. "
                         "Please set it in only one place, preferably as a trainer argument.")
    args.model_init_kwargs = {**(args.model_init_kwargs or {}), "quantization_config": quantization_config}


def _one_tokenizer(tokenizer: Any, processing_class: Any) -> Any:
    if tokenizer is not None and processing_class is not None and tokenizer is not processing_class:
        raise ValueError("Pass the tokenizer once: tokenizer= or processing_class=, not two different objects.")
    return processing_class if processing_class is not None else tokenizer


def _setup_model(model: Any, args: RewardConfig, tokenizer: Any, peft_config: Any) -> tuple[nn.Module, Any]:
    """The model to train (loaded when given as a path) and its tokenizer (loaded from the model's name when not
    given), with TRL's token options, dropout off, LoRA and the compute savings."""
    if model is None:
        raise ValueError("RewardTrainer needs model= (a model or a path / hub name).")
    revision = (args.model_init_kwargs or {}).get("revision")
    if isinstance(model, str):
        kwargs = {"dtype": "float32", **(args.model_init_kwargs or {})}
        kwargs.setdefault("trust_remote_code", args.trust_remote_code)
        model = load_reward_model(model, score_head_seed=args.score_head_seed, **kwargs)
    elif base_model(model).config.num_labels != 1:
        raise ValueError(
            f"The model has `num_labels={base_model(model).config.num_labels}`, but reward models require "
            "`num_labels=1` to output a single scalar reward per sequence. Load it with num_labels=1, or pass its "
            "name as a string to have it configured automatically."
        )
    if tokenizer is None:  # as TRL: the tokenizer of the model's own name or folder
        tokenizer = AutoTokenizer.from_pretrained(base_model(model).config._name_or_path, revision=revision,
                                                  trust_remote_code=args.trust_remote_code)
    new_tokens = configure_tokenizer(tokenizer, model, eos_token=args.eos_token, pad_token=args.pad_token,
                                     chat_template_path=args.chat_template_path)
    base_model(model).config.use_cache = False  # no KV cache in training; some heads reject the kwarg
    if peft_config is not None:
        if args.activation_checkpointing and args.activation_checkpointing_kwargs is None:
            # PEFT + ZeRO-3 + non-reentrant checkpointing raises CheckpointError (trl#2514): use reentrant.
            # (`gradient_checkpointing*` are transformers' deprecated mirrors of these names.)
            args.activation_checkpointing_kwargs = args.gradient_checkpointing_kwargs = {"use_reentrant": True}
        model = add_lora(model, peft_config, checkpointing=args.activation_checkpointing, new_token_ids=new_tokens,
                         deepspeed=args.deepspeed_plugin is not None)
    if args.disable_dropout:  # after PEFT: LoRA's own dropout too
        disable_dropout(model)
    packed = args.batching == "packed" and args.packed_attention and use_packed_attention(base_model(model))
    if args.shared_prefix and not packed:
        raise ValueError("shared_prefix=True needs batching='packed' and rm_scale's packed attention (packed_attention "
                         "on, a decoder model on 'sdpa' attention): set shared_prefix to None or False.")
    if args.shared_prefix is None:  # the stream reads the resolved value
        args.shared_prefix = bool(packed)
    if args.sparse_last_layer:
        use_sparse_last_layer(base_model(model))
    if args.lean_activations:
        use_lean_layers(base_model(model))
    return model, tokenizer


def _setup_eval_data(dataset: Any, tokenizer: Any, args: RewardConfig) -> Any:
    if isinstance(dataset, Mapping):  # a dict, DatasetDict or IterableDatasetDict: one eval set per name
        return {k: _one_eval_set(v, tokenizer, args, f"eval {k}") for k, v in dataset.items()}
    return _one_eval_set(dataset, tokenizer, args, "eval")


def _one_eval_set(dataset: Any, tokenizer: Any, args: RewardConfig, name: str) -> Any:
    if isinstance(dataset, PairFiles):  # streamed: each rank its shard, every pair counted once
        config = eval_stream_config(dataset, args, pairs_per_batch=args.per_device_eval_batch_size)
        return StreamedEvalSet(PairStream(config, tokenizer, rank=args.process_index, world_size=args.world_size))
    return _tokenize(dataset, tokenizer, args, name)


def _with_reward_metrics(user: Callable[[EvalPrediction], dict] | None) -> Callable[[EvalPrediction], dict]:
    """The built-in metrics (accuracy, margin, reward statistics: what TRL always reports), plus the user's from the
    same ``predictions[:, (chosen, rejected)]``."""
    if user is None:
        return compute_reward_metrics
    return lambda pred: {**compute_reward_metrics(pred), **user(pred)}


def _with_batched_reward_metrics(user: Callable[..., dict] | None) -> Callable[..., dict]:
    """batch_eval_metrics: transformers calls this per eval batch (every rank's rows) with ``compute_result`` True at
    the last one. The user's function sees each batch as it would alone; the built-in metrics come from all rows."""
    seen: list[torch.Tensor] = []

    def metrics(pred: EvalPrediction, compute_result: bool = False) -> dict:
        seen.append(torch.as_tensor(pred.predictions).detach().float().cpu())
        mine = user(pred, compute_result=compute_result) if user is not None else {}
        if not compute_result:
            return mine
        rewards = torch.cat(seen).numpy()
        seen.clear()
        return {**compute_reward_metrics(EvalPrediction(rewards, None)), **(mine or {})}

    metrics.reset = seen.clear  # RewardTrainer.evaluate: no rows left from an evaluation that raised
    return metrics


def _check_peft_config(peft_config: Any) -> None:
    from peft import PeftConfig  # lazy: peft is only needed with peft_config

    if not isinstance(peft_config, PeftConfig):  # TRL's error (not an AttributeError deep inside peft)
        raise TypeError(f"`peft_config` must be a `peft.PeftConfig` instance (e.g. `peft.LoraConfig`), got "
                        f"{type(peft_config).__name__}.")


def _check_train_dataset(dataset: Any) -> None:
    """TRL's TypeError for a DatasetDict (`load_dataset(...)` without `split=`), plus the fix."""
    from datasets import DatasetDict, IterableDatasetDict

    if isinstance(dataset, (DatasetDict, IterableDatasetDict)):
        raise TypeError(f"`train_dataset` must be a `Dataset` or `IterableDataset`, got `{type(dataset).__name__}`. "
                        f"Pick a split: load_dataset(..., split=\"train\") or dataset[\"train\"] (splits: "
                        f"{', '.join(dataset)}).")


def _tokenize(dataset: Any, tokenizer: Any, args: RewardConfig, name: str) -> Any:
    """Tokenise a `datasets.Dataset` (counted drops) or `IterableDataset` (lazily, as it is read), as TRL prepares
    them; anything else (a torch dataset of tokenised pairs, a stream) passes through."""
    if dataset is None or not hasattr(dataset, "map"):
        return dataset
    if not hasattr(dataset, "__len__"):  # datasets.IterableDataset (load_dataset(..., streaming=True))
        # Accelerate's dispatch mode would concatenate the ranks' batches of an iterable set (as TRL, off).
        if args.accelerator_config.dispatch_batches is True:
            logger.warning("An IterableDataset is read with dispatch_batches=False (each rank reads its own batches); "
                           "the dispatch_batches=True given is ignored. Unset it to remove this warning.")
        args.accelerator_config.dispatch_batches = False
        return prepare_dataset(dataset, tokenizer, max_length=args.max_length, truncation=args.truncation)
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


def skipped_rows(reports: list[dict[str, Any]]) -> dict[str, int]:
    """Skipped rows by reason, summed over the ranks' stream reports."""
    total: dict[str, int] = {}
    for report in reports:
        for reason, n in (report or {}).get("dropped", {}).items():
            total[reason] = total.get(reason, 0) + n
    return dict(sorted(total.items(), key=lambda kv: -kv[1]))


def _describe_data(dataset: Any) -> list[str]:
    if isinstance(dataset, PairFiles):
        return [str(getattr(f, "paths", f)) for f in dataset.files]
    info = getattr(dataset, "info", None)
    name = getattr(info, "dataset_name", None) or getattr(info, "builder_name", None)
    size = f" ({len(dataset)} rows)" if hasattr(dataset, "__len__") else ""
    return [f"{name or type(dataset).__name__}{size}"]
