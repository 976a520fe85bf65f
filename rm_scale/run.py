"""`train_from_recipe`: recipe → RewardConfig → model, data → RewardTrainer → evaluation → exported model."""

from __future__ import annotations

import json
import logging
import os
import warnings
from typing import Any

logger = logging.getLogger(__name__)


def train_from_recipe(recipe: dict[str, Any]) -> dict[str, Any]:
    """Run a whole job; returns the final evaluation metrics (empty without eval data)."""
    from transformers import AutoTokenizer

    from rm_scale.config import RewardConfig
    from rm_scale.model import load_reward_model
    from rm_scale.recipe import load_preference_files, resolve_model_path
    from rm_scale.trainer import RewardTrainer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # DeepSpeed calls torch's renamed collectives on every step; the rename warning would flood the log.
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed\.", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*'pin_memory' argument is set as true but no accelerator")
    # RewardConfig first: it starts the process group and, under ZeRO-3, makes from_pretrained load partitioned.
    args = RewardConfig(**recipe["train"])
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
    train_data = load_preference_files(recipe["data"]["train"])
    eval_files = recipe["data"].get("eval")
    eval_data = load_preference_files(eval_files) if eval_files else None

    trainer = RewardTrainer(
        model=model,
        args=args,
        tokenizer=tokenizer,
        train_dataset=train_data,
        eval_dataset=eval_data,
        peft_config=peft_config,
    )
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    metrics = trainer.evaluate() if eval_data is not None else {}
    final_dir = os.path.join(args.output_dir, "final")
    trainer.save_model(final_dir)
    if trainer.is_world_process_zero():
        with open(os.path.join(args.output_dir, "final_metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        print(f"rm_scale: model saved to {final_dir}")
        if metrics:
            print(f"rm_scale: held-out accuracy {metrics['eval_accuracy']:.3f} on {len(eval_data)} pairs")
        print(f"rm_scale: metrics in {os.path.join(args.output_dir, 'metrics.jsonl')}")
    return metrics
