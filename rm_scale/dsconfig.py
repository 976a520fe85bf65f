"""Fill and check a DeepSpeed JSON against `RewardConfig` — the run config is the one source of truth.

`"auto"` values are filled from the run config (transformers' own rules); a hard-coded value that disagrees with the
run config is an error (transformers raises only later, when the engine starts).
"""

from __future__ import annotations

import json
import os
from typing import Any


def load_ds_config(path: str | os.PathLike) -> dict[str, Any]:
    try:
        with open(path) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON at line {e.lineno}: {e.msg}.") from e
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"{path}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}.")
    if stage == 3 and not config["zero_optimization"].get("stage3_gather_16bit_weights_on_model_save", False):
        raise ValueError(
            f"{path}: ZeRO-3 needs zero_optimization.stage3_gather_16bit_weights_on_model_save: true, or the final "
            "model cannot be saved as one folder (LLaMA-Factory#2604)."
        )
    return config


def resolve_ds_config(path: str | os.PathLike, args: Any, *, world_size: int) -> dict[str, Any]:
    """The DeepSpeed dict the engine will get for ``args`` at ``world_size`` processes (model-size keys stay auto)."""
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    hf = HfTrainerDeepSpeedConfig(load_ds_config(path))
    hf.trainer_config_process(args)
    if hf.mismatches:
        raise ValueError(
            f"{path} disagrees with the run config:\n" + "\n".join(hf.mismatches) + "\nSet these keys to \"auto\" in "
            "the DeepSpeed JSON (the recipe is the one source of truth), or change the recipe."
        )
    config = hf.config
    micro, gas = args.per_device_train_batch_size, args.gradient_accumulation_steps
    config["train_batch_size"] = micro * gas * world_size  # args.world_size is 1 outside the launcher
    return config
