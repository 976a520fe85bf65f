"""`train_from_recipe`: recipe → RewardConfig → model, data → RewardTrainer → evaluation → exported model."""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from typing import Any

logger = logging.getLogger(__name__)


def train_from_recipe(recipe: dict[str, Any]) -> dict[str, Any]:
    """Run a whole job; returns the final evaluation metrics (empty without eval data)."""
    from transformers import AutoTokenizer

    from rm_scale.config import RewardConfig
    from rm_scale.distributed import shutdown
    from rm_scale.model import REWARD_STATS_FILE, load_reward_model, set_reward_stats
    from rm_scale.recipe import resolve_model_path
    from rm_scale.trainer import RewardTrainer
    from rm_scale.wandb_logging import set_wandb_recipe

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # DeepSpeed calls torch's renamed collectives on every step; the rename warning would flood the log.
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed\.", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*'pin_memory' argument is set as true but no accelerator")
    # RewardConfig first: it starts the process group and, under ZeRO-3, makes from_pretrained load partitioned.
    args = RewardConfig(**recipe["train"])
    _preflight(recipe, args)  # clear errors now, not after the model is loaded
    model_cfg = recipe["model"]
    path = resolve_model_path(model_cfg["name_or_path"])
    trust = bool(model_cfg.get("trust_remote_code", False))
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
    model = load_reward_model(
        path, dtype=model_cfg.get("dtype", "float32"), score_head_seed=args.score_head_seed, trust_remote_code=trust
    )
    peft_config = None
    if recipe.get("lora") is not None:
        from peft import LoraConfig, TaskType

        peft_config = LoraConfig(task_type=TaskType.SEQ_CLS, **recipe["lora"])
    train_data, eval_data, data_report = _data(recipe["data"], args, tokenizer)

    trainer = RewardTrainer(
        model=model,
        args=args,
        tokenizer=tokenizer,
        train_dataset=train_data,
        eval_dataset=eval_data,
        peft_config=peft_config,
    )
    set_wandb_recipe(trainer, recipe)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    metrics = trainer.evaluate() if eval_data is not None else {}
    final_dir = os.path.join(args.output_dir, "final")
    staging = final_dir + ".partial"  # the model is written here, then moved into place whole
    stream_report = trainer.stream_report()  # collective: every rank
    stats = _reward_stats(metrics, pairs=len(trainer.eval_dataset)) if metrics else {}
    set_reward_stats(trainer.model, stats)  # every rank: under ZeRO-3 save_model is collective
    if trainer.is_world_process_zero() and os.path.isdir(staging):
        shutil.rmtree(staging)  # left by a run killed while saving
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(staging)
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        if stats and peft_config is not None:  # an adapter folder has no config.json of the model
            with open(os.path.join(staging, REWARD_STATS_FILE), "w") as f:
                json.dump(stats, f, indent=2)
        _publish(staging, final_dir)
        with open(os.path.join(args.output_dir, "final_metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        data_report["train_stream_per_rank"] = stream_report
        with open(os.path.join(args.output_dir, "data_report.json"), "w") as f:
            json.dump(data_report, f, indent=2)
        for name, part in data_report.items():
            dropped = part.get("dropped") if isinstance(part, dict) else None
            if dropped:
                print(f"rm_scale: {name}: skipped rows by reason {dropped} (see data_report.json)")
        print(f"rm_scale: model saved to {final_dir}")
        if metrics:
            print(f"rm_scale: held-out accuracy {metrics['eval_accuracy']:.3f} on {len(eval_data)} pairs")
        print(f"rm_scale: metrics in {os.path.join(args.output_dir, 'metrics.jsonl')}")
    shutdown()
    return metrics


def _publish(staging: str, final_dir: str) -> None:
    """Move a finished model folder into place: a reader sees the old folder or the new one, never half of one."""
    old = final_dir + ".old"
    if os.path.isdir(old):
        shutil.rmtree(old)
    if os.path.isdir(final_dir):
        os.replace(final_dir, old)
    os.replace(staging, final_dir)
    if os.path.isdir(old):
        shutil.rmtree(old)


def _preflight(recipe: dict[str, Any], args: Any) -> None:
    """Check what would otherwise fail late, on every rank: the data paths exist, output_dir is writable, and the
    checkpoint to resume from (``resume_from_checkpoint: auto`` resolved here, once) fits this world size."""
    from rm_scale import checkpoint as ckpt
    from rm_scale.sources import parse_sources, resolve_files

    for key in ("train", "eval"):
        spec = recipe["data"].get(key)
        if spec is not None and spec != "split":
            for source in parse_sources(spec):
                resolve_files(source.paths)  # "Data path ... matches no file"
    ckpt.check_writable(args.output_dir)
    args.resume_from_checkpoint = ckpt.resolve_resume(args.resume_from_checkpoint, args.output_dir)
    if args.resume_from_checkpoint is not None:
        streaming = recipe["data"].get("streaming", "auto")
        streaming = args.max_steps > 0 if streaming == "auto" else bool(streaming)
        plugin = getattr(args, "deepspeed_plugin", None)
        per_rank = None
        if streaming:
            per_rank = "streamed data positions are per rank"
        elif plugin is not None and getattr(plugin, "zero_stage", None) == 3:
            per_rank = "ZeRO-3 shards are per rank"
        ckpt.check_world_size(args.resume_from_checkpoint, args.world_size, per_rank=per_rank)


def _reward_stats(metrics: dict[str, float], *, pairs: int) -> dict[str, float]:
    """Final-evaluation reward statistics saved with the model (rm_scale.model.read_reward_stats reads them)."""
    return {
        "rm_scale_reward_mean": metrics["eval_rewards_mean"],
        "rm_scale_reward_std": metrics["eval_rewards_std"],
        "rm_scale_eval_accuracy": metrics["eval_accuracy"],
        "rm_scale_eval_pairs": pairs,
    }


def _data(data: dict[str, Any], args: Any, tokenizer: Any) -> tuple[Any, Any, dict[str, Any]]:
    """Training data (a per-rank stream, or a map-style set) and evaluation set, with their drop counts.

    `data.eval` is files, or `split`: the prompts that `train.eval_fraction` holds out of the training sources.
    """
    import dataclasses

    from rm_scale.sources import parse_sources
    from rm_scale.stream import PairFiles, materialize_pairs, stream_config

    sources = parse_sources(data["train"])
    streaming = data.get("streaming", "auto")
    if streaming == "auto":
        streaming = args.max_steps > 0  # a stream has no length: the run must be measured in steps
    report: dict[str, Any] = {}
    if streaming:
        train = PairFiles(sources)
    else:
        _check_fits_in_memory(sources)
        train, stats = materialize_pairs(stream_config(sources, args, split="train"), tokenizer)
        report["train"] = dataclasses.asdict(stats)
    spec = data.get("eval")
    if spec is None:
        return train, None, report
    if spec == "split":
        if not args.eval_fraction:
            raise ValueError("data.eval: split needs train.eval_fraction > 0 (the share of prompts held out).")
        config = stream_config(sources, args, split="eval")
    else:
        config = stream_config(parse_sources(spec), args, split="train", eval_fraction=0.0)
    evaluation, stats = materialize_pairs(config, tokenizer)
    report["eval"] = dataclasses.asdict(stats)
    return train, evaluation, report


MAP_STYLE_LIMIT = 2 * 2**30  # bytes of input files; larger inputs must stream


def _check_fits_in_memory(sources: list[Any]) -> None:
    """Without streaming every pair is tokenised into memory first: refuse inputs too large for that."""
    from rm_scale.sources import resolve_files

    total = sum(os.path.getsize(f) for s in sources for f in resolve_files(s.paths) if os.path.isfile(f))
    if total > MAP_STYLE_LIMIT:
        raise ValueError(
            f"The training files hold {total / 2**30:.1f} GiB: too large to tokenise into memory. Stream them: set "
            "train.max_steps (a stream has no length) and leave data.streaming at auto (or true)."
        )
