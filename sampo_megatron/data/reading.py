"""Loading training pairs from ``--data-path``: a raw file (tokenised now) or an indexed dataset
(tokenised by ``tools/preprocess_preference_data.py``), with the same checks and the same result."""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from .encoding import PairEncoder, resolve_layout
from .errors import BadRecord, BadRecordLog
from .indexed import IndexedPairs, read_metadata
from .pairs import PreferencePair, finalize_pair
from .sources import iter_raw
from .tokenizer import Tokenizer


@dataclass(frozen=True)
class DataOptions:
    """How to read and check the data (the data flags of the trainer)."""

    seq_length: int
    data_format: str = "auto"
    prompt_template: str = "auto"
    on_bad_record: str = "error"
    min_response_tokens: int = 1
    data_split: str = "train"
    add_bos: bool = True
    model_vocab_size: int | None = None
    """Token ids must be below this; default the tokenizer's vocabulary size."""


def read_raw_pairs(path: str, tokenizer: Tokenizer, options: DataOptions, log: BadRecordLog,
                   progress: Callable[[str], None] | None = None, every_s: float = 30.0) -> tuple[list[PreferencePair], str]:  # fmt: skip
    """Tokenises and checks every record of a raw file; returns the pairs and a one-line description.

    ``progress`` is told how far it is every ``every_s`` seconds (a large file takes minutes)."""
    layout = resolve_layout(options.data_format, itertools.islice(iter_raw(path, options.data_split), 200), path)
    encoder = PairEncoder(tokenizer, layout, options.prompt_template, options.add_bos)
    vocab = options.model_vocab_size if options.model_vocab_size is not None else tokenizer.vocab_size
    pairs: list[PreferencePair] = []
    begin = last = time.monotonic()
    for done, item in enumerate(iter_raw(path, options.data_split)):
        if progress is not None and done and done % 1000 == 0 and time.monotonic() - last >= every_s:
            last = time.monotonic()
            progress(f"data: {done} records of {path} tokenised in {last - begin:.0f} s ({done / (last - begin):.0f}/s)")
        try:
            encoded = encoder.encode(item)
            pairs.append(
                finalize_pair(encoded, len(pairs), item.location, options.seq_length, options.min_response_tokens, vocab)
            )
        except BadRecord as bad:
            log.handle(bad)
    return pairs, f"{path} (layout {layout}, template {encoder.template.name}, tokenised now)"


def load_pairs(path: str, tokenizer: Tokenizer, options: DataOptions,
               progress: Callable[[str], None] | None = None) -> tuple[Sequence[PreferencePair], BadRecordLog, str]:  # fmt: skip
    """The training pairs of ``path``.

    Args:
        path: A raw data file / ``datasets`` directory, or the prefix of an indexed dataset (detected by
            its ``PREFIX.json``).
        tokenizer: The run's tokenizer.
        options: Reading and checking options.
        progress: Told how far tokenising a raw file is, every 30 s.

    Returns:
        ``(pairs, log, description)``: the pairs (a list, or a lazy sequence for indexed data), the
        bad-record counts, and what was read.

    Raises:
        BadRecord: the first bad record with ``on_bad_record="error"``.
    """
    path = os.fspath(path)
    log = BadRecordLog(options.on_bad_record)
    meta = read_metadata(path)
    if meta is None:
        pairs, description = read_raw_pairs(path, tokenizer, options, log, progress)
        return pairs, log, description
    pairs = IndexedPairs(meta, tokenizer, options.seq_length, log, options.min_response_tokens, options.model_vocab_size)
    description = (
        f"indexed dataset {meta['prefix']} ({meta['num_pairs']} pairs from {meta.get('source')}, layout "
        f"{meta['layout']}, template {meta['prompt_template']}; --data-format and --prompt-template "
        "were applied when it was preprocessed)"
    )
    return pairs, log, description


def read_pairs_jsonl(path: str, tokenizer: Tokenizer, seq_length: int, add_bos: bool = True) -> list[PreferencePair]:
    """Reads a JSONL file of ``{"prompt": str, "chosen": str, "rejected": str}`` records as they are
    (generic layout, plain template), stopping at the first bad record.

    Raises:
        BadRecord: (a ``ValueError``) e.g. ``"pairs.jsonl:17: field 'chosen' is missing [missing_field]"``.
    """
    options = DataOptions(seq_length, data_format="generic", prompt_template="plain", add_bos=add_bos)
    pairs, _ = read_raw_pairs(os.fspath(path), tokenizer, options, BadRecordLog("error"))
    return pairs
