"""`rm-scale inspect-data`: what the trainer would see — format, pairs kept and dropped by reason, per-rank counts and
rank balance, length percentiles and the padding efficiency of the configured batching (against plain fixed batches)."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from transformers import AutoTokenizer

from rm_scale.commands.recipe import load_recipe, resolve_model_path
from rm_scale.config import group_needs
from rm_scale.data.batching import rank_balance
from rm_scale.data.collate import computed_tokens
from rm_scale.data.formats import detect_format, tokenize_canonical
from rm_scale.data.sources import BadRow, parse_sources
from rm_scale.data.stream import PairStream, StreamConfig, canonical_pairs, packs_shared_prefix
from rm_scale.model.reward import ensure_pad_token


def describe_formats(config: StreamConfig) -> list[str]:
    """The format of each source, read from its first usable pair as training reads it (where filters and row groups
    included), or why none was usable among its first 100 bad rows."""
    names = []
    for source in config.sources:
        problems: list[BadRow] = []
        pairs, _ = canonical_pairs(dataclasses.replace(config, sources=[source], eval_fraction=0.0), limit=1,
                                   errors=problems, max_errors=100)
        if pairs:
            pair = {k: v for k, v in pairs[0].items() if not (k == "prompt" and v is None)}
            name = detect_format(list(pair), pair)
            name = f"{source.format or 'columns mapping'} → {name}" if not source.mapping.is_empty else name
        else:
            name = f"unknown: no usable row among the first {len(problems)}" + (
                f" (first: {problems[0]})" if problems else "")
        names.append(name)
    return names


def sample_pairs(config: StreamConfig, tokenizer: Any, *, count: int) -> list[dict[str, str]]:
    """The first ``count`` pairs as the mapping reads them (prompt | chosen | rejected) and the chosen sequence as
    the model sees it (decoded token ids, the end kept)."""
    pairs, _ = canonical_pairs(dataclasses.replace(config, eval_fraction=0.0), limit=count)
    out = []
    for pair in pairs:
        tokens = tokenize_canonical(pair, tokenizer) if "input_ids_chosen" not in pair else pair
        out.append({"prompt": _show(pair.get("prompt")), "chosen": _show(pair.get("chosen")),
                    "rejected": _show(pair.get("rejected")),
                    "model_sees_chosen": _tail(tokenizer.decode(tokens["input_ids_chosen"]))})
    return out


def _show(value: Any) -> str:
    if value is None:
        return "(none: whole transcripts / conversations)"
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return " | ".join(f"{m['role']}: {m['content']}" for m in value)
    return str(value)


def _tail(text: str, n: int = 240) -> str:
    return text if len(text) <= n else "…" + text[-n:]


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
            if "response_index" in batch:  # response groups: each response's prefix + own tokens
                _count_groups(report, batch)
                index, spans = batch["response_index"], batch["response_span"]
                lengths.extend((spans[:, 1] - spans[:, 0] + index[:, 1] - spans[:, 2] + 1).tolist())
                continue
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
        report.setdefault("warnings", {}).update(stream.stats.warnings)
        report["unshared_prompts"] = report.get("unshared_prompts", 0) + stream.stats.unshared_prompts
        for reason, n in stream.stats.dropped.items():
            dropped[reason] = dropped.get(reason, 0) + n
    real = sum(r["real_tokens"] for r in report["ranks"])
    padded = sum(r["padded_tokens"] for r in report["ranks"])
    report["pairs_kept"] = sum(r["pairs"] for r in report["ranks"])
    report["pairs_dropped"] = dropped
    report["padding_efficiency"] = real / max(padded, 1)
    report["prefix_sharing"] = sum(r.get("pair_tokens", 0) for r in report["ranks"]) / max(real, 1)
    report["computed_tokens_per_pair"] = padded / max(report["pairs_kept"], 1)
    if world_size > 1:
        report["rank_balance"] = rank_balance(computed)
    pct = (50, 90, 99, 100)
    report["length_percentiles"] = dict(zip(map(str, pct), np.percentile(lengths, pct).astype(int).tolist())) if lengths else {}
    if config.batching != "fixed":
        # fixed batches of pairs (what the same rows cost as TRL batches them): no groups, no shared prefix
        baseline = dataclasses.replace(config, batching="fixed", shared_prefix=False, response_groups=False,
                                       merge_prompt_pairs=False, listwise=False, keep_ties=False)
        base = [PairStream(baseline, tokenizer, rank=r, world_size=world_size) for r in range(world_size)]
        for stream in base:
            for _ in stream:
                pass
        report["padding_efficiency_fixed_batches"] = sum(s.stats.real_tokens for s in base) / max(
            sum(s.stats.padded_tokens for s in base), 1)
    return report


def _count_groups(report: dict[str, Any], batch: dict[str, Any]) -> None:
    groups = report.setdefault("groups", {"groups": 0, "responses": 0, "preference_edges": 0, "tie_edges": 0})
    groups["groups"] += int(batch["response_group"].max()) + 1 if len(batch["response_group"]) else 0
    groups["responses"] += len(batch["response_group"])
    groups["preference_edges"] += int(batch["group_edges"])
    groups["tie_edges"] += int(batch["group_ties"])


def print_report(report: dict[str, Any]) -> None:
    print(f"sources:  {report['sources']}")
    print(f"formats:  {report['formats']}")
    print(f"pairs kept: {report['pairs_kept']}   dropped: {sum(report['pairs_dropped'].values())}")
    if "groups" in report:
        g = report["groups"]
        print(f"response groups: {g['groups']} ({g['responses']} responses, each computed once): "
              f"{g['preference_edges']} preference edges (the pairs kept), {g['tie_edges']} tie edges trained")
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
    print(f"computed tokens per pair: {report['computed_tokens_per_pair']:.1f}   prefix sharing (pair tokens / "
          f"tokens computed once): {report['prefix_sharing']:.3f}")
    for warning in report.get("warnings", {}).values():
        print(f"warning: {warning}")
    if report.get("unshared_prompts"):
        print(f"warning: {report['unshared_prompts']} pairs are whole texts with no common beginning: no prompt was "
              "found in them; if the data has a prompt column, map it (columns.prompt)")
    for i, sample in enumerate(report.get("samples", []), 1):
        print(f"pair {i}:")
        for key in ("prompt", "chosen", "rejected", "model_sees_chosen"):
            print(f"  {key + ':':<19}{_tail(sample[key])}")


def run_inspect(paths: Sequence[str], *, model: str, world_size: int, pairs_per_batch: int, max_length: int | None,
                batching: str, token_budget: int | None, strict: bool, as_json: bool, config_file: str | None = None,
                show: int = 3, shared_prefix: bool | None = None) -> int:
    """`rm-scale inspect-data`: exits 1 when not a single pair is kept. Packed batches share each pair's prefix
    unless ``shared_prefix`` is False (as training does on a decoder model with sdpa attention)."""
    if config_file:
        recipe = load_recipe(config_file)
        train = recipe["train"]
        paths, model = list(paths) + [recipe["data"]["train"]], recipe["model"]["name_or_path"]
        pairs_per_batch = train.get("per_device_train_batch_size", pairs_per_batch)
        max_length, batching = train.get("max_length", max_length), train.get("batching", batching)
        token_budget, strict = train.get("token_budget", token_budget), train.get("strict_data", strict)
        shared_prefix = train.get("shared_prefix", shared_prefix)
        groups = _group_fields(train)
    else:
        groups = {}
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model))
    ensure_pad_token(tokenizer)
    sources = [s for spec in paths for s in parse_sources(spec)]
    config = StreamConfig(sources=sources, pairs_per_batch=pairs_per_batch, max_length=max_length,
                          batching=batching, token_budget=token_budget, strict=strict,
                          shared_prefix=packs_shared_prefix(batching, shared_prefix), **groups)
    report = inspect(config, tokenizer, world_size=world_size)
    report["samples"] = sample_pairs(config, tokenizer, count=show)
    if as_json:
        print(json.dumps(report))
    else:
        print_report(report)
    if report["pairs_kept"] == 0 and not report.get("groups", {}).get("tie_edges"):  # ties alone train a tie model
        print("rm-scale inspect-data: error: not a single usable pair (see the reasons above).", file=sys.stderr)
        return 1
    return 0


def _group_fields(train: dict[str, Any]) -> dict[str, Any]:
    """The StreamConfig fields of a recipe's response-group settings (as RewardConfig resolves them), so the report
    counts what training trains on: ties kept under the tie model, groups that do not rank dropped under
    Plackett-Luce."""
    loss_type, ties = train.get("loss_type", "bradley_terry"), train.get("ties", "drop")
    merge = bool(train.get("merge_prompt_pairs", False))
    on = train.get("response_groups")
    return {"response_groups": bool(group_needs(loss_type, ties, merge)) if on is None else bool(on),
            "merge_prompt_pairs": merge, "listwise": loss_type == "plackett_luce", "keep_ties": ties == "tie_model"}
