"""When a run stops early on purpose: a signal (``--exit-signal-handler``), a time budget
(``--exit-duration-in-mins``) or a step budget (``--exit-interval``), Megatron-LM's flags.

Each is checked between steps, and every rank takes the same decision (one all-reduce of the
reasons), so every rank finishes the step it is in, the run saves a complete checkpoint, and exits
0 naming where it saved. A SLURM job that is preempted or reaches its time limit gets SIGTERM
(``#SBATCH --signal``, launch/slurm/) and is requeued; the same command then resumes from that
checkpoint.

The signal handler only records the signal: a second SIGTERM during the save changes nothing, and
the marker moves only after the checkpoint is complete (runtime/checkpointing.py).
"""

from __future__ import annotations

import os
import signal
import time

import torch
import torch.distributed as dist

from ..config import OperationsConfig
from .early_signals import SIGNALS, release_early


class ExitConditions:
    """The early-exit conditions of a run.

    Args:
        operations: the flags (``exit_signal_handler``, ``exit_duration_in_mins``, ``exit_interval``).
        start: the run's start (``time.monotonic()``), for the duration budget.
        device: where the all-reduce's tensor lives (the GPU under NCCL).
    """

    def __init__(self, operations: OperationsConfig, start: float | None = None, device: torch.device | None = None) -> None:
        self.operations = operations
        self.device = device or torch.device("cpu")
        self.start = time.monotonic() if start is None else start
        early = release_early()  # signals recorded during start-up (training/early_signals.py)
        self.received: list[int] = []
        self._previous: dict[int, object] = {}
        if operations.exit_signal_handler:
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._record)
            self.received.extend(early)
        else:
            for sig in early:  # what would have happened at once: SIGTERM ends, SIGINT interrupts
                os.kill(os.getpid(), sig)

    def _record(self, signum: int, frame) -> None:
        self.received.append(signum)

    @property
    def enabled(self) -> bool:
        t = self.operations
        return bool(t.exit_signal_handler or t.exit_duration_in_mins is not None or t.exit_interval)

    def local_reason(self, iteration: int) -> str | None:
        """Why this rank would stop after ``iteration`` (1-based, the step just finished), or None."""
        t = self.operations
        if self.received:
            return f"{signal.Signals(self.received[0]).name} received"
        if t.exit_duration_in_mins is not None and time.monotonic() - self.start >= 60 * t.exit_duration_in_mins:
            return f"--exit-duration-in-mins {t.exit_duration_in_mins:g} reached"
        if t.exit_interval and iteration % t.exit_interval == 0:
            return f"--exit-interval {t.exit_interval} reached"
        return None

    def should_exit(self, iteration: int, group=None) -> str | None:
        """The reason every rank stops after ``iteration``, or None (a collective when enabled: every
        rank must call it after each step)."""
        if not self.enabled:
            return None
        reason = self.local_reason(iteration)
        if not dist.is_initialized():
            return reason
        # The same decision on every rank: the strongest reason of any rank (a signal, then the time
        # budget, then the step budget; a signal may reach only some ranks, clocks differ).
        code = torch.tensor([_code(reason)], dtype=torch.int64, device=self.device)
        dist.all_reduce(code, op=dist.ReduceOp.MAX, group=group)
        return reason if _code(reason) == int(code) else _reason_of(int(code), self.operations)

    def restore(self) -> None:
        """Put back the signal handlers that were there before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def _code(reason: str | None) -> int:
    """0 none, 1 step budget, 2 time budget, 3 signal."""
    if reason is None:
        return 0
    if "received" in reason:
        return 3
    return 2 if "duration" in reason else 1


def _reason_of(code: int, operations: OperationsConfig) -> str | None:
    """The text of another rank's reason (its signal's name is not known here)."""
    return {
        0: None,
        1: f"--exit-interval {operations.exit_interval} reached",
        2: f"--exit-duration-in-mins {operations.exit_duration_in_mins:g} reached",
        3: "a signal was received (on another rank)",
    }[code]
