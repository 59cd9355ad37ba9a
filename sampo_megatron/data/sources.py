"""Readers for preference data files: JSONL, JSON, parquet and Hugging Face ``datasets`` directories.

A reader yields :class:`RawItem` s in file order: where the record is and its payload. JSONL lines
are passed on undecoded (bytes) so that decoding and JSON parsing can run in worker processes;
:func:`decode_item` turns any payload into a Python record and raises :class:`BadRecord` for
malformed JSON or invalid UTF-8, naming the field that holds the bad bytes when JSON parsing
still succeeds.

parquet needs ``pyarrow`` and ``datasets`` directories need ``datasets``; both are optional
(``pip install sampo-megatron[data]``) and imported only when such a file is read.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Iterator

from .errors import BadRecord, Location

SOURCE_KINDS = ("jsonl", "json", "parquet", "datasets")
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class RawItem:
    """One record as read: its location and either the undecoded line (bytes) or the decoded value."""

    location: Location
    payload: Any


def _optional(module: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"reading {what} needs the '{module}' package: pip install 'sampo-megatron[data]' (or pip install {module})"
        ) from None


def source_kind(path: str) -> str:
    """Which reader handles ``path``: by extension, or ``datasets`` for a ``save_to_disk`` directory.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the kind cannot be told.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"data not found: {path}")
    if os.path.isdir(path):
        markers = ("dataset_info.json", "state.json", "dataset_dict.json")
        if any(os.path.isfile(os.path.join(path, m)) for m in markers):
            return "datasets"
        raise ValueError(f"{path}: a directory, but not one written by datasets' save_to_disk (no {' / '.join(markers)})")
    lower = path.lower()
    for ext, kind in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "json"), (".parquet", "parquet")):
        if lower.endswith(ext):
            return kind
    raise ValueError(f"{path}: unknown data file type (expected .jsonl, .json, .parquet or a datasets directory)")


def find_invalid_text(value: Any, field: str = "") -> str | None:
    """Path of the first string inside ``value`` that is not valid Unicode (a lone surrogate: what
    undecodable bytes or a ``"\\udc80"`` escape become), e.g. ``"chosen[1].content"``; else ``None``."""
    if isinstance(value, str):
        return (field or "<record>") if _SURROGATE.search(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            found = find_invalid_text(item, f"{field}.{key}" if field else str(key))
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = find_invalid_text(item, f"{field}[{i}]")
            if found:
                return found
    return None


def decode_item(item: RawItem) -> Any:
    """The record of ``item``: JSON-decodes a JSONL line; checks every string is valid text.

    Raises:
        BadRecord: ``malformed_json`` or ``invalid_utf8`` (with the field when it can be told).
    """
    record = item.payload
    if isinstance(record, BadRecord):  # a reader that already found the problem (parquet cells)
        raise record
    if isinstance(record, bytes):
        try:
            text = record.decode("utf-8")
            bad_bytes = None
        except UnicodeDecodeError as e:
            # Keep going with the bytes escaped, so the error can say which field holds them.
            text = record.decode("utf-8", errors="surrogateescape")
            bad_bytes = f"byte 0x{record[e.start]:02x} at column {e.start + 1} is not valid UTF-8"
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            if bad_bytes:
                raise BadRecord(item.location, "invalid_utf8", bad_bytes) from None
            raise BadRecord(item.location, "malformed_json", f"malformed JSON: {e.msg} (column {e.colno})") from None
        if bad_bytes:
            field = find_invalid_text(record)
            raise BadRecord(item.location, "invalid_utf8", f"holds invalid UTF-8 ({bad_bytes})", field) from None
    field = find_invalid_text(record)
    if field is not None:
        raise BadRecord(item.location, "invalid_utf8", "is not valid Unicode text (lone surrogate)", field)
    return record


def _read_jsonl(path: str) -> Iterator[RawItem]:
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                yield RawItem(Location(path, "line", lineno), line)


def _read_json(path: str) -> Iterator[RawItem]:
    """A top-level array of records, or (as Hugging Face writes ``.json``) one record per line."""
    with open(path, "rb") as f:
        raw = f.read()
    text = raw.decode("utf-8", errors="surrogateescape")  # bad bytes are reported per record below
    start = len(text) - len(text.lstrip())
    if not text[start:].startswith("["):
        # JSON Lines under a .json name: the byte lines are what the JSONL reader expects.
        for lineno, line in enumerate(raw.splitlines(keepends=True), start=1):
            if line.strip():
                yield RawItem(Location(path, "line", lineno), line)
        return
    decoder = json.JSONDecoder()
    pos, line = start + 1, 1 + text.count("\n", 0, start)
    expect_value = True
    while True:
        # Skip whitespace and the commas between elements, counting lines as we go.
        while pos < len(text) and (text[pos].isspace() or (text[pos] == "," and not expect_value)):
            if text[pos] == ",":
                expect_value = True
            line += text[pos] == "\n"
            pos += 1
        if pos < len(text) and text[pos] == "]":
            return
        if pos >= len(text) or not expect_value:
            # Element boundaries are lost after a syntax error: the rest of an array cannot be read.
            raise BadRecord(
                Location(path, "line", line),
                "malformed_json",
                "malformed JSON array (expected ',' or ']'); records after this point cannot be located",
            )
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise BadRecord(
                Location(path, "line", e.lineno),
                "malformed_json",
                f"malformed JSON: {e.msg} (column {e.colno}); records after this point cannot be located",
            ) from None
        yield RawItem(Location(path, "line", line), value)
        line += text.count("\n", pos, end)
        pos, expect_value = end, False


def _rows_of_batch(batch, first_row: int, path: str) -> list[RawItem]:
    try:
        rows = batch.to_pylist()
    except UnicodeDecodeError:
        rows = None
    if rows is not None:
        return [RawItem(Location(path, "row", first_row + i), r) for i, r in enumerate(rows)]
    # Some cell is not valid UTF-8: find it row by row, column by column.
    items = []
    for i in range(batch.num_rows):
        row, bad = {}, None
        for name in batch.schema.names:
            try:
                row[name] = batch.column(name)[i].as_py()
            except UnicodeDecodeError:
                bad = name
                break
        location = Location(path, "row", first_row + i)
        items.append(RawItem(location, BadRecord(location, "invalid_utf8", "is not valid UTF-8", bad) if bad else row))
    return items


def _read_parquet(path: str) -> Iterator[RawItem]:
    pq = _optional("pyarrow.parquet", "parquet files")
    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        yield from _rows_of_batch(batch, row, path)
        row += batch.num_rows


def _read_datasets(path: str, split: str) -> Iterator[RawItem]:
    datasets = _optional("datasets", "Hugging Face datasets directories")
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"{path}: no split {split!r} (has {sorted(ds)}); pick one with --data-split")
        ds = ds[split]
    row = 0
    # Arrow batches rather than row-by-row Python access: the latter is several times slower.
    for batch in ds.with_format("arrow").iter(batch_size=1024):
        for item in _rows_of_batch(batch, row, path):
            yield item
        row += batch.num_rows


def iter_raw(path: str, split: str = "train") -> Iterator[RawItem]:
    """Every non-blank record of ``path`` in file order.

    Args:
        path: A ``.jsonl`` / ``.json`` / ``.parquet`` file or a ``datasets.save_to_disk`` directory.
        split: The split to read from a ``DatasetDict`` directory.
    """
    kind = source_kind(path)
    if kind == "jsonl":
        return _read_jsonl(path)
    if kind == "json":
        return _read_json(path)
    if kind == "parquet":
        return _read_parquet(path)
    return _read_datasets(path, split)
