"""Encoding a whole file, in this process or in worker processes, always in file order.

Workers get chunks of raw items (undecoded JSONL lines or decoded rows) and return encoded pairs or
:class:`~sampo_megatron.data.errors.BadRecord` s; ``imap`` keeps the order, so the output (and the
sample ids given downstream) is the same for any number of workers.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
from typing import Iterable, Iterator

from .encoding import EncoderSpec, PairEncoder, encode_items
from .errors import BadRecord, Location
from .pairs import EncodedPair
from .sources import RawItem

Result = tuple[Location, EncodedPair | BadRecord]

_worker_encoder: PairEncoder | None = None


def _init_worker(spec: EncoderSpec) -> None:
    global _worker_encoder
    _worker_encoder = PairEncoder.from_spec(spec)


def _encode_chunk(chunk: list[RawItem]) -> list[Result]:
    assert _worker_encoder is not None
    return [(item.location, result) for item, result in encode_items(_worker_encoder, chunk)]


def _chunks(items: Iterable[RawItem], size: int) -> Iterator[list[RawItem]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def encoded_stream(
    items: Iterable[RawItem], spec: EncoderSpec, num_workers: int = 1, chunk_size: int = 256, encoder: PairEncoder | None = None
) -> Iterator[Result]:
    """``(location, pair or BadRecord)`` for every item, in order.

    Args:
        items: Raw items, e.g. from :func:`~sampo_megatron.data.sources.iter_raw`.
        spec: How to encode (workers build their own encoder from it).
        num_workers: 1 encodes in this process; more start a ``multiprocessing`` pool.
        chunk_size: Items per task sent to a worker (amortises the inter-process overhead).
        encoder: An already built encoder for ``num_workers == 1`` (saves loading the tokenizer twice).
    """
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if num_workers == 1:
        encoder = encoder or PairEncoder.from_spec(spec)
        for item, result in encode_items(encoder, items):
            yield item.location, result
        return
    # Fork is fastest (no re-import); the tokenizer's own thread pool must then stay off in children.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
    with ctx.Pool(num_workers, initializer=_init_worker, initargs=(spec,)) as pool:
        for results in pool.imap(_encode_chunk, _chunks(items, chunk_size)):
            yield from results
