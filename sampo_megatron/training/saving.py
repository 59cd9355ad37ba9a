"""Checkpoint saves of a training run: synchronous, or in the background with ``--async-save``;
``--keep-last`` retention once a save is complete.

With ``--async-save`` a save returns once the tensors are staged (a forked process holds the
snapshot and writes it); megatron-core's ``AsyncCallsQueue`` then finalizes it (a collective check
that every rank's write is done, then the manifest and the marker: runtime/checkpointing.py).
:meth:`Saver.poll` is called every step, :meth:`Saver.wait` before a new save and before the run
exits, so at most one save is in flight and a run never exits with a save unfinished.
"""

from __future__ import annotations

from typing import Callable

import torch.distributed as dist

from ..config import CheckpointConfig
from ..runtime.checkpointing import CheckpointContents, prune_checkpoints, save_checkpoint


class Saver:
    """Saves to ``--save``, prunes to ``--keep-last``, and says so on rank 0.

    Args:
        cfg: the checkpoint flags.
        dp_group: the group the fully parallel save spreads the writes over.
        message: prints a line on the logging rank.
    """

    def __init__(self, cfg: CheckpointConfig, dp_group, message: Callable[[str], None]) -> None:
        self.cfg = cfg
        self.dp_group = dp_group
        self.message = message
        self.queue = None
        if cfg.async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self.queue = AsyncCallsQueue()

    def save(self, iteration: int, chunks, contents: CheckpointContents, finish: Callable[[str], None]) -> str:
        """Save ``iteration`` (after an earlier background save, if any, is complete)."""
        self.wait()
        return save_checkpoint(self.cfg.save, iteration, chunks, contents, self.dp_group, finish=finish,
                               on_complete=self._completed, async_queue=self.queue)  # fmt: skip

    def _completed(self, ckpt: str) -> None:
        self.message(f"saved checkpoint {ckpt}")
        if self.cfg.keep_last and dist.get_rank() == 0:
            for old in prune_checkpoints(self.cfg.save, self.cfg.keep_last):
                self.message(f"deleted checkpoint {old} (--keep-last {self.cfg.keep_last})")

    def poll(self) -> None:
        """Finalize a background save whose write is complete on every rank (collective)."""
        if self.queue is not None and self.queue.get_num_unfinalized_calls():
            self.queue.maybe_finalize_async_calls(blocking=False)

    def wait(self) -> None:
        """Wait for a background save and finalize it (collective)."""
        if self.queue is not None and self.queue.get_num_unfinalized_calls():
            self.queue.maybe_finalize_async_calls(blocking=True)
