"""Where preference rows come from, and how a raw row becomes pairs.

A *source* is a set of files (or a `save_to_disk` folder, or a hub data set) with optional column names, a weight for
mixing, and a format. Rows are read as *records* that keep their file and line, so a bad row can be named exactly:
JSON Lines are read line by line (bad UTF-8 or a malformed line is one bad record, not a crashed loader); other formats
go through `datasets` builders.

`to_pairs` turns one record into zero or more canonical pairs ``{"prompt", "chosen", "rejected", ["margin"],
["subset"]}`` (text or messages) or pre-tokenised pairs, or raises `BadRow` with the field and the fix.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rm_scale.data.formats import PRETOKENIZED

DEMO_DATA = {"rm_scale:demo/train": "train.jsonl", "rm_scale:demo/eval": "eval.jsonl"}
HUB = "hub:"  # "hub:org/name" or "hub:org/name@split" (default split: train)
CANONICAL = ("prompt", "chosen", "rejected", "margin", "subset")
EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv")


class BadRow(ValueError):
    """A row that cannot become a pair; `reason` is the count key, the message names field and fix."""

    def __init__(self, reason: str, message: str, *, where: str = "", field_name: str = "") -> None:
        self.reason, self.where, self.field_name = reason, where, field_name
        super().__init__(f"{where}: {message}" if where else message)


@dataclass
class Source:
    """One input. `columns` maps rm_scale names (prompt, chosen, rejected, margin, subset, responses, pair_labels,
    scores) to the data's own column names, so files need no rewriting."""

    paths: list[str]
    weight: float = 1.0
    columns: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.weight <= 0:
            raise ValueError(f"Source {self.paths}: weight must be > 0, got {self.weight}.")
        allowed = set(CANONICAL) | {"responses", "pair_labels", "scores"}
        unknown = set(self.columns) - allowed
        if unknown:
            raise ValueError(f"Source {self.paths}: unknown column mapping {sorted(unknown)}; allowed {sorted(allowed)}.")


def parse_sources(spec: str | Sequence[Any]) -> list[Source]:
    """`data.train` of a recipe: a path, a list of paths, or a list of {path(s), weight, columns} mappings."""
    items = [spec] if isinstance(spec, (str, Mapping)) else list(spec)
    if items and all(isinstance(i, str) for i in items):
        return [Source(paths=list(items))]
    sources = []
    for item in items:
        if isinstance(item, str):
            sources.append(Source(paths=[item]))
        elif isinstance(item, Mapping):
            extra = set(item) - {"path", "paths", "weight", "columns"}
            if extra:
                raise ValueError(f"Data source {dict(item)}: unknown key(s) {sorted(extra)}; use path(s), weight, columns.")
            paths = item.get("paths") or item.get("path")
            if not paths:
                raise ValueError(f"Data source {dict(item)} has no path.")
            sources.append(Source(paths=[paths] if isinstance(paths, str) else list(paths),
                                  weight=float(item.get("weight", 1.0)), columns=dict(item.get("columns") or {})))
        else:
            raise ValueError(f"Data source {item!r} must be a path or a mapping.")
    return sources


# ---- files ---------------------------------------------------------------------------------------------------------


def resolve_files(paths: Sequence[str]) -> list[str]:
    """Expand shipped names, globs and folders into data files. A path that matches nothing is an error."""
    out: list[str] = []
    for item in paths:
        if item.startswith(HUB):  # a hub data set, streamed by `datasets` (needs the network, or its local cache)
            out.append(item)
            continue
        if item in DEMO_DATA:
            out.append(str(Path(__file__).parent / "demo_data" / DEMO_DATA[item]))
            continue
        path = os.path.expanduser(item)
        if os.path.isdir(path) and not is_saved_dataset(path):
            found = sorted(p for p in glob.glob(os.path.join(path, "**", "*"), recursive=True) if _is_data_file(p))
            if not found:
                raise ValueError(f"Data folder {item!r} holds no {'/'.join(EXTENSIONS)} files (optionally .gz), "
                                 "searched recursively: point data.train / data.eval at the files themselves, or "
                                 "rename them to one of these extensions.")
            out.extend(found)
            continue
        matches = [path] if is_saved_dataset(path) else sorted(glob.glob(path, recursive=True))
        if not matches:
            raise ValueError(f"Data path {item!r} matches no file (cwd {os.getcwd()}). Check the path in data.train / data.eval.")
        out.extend(matches)
    return out


