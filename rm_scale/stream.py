"""Kept for scripts written against rm_scale 0.1: the streaming data API now lives in `rm_scale.data`
(``from rm_scale.data import PairFiles``)."""

from rm_scale.data.stream import PairFiles, PairStream, StreamConfig, materialize_pairs, stream_config

__all__ = ["PairFiles", "PairStream", "StreamConfig", "materialize_pairs", "stream_config"]
