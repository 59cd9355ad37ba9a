"""Releasing the index files megatron-core's indexed datasets keep mapped (0.16, 0.19).

``datasets/indexed_dataset.py``'s ``_IndexReader.__getitem__`` is an ``lru_cache`` (maxsize 8)
shared by every reader of the process: its keys hold the last readers used, so a dataset that was
closed keeps its ``.idx`` file memory-mapped until eight other look-ups push it out. A process
that runs several trainings (a test pool, a sweep) would keep them open. :func:`release_index_readers`
clears that cache when a dataset is closed (data/indexed.py).
"""

from __future__ import annotations

from .version import release_line

# Release line -> file:line of the cached method.
_SITES = {"0.16": "indexed_dataset.py:350", "0.19": "indexed_dataset.py:346"}


def release_index_readers() -> None:
    """Forget the index readers ``_IndexReader.__getitem__``'s cache holds.

    Raises:
        CompatError: the installed megatron-core no longer caches there (re-survey this file).
    """
    from megatron.core.datasets.indexed_dataset import _IndexReader

    from .cpu import CompatError

    line = release_line().name
    cached = getattr(_IndexReader.__getitem__, "cache_clear", None)
    if cached is None:
        raise CompatError(
            f"megatron-core {line}: _IndexReader.__getitem__ is no longer an lru_cache (expected at {_SITES.get(line)}); "
            "re-survey sampo_megatron/compat/indexed_dataset.py"
        )
    cached()