def is_saved_dataset(path: str) -> bool:
    return os.path.isdir(path) and (
        os.path.exists(os.path.join(path, "dataset_info.json")) or os.path.exists(os.path.join(path, "state.json"))
    )


def _is_data_file(path: str) -> bool:
    name = path[:-3] if path.endswith(".gz") else path
    return os.path.isfile(path) and name.endswith(EXTENSIONS)


def file_kind(path: str) -> str:
    """How a data file is read: 'jsonl', 'json' (one array or object), 'parquet', 'csv', 'saved' or 'hub'."""
    if path.startswith(HUB):
        return "hub"
    if is_saved_dataset(path):
        return "saved"
    name = path[:-3] if path.endswith(".gz") else path
    for ext, kind in ((".jsonl", "jsonl"), (".json", "json"), (".parquet", "parquet"), (".csv", "csv")):
        if name.endswith(ext):
            return kind
    raise ValueError(f"{path}: unsupported data file; use .jsonl, .json, .parquet or .csv (optionally .gz), or a "
                     "folder written by Dataset.save_to_disk.")


def iter_records(path: str) -> Iterator[dict[str, Any]]:
    """Records ``{"file", "line", "text" | "row"}`` of one file; bad lines come through as records with ``"error"``."""
    kind = file_kind(path)
    if kind == "jsonl":
        opener = gzip.open if path.endswith(".gz") else open
        count = 0
        with opener(path, "rb") as f:
            for line, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                count += 1
                try:
                    yield {"file": path, "line": line, "text": raw.decode("utf-8")}
                except UnicodeDecodeError as e:
                    yield {"file": path, "line": line, "error": f"bad UTF-8 at byte {e.start}"}
        if count == 0:
            yield {"file": path, "line": 0, "error": "empty file"}
        return
    if kind == "json":
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            try:
                data = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                yield {"file": path, "line": getattr(e, "lineno", 0),
                       "error": f"not valid JSON ({getattr(e, 'msg', e)}, column {getattr(e, 'colno', '?')})"}
                return
        rows = data if isinstance(data, list) else [data]
        if not rows:
            yield {"file": path, "line": 0, "error": "empty file"}
        for i, row in enumerate(rows, 1):
            yield {"file": path, "line": i, "row": row}  # "line" is the element number in a JSON array
        return
    from datasets import load_dataset, load_from_disk

    if kind == "hub":
        name, _, split = path[len(HUB):].partition("@")
        try:
            rows = load_dataset(name, split=split or "train", streaming=True)
        except Exception as e:  # offline, unknown name, gated: say which source and how to fix it
            raise ValueError(f"{path}: cannot open the hub data set {name!r} ({type(e).__name__}: {e}). Check the "
                             "name and the network (HF_HUB_OFFLINE), or download it and give local files.") from e
        for i, row in enumerate(rows, 1):
            yield {"file": path, "line": i, "row": row}
        return
    if kind == "saved":
        ds = load_from_disk(path)
        ds = ds["train"] if hasattr(ds, "keys") and "train" in ds else ds
    else:
        ds = load_dataset(kind, data_files=[path], split="train")
    if len(ds) == 0:
        yield {"file": path, "line": 0, "error": "empty file"}
    for i, row in enumerate(ds, 1):
        yield {"file": path, "line": i, "row": row}


# ---- rows → pairs --------------------------------------------------------------------------------------------------


