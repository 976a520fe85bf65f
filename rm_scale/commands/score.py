"""`rm-scale score`: the reward of every row of JSONL / JSON / parquet files, sharded over ranks, resumable.

    rm-scale score --model outputs/run/final --data rollouts.jsonl --out scores.jsonl [--normalize]
    accelerate launch --num_processes 8 -m rm_scale score --model ... --data 'shards/*.parquet' --out scores.jsonl

A row with ``text`` (or ``query``) gets ``reward``; ``prompt`` + ``response`` (or ``completion``), strings or messages,
gets ``reward``; a preference row in any format training reads (``--format`` presets, TRL's columns, several responses)
gets ``chosen_reward``, ``rejected_reward`` and ``margin`` (several pairs: ``pairs``, a list of them). Each output line
names its row (``file``, ``line``) and keeps the input order. Rows that cannot be scored are skipped and counted by
reason in ``<out>.report.json`` (with the first few named by file:line), as the data pipeline does.

Each rank scores every world-size-th row into ``<out>.parts/rank<k>.jsonl``, flushed per batch; a killed run started
again skips the rows already written (any world size), and when every rank is done rank 0 merges the parts into
``<out>`` (written whole, then renamed) and removes them.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from rm_scale.data.formats import tokenize_canonical
from rm_scale.data.mapping import RowMapping, matches
from rm_scale.data.pairs import to_pairs
from rm_scale.data.sources import BadRow, Source, iter_records, record_row, record_where, resolve_files
from rm_scale.distributed import all_gather_objects, init_gloo_group, shutdown
from rm_scale.scoring import RewardScorer
from rm_scale.train.checkpoint import hold_point

ROWS_PER_BATCH = 256
EXAMPLES_PER_REASON = 5


def run_score(model: str, data: Sequence[str], out: str, *, data_format: str | None = None, normalize: bool = False,
              batch_tokens: int = 4096, max_length: int | None = None, dtype: str = "float32",
              rows_per_batch: int = ROWS_PER_BATCH, progress: bool = True) -> int:
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    files = resolve_files(list(data))  # ValueError names a missing path
    out_path = Path(out)
    parts = Path(f"{out}.parts")
    if out_path.exists() and not parts.exists():
        if rank == 0:
            print(f"rm-scale score: {out} is complete already (remove it to score again)", file=sys.stderr)
        return 0
    if world > 1:
        init_gloo_group(timeout=timedelta(minutes=60))
    parts.mkdir(parents=True, exist_ok=True)
    done = _done_rows(parts)  # every rank's finished rows, whatever world size wrote them
    device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if _cuda() else None
    scorer = RewardScorer(model, normalize=normalize, batch_tokens=batch_tokens, max_length=max_length, dtype=dtype,
                          device=device)
    mapping = Source(paths=list(data), format=data_format).mapping
    report = _score_shard(scorer, files, parts / f"rank{rank}.jsonl", mapping=mapping, done=done, rank=rank,
                          world=world, progress=progress and rank == 0, rows_per_batch=rows_per_batch)
    reports = all_gather_objects(report) if world > 1 else [report]  # also the barrier before the merge
    if rank == 0:
        merged = _merge(files, parts, out_path)
        summary = _summary(reports, merged, model=model, out=out, world=world)
        Path(f"{out}.report.json").write_text(json.dumps(summary, indent=2))
        shutil.rmtree(parts)
        print(_text(summary))
    if world > 1:
        shutdown()
    return 0


def _cuda() -> bool:
    import torch  # lazy: the module imports no torch at the top (the command line's --help stays fast)

    return torch.cuda.is_available()


def _rows(files: list[str], rank: int, world: int) -> Iterator[tuple[int, dict[str, Any]]]:
    """(global index, record) of this rank's rows: every world-size-th record of all files, in order."""
    index = 0
    for path in files:
        for record in iter_records(path):
            if index % world == rank:
                yield index, record
            index += 1


def _done_rows(parts: Path) -> set[tuple[str, int]]:
    """(file, line) of every row in the part files; a line cut short by a kill is removed from its file."""
    done: set[tuple[str, int]] = set()
    for part in sorted(parts.glob("rank*.jsonl")):
        good = 0
        with open(part, "rb") as f:
            for raw in f:
                try:
                    row = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    break  # the last line of a killed writer; everything before it is whole
                if not raw.endswith(b"\n"):
                    break
                done.add((row["file"], row["line"]))
                good += len(raw)
        os.truncate(part, good)
    return done


