"""What a closed run may leave behind in its process, so that the next run in the same process (a
test pool, a notebook, a hyper-parameter sweep) starts as a fresh launch would.

:meth:`ProcessState.capture` takes a snapshot before a run; :func:`leftovers` lists, one line each,
what differs after it was closed:

- megatron-core's process-wide state: the model-parallel groups, the global memory buffer, the
  tensor-parallel RNG tracker's states, the micro-batch calculator (runtime/distributed.py
  resets them);
- process groups of torch.distributed beyond those of the snapshot;
- signal handlers (SIGTERM, SIGINT, SIGUSR1, SIGUSR2, SIGHUP: training/exit.py, training/early_signals.py);
- files open on regular files, threads (the run lock's heartbeat, TensorBoard's writer, the data
  pool) and child processes (checkpoint writers, ``--async-save``'s worker) that were not there;
- the CPU layer of compat/ unapplied, or applied twice over (it must stay applied once).
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import threading
from dataclasses import dataclass

WATCHED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)


def _open_files() -> frozenset[str]:
    """``fd:path`` of every descriptor open on a regular file (sockets, pipes and devices left out:
    gloo's connections and the interpreter's own pipes are not a run's)."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.startswith("/") and not target.startswith(("/dev/", "/proc/")) and os.path.isfile(target):
            found.add(f"{name}:{target}")
    return frozenset(found)


def _children() -> frozenset[int]:
    """PIDs of this process's live (not zombie) children."""
    me = str(os.getpid())
    found = set()
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                found.update(int(p) for p in f.read().split())
        except OSError:
            continue
    alive = set()
    for pid in found:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if fields[0] != "Z" and fields[1] == me:
                alive.add(pid)
        except OSError:
            continue
    return frozenset(alive)


def _command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:200]
    except OSError:
        return "gone"


def _process_group_count() -> int:
    import torch.distributed as dist

    return len(dist.distributed_c10d._world.pg_map) if dist.is_initialized() else 0


@dataclass(frozen=True)
class ProcessState:
    """A snapshot of what a run may change in its process."""

    signal_handlers: tuple
    open_files: frozenset[str]
    threads: frozenset[str]
    children: frozenset[int]
    process_groups: int

    @classmethod
    def capture(cls) -> ProcessState:
        return cls(
            signal_handlers=tuple(signal.getsignal(s) for s in WATCHED_SIGNALS),
            open_files=_open_files(),
            threads=frozenset(t.name for t in threading.enumerate() if t.is_alive()),
            children=_children(),
            process_groups=_process_group_count(),
        )


def _megatron_leftovers() -> list[str]:
    if "megatron.core" not in sys.modules:
        return []
    from megatron.core import num_microbatches_calculator, parallel_state
    from megatron.core.tensor_parallel import random

    problems = []
    if parallel_state.model_parallel_is_initialized():
        problems.append("megatron-core's model-parallel state is still initialised")
    if parallel_state._GLOBAL_MEMORY_BUFFER is not None:
        problems.append("megatron-core's global memory buffer is still allocated")
    if num_microbatches_calculator._GLOBAL_NUM_MICROBATCHES_CALCULATOR is not None:
        problems.append("megatron-core's micro-batch calculator is still set")
    tracker = random._CUDA_RNG_STATE_TRACKER
    if tracker is not None and tracker.get_states():
        problems.append(f"the tensor-parallel RNG tracker still holds states {sorted(tracker.get_states())}")
    return problems


def _compat_leftovers() -> list[str]:
    if "sampo_megatron.compat.cpu" not in sys.modules:
        return []
    from ..compat import cpu

    return [f"compat: {p}" for p in cpu.applied_problems()]


def leftovers(before: ProcessState) -> list[str]:
    """What differs from ``before`` now that a run was closed; empty when nothing leaked.

    Args:
        before: the snapshot taken before the run (:meth:`ProcessState.capture`).
    """
    gc.collect()  # objects only a reference cycle keeps (and their files) are garbage, not leftovers
    now = ProcessState.capture()
    problems = _megatron_leftovers() + _compat_leftovers()
    if now.process_groups > before.process_groups:
        problems.append(f"{now.process_groups - before.process_groups} process group(s) of torch.distributed not destroyed")
    for sig, was, is_now in zip(WATCHED_SIGNALS, before.signal_handlers, now.signal_handlers):
        if was != is_now:
            problems.append(f"the {signal.Signals(sig).name} handler changed: {was!r} -> {is_now!r}")
    for entry in sorted(now.open_files - before.open_files):
        problems.append(f"a file is still open: fd {entry.replace(':', ' on ', 1)}")
    for name in sorted(now.threads - before.threads):
        problems.append(f"a thread still runs: {name}")
    for pid in sorted(now.children - before.children):
        problems.append(f"a child process still runs: PID {pid} ({_command_line(pid)})")
    return problems
