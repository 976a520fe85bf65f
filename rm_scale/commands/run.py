"""`train_from_recipe`: recipe → (RewardConfig, model spec, data spec) once → model, data → RewardTrainer → evaluation
→ exported model."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import warnings
from typing import Any

from transformers import AutoTokenizer

from rm_scale.commands.recipe import DataSpec, resolve_data, resolve_model
from rm_scale.config import RewardConfig
from rm_scale.data.sources import Source, resolve_files
from rm_scale.data.stream import PairFiles, eval_stream_config, materialize_pairs, require_pairs, stream_config
from rm_scale.distributed import shutdown
from rm_scale.model.reward import REWARD_STATS_FILE, ensure_pad_token, load_reward_model, set_reward_stats
from rm_scale.train import checkpoint as ckpt
from rm_scale.train.trainer import RewardTrainer, skipped_rows
from rm_scale.train.wandb_logging import set_wandb_recipe

logger = logging.getLogger(__name__)

MAP_STYLE_LIMIT = 2 * 2**30  # bytes of input files; larger inputs must stream


def train_from_recipe(recipe: dict[str, Any]) -> dict[str, Any]:
    """Run a whole job; returns the final evaluation metrics (empty without eval data)."""
    _quiet_logs()
    # RewardConfig first: it starts the process group and, under ZeRO-3, makes from_pretrained load partitioned.
    args = RewardConfig(**recipe["train"])
    model_spec, data_spec = resolve_model(recipe), resolve_data(recipe, args)
    _preflight(args, data_spec)  # clear errors now, not after the model is loaded
    tokenizer = AutoTokenizer.from_pretrained(model_spec.path, trust_remote_code=model_spec.trust_remote_code,
                                              revision=model_spec.revision)
    ensure_pad_token(tokenizer)
    train_data, eval_data, data_report = _data(data_spec, args, tokenizer)  # data errors before the model loads
    model = load_reward_model(model_spec.path, score_head_seed=args.score_head_seed, **model_spec.load_kwargs())
    trainer = RewardTrainer(model=model, args=args, tokenizer=tokenizer, train_dataset=train_data,
                            eval_dataset=eval_data, peft_config=_lora(recipe))
    set_wandb_recipe(trainer, recipe)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    metrics = final_evaluation(trainer) if eval_data is not None else {}
    data_report["train_stream_per_rank"] = trainer.stream_report()  # collective: every rank
    if isinstance(eval_data, PairFiles):
        data_report["eval_stream_per_rank"] = trainer.stream_report(evaluation=True)
    stats = _reward_stats(metrics, pairs=_eval_pairs(metrics, trainer.eval_dataset)) if metrics else {}
    set_reward_stats(trainer.model, stats)  # every rank: under ZeRO-3 save_model is collective
    final_dir = os.path.join(args.output_dir, "final")
    trainer.save_final_model(final_dir, reward_stats=stats, metrics=metrics,
                             data=[f"{s.paths}" + (f" (format: {s.format})" if s.format else "") for s in data_spec.train],
                             stats_file=REWARD_STATS_FILE if recipe.get("lora") is not None else None)
    if trainer.is_world_process_zero():
        _write_reports(args.output_dir, metrics, data_report)
        print(f"rm_scale: model saved to {final_dir}")
        if metrics:
            print(f"rm_scale: held-out accuracy {metrics['eval_accuracy']:.3f} on "
                  f"{_eval_pairs(metrics, trainer.eval_dataset)} pairs")
        print(f"rm_scale: metrics in {os.path.join(args.output_dir, 'metrics.jsonl')}")
    shutdown()
    return metrics


def final_evaluation(trainer: RewardTrainer) -> dict[str, Any]:
    """The held-out metrics of the final weights. When this process's last evaluation ran at the last step (eval_steps
    dividing max_steps, the common case), those are its metrics: evaluating the same weights again costs a whole pass
    and logs the same point twice. After a resume that trained nothing, the evaluation runs anew."""
    last = next((h for h in reversed(trainer.state.log_history) if "eval_loss" in h), None)
    if (last is not None and last.get("step") == trainer.state.global_step and trainer.last_eval is not None
            and not isinstance(trainer.eval_dataset, dict)):
        return {k: v for k, v in last.items() if k != "step"}
    return trainer.evaluate()


def _quiet_logs() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # DeepSpeed calls torch's renamed collectives on every step; the rename warning would flood the log.
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed\.", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*'pin_memory' argument is set as true but no accelerator")


def _lora(recipe: dict[str, Any]) -> Any:
    if recipe.get("lora") is None:
        return None
    from peft import LoraConfig, TaskType  # lazy: peft only for LoRA recipes

    return LoraConfig(task_type=TaskType.SEQ_CLS, **recipe["lora"])


def _write_reports(output_dir: str, metrics: dict[str, Any], data_report: dict[str, Any]) -> None:
    with open(os.path.join(output_dir, "final_metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    with open(os.path.join(output_dir, "data_report.json"), "w") as f:
        json.dump(data_report, f, indent=2)
    for name, part in data_report.items():
        parts = part if isinstance(part, list) else [part] if isinstance(part, dict) else []
        dropped = skipped_rows(parts)
        name = {"train_stream_per_rank": "train (streamed, all ranks)",
                "eval_stream_per_rank": "eval (streamed, all ranks)"}.get(name, name)
        if dropped:
            print(f"rm_scale: {name}: skipped rows by reason {dropped} (see data_report.json)")
        for warning in sorted({w for p in parts for w in (p or {}).get("warnings", {}).values()}):
            print(f"rm_scale: {name}: warning: {warning}")
        unshared = sum((p or {}).get("unshared_prompts", 0) for p in parts)
        if unshared:
            print(f"rm_scale: {name}: warning: {unshared} pairs are whole texts with no common beginning, so no "
                  "prompt was found in them; if the data has a prompt column, map it (columns.prompt)")


def _preflight(args: RewardConfig, data: DataSpec) -> None:
    """Check what would otherwise fail late, on every rank: output_dir is writable, and the checkpoint to resume from
    (``resume_from_checkpoint: auto`` resolved here, once) fits this world size. (The data paths were checked when
    the data section was resolved.)"""
    ckpt.check_writable(args.output_dir)
    args.resume_from_checkpoint = ckpt.resolve_resume(args.resume_from_checkpoint, args.output_dir)
    if args.resume_from_checkpoint is not None:
        plugin = getattr(args, "deepspeed_plugin", None)  # set by TrainingArguments only under DeepSpeed
        ckpt.check_world_size(args.resume_from_checkpoint, args.world_size, streamed=data.streaming,
                              zero_stage=getattr(plugin, "zero_stage", None))


def _eval_pairs(metrics: dict[str, float], eval_dataset: Any) -> int:
    """Pairs of the final evaluation: counted by a streamed one (over every rank), else the data set's length."""
    return int(metrics["eval_pairs"]) if "eval_pairs" in metrics else len(eval_dataset)


