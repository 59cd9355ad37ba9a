"""One rank of a test pool (tests/pool.py): joins the gloo group once, then runs jobs until told to
stop. A job is an importable function and its arguments; every rank runs it and sends back its
result or its traceback, then whether the job left state behind (runtime/leftovers.py).

Usage (by tests/pool.py only): python tests/pool_worker.py FD warm|cold — FD is this rank's end of
a socket pair to the test process, cold skips importing the trainer's stack; RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT come from the environment.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import signal
import sys
import traceback
from multiprocessing.connection import Connection


def _die_with_the_test_process() -> None:
    """SIGKILL this rank when the pytest process that started it dies (Linux prctl)."""
    with_parent = ctypes.CDLL(None, use_errno=True)
    with_parent.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def _warm_up(warm: bool) -> None:
    """Join the group; ``warm``: import what every job needs once, before the first job (what a
    launch pays each time)."""
    import torch.distributed as dist

    dist.init_process_group("gloo")  # a client of the store the pool hosts (TORCHELASTIC_USE_AGENT_STORE)
    # Jobs that start launches of their own: their ranks host their own store again.
    os.environ.pop("TORCHELASTIC_USE_AGENT_STORE")
    if not warm:
        return
    import sampo_megatron.training.trainer  # noqa: F401  (megatron-core, the data stack, the losses)
    from sampo_megatron.compat import apply_cpu_compat

    apply_cpu_compat()  # once per process, as every launch does at start-up; idempotent afterwards
    from multiprocessing import resource_tracker

    import transformers  # noqa: F401  (the conversion and oracle jobs; ~2 s)

    # multiprocessing's tracker of semaphores and shared memory is one per process, for its
    # lifetime (the checkpoint writer's first save starts it): part of the baseline, not a leak.
    resource_tracker.ensure_running()


def _resolve(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def main() -> None:
    _die_with_the_test_process()
    conn = Connection(int(sys.argv[1]))
    _warm_up(sys.argv[2] == "warm")
    from sampo_megatron.runtime.leftovers import ProcessState, leftovers

    baseline = ProcessState.capture()
    conn.send(("ready", os.getpid()))
    while True:
        message = conn.recv()
        if message[0] == "stop":
            break
        _, target, args, kwargs = message
        saved_argv, saved_path, saved_cwd = list(sys.argv), list(sys.path), os.getcwd()
        try:
            reply = ("ok", _resolve(target)(*args, **kwargs))
        except BaseException as err:  # SystemExit too: the test sees the code
            reply = ("error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}")
        finally:
            sys.argv[:], sys.path[:] = saved_argv, saved_path
            os.chdir(saved_cwd)
            sys.stdout.flush()
            sys.stderr.flush()
        conn.send((*reply, leftovers(baseline)))
    import torch.distributed as dist

    dist.destroy_process_group()


if __name__ == "__main__":
    main()
