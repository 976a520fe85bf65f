"""Per-rank streaming of preference pairs: read this rank's shard, tokenise on the fly, batch with little padding, and
resume exactly.

Built on `datasets` streaming (`load_dataset(..., streaming=True)` + `split_dataset_by_node`: file-level shards when
the files divide evenly over the ranks, else example-level). Shuffling and batching work on *blocks* of consecutive
examples: a block is read, tokenised, shuffled and cut into micro-batches with a generator seeded by
(seed, epoch, block). The resume state is therefore tiny and exact — the upstream position at the start of the block and
the number of micro-batches already consumed from it — and resuming re-reads one block instead of re-iterating the
epoch (LLaMA-Factory#2146).

Takes rank and world size as arguments; never asks torch.distributed.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rm_scale.data.batching import check_batching, make_batches
from rm_scale.data.collate import RewardDataCollatorWithPadding, computed_tokens, pack_pairs
from rm_scale.data.formats import pair_length, tokenize_canonical, truncate_pair
from rm_scale.data.sources import (
    BadRow,
    Source,
    in_eval_split,
    iter_records,
    parse_sources,
    record_row,
    resolve_files,
    to_pairs,
)


@dataclass(frozen=True)
class PairFiles:
    """Preference data to stream: `RewardTrainer(train_dataset=PairFiles(["data/*.jsonl"]))`. Each item is a path
    (file, glob, folder, save_to_disk folder) or a source mapping {path(s), weight, columns}; batching options come
    from `RewardConfig` (`batching`, `token_budget`, `stream_block_size`, `eval_fraction`, `strict_data`)."""

    files: Sequence[Any]


@dataclass
class StreamConfig:
    """How pairs are read and batched. `pairs_per_batch` caps every micro-batch; `token_budget` also caps
    2 x pairs x longest-sequence (the padded size of the concatenated forward) when batching is "token_budget"."""

    sources: Sequence[Any]  # rm_scale.data.sources.Source, or a list of paths
    pairs_per_batch: int
    max_length: int | None = 1024
    batching: str = "fixed"
    token_budget: int | None = None
    block_size: int = 1024
    seed: int = 0
    eval_fraction: float = 0.0  # pairs whose prompt hashes below this are held out for evaluation
    split: str = "train"  # with eval_fraction: "train" keeps the other prompts, "eval" only the held-out ones
    strict: bool = False  # a bad row raises (file, line, field, fix) instead of being skipped and counted
    truncation: str = "drop"  # over-long pairs: "drop" (counted) or "keep_end" (keep the last max_length tokens)

    def __post_init__(self) -> None:
        if not all(isinstance(x, Source) for x in self.sources):
            self.sources = parse_sources(list(self.sources))
        check_batching(batching=self.batching, token_budget=self.token_budget, truncation=self.truncation)
        if self.pairs_per_batch < 1 or self.block_size < self.pairs_per_batch:
            raise ValueError("Need 1 <= pairs_per_batch <= block_size.")


def stream_config(sources: Sequence[Any], args: Any, **overrides: Any) -> StreamConfig:
    """The StreamConfig that a `RewardConfig` describes (one place maps the run config to the data pipeline)."""
    fields = dict(
        sources=sources,
        pairs_per_batch=args.per_device_train_batch_size,
        max_length=args.max_length,
        batching=args.batching,
        token_budget=args.token_budget,
        block_size=args.stream_block_size,
        seed=args.seed,
        eval_fraction=args.eval_fraction,
        strict=args.strict_data,
        truncation=args.truncation,
    )
    fields.update(overrides)
    return StreamConfig(**fields)


@dataclass
class StreamStats:
    """Counts of this rank's pass so far (reported with the run)."""

    pairs: int = 0
    truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    real_tokens: int = 0
    padded_tokens: int = 0

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


