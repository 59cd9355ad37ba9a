"""The layout of a run directory: ``iter_XXXXXXX/`` checkpoints and the marker naming the newest
complete one (Megatron-LM's names). The one statement of the format: the trainer and the export
both read it from here."""

from __future__ import annotations

import os

MARKER = "latest_checkpointed_iteration.txt"


def iteration_dir(save_dir: str, iteration: int) -> str:
    return os.path.join(save_dir, f"iter_{iteration:07d}")


def marked_iteration(save_dir: str) -> int | None:
    """The iteration ``save_dir``'s marker names, or None without a marker.

    Raises:
        ValueError: the marker does not hold an iteration number.
    """
    marker = os.path.join(save_dir, MARKER)
    if not os.path.isfile(marker):
        return None
    with open(marker) as f:
        text = f.read().strip()
    if not text.isdigit():
        raise ValueError(f"{marker}: expected an iteration number, found {text!r}")
    return int(text)
