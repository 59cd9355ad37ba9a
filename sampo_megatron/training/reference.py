"""The reference model: a frozen replica run forward-only each step, or per-token log-probs cached
on disk once per reference version (``--ref-mode cache``).

Where the reference comes from is recorded in the run state, so a resumed run rebuilds exactly the
reference it had: ``{"kind": "checkpoint", "path": ...}`` (``--ref-load`` or the starting
``--load``), ``{"kind": "init", "seed": ...}`` (the random initialisation), or ``{"kind": "saved"}``
(after an Iterative update its weights travel in every checkpoint).
"""

from __future__ import annotations

import json
import os
from functools import partial

import numpy as np
import torch
import torch.distributed as dist

from .step import StepContext, reference_forward_step


def forward_only_logps(chunks, micro_batches: list[dict], ctx: StepContext, seq_length: int) -> list[torch.Tensor] | None:
    """Per-token log-probs ``[2P, S]`` of each micro-batch through a forward-only pipeline schedule.

    Returns:
        One tensor per micro-batch on the last pipeline stage, ``None`` on other stages.
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    iterators = [iter(micro_batches) for _ in chunks]
    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=partial(reference_forward_step, ctx),
            data_iterator=iterators if len(chunks) > 1 else iterators[0],
            model=chunks,
            num_microbatches=len(micro_batches),
            seq_length=seq_length,
            micro_batch_size=micro_batches[0]["tokens"].shape[0],
            forward_only=True,
            collect_non_loss_data=True,
        )
    return outputs if parallel_state.is_pipeline_last_stage() else None


@torch.no_grad()
def copy_weights(source_chunks, target_chunks) -> None:
    """Copy a model's weights into another with the same layout (Iterative reference update)."""
    for src, dst in zip(source_chunks, target_chunks):
        src = getattr(src, "module", src)  # unwrap megatron DDP
        for (name, s), (_, d) in zip(src.named_parameters(), dst.named_parameters()):
            d.copy_(s)


class ReferenceCache:
    """Per-token reference log-probs of every pair, ``[pairs, 2 (chosen, rejected), S]`` float32,
    memory-mapped from ``<dir>/ref_logps_v<version>.npy``. A ``.json`` beside it is written last and
    marks the file complete, so an interrupted computation is redone, never read."""

    def __init__(self, directory: str, num_pairs: int, seq_length: int) -> None:
        self.directory = directory
        self.shape = (num_pairs, 2, seq_length)
        self._version: int | None = None
        self._array: np.ndarray | None = None

    def _paths(self, version: int) -> tuple[str, str]:
        stem = os.path.join(self.directory, f"ref_logps_v{version}")
        return stem + ".npy", stem + ".json"

    def is_complete(self, version: int) -> bool:
        data, meta = self._paths(version)
        if not (os.path.isfile(data) and os.path.isfile(meta)):
            return False
        with open(meta) as f:
            return tuple(json.load(f)["shape"]) == self.shape

    def build(self, version: int, steps, compute) -> None:
        """Fill the cache for ``version``.

        Args:
            steps: iterable of lists of micro-batches (this rank's share of each global batch).
            compute: ``micro_batches -> list of [2P, S] tensors`` on ranks that write, else ``None``.
        """
        data, meta = self._paths(version)
        if dist.get_rank() == 0:
            os.makedirs(self.directory, exist_ok=True)
            np.lib.format.open_memmap(data, mode="w+", dtype=np.float32, shape=self.shape).flush()
        dist.barrier()
        array = np.lib.format.open_memmap(data, mode="r+")
        for micro_batches in steps:
            results = compute(micro_batches)
            if results is None:
                continue
            for batch, logps in zip(micro_batches, results):
                pairs = batch["sample_ids"].cpu().numpy()
                chosen, rejected = logps.float().cpu().chunk(2, dim=0)
                width = chosen.shape[1]  # a micro-batch may be narrower than seq_length; the rest stays 0
                array[pairs, 0, :width] = chosen.numpy()
                array[pairs, 1, :width] = rejected.numpy()
        array.flush()
        del array
        dist.barrier()
        if dist.get_rank() == 0:
            with open(meta, "w") as f:
                json.dump({"shape": list(self.shape), "version": version}, f)
        dist.barrier()

    def lookup(self, version: int, sample_ids: torch.Tensor, width: int | None = None) -> torch.Tensor:
        """``[2P, width]`` reference log-probs of these pairs (chosen rows, then rejected rows);
        ``width`` defaults to the cache's sequence length."""
        if self._version != version:
            if not self.is_complete(version):
                raise FileNotFoundError(f"reference cache {self._paths(version)[0]} is missing or incomplete")
            self._array = np.load(self._paths(version)[0], mmap_mode="r")
            self._version = version
        rows = torch.from_numpy(np.ascontiguousarray(self._array[sample_ids.cpu().numpy(), :, :width]))
        return torch.cat([rows[:, 0], rows[:, 1]], dim=0)
