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

from rm_scale.data import RewardDataCollatorWithPadding, tokenize_canonical

BATCHING = ("fixed", "length_grouped", "token_budget", "packed")
TRUNCATION = ("drop", "keep_end")


def check_batching(*, batching: str, token_budget: int | None, truncation: str) -> None:
    """Validate the batching options (shared by RewardConfig and StreamConfig)."""
    if truncation not in TRUNCATION:
        raise ValueError(f"truncation must be one of {TRUNCATION}, got {truncation!r}.")
    if batching not in BATCHING:
        raise ValueError(f"batching must be one of {BATCHING}, got {batching!r}.")
    if batching in ("token_budget", "packed") and not token_budget:
        raise ValueError(f"batching={batching!r} needs token_budget (max tokens per micro-batch).")


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

    sources: Sequence[Any]  # rm_scale.sources.Source, or a list of paths
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
        from rm_scale.sources import Source, parse_sources

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

    # -- upstream -------------------------------------------------------------------------------------------------

    def _upstream(self, epoch: int) -> Any:
        from datasets import Features, IterableDataset, Value, interleave_datasets
        from datasets.distributed import split_dataset_by_node

        from rm_scale.sources import resolve_files

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
            batches = self._batches(pairs, random.Random(key), order=random.Random(f"{key}/order"))
            for k, batch in enumerate(batches):
                if k < skip:
                    continue
                if self.config.batching == "packed":
                    out = pack_pairs(batch, row_length=self.config.max_length, pad_id=self.tokenizer.pad_token_id)
                    real, computed = int(out["packed_real_tokens"]), out["packed_input_ids"].numel()
                else:
                    out = self.collator(batch)
                    real = int(out["attention_mask_chosen"].sum() + out["attention_mask_rejected"].sum())
                    computed = 2 * out["input_ids_chosen"].numel()
                self.stats.real_tokens += real
                self.stats.padded_tokens += computed
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
        from rm_scale.sources import BadRow, in_eval_split, record_row, to_pairs

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
                elif limit is not None and _pair_length(tokens) > limit and self.config.truncation == "keep_end":
                    out.append(truncate_pair(tokens, limit))
                    self.stats.truncated += 1
                    continue
                elif limit is not None and _pair_length(tokens) > limit:
                    problem = BadRow(f"longer than max_length={limit}", f"pair has {_pair_length(tokens)} tokens > "
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

    def _batches(self, pairs: list[dict[str, Any]], rng: random.Random, *, order: random.Random) -> list[list[dict[str, Any]]]:
        """This rank's micro-batches of one block. ``rng`` shuffles the pairs (its draws depend on this rank's pair
        count); ``order`` is the same generator on every rank and orders the batches (see `balanced_order`)."""
        cfg = self.config
        rng.shuffle(pairs)
        if cfg.batching == "packed":  # no padding to share: fill each micro-batch up to the real-token budget
            batches, current, used = [], [], 0
            for pair in pairs:
                size = len(pair["input_ids_chosen"]) + len(pair["input_ids_rejected"])
                if current and (len(current) >= cfg.pairs_per_batch or used + size > cfg.token_budget):
                    batches.append(current)
                    current, used = [], 0
                current.append(pair)
                used += size
            batches += [current] if current else []
            batches.sort(key=_real_tokens)  # stable
            return balanced_order(batches, order)
        if cfg.batching == "fixed":
            return [pairs[i : i + cfg.pairs_per_batch] for i in range(0, len(pairs), cfg.pairs_per_batch)]
        pairs.sort(key=_pair_length)  # stable: ties keep the shuffled order
        batches: list[list[dict[str, Any]]] = []
        current: list[dict[str, Any]] = []
        for pair in pairs:
            longest = _pair_length(pair)  # sorted ascending: the newest pair is the longest
            full = len(current) >= cfg.pairs_per_batch
            over = cfg.batching == "token_budget" and current and 2 * (len(current) + 1) * longest > cfg.token_budget
            if full or over:
                batches.append(current)
                current = []
            current.append(pair)
        if current:
            batches.append(current)
        return balanced_order(batches, order)  # ascending length in, balanced random order out


def balanced_order(batches: list[Any], order: random.Random) -> list[Any]:
    """Random batch order that keeps the ranks' micro-batches of one step alike in size.

    ``batches`` come sorted by size, ascending; ``order`` is a generator seeded identically on every rank. Step t
    draws the same random quantile u_t on every rank, and each rank takes its unused batch whose own quantile
    (k + 0.5) / n is nearest to u_t. So at every step the ranks run micro-batches of about the same size even though
    their batch counts differ a little -- under ZeRO-3 or DDP each step waits for the busiest rank. Measured on the
    hh-rlhf pairs (8 pairs per micro-batch, 2 ranks, computed tokens of the mean / the busiest rank): 0.756 with
    independently shuffled length-grouped batches, 0.986 with this; packed micro-batches 0.872 -> 0.976. Which sizes
    come first is random (no length curriculum).
    """
    import bisect

    n = len(batches)
    unused = list(range(n))
    out = []
    for _ in range(n):
        target = order.random() * n - 0.5  # the k whose quantile (k + 0.5) / n is u_t
        i = bisect.bisect_left(unused, target)
        if i == len(unused) or (i > 0 and target - unused[i - 1] <= unused[i] - target):
            i -= 1
        out.append(batches[unused.pop(i)])
    return out


def computed_tokens(batch: dict[str, Any]) -> int:
    """Token positions a micro-batch's forward computes, padding included: from its shapes (padded: chosen + rejected
    rows; packed: the packed rows), so no device sync."""
    if "packed_input_ids" in batch:
        return int(batch["packed_input_ids"].numel())
    return int(batch["input_ids_chosen"].numel() + batch["input_ids_rejected"].numel())


def rank_balance(computed: list[list[int]]) -> float:
    """Sum over steps of the ranks' mean computed tokens / sum of the busiest rank's: the fraction of the step time the
    ranks are busy when every step waits for the slowest (ZeRO-3, DDP). A rank whose shard ran out counts 0 (the
    trainer gives it a one-token zero-weight batch)."""
    from itertools import zip_longest

    steps = list(zip_longest(*computed, fillvalue=0))
    busiest = sum(max(s) for s in steps)
    return sum(sum(s) / len(s) for s in steps) / busiest if busiest else 1.0


def _real_tokens(batch: list[dict[str, Any]]) -> int:
    return sum(len(p["input_ids_chosen"]) + len(p["input_ids_rejected"]) for p in batch)


def materialize_pairs(config: StreamConfig, tokenizer: Any) -> tuple[Any, StreamStats]:
    """All pairs of ``config`` (every rank's share) as a map-style `datasets.Dataset` of token ids — for evaluation
    sets and small training sets; same formats, checks and counts as the stream."""
    from datasets import Dataset

    stream = PairStream(config, tokenizer, rank=0, world_size=1)
    pairs = [p for rec in stream._upstream(0) for p in stream.pairs_of(rec)]
    if not pairs:
        raise ValueError(f"No usable pairs in {[s.paths for s in config.sources]} (split {config.split!r}); "
                         f"dropped: {stream.stats.dropped or 'none'}.")
    stream.stats.pairs = len(pairs)
    columns = sorted(set().union(*pairs))
    return Dataset.from_dict({c: [p.get(c) for p in pairs] for c in columns}), stream.stats


def _records(files: list[str], source: int) -> Iterator[dict[str, Any]]:
    """Generator behind the upstream IterableDataset: one shard = a sub-list of files, read in order."""
    from rm_scale.sources import iter_records

    for path in files:
        for rec in iter_records(path):
            row = rec.get("row")
            yield {"file": rec["file"], "line": rec["line"], "text": rec.get("text"), "error": rec.get("error"),
                   "row": None if row is None else json.dumps(row, default=str), "source": source}


def pack_pairs(pairs: list[dict[str, Any]], *, row_length: int | None, pad_id: int) -> dict[str, Any]:
    """Padding-free micro-batch: every chosen and rejected sequence laid end to end in rows of at most
    ``row_length`` tokens (first fit, longest first), ``position_ids`` restarting at 0 for each sequence.

    transformers builds a block-diagonal causal mask from restarting position_ids when no attention mask is given
    (and no KV cache is used), so each sequence attends only to itself. ``chosen_index`` / ``rejected_index`` hold the
    (row, column) of each sequence's last token, where its reward is read.
    """
    seqs = [(i, side, pair[f"input_ids_{side}"]) for i, pair in enumerate(pairs) for side in ("chosen", "rejected")]
    longest, total = max(len(s) for _, _, s in seqs), sum(len(s) for _, _, s in seqs)
    rows, fill = _first_fit(seqs, max(row_length or longest, longest))
    # Rows as few as at row_length, but as short as possible: narrow them until a sequence would need another row,
    # so the last row is not mostly padding.
    width = max(longest, -(-total // len(rows)))
    while True:
        narrow = _first_fit(seqs, width)
        if len(narrow[0]) <= len(rows):
            rows, fill = narrow
            break
        width += max(1, width // 64)
    width = max(fill)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    index = {"chosen": torch.zeros((len(pairs), 2), dtype=torch.long),
             "rejected": torch.zeros((len(pairs), 2), dtype=torch.long)}
    for r, row in enumerate(rows):
        col = 0
        for i, side, seq in row:
            ids[r, col : col + len(seq)] = torch.as_tensor(seq, dtype=torch.long)
            pos[r, col : col + len(seq)] = torch.arange(len(seq))
            index[side][i] = torch.tensor([r, col + len(seq) - 1])
            col += len(seq)
        pos[r, col:] = torch.arange(width - col)  # the row's tail padding is a sequence of its own
    out = {"packed_input_ids": ids, "packed_position_ids": pos, "chosen_index": index["chosen"],
           "rejected_index": index["rejected"], "packed_real_tokens": torch.tensor(sum(fill))}
    if "margin" in pairs[0]:
        out["margin"] = torch.tensor([float(p["margin"]) for p in pairs], dtype=torch.float)
    return out


def _first_fit(seqs: list[tuple[int, str, list[int]]], capacity: int) -> tuple[list[list[Any]], list[int]]:
    """First-fit decreasing bin packing of sequences into rows of ``capacity`` tokens."""
    rows: list[list[Any]] = []
    fill: list[int] = []
    for item in sorted(seqs, key=lambda x: -len(x[2])):
        n = len(item[2])
        row = next((r for r, used in enumerate(fill) if used + n <= capacity), None)
        if row is None:
            rows.append([])
            fill.append(0)
            row = len(rows) - 1
        rows[row].append(item)
        fill[row] += n
    return rows, fill


def truncate_pair(pair: dict[str, Any], limit: int) -> dict[str, Any]:
    """Keep the last ``limit`` tokens of each side: the response end (where the reward is read) and the prompt tail."""
    out = dict(pair)
    for side in ("chosen", "rejected"):
        out[f"input_ids_{side}"] = pair[f"input_ids_{side}"][-limit:]
        out[f"attention_mask_{side}"] = pair[f"attention_mask_{side}"][-limit:]
    return out


def _pair_length(pair: dict[str, Any]) -> int:
    return max(len(pair["input_ids_chosen"]), len(pair["input_ids_rejected"]))


def padding_batch(tokenizer: Any) -> dict[str, Any]:
    """A one-pair batch of weight zero: a rank whose shard is exhausted runs it so that every rank still runs the same
    number of forwards (under ZeRO-3 each forward is a collective)."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
    ids = torch.tensor([[eos]], dtype=torch.long)
    ones = torch.ones_like(ids)
    return {"input_ids_chosen": ids, "attention_mask_chosen": ones, "input_ids_rejected": ids.clone(),
            "attention_mask_rejected": ones.clone(), "_pad": True}
