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
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rm_scale.data.batching import check_batching, make_batches
from rm_scale.data.collate import (
    RewardDataCollatorWithPadding,
    computed_tokens,
    pack_group_batch,
    pack_groups,
    pack_pairs,
)
from rm_scale.data.formats import pair_length, tokenize_canonical, truncate_pair
from rm_scale.data.groups import (
    keyed_like_pair,
    limit_group,
    merge_groups,
    ranking_tiers,
    to_group,
    tokenize_group,
)
from rm_scale.data.mapping import ignored_label_columns, matches
from rm_scale.data.presets import presets_reading
from rm_scale.data.pairs import GROUP, implicit_prompt, in_eval_split, prompt_key, to_pairs
from rm_scale.data.sources import (
    BadRow,
    Source,
    iter_records,
    parse_sources,
    record_row,
    record_where,
    resolve_files,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PairFiles:
    """Preference data to stream: `RewardTrainer(train_dataset=PairFiles(["data/*.jsonl"]))`. Each item is a path
    (file, glob, folder, save_to_disk folder) or a source mapping {path(s), weight, columns}; batching options come
    from `RewardConfig` (`batching`, `token_budget`, `stream_block_size`, `eval_fraction`, `strict_data`)."""

    files: Sequence[Any]
    held_out: bool = False  # as an eval set: only the pairs that `eval_fraction` holds out of these files


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
    shared_prefix: bool = False  # packed: each pair's common prefix once (collate.pack_groups)
    response_groups: bool = False  # each row's responses as one group (rm_scale.data.groups), not expanded to pairs
    merge_prompt_pairs: bool = False  # with response_groups: the rows of one prompt within a block as one group
    listwise: bool = False  # with response_groups: a group's edges must rank its responses (else it is dropped)
    keep_ties: bool = False  # with response_groups: a group whose edges are all ties is trained on (the tie model)
    read_once: bool = False  # several sources one after the other, each row once (evaluation); weights do not apply

    def __post_init__(self) -> None:
        if not all(isinstance(x, Source) for x in self.sources):
            self.sources = parse_sources(list(self.sources))
        check_batching(batching=self.batching, token_budget=self.token_budget, truncation=self.truncation)
        if self.pairs_per_batch < 1 or self.block_size < self.pairs_per_batch:
            raise ValueError("Need 1 <= pairs_per_batch <= block_size.")
        if self.response_groups and not self.shared_prefix:
            raise ValueError("response_groups needs batching='packed' with the shared prefix on (a decoder model on "
                             "'sdpa' attention, packed_attention and shared_prefix not off).")


SHARED_ROW_TOKENS = 4096  # the widest row of shared-prefix groups (see PairStream's packing)


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
        shared_prefix=packs_shared_prefix(args.batching, getattr(args, "shared_prefix", None)),
        response_groups=bool(getattr(args, "response_groups", False)),
        merge_prompt_pairs=bool(getattr(args, "merge_prompt_pairs", False)),
        listwise=getattr(args, "loss_type", "bradley_terry") == "plackett_luce",
        keep_ties=getattr(args, "ties", "drop") == "tie_model",
    )
    fields.update(overrides)
    return StreamConfig(**fields)


def packs_shared_prefix(batching: str, shared_prefix: bool | None) -> bool:
    """Whether packed batches share each pair's prefix. None (not resolved by a trainer, e.g. inspect-data): what the
    trainer picks for a decoder model on sdpa attention."""
    return batching == "packed" and shared_prefix is not False


def eval_stream_config(files: PairFiles, args: Any, **overrides: Any) -> StreamConfig:
    """The StreamConfig of an evaluation set: the pairs that `eval_fraction` holds out of ``files`` (``held_out``),
    else every pair of them."""
    split = {"split": "eval"} if files.held_out else {"split": "train", "eval_fraction": 0.0}
    return stream_config(files.files, args, **split, read_once=True, **overrides)