class ShardReport:
    """What one rank did: rows scored, rows skipped by reason (the first few named), texts cut to max_length."""

    def __init__(self) -> None:
        self.scored = 0
        self.skipped: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}
        self.seconds = 0.0

    def skip(self, reason: str, message: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < EXAMPLES_PER_REASON:
            examples.append(message)


def _score_shard(scorer: RewardScorer, files: list[str], part: Path, *, mapping: RowMapping,
                 done: set[tuple[str, int]], rank: int, world: int, progress: bool,
                 rows_per_batch: int) -> dict[str, Any]:
    from tqdm.auto import tqdm  # lazy: with the scorer's imports (transformers brings tqdm)

    report = ShardReport()
    start, truncated = time.perf_counter(), scorer.truncated
    bar = tqdm(desc="rm-scale score", unit=" rows", disable=not progress, dynamic_ncols=True)
    batch: list[tuple[dict[str, Any], Any]] = []
    with open(part, "a", encoding="utf-8") as f:
        for _, record in _rows(files, rank, world):
            if (record["file"], record["line"]) in done:
                continue
            item = _row_item(record, mapping, scorer, report)
            if item is not None:
                batch.append(item)
            if len(batch) >= rows_per_batch:
                _write(f, _score_batch(scorer, batch), report, bar)
                batch = []
                hold_point(f"score:rows-{report.scored}")  # tests kill here (RM_SCALE_HOLD_AT)
        if batch:
            _write(f, _score_batch(scorer, batch), report, bar)
    bar.close()
    report.seconds = time.perf_counter() - start
    return {"rank": rank, "scored": report.scored, "skipped": report.skipped, "examples": report.examples,
            "truncated": scorer.truncated - truncated, "seconds": report.seconds}


def _row_item(record: dict[str, Any], mapping: RowMapping, scorer: RewardScorer,
              report: ShardReport) -> tuple[dict[str, Any], Any] | None:
    """(output head, what to score) of one row: a token-id list, or a list of (chosen, rejected) pairs of ids."""
    head = {"file": record["file"], "line": record["line"]}
    try:
        row = record_row(record)
        if mapping.where and not matches(row, mapping.where):
            report.skip("excluded by where", record_where(record))
            return None
        text = row.get("text", row.get("query"))
        if isinstance(text, str) and text:
            return head, scorer.encode(text)
        response = row.get("response", row.get("completion"))
        if response is not None and row.get("prompt") is not None and "chosen" not in row:
            return head, scorer.encode(row["prompt"], response)
        pairs = []
        for pair in to_pairs(row, mapping, where=record_where(record)):
            if "drop" in pair:
                report.skip(pair["drop"], record_where(record))
                continue
            ids = tokenize_canonical(pair, scorer.tokenizer)
            pairs.append((scorer.cut(ids["input_ids_chosen"]), scorer.cut(ids["input_ids_rejected"])))
        if not pairs:
            return None
        return head, pairs
    except BadRow as e:
        report.skip(e.reason, str(e))
    except (TypeError, ValueError) as e:  # a text field of a shape the scorer cannot read
        report.skip("not text", f"{record_where(record)}: {e}")
    return None


def _score_batch(scorer: RewardScorer, batch: list[tuple[dict[str, Any], Any]]) -> list[dict[str, Any]]:
    singles = [i for i, (_, item) in enumerate(batch) if isinstance(item[0], int)]  # token ids, else pairs of them
    single = set(singles)
    pairs = [(i, p) for i, (_, item) in enumerate(batch) if i not in single for p in item]
    rewards = scorer.finish(scorer.rewards_of_ids([batch[i][1] for i in singles])) if singles else []
    out = [dict(head) for head, _ in batch]
    for i, r in zip(singles, rewards):
        out[i]["reward"] = r
    if pairs:
        chosen, rejected = scorer.rewards_of_pairs([p for _, p in pairs])
        for (i, _), c, r in zip(pairs, scorer.finish(chosen), scorer.finish(rejected)):
            out[i].setdefault("pairs", []).append({"chosen_reward": c, "rejected_reward": r, "margin": c - r})
    for row in out:
        if len(row.get("pairs", [])) == 1:
            row.update(row.pop("pairs")[0])
    return out


def _write(f: Any, rows: list[dict[str, Any]], report: ShardReport, bar: Any) -> None:
    f.write("".join(json.dumps(r) + "\n" for r in rows))
    f.flush()
    os.fsync(f.fileno())  # a kill after this loses nothing of the batch
    report.scored += len(rows)
    bar.update(len(rows))


def _merge(files: list[str], parts: Path, out: Path) -> int:
    """Every part's rows, deduplicated and in input order (file, then line), written to ``out`` whole."""
    order = {path: i for i, path in enumerate(files)}
    rows: dict[tuple[str, int], str] = {}
    for part in sorted(parts.glob("rank*.jsonl")):
        for line in part.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            rows[(row["file"], row["line"])] = line
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for key in sorted(rows, key=lambda k: (order.get(k[0], len(order)), k[0], k[1])):
            f.write(rows[key] + "\n")
    os.replace(tmp, out)
    return len(rows)


def _summary(reports: list[dict[str, Any]], merged: int, *, model: str, out: str, world: int) -> dict[str, Any]:
    skipped: dict[str, int] = {}
    examples: dict[str, list[str]] = {}
    for r in reports:
        for reason, n in r["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
            examples.setdefault(reason, []).extend(r["examples"][reason])
    seconds = max(r["seconds"] for r in reports)
    scored = sum(r["scored"] for r in reports)
    return {"model": model, "out": out, "rows": merged, "scored_this_run": scored, "world_size": world,
            "rows_per_s": scored / seconds if seconds else None, "skipped": skipped,
            "skipped_examples": {k: v[:EXAMPLES_PER_REASON] for k, v in examples.items()},
            "truncated": sum(r["truncated"] for r in reports)}


def _text(s: dict[str, Any]) -> str:
    lines = [f"rm-scale score: {s['rows']} rows in {s['out']} ({s['scored_this_run']} scored now"
             + (f", {s['rows_per_s']:.1f} rows/s" if s["rows_per_s"] else "") + f", {s['world_size']} rank(s))"]
    if s["truncated"]:
        lines.append(f"  {s['truncated']} texts longer than max_length: their last tokens were scored")
    for reason, n in sorted(s["skipped"].items()):
        lines.append(f"  skipped {n}: {reason} (e.g. {s['skipped_examples'][reason][0]})")
    lines.append(f"  report: {s['out']}.report.json")
    return "\n".join(lines)
