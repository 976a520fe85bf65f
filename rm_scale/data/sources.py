"""Where preference rows come from: sources, files, records.

A *source* is a set of files (or a `save_to_disk` folder, or a hub data set) with optional column names, a weight for
mixing, and a format. Rows are read as *records* that keep their file and line, so a bad row can be named exactly:
JSON Lines are read line by line (bad UTF-8 or a malformed line is one bad record, not a crashed loader); other formats
go through `datasets` builders.

`record_row` turns a record into its row, or raises `BadRow` for an unreadable one; rm_scale.data.pairs turns rows into
pairs.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rm_scale.data.mapping import RowMapping, parse_mapping
from rm_scale.data.presets import preset_mapping

DEMO_DATA = {"rm_scale:demo/train": "train.jsonl", "rm_scale:demo/eval": "eval.jsonl",
             "rm_scale:demo/ties_train": "ties_train.jsonl", "rm_scale:demo/ties_eval": "ties_eval.jsonl"}
HUB = "hub:"  # "hub:org/name", "hub:org/name@split" (default split: train), "hub:org/name:config@split"
EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv")


class BadRow(ValueError):
    """A row that cannot become a pair; `reason` is the count key, the message names field and fix."""

    def __init__(self, reason: str, message: str, *, where: str = "", field_name: str = "") -> None:
        self.reason, self.where, self.field_name = reason, where, field_name
        super().__init__(f"{where}: {message}" if where else message)


@dataclass
class Source:
    """One input: files (or a hub set / save_to_disk folder), a weight for mixing, and how its rows are read: a named
    preset (`format`, rm_scale.data.presets) and/or a `columns` mapping (rm_scale.data.mapping) and a `where` row
    filter. Without either, rows use rm_scale's (TRL's) column names, detected per row."""

    paths: list[str]
    weight: float = 1.0
    columns: dict[str, Any] = field(default_factory=dict)
    format: str | None = None
    where: dict[str, Any] = field(default_factory=dict)
    mapping: RowMapping = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.weight <= 0:
            raise ValueError(f"Source {self.paths}: weight must be > 0, got {self.weight}.")
        preset = preset_mapping(self.format, source=f"Source {self.paths}") if self.format else {}
        columns = {**preset.get("columns", {}), **self.columns}
        where = {**preset.get("where", {}), **self.where}
        self.mapping = parse_mapping(columns, where, source=f"Source {self.paths}")


SOURCE_KEYS = ("path", "paths", "weight", "columns", "format", "where")


def parse_sources(spec: str | Sequence[Any]) -> list[Source]:
    """`data.train` of a recipe: a path, a list of paths, or a list of {path(s), weight, columns, format, where}."""
    items = [spec] if isinstance(spec, (str, Mapping)) else list(spec)
    if items and all(isinstance(i, str) for i in items):
        return [Source(paths=list(items))]
    sources = []
    for item in items:
        if isinstance(item, str):
            sources.append(Source(paths=[item]))
        elif isinstance(item, Mapping):
            extra = set(item) - set(SOURCE_KEYS)
            if extra:
                raise ValueError(f"Data source {dict(item)}: unknown key(s) {sorted(extra)}; use {', '.join(SOURCE_KEYS)}.")
            paths = item.get("paths") or item.get("path")
            if not paths:
                raise ValueError(f"Data source {dict(item)} has no path.")
            sources.append(Source(paths=[paths] if isinstance(paths, str) else list(paths),
                                  weight=float(item.get("weight", 1.0)), columns=dict(item.get("columns") or {}),
                                  format=item.get("format"), where=dict(item.get("where") or {})))
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
        name, _, config = name.partition(":")  # hub:org/name[:config][@split]
        try:
            rows = load_dataset(name, config or None, split=split or "train", streaming=True)
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


def record_where(record: Mapping[str, Any]) -> str:
    """``file:line`` of a record, as messages name it (an empty file has no line)."""
    return f"{record['file']}:{record['line']}" if record.get("line") else record["file"]


def record_row(record: Mapping[str, Any]) -> dict[str, Any]:
    """The row of a record, or BadRow for an unreadable one."""
    where = record_where(record)
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
