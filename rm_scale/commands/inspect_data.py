"""`rm-scale inspect-data`: what the trainer would see — format, pairs kept and dropped by reason, per-rank counts and
rank balance, length percentiles and the padding efficiency of the configured batching (against plain fixed batches)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from transformers import AutoTokenizer

from rm_scale.commands.recipe import resolve_model_path
from rm_scale.data.batching import rank_balance
from rm_scale.data.collate import computed_tokens
from rm_scale.data.formats import detect_format
from rm_scale.data.pairs import to_pairs
from rm_scale.data.sources import BadRow, iter_records, record_row, resolve_files
from rm_scale.data.stream import PairStream, StreamConfig
from rm_scale.model.reward import ensure_pad_token


def describe_formats(config: StreamConfig) -> list[str]:
    """The format of each source, read from its first usable row."""
    names = []
    for source in config.sources:
        name = "unknown (no readable row)"
        for path in resolve_files(source.paths):
            for rec in iter_records(path):
                try:
                    row = record_row(rec)
                    pairs = [p for p in to_pairs(row, source.mapping) if "drop" not in p]
                except BadRow:
                    continue
                if not pairs:
                    continue
                responses = source.mapping.multi_response or any(k.startswith("prediction ") for k in row)
                pair = {k: v for k, v in pairs[0].items() if not (k == "prompt" and v is None)}
                name = "multi-response → " + detect_format(list(pair), pair) if responses else detect_format(
                    list(pair), pair)
                break
            if not name.startswith("unknown"):
                break
        names.append(name)
    return names


def inspect(config: StreamConfig, tokenizer: Any, *, world_size: int) -> dict[str, Any]:
    """One pass of every rank's stream (as the trainer would run it), summarised."""
    report: dict[str, Any] = {"sources": [s.paths for s in config.sources], "formats": describe_formats(config),
                              "world_size": world_size, "batching": config.batching, "ranks": []}
    lengths: list[int] = []
    dropped: dict[str, int] = {}
    computed: list[list[int]] = []  # per rank, the computed tokens of each micro-batch, in order
    for rank in range(world_size):
        stream = PairStream(config, tokenizer, rank=rank, world_size=world_size)
        batches = 0
        computed.append([])
        for batch in stream:
            batches += 1
            computed[-1].append(computed_tokens(batch))
            for side in ("chosen", "rejected"):
                if "packed_position_ids" in batch:  # a sequence's length is its last position + 1
                    index = batch[f"{side}_index"]
                    lengths.extend((batch["packed_position_ids"][index[:, 0], index[:, 1]] + 1).tolist())
                else:
                    lengths.extend(batch[f"attention_mask_{side}"].sum(-1).tolist())
        stats = dataclasses.asdict(stream.stats)
        stats["batches"] = batches
        stats["padding_efficiency"] = stats["real_tokens"] / max(stats["padded_tokens"], 1)
        report["ranks"].append(stats)
        for reason, n in stream.stats.dropped.items():
            dropped[reason] = dropped.get(reason, 0) + n
    real = sum(r["real_tokens"] for r in report["ranks"])
    padded = sum(r["padded_tokens"] for r in report["ranks"])
    report["pairs_kept"] = sum(r["pairs"] for r in report["ranks"])
    report["pairs_dropped"] = dropped
    report["padding_efficiency"] = real / max(padded, 1)
    if world_size > 1:
        report["rank_balance"] = rank_balance(computed)
    pct = (50, 90, 99, 100)
    report["length_percentiles"] = dict(zip(map(str, pct), np.percentile(lengths, pct).astype(int).tolist())) if lengths else {}
    if config.batching != "fixed":
        baseline = dataclasses.replace(config, batching="fixed")
        base = [PairStream(baseline, tokenizer, rank=r, world_size=world_size) for r in range(world_size)]
        for stream in base:
            for _ in stream:
                pass
        report["padding_efficiency_fixed_batches"] = sum(s.stats.real_tokens for s in base) / max(
            sum(s.stats.padded_tokens for s in base), 1)
    return report


def print_report(report: dict[str, Any]) -> None:
    print(f"sources:  {report['sources']}")
    print(f"formats:  {report['formats']}")
    print(f"pairs kept: {report['pairs_kept']}   dropped: {sum(report['pairs_dropped'].values())}")
    for reason, n in sorted(report["pairs_dropped"].items(), key=lambda kv: -kv[1]):
        print(f"  {n:8d}  {reason}")
    print(f"per rank (world size {report['world_size']}):")
    for rank, stats in enumerate(report["ranks"]):
        print(f"  rank {rank}: {stats['pairs']} pairs in {stats['batches']} micro-batches, "
              f"padding efficiency {stats['padding_efficiency']:.3f}")
    if "rank_balance" in report:
        print(f"  rank balance (mean / busiest rank's computed tokens per step): {report['rank_balance']:.3f}")
    print(f"sequence length percentiles (tokens): {report['length_percentiles']}")
    line = f"padding efficiency ({report['batching']} batches): {report['padding_efficiency']:.3f}"
    if "padding_efficiency_fixed_batches" in report:
        line += f"   (fixed batches: {report['padding_efficiency_fixed_batches']:.3f})"
    print(line)


def run_inspect(paths: Sequence[str], *, model: str, world_size: int, pairs_per_batch: int, max_length: int | None,
                batching: str, token_budget: int | None, strict: bool, as_json: bool) -> int:
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model))
    ensure_pad_token(tokenizer)
    config = StreamConfig(sources=list(paths), pairs_per_batch=pairs_per_batch, max_length=max_length,
                          batching=batching, token_budget=token_budget, strict=strict)
    report = inspect(config, tokenizer, world_size=world_size)
    if as_json:
        print(json.dumps(report))
    else:
        print_report(report)
    return 0
