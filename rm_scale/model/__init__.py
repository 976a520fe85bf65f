"""Build, read and export reward models (`reward`), LoRA (`lora`), and the exact compute and memory savings: the last
layer at the reward tokens only (`last_layer`), attention per packed sequence (`packed_attention`), norms and MLPs that
save less for the backward (`lean_layers`); the shipped SmolLM2 (`pretrained`). Knows nothing of ranks or losses; never
imports `rm_scale.data`."""

from rm_scale.model.reward import (
    REWARD_STATS_FILE,
    SCORE_HEAD_NAMES,
    base_model,
    disable_dropout,
    ensure_pad_token,
    forward_packed_rewards,
    forward_rewards,
    init_score_head,
    last_real_index,
    load_reward_model,
    read_reward_stats,
    score_head,
    set_reward_stats,
)

__all__ = [
    "REWARD_STATS_FILE",
    "SCORE_HEAD_NAMES",
    "base_model",
    "disable_dropout",
    "ensure_pad_token",
    "forward_packed_rewards",
    "forward_rewards",
    "init_score_head",
    "last_real_index",
    "load_reward_model",
    "read_reward_stats",
    "score_head",
    "set_reward_stats",
]
