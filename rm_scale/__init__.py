"""rm_scale: pairwise (Bradley-Terry) reward-model training that stays correct under DeepSpeed ZeRO-3.

A TRL user switches with one import: ``from rm_scale import RewardConfig, RewardTrainer, RewardDataCollatorWithPadding``.
Names are imported lazily so that ``import rm_scale.loss`` stays free of transformers, accelerate and deepspeed.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "RewardConfig": "rm_scale.config",
    "RewardDataCollatorWithPadding": "rm_scale.data.collate",
    "PairFiles": "rm_scale.data.stream",
    "RewardScorer": "rm_scale.scoring.scorer",
    "RewardTrainer": "rm_scale.train.trainer",
    "compute_reward_metrics": "rm_scale.train.metrics",
    "forward_rewards": "rm_scale.model.reward",
    "init_score_head": "rm_scale.model.reward",
    "load_reward_model": "rm_scale.model.reward",
    "read_reward_stats": "rm_scale.model.reward",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rm_scale' has no attribute {name!r}")
