"""SIGTERM and SIGINT that arrive while a training process starts, before it knows whether
``--exit-signal-handler`` is on (imports and start-up take seconds; SLURM may signal then).

:func:`record_early` (the first thing ``sampo-train`` does) records them instead of dying;
:func:`release_early` puts the original handlers back and hands the recorded signals to
training/exit.py, which keeps them (handler on: the run stops after its first step, saving) or
delivers them again (handler off: the usual behaviour, just later).
"""

from __future__ import annotations

import signal

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_pending: list[int] = []
_originals: dict[int, object] = {}


def _record(signum: int, frame) -> None:
    _pending.append(signum)


def record_early() -> None:
    """Record SIGTERM and SIGINT from now on (main thread only)."""
    if _originals:
        return
    for sig in SIGNALS:
        _originals[sig] = signal.signal(sig, _record)


def release_early() -> list[int]:
    """Put back the handlers :func:`record_early` replaced; the signals recorded meanwhile."""
    for sig, handler in _originals.items():
        signal.signal(sig, handler)
    _originals.clear()
    pending = list(_pending)
    _pending.clear()
    return pending
