"""Stopping the process megatron-core's torch_dist checkpoint writer leaves behind (0.16, 0.19).

``dist_checkpointing.strategies.filesystem_async`` creates a ``spawn`` multiprocessing Manager for
its results queue on the first save and keeps it in the module global ``_results_queue`` for the
process's lifetime. A process killed by SIGKILL never runs the finalizer that stops it, so the
Manager would outlive the run (under torchrun; a SLURM step kills it with the job).
:func:`stop_writer_manager`, called after each save, leaves it alive only while a checkpoint is
being written, at the cost of a restart per save.
"""

from __future__ import annotations

from .version import release_line

# Release line -> (file:line of the global, the factory that fills it).
_SITES = {
    "0.16": ("filesystem_async.py:48,51-56", "_get_write_results_queue"),
    "0.19": ("filesystem_async.py:49,53-66", "get_write_results_queue"),
}


def stop_writer_manager() -> None:
    """Shut down the writer's Manager, if one runs, so that the next save starts a new one.

    Raises:
        CompatError: the installed megatron-core keeps the queue elsewhere (re-survey this file).
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from .cpu import CompatError

    line = release_line().name
    where, factory = _SITES[line]
    if "_results_queue" not in vars(filesystem_async) or not hasattr(filesystem_async, factory):
        raise CompatError(
            f"megatron-core {line}: filesystem_async no longer keeps its writer queue in _results_queue / {factory} "
            f"(expected at {where}); re-survey sampo_megatron/compat/checkpoint_writer.py"
        )
    queue = filesystem_async._results_queue
    if queue is not None:
        manager = getattr(queue, "_manager", None)
        if manager is not None:
            manager.shutdown()
        filesystem_async._results_queue = None
