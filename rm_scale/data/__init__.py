"""The data pipeline: sources (files, globs, folders, hub; rows → canonical pairs) → formats (pairs → token ids) →
batching (which pairs go together, balanced over ranks) → collate (padded or packed micro-batches) → stream (each
rank's shard, block-shuffled, exactly resumable). Takes rank and world size as arguments; never talks to ranks and
never imports `rm_scale.model`."""

from rm_scale.data.collate import RewardDataCollatorWithPadding
from rm_scale.data.formats import detect_format, prepare_dataset, tokenize_pair
from rm_scale.data.stream import PairFiles, PairStream, StreamConfig

__all__ = [
    "PairFiles",
    "PairStream",
    "RewardDataCollatorWithPadding",
    "StreamConfig",
    "detect_format",
    "prepare_dataset",
    "tokenize_pair",
]
