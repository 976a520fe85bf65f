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
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rm_scale.data import RewardDataCollatorWithPadding, detect_format, tokenize_pair

BATCHING = ("fixed", "length_grouped", "token_budget")


@dataclass(frozen=True)
class PairFiles:
    """Preference files to stream: pass as `RewardTrainer(train_dataset=PairFiles([...]))`; batching options come
    from `RewardConfig` (`batching`, `token_budget`, `stream_block_size`)."""

    files: Sequence[str]


@dataclass
class StreamConfig:
    """How pairs are read and batched. `pairs_per_batch` caps every micro-batch; `token_budget` also caps
    2 x pairs x longest-sequence (the padded size of the concatenated forward) when batching is "token_budget"."""

    files: Sequence[str]
    pairs_per_batch: int
    max_length: int | None = 1024
    batching: str = "fixed"
    token_budget: int | None = None
    block_size: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batching not in BATCHING:
            raise ValueError(f"batching must be one of {BATCHING}, got {self.batching!r}.")
        if self.batching == "token_budget" and not self.token_budget:
            raise ValueError('batching="token_budget" needs token_budget (max padded tokens per micro-batch).')
        if self.pairs_per_batch < 1 or self.block_size < self.pairs_per_batch:
            raise ValueError("Need 1 <= pairs_per_batch <= block_size.")


@dataclass
class StreamStats:
    """Counts of this rank's pass so far (reported with the run)."""

    pairs: int = 0
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

    # -- upstream -------------------------------------------------------------------------------------------------

    def _upstream(self, epoch: int) -> Any:
        from datasets import load_dataset
        from datasets.distributed import split_dataset_by_node

        from rm_scale.recipe import file_kind

        files = list(self.config.files)
        random.Random(f"{self.config.seed}/files/{epoch}").shuffle(files)  # file order changes each epoch
        kinds = {file_kind(f) for f in files}
        if len(kinds) != 1:
            raise ValueError(f"Mixed file types in one stream: {sorted(kinds)}; use one type per data list.")
        ds = load_dataset(kinds.pop(), data_files=files, split="train", streaming=True)
        return split_dataset_by_node(ds, rank=self.rank, world_size=self.world_size)

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
        fmt: str | None = None
        while True:
            # Until the first row is read after load_state_dict, datasets reports its initial state, not the loaded one.
            start = pending if pending is not None else copy.deepcopy(upstream.state_dict())
            pending = None
            raw = [row for _, row in zip(range(self.config.block_size), rows)]
            if not raw:
                break
            if fmt is None:
                fmt = detect_format(list(raw[0]), raw[0])
            pairs = [p for p in (self._tokenize(r, fmt) for r in raw) if p is not None]
            batches = self._batches(pairs, random.Random(f"{self.config.seed}/{epoch}/{block}"))
            for k, batch in enumerate(batches):
                if k < skip:
                    continue
                out = self.collator(batch)
                real = int(out["attention_mask_chosen"].sum() + out["attention_mask_rejected"].sum())
                self.stats.real_tokens += real
                self.stats.padded_tokens += 2 * out["input_ids_chosen"].numel()
                self.stats.pairs += len(batch)
                out["_state"] = {
                    "epoch": epoch, "block": block, "emitted": k + 1, "upstream": start,
                    "rank": self.rank, "world_size": self.world_size,
                }
                yield out
            block, skip = block + 1, 0
        self.epoch = epoch + 1

    def _tokenize(self, row: dict[str, Any], fmt: str) -> dict[str, Any] | None:
        try:
            pair = tokenize_pair(row, self.tokenizer, fmt=fmt)
        except (KeyError, TypeError, ValueError):
            self.stats.drop("malformed")
            return None
        if pair["input_ids_chosen"] == pair["input_ids_rejected"]:
            self.stats.drop("identical chosen and rejected")
            return None
        limit = self.config.max_length
        if limit is not None and max(len(pair["input_ids_chosen"]), len(pair["input_ids_rejected"])) > limit:
            self.stats.drop(f"longer than max_length={limit}")
            return None
        return pair

    def _batches(self, pairs: list[dict[str, Any]], rng: random.Random) -> list[list[dict[str, Any]]]:
        cfg = self.config
        rng.shuffle(pairs)
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
        rng.shuffle(batches)  # no length curriculum: batch order is random
        return batches


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