class PairStream(torch.utils.data.IterableDataset):
    """Micro-batches of this rank's shard, each with the state to resume right after it (key ``"_state"``).

    Iterating once is one pass (an epoch) over the shard; the next iteration starts the next epoch, reshuffled
    deterministically. `load_state_dict` makes the next iteration continue exactly after a consumed batch.
    """

    def __init__(self, config: StreamConfig, tokenizer: Any, *, rank: int, world_size: int) -> None:
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size}).")
        self.config, self.tokenizer, self.rank, self.world_size = config, tokenizer, rank, world_size
        self.collator = RewardDataCollatorWithPadding(tokenizer)
        self.epoch = 0
        self._resume: dict[str, Any] | None = None
        self.stats = StreamStats()

    # -- state ----------------------------------------------------------------------------------------------------

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue right after the batch whose ``_state`` this is (same world size and rank)."""
        if (state["rank"], state["world_size"]) != (self.rank, self.world_size):
            raise ValueError(
                f"Data state of rank {state['rank']}/{state['world_size']} cannot resume rank "
                f"{self.rank}/{self.world_size}: resume with the same world size, or restart the data from the "
                "beginning of an epoch (see README, 'Resuming')."
            )
        self._resume = copy.deepcopy(state)
        self.epoch = state["epoch"]
        self.stats = StreamStats(**state["stats"])

    def has_batches_left(self) -> bool:
        """Whether the next iteration would yield a batch (reads at most one block, on a copy of this stream)."""
        probe = PairStream(self.config, self.tokenizer, rank=self.rank, world_size=self.world_size)
        probe.epoch, probe._resume = self.epoch, copy.deepcopy(self._resume)
        return next(iter(probe), None) is not None

    def start_next_epoch(self) -> None:
        """Make the next iteration the first pass of the next epoch (after this one ended on every rank)."""
        self._resume = None
        self.epoch += 1

    # -- upstream -------------------------------------------------------------------------------------------------

    def _upstream(self, epoch: int) -> Any:
        from datasets import Features, IterableDataset, Value, interleave_datasets
        from datasets.distributed import split_dataset_by_node

        features = Features({"file": Value("string"), "line": Value("int64"), "text": Value("string"),
                             "row": Value("string"), "error": Value("string"), "source": Value("int64")})
        parts, weights = [], []
        for index, source in enumerate(self.config.sources):
            files = resolve_files(source.paths)
            random.Random(f"{self.config.seed}/files/{index}/{epoch}").shuffle(files)  # new file order each epoch
            ds = IterableDataset.from_generator(
                _records, gen_kwargs={"files": files, "source": index}, features=features
            )
            # file-level shards when the files spread over the ranks, else example-level: disjoint either way
            parts.append(split_dataset_by_node(ds, rank=self.rank, world_size=self.world_size))
            weights.append(source.weight)
        if len(parts) == 1:
            return parts[0]
        total = sum(weights)
        # Weights are sampling probabilities; the pass ends once every source has been seen whole at least once
        # (small or heavy sources repeat within it).
        return interleave_datasets(
            parts, probabilities=[w / total for w in weights], seed=self.config.seed + epoch,
            stopping_strategy="all_exhausted",
        )

    # -- iteration ------------------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch = self.epoch
        upstream = self._upstream(epoch)
        block, skip, pending = 0, 0, None
        if self._resume is not None:
            pending = self._resume["upstream"]
            upstream.load_state_dict(pending)
            block, skip = self._resume["block"], self._resume["emitted"]
            self._resume = None
        rows = iter(upstream)
        while True:
            # Until the first row is read after load_state_dict, datasets reports its initial state, not the loaded one.
            start = pending if pending is not None else copy.deepcopy(upstream.state_dict())
            pending = None
            raw = [row for _, row in zip(range(self.config.block_size), rows)]
            if not raw:
                break
            pairs = [p for r in raw for p in self.pairs_of(r)]
            key = f"{self.config.seed}/{epoch}/{block}"
            batches = make_batches(pairs, batching=self.config.batching, pairs_per_batch=self.config.pairs_per_batch,
                                   token_budget=self.config.token_budget, rng=random.Random(key),
                                   order=random.Random(f"{key}/order"))
            for k, batch in enumerate(batches):
                if k < skip:
                    continue
                if self.config.batching == "packed":
                    out = pack_pairs(batch, row_length=self.config.max_length, pad_id=self.tokenizer.pad_token_id)
                    real = int(out["packed_real_tokens"])
                else:
                    out = self.collator(batch)
                    real = int(out["attention_mask_chosen"].sum() + out["attention_mask_rejected"].sum())
                self.stats.real_tokens += real
                self.stats.padded_tokens += computed_tokens(out)
                self.stats.pairs += len(batch)
                out["_state"] = {
                    "epoch": epoch, "block": block, "emitted": k + 1, "upstream": start,
                    "rank": self.rank, "world_size": self.world_size, "stats": dataclasses.asdict(self.stats),
                }
                yield out
            block, skip = block + 1, 0
        self.epoch = epoch + 1

    def pairs_of(self, record: dict[str, Any]) -> list[dict[str, Any]]:
        """Tokenised training pairs of one record; bad rows are counted by reason (or raise in strict mode)."""
        out = []
        try:
            where = f"{record['file']}:{record['line']}"
            rec = {k: v for k, v in record.items() if v is not None}
            if "row" in rec:
                rec["row"] = json.loads(rec["row"])
            row = record_row(rec)
            for pair in to_pairs(row, self.config.sources[record["source"]].columns, where=where):
                if self.config.eval_fraction and (
                    in_eval_split(pair, self.config.eval_fraction, self.config.seed) != (self.config.split == "eval")
                ):
                    continue  # the other split's prompt
                tokens = None if "drop" in pair else tokenize_canonical(pair, self.tokenizer)
                limit = self.config.max_length
                if tokens is None:
                    problem = BadRow(pair["drop"], f"a pair of this row is unusable ({pair['drop']})", where=where)
                elif tokens["input_ids_chosen"] == tokens["input_ids_rejected"]:
                    problem = BadRow("identical chosen and rejected", "chosen and rejected tokenise to the same ids; "
                                     "drop the row", where=where)
                elif limit is not None and pair_length(tokens) > limit and self.config.truncation == "keep_end":
                    out.append(truncate_pair(tokens, limit))
                    self.stats.truncated += 1
                    continue
                elif limit is not None and pair_length(tokens) > limit:
                    problem = BadRow(f"longer than max_length={limit}", f"pair has {pair_length(tokens)} tokens > "
                                     f"max_length={limit}: raise max_length or drop the row", where=where)
                else:
                    out.append(tokens)
                    continue
                # one unusable pair of a multi-response row does not cost the row's other pairs
                if self.config.strict and problem.reason != "tie":
                    raise problem
                self.stats.drop(problem.reason)
        except BadRow as e:
            if self.config.strict:
                raise ValueError(f"Bad preference row (strict_data): {e}") from None
            self.stats.drop(e.reason)
        return out


def materialize_pairs(config: StreamConfig, tokenizer: Any) -> tuple[Any, StreamStats]:
    """All pairs of ``config`` (every rank's share) as a map-style `datasets.Dataset` of token ids — for evaluation
    sets and small training sets; same formats, checks and counts as the stream."""
    from datasets import Dataset

    stream = PairStream(config, tokenizer, rank=0, world_size=1)
    pairs = [p for rec in stream._upstream(0) for p in stream.pairs_of(rec)]
    if not pairs:
        raise ValueError(no_pairs_message(config, stream.stats.dropped))
    stream.stats.pairs = len(pairs)
    columns = sorted(set().union(*pairs))
    return Dataset.from_dict({c: [p.get(c) for p in pairs] for c in columns}), stream.stats


def require_pairs(config: StreamConfig, tokenizer: Any) -> None:
    """A ValueError, before any training, when the sources hold no usable pair at all (every row bad, empty files):
    reads until the first micro-batch (usually within the first block)."""
    stream = PairStream(config, tokenizer, rank=0, world_size=1)
    if next(iter(stream), None) is None:
        raise ValueError(no_pairs_message(config, stream.stats.dropped))


def no_pairs_message(config: StreamConfig, dropped: dict[str, int]) -> str:
    files = [f for s in config.sources for f in resolve_files(s.paths)]
    counts = ", ".join(f"{n} {reason}" for reason, n in sorted(dropped.items(), key=lambda kv: -kv[1])) or "no rows"
    split = f" (the {config.split!r} split of eval_fraction={config.eval_fraction})" if config.eval_fraction else ""
    return (f"No usable preference pair in {', '.join(files)}{split}: skipped {counts}. Check the files with "
            "`rm-scale inspect-data <files> --strict` (it names the first bad row's file, line, field and fix), "
            "or map your column names with the data source's `columns:`.")


def _records(files: list[str], source: int) -> Iterator[dict[str, Any]]:
    """Generator behind the upstream IterableDataset: one shard = a sub-list of files, read in order."""
    for path in files:
        for rec in iter_records(path):
            row = rec.get("row")
            yield {"file": rec["file"], "line": rec["line"], "text": rec.get("text"), "error": rec.get("error"),
                   "row": None if row is None else json.dumps(row, default=str), "source": source}


