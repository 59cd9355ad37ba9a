"""Keep a long conversion's resident set at what it holds, not at what it once held."""

from __future__ import annotations

import ctypes
import sys

# mallopt parameter number of M_MMAP_THRESHOLD in glibc's malloc.h.
_M_MMAP_THRESHOLD = -3


def return_freed_memory_to_os(threshold_bytes: int = 1 << 20) -> bool:
    """Make glibc allocate blocks of ``threshold_bytes`` or more with ``mmap``, so freeing a tensor
    returns its memory to the system at once.

    By default glibc raises this threshold to the size of the largest block freed so far (up to
    32 MiB); tensors below it then come from the heap, which rarely shrinks, and a conversion that
    frees every layer after writing it still sees its resident set creep up layer by layer.
    Process-wide, so the conversion command lines call it, not the library functions.

    Returns:
        Whether the setting took effect (False off glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold_bytes))
