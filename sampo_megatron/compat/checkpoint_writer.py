"""Stopping the process megatron-core's torch_dist checkpoint writer leaves behind (0.16, 0.19).

``dist_checkpointing.strategies.filesystem_async`` creates a ``spawn`` multiprocessing Manager for
its results queue on the first save and keeps it in the module global ``_results_queue`` for the
process's lifetime. A process killed by SIGKILL never runs the finalizer that stops it, so the
Manager would outlive the run (under torchrun; a SLURM step kills it with the job).
:func:`stop_writer_manager`, called after each save, leaves it alive only while a checkpoint is
being written, at the cost of a restart per save; on CPU :func:`start_writer_manager` starts it
by ``fork`` (milliseconds instead of a fresh interpreter's seconds).
"""

from __future__ import annotations

from .version import release_line

# Release line -> (file:line of the global, the factory that fills it).
_SITES = {
    "0.16": ("filesystem_async.py:48,51-56", "_get_write_results_queue"),
    "0.19": ("filesystem_async.py:49,53-66", "get_write_results_queue"),
}


def _check_site():
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from .cpu import CompatError

    line = release_line().name
    where, factory = _SITES[line]
    if "_results_queue" not in vars(filesystem_async) or not hasattr(filesystem_async, factory):
        raise CompatError(
            f"megatron-core {line}: filesystem_async no longer keeps its writer queue in _results_queue / {factory} "
            f"(expected at {where}); re-survey sampo_megatron/compat/checkpoint_writer.py"
        )
    return filesystem_async


def start_writer_manager() -> None:
    """On CPU, start the writer's Manager by ``fork`` instead of ``spawn`` before a save.

    A spawned Manager is a fresh interpreter: ~1.5 s to start and ~0.8 s to stop on two cores,
    for every save of a tiny model (the tests' and the demo's), since :func:`stop_writer_manager`
    stops it after each save. A forked one starts in milliseconds and holds only the queue. On a
    GPU machine nothing changes: forking a process that holds a CUDA context is what the spawn
    there avoids.

    Raises:
        CompatError: the installed megatron-core keeps the queue elsewhere (re-survey this file).
    """
    import multiprocessing as mp

    import torch

    filesystem_async = _check_site()
    if torch.cuda.is_available() or filesystem_async._results_queue is not None:
        return
    filesystem_async._results_queue = mp.get_context("fork").Manager().Queue()


def stop_writer_manager() -> None:
    """Shut down the writer's Manager, if one runs, so that the next save starts a new one.

    Raises:
        CompatError: the installed megatron-core keeps the queue elsewhere (re-survey this file).
    """
    filesystem_async = _check_site()
    queue = filesystem_async._results_queue
    if queue is not None:
        manager = getattr(queue, "_manager", None)
        if manager is not None:
            manager.shutdown()
        filesystem_async._results_queue = None
