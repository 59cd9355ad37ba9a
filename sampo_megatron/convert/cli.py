"""What the two conversion command lines share: the dtype names and the run-and-report wrapper."""

from __future__ import annotations

import sys
from typing import Callable

DTYPES = {"auto": None, "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
"""``--dtype`` choices -> torch dtype names (``auto``: keep the source's)."""


def torch_dtype(name: str):
    """The torch dtype for a ``--dtype`` choice, ``None`` for ``auto``."""
    import torch

    return getattr(torch, DTYPES[name]) if DTYPES[name] else None


def run_conversion(convert: Callable, *args, quiet: bool, **kwargs) -> int:
    """Run a conversion as a command: freed memory goes back to the system, progress goes to
    stderr unless ``quiet``, and a :class:`ConversionError` becomes a one-line message and exit 2."""
    from .errors import ConversionError
    from .memory import return_freed_memory_to_os
    from .progress import stderr_lines

    return_freed_memory_to_os()
    try:
        convert(*args, emit=None if quiet else stderr_lines, **kwargs)
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