def record_row(record: Mapping[str, Any]) -> dict[str, Any]:
    """The row of a record, or BadRow for an unreadable one."""
    where = f"{record['file']}:{record['line']}" if record["line"] else record["file"]  # an empty file has no line
    if "error" in record:
        fix = "remove the file or add rows" if record["error"] == "empty file" else "fix or delete that line"
        reason = record["error"].split(" at ")[0].split(" (")[0]
        raise BadRow(reason, f"{record['error']}; {fix}", where=where)
    if "row" in record:
        row = record["row"]
    else:
        try:
            row = json.loads(record["text"])
        except json.JSONDecodeError as e:
            raise BadRow("malformed JSON", f"malformed JSON ({e.msg} at column {e.colno}); fix or delete that line",
                         where=where) from None
    if not isinstance(row, dict):
        raise BadRow("malformed JSON", f"a row must be a JSON object with the pair's fields ({{\"prompt\": ..., "
                     f"\"chosen\": ..., \"rejected\": ...}}), got a {type(row).__name__}; rewrite that row as "
                     "an object or delete it", where=where)
    return row


def to_pairs(row: Mapping[str, Any], columns: Mapping[str, Any], *, where: str = "") -> list[dict[str, Any]]:
    """Canonical pairs from one row (several for a multi-response row); BadRow names the field and the fix."""
    col = {k: columns.get(k, k) for k in CANONICAL + ("pair_labels", "scores")}
    responses = columns.get("responses") or _numbered_responses(row)
    if responses:
        return _expand_responses(row, responses, col, where=where)
    if all(k in row for k in PRETOKENIZED) or ("chosen_ids" in row and "rejected_ids" in row):
        return [_passthrough(row, col)]
    missing = [c for c in (col["chosen"], col["rejected"]) if c not in row]
    if missing:
        raise BadRow("missing field", f"no field {missing[0]!r} (columns: {sorted(row)[:8]}); map your column names "
                     "with data sources' `columns: {chosen: ..., rejected: ...}`", where=where, field_name=missing[0])
    pair = {"prompt": row.get(col["prompt"], None), "chosen": row[col["chosen"]], "rejected": row[col["rejected"]]}
    for side in ("chosen", "rejected"):
        _check_text(pair[side], col[side], where)
    if pair["prompt"] is not None and not isinstance(pair["prompt"], (str, list)):
        raise BadRow("not text", f"field {col['prompt']!r} must be a string or a list of messages; fix or drop the row", where=where,
                     field_name=col["prompt"])
    if pair["chosen"] == pair["rejected"]:
        raise BadRow("identical chosen and rejected", f"fields {col['chosen']!r} and {col['rejected']!r} are "
                     "identical: the pair carries no preference; drop the row", where=where, field_name=col["chosen"])
    _copy_extras(row, col, pair, where)
    return [pair]


def _check_text(value: Any, name: str, where: str) -> None:
    if isinstance(value, list):
        if not value or not all(isinstance(m, Mapping) and "role" in m and "content" in m for m in value):
            raise BadRow("not text", f"field {name!r} is a list but not of {{role, content}} messages; fix or drop the row", where=where,
                         field_name=name)
        return
    if not isinstance(value, str):
        raise BadRow("not text", f"field {name!r} must be a string (or messages), got {type(value).__name__}; fix or drop the row",
                     where=where, field_name=name)
    if not value.strip():
        raise BadRow("empty field", f"field {name!r} is empty; fill it or drop the row", where=where, field_name=name)


def _copy_extras(row: Mapping[str, Any], col: Mapping[str, str], pair: dict[str, Any], where: str) -> None:
    if col["margin"] in row and row[col["margin"]] is not None:
        try:
            pair["margin"] = float(row[col["margin"]])
        except (TypeError, ValueError):
            raise BadRow("bad margin", f"field {col['margin']!r} must be a number", where=where,
                         field_name=col["margin"]) from None
    if col["subset"] in row and row[col["subset"]] is not None:
        pair["subset"] = str(row[col["subset"]])


def _passthrough(row: Mapping[str, Any], col: Mapping[str, str]) -> dict[str, Any]:
    keys = PRETOKENIZED if all(k in row for k in PRETOKENIZED) else ("chosen_ids", "rejected_ids", "prompt_ids")
    pair = {k: list(row[k]) for k in keys if k in row and row[k] is not None}
    _copy_extras(row, col, pair, "")
    return pair


