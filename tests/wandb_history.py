"""Reads the history rows of an offline W&B run (``run-<id>.wandb``) without W&B's servers.

The file is a LevelDB-style log (google/leveldb doc/log_format.md) after a 7-byte header
(``:W&B``, magic, version): 32 KiB blocks of records, each ``crc32 (4) | length (2) | type (1) |
data``, a record split over blocks as FIRST / MIDDLE / LAST pieces, a block's last < 7 bytes zero.
Each assembled record is a ``wandb.proto.wandb_internal_pb2.Record``; history rows are the
``history`` ones (items with a key and a JSON value).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[bytes]:
    data = path.read_bytes()
    ident, _magic, _version = struct.unpack("<4sHB", data[:HEADER])
    assert ident == b":W&B", f"{path}: not a W&B run file (header {ident!r})"
    records, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the block's trailer
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0:  # zero padding (a preallocated or unfinished tail)
            pos += left
            continue
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            records.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            records.append(pending + chunk)
            pending = b""
    return records


def read_history(path: Path) -> list[dict]:
    """Every history row of the run, in order: ``{key: value}`` (W&B adds ``_step``, ``_runtime``, ``_timestamp``)."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for raw in read_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    return rows