def _reward_stats(metrics: dict[str, float], *, pairs: int) -> dict[str, float]:
    """Final-evaluation reward statistics saved with the model (rm_scale.model.read_reward_stats reads them)."""
    return {
        "rm_scale_reward_mean": metrics["eval_rewards_mean"],
        "rm_scale_reward_std": metrics["eval_rewards_std"],
        "rm_scale_eval_accuracy": metrics["eval_accuracy"],
        "rm_scale_eval_pairs": pairs,
    }


def _data(data: DataSpec, args: RewardConfig, tokenizer: Any) -> tuple[Any, Any, dict[str, Any]]:
    """Training data (a per-rank stream, or a map-style set) and evaluation set, with their drop counts.

    `data.eval` is files, or `split`: the prompts that `train.eval_fraction` holds out of the training sources.
    """
    report: dict[str, Any] = {}
    if args.response_groups and not data.streaming:
        raise ValueError("response_groups (loss_type, ties or merge_prompt_pairs) trains on streamed data: set "
                         "train.max_steps (data.streaming: auto then streams) or data.streaming: true.")
    if data.streaming:
        if args.resume_from_checkpoint is None:
            require_pairs(stream_config(data.train, args, split="train"), tokenizer)
        train = PairFiles(data.train)
    else:
        _check_fits_in_memory(data.train)
        train, stats = materialize_pairs(stream_config(data.train, args, split="train"), tokenizer)
        report["train"] = dataclasses.asdict(stats)
    if data.eval is None:
        return train, None, report
    held_out = data.eval == "split"
    evaluation = PairFiles(data.train if held_out else data.eval, held_out=held_out)
    if data.streaming:  # each rank streams its shard of the evaluation pairs too: nothing is materialised
        require_pairs(eval_stream_config(evaluation, args), tokenizer)
        return train, evaluation, report
    evaluation, stats = materialize_pairs(eval_stream_config(evaluation, args), tokenizer)
    report["eval"] = dataclasses.asdict(stats)
    return train, evaluation, report


def _check_fits_in_memory(sources: list[Source]) -> None:
    """Without streaming every pair is tokenised into memory first: refuse inputs too large for that."""
    total = sum(os.path.getsize(f) for s in sources for f in resolve_files(s.paths) if os.path.isfile(f))
    if total > MAP_STYLE_LIMIT:
        raise ValueError(
            f"The training files hold {total / 2**30:.1f} GiB: too large to tokenise into memory. Stream them: set "
            "train.max_steps (a stream has no length) and leave data.streaming at auto (or true)."
        )