def _numbered_responses(row: Mapping[str, Any]) -> list[str]:
    # FineGrainedRLHF-style rows: "prediction 1".."prediction N" with pairwise labels in "preference".
    names = sorted((k for k in row if k.startswith("prediction ") and k.split()[-1].isdigit()),
                   key=lambda k: int(k.split()[-1]))
    return names if len(names) >= 2 and ("preference" in row or "scores" in row) else []


def _expand_responses(row: Mapping[str, Any], responses: Sequence[str] | str, col: Mapping[str, str], *,
                      where: str) -> list[dict[str, Any]]:
    """N responses with pairwise labels (pairs i<j in order; 1 = first better, 2 = second, 0 = tie) or scores."""
    texts = row[responses] if isinstance(responses, str) else [row.get(r) for r in responses]
    prompt_key = col["prompt"] if col["prompt"] in row else "question"
    prompt = row.get(prompt_key)
    if not isinstance(prompt, str):
        raise BadRow("missing field", f"multi-response row needs a text prompt (field {col['prompt']!r} or "
                     "'question')", where=where, field_name=col["prompt"])
    index_pairs = [(i, j) for i in range(len(texts)) for j in range(i + 1, len(texts))]
    labels_key = col["pair_labels"] if col["pair_labels"] in row else "preference"
    if labels_key in row:
        labels = row[labels_key]
        if not isinstance(labels, list) or len(labels) != len(index_pairs):
            raise BadRow("bad labels", f"field {labels_key!r} needs {len(index_pairs)} labels (pairs i<j), got "
                         f"{labels!r}", where=where, field_name=labels_key)
        winners = {1: 0, 2: 1}
    elif col["scores"] in row:
        scores = row[col["scores"]]
        labels = [0 if scores[i] == scores[j] else (1 if scores[i] > scores[j] else 2) for i, j in index_pairs]
        winners = {1: 0, 2: 1}
    else:
        raise BadRow("bad labels", "multi-response row needs pair labels ('preference') or 'scores'", where=where)
    pairs = []
    for (i, j), label in zip(index_pairs, labels):
        # A pair that cannot be used is a marker {"drop": reason}: counted, while the row's other pairs are kept.
        base = {"prompt": prompt.rstrip() + "\n"}
        if label == 0:
            pairs.append({**base, "drop": "tie"})
            continue
        if label not in winners:
            raise BadRow("bad labels", f"label {label!r} for responses {i + 1} vs {j + 1}: use 1, 2 or 0 (tie)",
                         where=where, field_name=labels_key)
        good, bad = (texts[i], texts[j]) if winners[label] == 0 else (texts[j], texts[i])
        if not isinstance(good, str) or not isinstance(bad, str) or not good.strip() or not bad.strip():
            pairs.append({**base, "drop": "empty field"})
            continue
        if good == bad:
            pairs.append({**base, "drop": "identical chosen and rejected"})
            continue
        pair = {**base, "chosen": good, "rejected": bad}
        _copy_extras(row, col, pair, where)
        pairs.append(pair)
    return pairs


def prompt_key(pair: Mapping[str, Any]) -> str:
    """What identifies the prompt of a pair, for splitting train/eval by prompt (never by pair)."""
    prompt = pair.get("prompt")
    if prompt is None and isinstance(pair.get("chosen"), str):
        prompt = implicit_prompt(pair["chosen"], pair["rejected"])
    return json.dumps(prompt, sort_keys=True)


def implicit_prompt(chosen: str, rejected: str) -> str:
    """The shared beginning of two transcripts, cut back to the last turn marker (hh-rlhf style)."""
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    shared = chosen[:n]
    cut = shared.rfind("\n\nAssistant:")
    return shared[: cut + len("\n\nAssistant:")] if cut >= 0 else shared


def in_eval_split(pair: Mapping[str, Any], fraction: float, seed: int) -> bool:
    """Deterministic split by prompt hash: every pair of a prompt lands on the same side."""
    digest = hashlib.sha256(f"{seed}/{prompt_key(pair)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction
