"""Read what a W&B run logged from its `run-<id>.wandb` file (wandb ships no public reader; offline: no summary).

The file is a LevelDB-style log: a 7-byte header (":W&B", magic 0xBEE1, version), then 32 KiB blocks of records
(crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last), each payload a `wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

_BLOCK = 32 * 1024
_HEADER = 7


def records(path: str | Path) -> Iterator[Any]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, payload = _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # a block's tail too short for a record header is zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        payload = chunk if kind in (1, 2) else payload + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(payload)
            yield record


def _nested(items: Any) -> dict[str, Any]:
    """History/summary items → dict; nested keys ("eval/h", "_type") become nested dicts."""
    out: dict[str, Any] = {}
    for item in items:
        keys = list(item.nested_key) or [item.key]
        node = out
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = json.loads(item.value_json)
    return out


def read_run(path: str | Path) -> dict[str, Any]:
    """{"run": RunRecord, "config": {...}, "history": [row, ...]} of one run file."""
    run, config, history = None, {}, []
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            config.update(_nested(record.run.config.update))
        elif kind == "config":
            config.update(_nested(record.config.update))
        elif kind == "history":
            history.append(_nested(record.history.item))
    return {"run": run, "config": config, "history": history}


def run_files(wandb_dir: str | Path) -> list[Path]:
    """Every `run-<id>.wandb` under ``<wandb_dir>/wandb/offline-run-*``, oldest first."""
    return sorted(Path(wandb_dir).glob("wandb/offline-run-*/run-*.wandb"))
