"""Tokenise a preference set once, with several worker processes, into megatron-core indexed
datasets, with a length-statistics report and the paper's long/short subsets.

The command line is ``tools/preprocess_preference_data.py``; this module is the library behind it
(and behind ``bench/preprocess.py``).
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from dataclasses import dataclass, field

from .encoding import EncoderSpec, PairEncoder, resolve_layout
from .errors import BadRecord, BadRecordLog
from .indexed import IndexedPairWriter
from .pairs import EncodedPair, finalize_pair
from .pipeline import encoded_stream
from .sources import iter_raw, source_kind
from .stats import LengthStats, write_histogram_png, write_report
from .templates import get_template
from .tokenizer import load_tokenizer

SPLITS = ("long", "short")
"""``long``: chosen has more tokens than rejected; ``short``: fewer. Ties belong to neither."""


@dataclass
class PreprocessConfig:
    """Options of ``tools/preprocess_preference_data.py`` (see its ``--help``)."""

    input: str
    output_prefix: str
    tokenizer_model: str
    tokenizer_type: str = "auto"
    data_format: str = "auto"
    data_split: str = "train"
    prompt_template: str = "auto"
    add_bos: bool = True
    workers: int = 1
    on_bad_record: str = "error"
    seq_length: int | None = None
    """If given, also drop pairs that have no room at this length (else that is checked at training)."""
    min_response_tokens: int = 1
    split_by_length: tuple[str, ...] = ()
    stats: bool = True
    progress: bool = True
    chunk_size: int = 256
    outputs: dict = field(default_factory=dict)


def split_of(pair: EncodedPair) -> str | None:
    """``"long"`` / ``"short"`` / ``None`` (tie) by response token counts."""
    c, r = len(pair.chosen_ids), len(pair.rejected_ids)
    return "long" if c > r else "short" if c < r else None


class Progress:
    """A status line on stderr about once a second: records, pairs, bad records, tokens/s."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.start = self.last = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def update(self, records: int, pairs: int, bad: int, tokens: int, final: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not final and now - self.last < (1.0 if self.tty else 10.0)):
            return
        self.last = now
        rate = tokens / max(now - self.start, 1e-9)
        line = f"{records} records, {pairs} pairs, {bad} bad, {tokens} tokens, {rate:,.0f} tokens/s"
        print(("\r" if self.tty else "") + line, end="\n" if final or not self.tty else "", file=sys.stderr, flush=True)


def preprocess(cfg: PreprocessConfig) -> dict:
    """Runs the preprocessing; returns a summary (counts, tokens/s, output paths, bad records).

    Raises:
        BadRecord: the first bad record with ``on_bad_record="error"`` (no ``PREFIX.json`` is
            written then, so the partial output is never mistaken for a dataset).
    """
    for s in cfg.split_by_length:
        if s not in SPLITS:
            raise ValueError(f"--split-by-length takes {SPLITS}, got {s!r}")
    tokenizer = load_tokenizer(cfg.tokenizer_model, cfg.tokenizer_type)
    layout = resolve_layout(cfg.data_format, itertools.islice(iter_raw(cfg.input, cfg.data_split), 200), cfg.input)
    template = get_template(cfg.prompt_template, tokenizer).name
    spec = EncoderSpec(os.path.abspath(cfg.tokenizer_model), cfg.tokenizer_type, layout, template, cfg.add_bos)
    log = BadRecordLog(cfg.on_bad_record)
    prefixes = {None: cfg.output_prefix, **{s: f"{cfg.output_prefix}_{s}" for s in cfg.split_by_length}}
    writers = {key: IndexedPairWriter(prefix, tokenizer.vocab_size) for key, prefix in prefixes.items()}
    stats = {key: LengthStats() for key in prefixes}
    progress = Progress(cfg.progress)
    records = tokens = 0
    start = time.perf_counter()

    encoder = PairEncoder(tokenizer, layout, template, cfg.add_bos) if cfg.workers == 1 else None
    stream = encoded_stream(iter_raw(cfg.input, cfg.data_split), spec, cfg.workers, cfg.chunk_size, encoder)
    try:
        for location, result in stream:
            records += 1
            try:
                if isinstance(result, BadRecord):
                    raise result
                if cfg.seq_length is not None:  # the same checks training would run at this length
                    finalize_pair(result, 0, location, cfg.seq_length, cfg.min_response_tokens, tokenizer.vocab_size)
            except BadRecord as bad:
                log.handle(bad)
                continue
            # The whole set, plus the pair's long/short subset (a tie, split None, belongs to no subset).
            split = split_of(result)
            for key in (None,) if split is None else (None, split):
                if key in writers:
                    writers[key].add(result, location.number)
                    stats[key].add(result)
            tokens += len(result.prompt_ids) + len(result.chosen_ids) + len(result.rejected_ids)
            progress.update(records, writers[None].count, log.total, tokens)
    finally:
        stream.close()  # stops the worker pool at once if a bad record ended the run
    elapsed = time.perf_counter() - start
    progress.update(records, writers[None].count, log.total, tokens, final=True)

    metadata = {
        "source": os.path.abspath(cfg.input),
        "source_location": "line" if source_kind(cfg.input) in ("jsonl", "json") else "row",
        "data_split": cfg.data_split,
        "layout": layout,
        "prompt_template": template,
        "add_bos": cfg.add_bos,
        "tokenizer": {
            "path": spec.tokenizer_model,
            "type": cfg.tokenizer_type,
            "fingerprint": tokenizer.fingerprint(),
            "vocab_size": tokenizer.vocab_size,
            "bos_id": tokenizer.bos_id,
            "eos_id": tokenizer.eos_id,
            "pad_id": tokenizer.pad_id,
        },  # fmt: skip
        "checked_seq_length": cfg.seq_length,
        "min_response_tokens": cfg.min_response_tokens,
        "bad_records": log.to_dict(),
    }
    outputs = {}
    for key, writer in writers.items():
        outputs[key or "all"] = writer.finalize({**metadata, "subset": key})
    summary = {
        "records": records,
        "pairs": writers[None].count,
        "tokens": tokens,
        "seconds": elapsed,
        "tokens_per_s": tokens / max(elapsed, 1e-9),
        "workers": cfg.workers,
        "outputs": outputs,
        "bad_records": log.to_dict(),
        "log_summary": log.summary(writers[None].count),
    }
    if cfg.stats:
        report = stats[None].report(cfg.seq_length)
        report["subsets"] = {key: stats[key].report(cfg.seq_length) for key in cfg.split_by_length}
        report["bad_records"] = log.to_dict()
        report["source"] = metadata["source"]
        write_report(report, cfg.output_prefix + "_stats.json")
        summary["stats"] = cfg.output_prefix + "_stats.json"
        png = cfg.output_prefix + "_stats.png"
        if write_histogram_png(stats[None], png, os.path.basename(cfg.input)):
            summary["histogram"] = png
    return summary