@dataclass
class StreamStats:
    """Counts of this rank's pass so far (reported with the run)."""

    pairs: int = 0
    truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    real_tokens: int = 0
    padded_tokens: int = 0
    pair_tokens: int = 0  # tokens of the pairs' sequences (more than real_tokens when shared prefixes are computed once)
    warnings: dict[str, str] = field(default_factory=dict)  # per source: a mapping that looks wrong
    unshared_prompts: int = 0  # whole-transcript pairs whose two sides share no beginning (no prompt found)

    def drop(self, reason: str, count: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + count


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
        self._checked: set[int] = set()  # sources whose mapping was checked against a first row

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

    def start_state(self, *, epoch: int) -> dict[str, Any]:
        """The resume state of a rank that has not consumed a batch of ``epoch`` (its shard may be empty)."""
        return {"epoch": epoch, "block": 0, "emitted": 0, "upstream": None, "rank": self.rank,
                "world_size": self.world_size, "stats": dataclasses.asdict(self.stats)}

    def has_batches_left(self) -> bool:
        """Whether the next iteration would yield a batch (reads at most one block, on a copy of this stream)."""
        probe = PairStream(self.config, self.tokenizer, rank=self.rank, world_size=self.world_size)
        probe.epoch, probe._resume, probe._checked = self.epoch, copy.deepcopy(self._resume), set(self._checked)
        return next(iter(probe), None) is not None

    def start_epoch(self, epoch: int) -> None:
        """Make the next iteration the first pass of ``epoch`` from its start (no resume position)."""
        self._resume = None
        self.epoch = epoch

    # -- upstream -------------------------------------------------------------------------------------------------

    def _upstream(self, epoch: int) -> Any:
        from datasets import Features, IterableDataset, Value, concatenate_datasets, interleave_datasets
        from datasets.distributed import split_dataset_by_node

        features = Features({"file": Value("string"), "line": Value("int64"), "text": Value("string"),
                             "row": Value("string"), "error": Value("string"), "source": Value("int64")})
        parts, weights = [], []
        for index, source in enumerate(self.config.sources):
            files = resolve_files(source.paths)
            random.Random(f"{self.config.seed}/files/{index}/{epoch}").shuffle(files)  # new file order each epoch
            ds = IterableDataset.from_generator(
                _records, gen_kwargs={"files": files, "source": index, "group_by": source.mapping.group_by},
                features=features,
            )
            # file-level shards when the files spread over the ranks, else example-level: disjoint either way
            parts.append(split_dataset_by_node(ds, rank=self.rank, world_size=self.world_size))
            weights.append(source.weight)
        if len(parts) == 1:
            return parts[0]
        if self.config.read_once:  # evaluation: sampling by weight would count a small source's rows several times
            return concatenate_datasets(parts)
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
        block, skip, pending, resumed_stats = 0, 0, None, None
        if self._resume is not None:
            pending = self._resume["upstream"]
            if pending is not None:  # None: saved before this rank consumed any batch (start of the epoch)
                upstream.load_state_dict(pending)
            block, skip = self._resume["block"], self._resume["emitted"]
            resumed_stats = StreamStats(**self._resume["stats"]) if pending is not None else None
            self._resume = None
        rows = iter(upstream)
        while True:
            # Until the first row is read after load_state_dict, datasets reports its initial state, not the loaded one.
            start = pending if pending is not None else copy.deepcopy(upstream.state_dict())
            pending = None
            raw = [row for _, row in zip(range(self.config.block_size), rows)]
            if not raw:
                break
            pairs = self.groups_of(raw) if self.config.response_groups else [p for r in raw for p in self.pairs_of(r)]
            if resumed_stats is not None:  # the resumed block was counted before the checkpoint: not twice
                self.stats, resumed_stats = resumed_stats, None
            key = f"{self.config.seed}/{epoch}/{block}"
            batches = make_batches(pairs, batching=self.config.batching, pairs_per_batch=self.config.pairs_per_batch,
                                   token_budget=self.config.token_budget, rng=random.Random(key),
                                   order=random.Random(f"{key}/order"), shared_prefix=self.config.shared_prefix,
                                   groups=self.config.response_groups)
            for k, batch in enumerate(batches):
                if k < skip:
                    continue
                if self.config.batching == "packed":
                    # Shared-prefix groups run on the packed attention (per segment), where a row's width costs no
                    # attention: rows up to SHARED_ROW_TOKENS wide, so little tail padding (since the sparse last
                    # layer stopped copying a row's keys per read token, 2k-16k-token rows cost the same per token).
                    # Plain packed rows may meet the stock sdpa, whose block-diagonal mask is quadratic in the row:
                    # max_length.
                    if self.config.response_groups:
                        out = pack_group_batch(batch, row_length=SHARED_ROW_TOKENS, pad_id=self.tokenizer.pad_token_id)
                    elif self.config.shared_prefix:
                        out = pack_groups(batch, row_length=SHARED_ROW_TOKENS, pad_id=self.tokenizer.pad_token_id)
                    else:
                        out = pack_pairs(batch, row_length=self.config.max_length, pad_id=self.tokenizer.pad_token_id)
                    real = int(out["packed_real_tokens"])
                else:
                    out = self.collator(batch)
                    real = int(out["attention_mask_chosen"].sum() + out["attention_mask_rejected"].sum())
                self.stats.real_tokens += real
                self.stats.pair_tokens += int(out.get("packed_pair_tokens", real))
                self.stats.padded_tokens += computed_tokens(out)
                self.stats.pairs += int(out["group_edges"]) if self.config.response_groups else len(batch)
                if any("subset" in p for p in batch):  # per-subset evaluation accuracy
                    out["_subsets"] = [p.get("subset") for p in batch]
                out["_state"] = {
                    "epoch": epoch, "block": block, "emitted": k + 1, "upstream": start,
                    "rank": self.rank, "world_size": self.world_size, "stats": dataclasses.asdict(self.stats),
                }
                yield out
            block, skip = block + 1, 0
        self.epoch = epoch + 1

    def _keep(self, row: dict[str, Any], where: dict[str, Any]) -> bool:
        """The source's ``where`` filter: rows that do not match are counted as "excluded by where"."""
        if GROUP in row:
            kept = [r for r in row[GROUP] if matches(r, where)]
            for _ in range(len(row[GROUP]) - len(kept)):
                self.stats.drop("excluded by where")
            row[GROUP] = kept
            return bool(kept)
        if matches(row, where):
            return True
        self.stats.drop("excluded by where")
        return False

    def pairs_of(self, record: dict[str, Any]) -> list[dict[str, Any]]:
        """Tokenised training pairs of one record; bad rows are counted by reason (or raise in strict mode)."""
        out = []
        try:
            for pair, where in self.canonical_pairs(record):
                tokens = self._tokens(pair, where)
                if tokens is not None:
                    out.append(tokens)
        except BadRow as e:
            self._bad_row(e)
        return out

    def _bad_row(self, e: BadRow) -> None:
        """A row that cannot be read: counted by reason, or (strict_data) an error naming file, line, field and fix."""
        if self.config.strict:
            raise ValueError(f"Bad preference row (strict_data): {e}") from None
        self.stats.drop(e.reason)

    def groups_of(self, raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Tokenised response groups of a block's records (`response_groups`), one per row, or one per prompt with
        `merge_prompt_pairs`; unusable rows and groups are counted by reason (or raise in strict mode)."""
        groups = []
        for record in raw:
            try:
                group, where = self.canonical_group(record)
                if group is None:
                    continue
                if "drop" in group:
                    raise BadRow(group["drop"], group.get("detail") or group["drop"], where=where)
                for reason, n in group.pop("left_out", {}).items():
                    self.stats.drop(f"{reason} (response left out)", n)
                groups.append({**tokenize_group(group, self.tokenizer), "_key": prompt_key(keyed_like_pair(group)),
                               "_where": where})
            except BadRow as e:
                self._bad_row(e)
        if self.config.merge_prompt_pairs:
            groups = merge_groups(groups, key=lambda g: g["_key"])
        return [g for g in map(self._checked_group, groups) if g is not None]

    def canonical_group(self, record: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
        """The canonical group of one record in this split (None: excluded by ``where`` or in the other split)."""
        where = record_where(record)
        row, mapping = self._row(record)
        if mapping.where and not self._keep(row, mapping.where):
            return None, where
        group = to_group(row, mapping, where=where)
        cfg = self.config
        if cfg.eval_fraction and in_eval_split(keyed_like_pair(group), cfg.eval_fraction, cfg.seed) != (
                cfg.split == "eval"):
            return None, where
        return group, where

    def _checked_group(self, group: dict[str, Any]) -> dict[str, Any] | None:
        """A tokenised group that can be trained on (identical responses once, within max_length, a consistent
        ranking when listwise), or None (counted)."""
        where = group.pop("_where")
        group.pop("_key")
        if self.config.listwise and ("margin" in group or "margins" in group):
            raise ValueError(f"{where}: the row has a margin (a margin column, or score_margin in the mapping), but "
                             "loss_type='plackett_luce' has no margin term: use loss_type='bradley_terry' (margins "
                             "apply to its edges) or drop the margin.")
        (group,) = merge_groups([group], key=lambda g: 0)  # responses that tokenise alike are one response
        same = sum(i == j for i, j, _ in group["edges"])
        if same:
            self.stats.drop("identical responses (edge left out)", same)
            keep = [n for n, (i, j, _) in enumerate(group["edges"]) if i != j]
            group["edges"] = [group["edges"][n] for n in keep]
            if "margins" in group:
                group["margins"] = [group["margins"][n] for n in keep]
        fit, truncated, problem = limit_group(group, self.config.max_length, self.config.truncation)
        self.stats.truncated += truncated
        if fit is not None and not fit["edges"]:
            fit, problem = None, "no preference"
        if fit is not None and not self.config.keep_ties and all(t for _, _, t in fit["edges"]):
            fit, problem = None, "tie"
        if fit is not None and self.config.listwise and ranking_tiers(len(fit["input_ids"]), fit["edges"]) is None:
            fit, problem = None, "inconsistent ranking"
        if fit is None:
            if self.config.strict and problem != "tie":
                raise ValueError(f"Bad preference row (strict_data): {where}: {problem}: drop the row or fix its "
                                 "labels")
            self.stats.drop(problem)
        return fit

    def canonical_pairs(self, record: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
        """The canonical pairs (and drop markers) of one record in this split, each with its file:line; BadRow for
        an unusable row. Rows the source's ``where`` excludes are counted here."""
        where = record_where(record)
        row, mapping = self._row(record)
        if mapping.where and not self._keep(row, mapping.where):
            return []
        cfg = self.config
        pairs = [(pair, where) for pair in to_pairs(row, mapping, where=where)
                 if not cfg.eval_fraction or in_eval_split(pair, cfg.eval_fraction, cfg.seed) == (cfg.split == "eval")]
        for pair, _ in pairs:
            if pair.get("prompt") is None and isinstance(pair.get("chosen"), str) and not implicit_prompt(
                    pair["chosen"], pair["rejected"]).strip():
                self.stats.unshared_prompts += 1
        return pairs

    def _row(self, record: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        """An upstream record's row (BadRow for an unreadable one) and its source's mapping, checked against the
        source's first readable row (`_mapping_warning`)."""
        rec = {k: v for k, v in record.items() if v is not None}
        if "row" in rec:
            rec["row"] = json.loads(rec["row"])
        row = record_row(rec)
        source = self.config.sources[record["source"]]
        if record["source"] not in self._checked:
            self._checked.add(record["source"])
            warning = self._mapping_warning(row, source)
            if warning:
                self.stats.warnings[str(record["source"])] = warning
        return row, source.mapping

    def _mapping_warning(self, row: dict[str, Any], source: Source) -> str:
        """A warning (once per source, on its first readable row) when the mapping ignores a label-like column."""
        first = row[GROUP][0] if GROUP in row else row
        ignored = ignored_label_columns(first, source.mapping)
        if not ignored:
            return ""
        fits = presets_reading(set(first))
        message = (f"{source.paths}: columns {ignored} look like preference labels but the mapping does not read "
                   "them: if they say which response is better, pairs may be reversed. "
                   + (f"The preset(s) {', '.join(f'format: {p}' for p in fits)} read them; or " if fits else "")
                   + "map them with columns.label + label_coding, votes or scores (README, 'Data').")
        if self.rank == 0:
            logger.warning(message)
        return message

    def _tokens(self, pair: dict[str, Any], where: str) -> dict[str, Any] | None:
        """Token ids of a canonical pair, or None (counted) for one that cannot be trained on."""
        tokens = None if "drop" in pair else tokenize_canonical(pair, self.tokenizer)
        limit = self.config.max_length
        if tokens is None:
            problem = BadRow(pair["drop"], pair.get("detail") or f"a pair of this row is unusable ({pair['drop']})",
                             where=where)
        elif tokens["input_ids_chosen"] == tokens["input_ids_rejected"]:
            problem = BadRow("identical chosen and rejected", "chosen and rejected tokenise to the same ids; drop the "
                             "row", where=where)
        elif limit is not None and pair_length(tokens) > limit and self.config.truncation == "keep_end":
            self.stats.truncated += 1
            return truncate_pair(tokens, limit)
        elif limit is not None and pair_length(tokens) > limit:
            problem = BadRow(f"longer than max_length={limit}", f"pair has {pair_length(tokens)} tokens > "
                             f"max_length={limit}: raise max_length or drop the row", where=where)
        else:
            return tokens
        # one unusable pair of a multi-response row does not cost the row's other pairs
        if self.config.strict and problem.reason not in ("tie", "chosen scored below rejected"):
            raise problem
        self.stats.drop(problem.reason)
        return None


def canonical_pairs(config: StreamConfig, *, limit: int | None = None, errors: list[BadRow] | None = None,
                    max_errors: int | None = None) -> tuple[list[dict[str, Any]], StreamStats]:
    """The canonical (untokenised) pairs of ``config``'s sources as the mapping reads them (filters and groups
    included), up to ``limit``, with the counts of what was dropped: what `rm-scale inspect-data` shows, and what
    tests assert on. Unusable rows go to ``errors`` too; reading stops after ``max_errors`` of them."""
    stream = PairStream(config, tokenizer=None, rank=0, world_size=1)
    pairs: list[dict[str, Any]] = []
    for record in stream._upstream(0):
        try:
            found = stream.canonical_pairs(record)
        except BadRow as e:
            stream.stats.drop(e.reason)
            if errors is not None:
                errors.append(e)
                if max_errors is not None and len(errors) >= max_errors:
                    break
            continue
        for pair, _ in found:
            if "drop" in pair:
                stream.stats.drop(pair["drop"])
            else:
                pairs.append(pair)
        if limit is not None and len(pairs) >= limit:
            break
    return pairs[:limit], stream.stats


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


def _records(files: list[str], source: int, group_by: str | None = None) -> Iterator[dict[str, Any]]:
    """Generator behind the upstream IterableDataset: one shard = a sub-list of files, read in order. With
    ``group_by``, adjacent rows that share that column are one record (one prompt's responses): grouped before the
    data is sharded, so a group never straddles two ranks."""
    for path in files:
        records = iter_records(path)
        for rec in _grouped(records, group_by) if group_by else records:
            row = rec.get("row")
            yield {"file": rec["file"], "line": rec["line"], "text": rec.get("text"), "error": rec.get("error"),
                   "row": None if row is None else json.dumps(row, default=str), "source": source}




def _grouped(records: Iterator[dict[str, Any]], key: str) -> Iterator[dict[str, Any]]:
    """Adjacent readable rows with the same ``row[key]`` as one record ``{"row": {GROUP: [rows]}}``; unreadable
    records pass through (they are counted where rows are turned into pairs)."""
    group: list[dict[str, Any]] = []
    first: dict[str, Any] | None = None
    for rec in records:
        try:
            row = record_row(rec)
        except BadRow:
            yield rec
            continue
        if group and row.get(key, object()) == group[0].get(key, object()) and key in row:
            group.append(row)
            continue
        if group:
            yield {"file": first["file"], "line": first["line"], "row": {GROUP: group}}
        group, first = [row], rec
    if group:
        yield {"file": first["file"], "line": first["line"], "row": {GROUP: group}}
