"""Use a trained reward model: `RewardScorer` (batch scoring, a TRL reward function), the HTTP server (`server`).
May use `rm_scale.data` and `rm_scale.model`; knows no training, ranks or losses."""

from rm_scale.scoring.scorer import RewardScorer, load_scoring_model

__all__ = ["RewardScorer", "load_scoring_model"]
