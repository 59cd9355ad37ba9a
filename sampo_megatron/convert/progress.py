"""Progress lines for long conversions: bytes done of the total, rate, time left."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB"


class Progress:
    """Counts bytes written and prints a line at most every ``interval`` seconds (and at the end).

    Args:
        title: prefix of each line, e.g. ``hf->megatron``.
        total_bytes: bytes the conversion will write.
        emit: where lines go (default: stderr); ``None`` prints nothing.
        interval: minimum seconds between lines.
    """

    def __init__(self, title: str, total_bytes: int, emit: Callable[[str], None] | None = None, interval: float = 5.0) -> None:
        self.title = title
        self.total = max(total_bytes, 1)
        self.done = 0
        self.emit = emit
        self.interval = interval
        self.start = self._last = time.monotonic()

    def message(self, text: str) -> None:
        if self.emit is not None:
            self.emit(f"[{self.title}] {text}")

    def advance(self, nbytes: int, what: str = "") -> None:
        """Record ``nbytes`` written (``what``: the item, shown in the line)."""
        self.done += nbytes
        now = time.monotonic()
        if now - self._last >= self.interval or self.done >= self.total:
            self._last = now
            elapsed = now - self.start
            rate = self.done / elapsed if elapsed > 0 else 0.0
            left = (self.total - self.done) / rate if rate > 0 else float("nan")
            self.message(
                f"{100 * self.done / self.total:5.1f}% {_gb(self.done)} / {_gb(self.total)} "
                f"({_gb(rate)}/s, {left:.0f} s left){' ' + what if what else ''}"
            )


def stderr_lines(text: str) -> None:
    """The default progress sink."""
    print(text, file=sys.stderr, flush=True)
