"""Write a megatron-core torch_dist checkpoint from one process, one chunk in memory at a time.

A torch_dist checkpoint is a PyTorch Distributed Checkpoint (``.metadata`` + ``*.distcp``) plus
megatron's ``metadata.json`` and ``common.pt``. Every tensor is described by its global shape and
a list of chunks (offset, size); megatron-core reads whatever region each rank needs, so a
checkpoint written here as whole layers loads into any TP/PP layout.

``torch.distributed.checkpoint`` asks its planner for each item's data only when it writes that
item (``SavePlanner.resolve_data``); the planner below produces each chunk then, from a callable,
so the checkpoint never has to exist in memory. Each item goes to its own file
(``single_file_per_rank=False``): the file writer keeps every tensor of a file alive until the file
is closed, so one big file would hold the whole model by the end.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

# megatron-core's dist_checkpointing metadata for the torch_dist backend (serialization.py).
MEGATRON_METADATA = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}
MEGATRON_METADATA_FILE = "metadata.json"
MEGATRON_COMMON_FILE = "common.pt"


@dataclass
class Chunk:
    """A region of a tensor and the callable that produces its data (called once, when written)."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    produce: Callable[[], torch.Tensor]


@dataclass
class TensorSpec:
    """A checkpoint tensor: key, global shape, dtype and the chunks that tile it exactly."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: list[Chunk] = field(default_factory=list)


@dataclass
class ObjectSpec:
    """A megatron ShardedObject: its unique key (``key/shard_<offset>_<shape>``) and value."""

    key: str
    value: object


class _LazySavePlanner(DefaultSavePlanner):
    """Plans the given tensors and objects; produces each chunk's data only when it is written."""

    def __init__(self, tensors: list[TensorSpec], objects: list[ObjectSpec], on_written: Callable[[str, int], None]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._tensors = tensors
        self._objects = objects
        self._on_written = on_written
        self._producers: dict[tuple[str, tuple[int, ...]], tuple[TensorSpec, Chunk]] = {}
        self._values = {obj.key: obj.value for obj in objects}

    def create_local_plan(self) -> SavePlan:
        items = []
        for spec in self._tensors:
            properties = TensorProperties(dtype=spec.dtype)
            for chunk in spec.chunks:
                offsets = torch.Size(chunk.offsets)
                self._producers[(spec.key, tuple(offsets))] = (spec, chunk)
                items.append(
                    WriteItem(
                        index=MetadataIndex(spec.key, offsets),
                        type=WriteItemType.SHARD,
                        tensor_data=TensorWriteData(
                            chunk=ChunkStorageMetadata(offsets=offsets, sizes=torch.Size(chunk.sizes)),
                            properties=properties,
                            size=torch.Size(spec.shape),
                        ),
                    )
                )
        items += [WriteItem(index=MetadataIndex(obj.key), type=WriteItemType.BYTE_IO) for obj in self._objects]
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        fqn = write_item.index.fqn
        if write_item.type == WriteItemType.BYTE_IO:
            # megatron stores a ShardedObject as torch.save([data]) (strategies/torch.py).
            buffer = io.BytesIO()
            torch.save([self._values[fqn]], buffer)
            buffer.seek(0)
            return buffer
        spec, chunk = self._producers[(fqn, tuple(write_item.index.offset))]
        data = chunk.produce().to(spec.dtype).contiguous()
        if tuple(data.shape) != tuple(chunk.sizes):
            raise ValueError(f"{fqn} at {chunk.offsets}: produced shape {tuple(data.shape)}, expected {chunk.sizes}")
        self._on_written(fqn, data.numel() * data.element_size())
        return data


def write_torch_dist(
    ckpt_dir: str,
    tensors: list[TensorSpec],
    objects: list[ObjectSpec],
    on_written: Callable[[str, int], None] = lambda key, nbytes: None,
) -> None:
    """Write a torch_dist checkpoint into the (existing, empty) directory ``ckpt_dir``.

    ``metadata.json``, the file by which a directory is recognised as a checkpoint, is written last,
    so an interrupted conversion never leaves something that looks complete.

    Args:
        ckpt_dir: output directory.
        tensors: the tensors; their chunks must tile each tensor exactly (checked by DCP).
        objects: the ShardedObjects (megatron's ``_extra_state`` entries).
        on_written: called with (key, bytes) after each chunk is produced, for progress.
    """
    planner = _LazySavePlanner(tensors, objects, on_written)
    writer = dcp.FileSystemWriter(ckpt_dir, single_file_per_rank=False, thread_count=1)
    with warnings.catch_warnings():  # single-process use is intended, not a missing process group
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({}, storage_writer=writer, planner=planner, no_dist=True)
    # The common (non-sharded) state of a model-only checkpoint is empty.
    torch.save({}, os.path.join(ckpt_dir, MEGATRON_COMMON_FILE))
    with open(os.path.join(ckpt_dir, MEGATRON_METADATA_FILE), "w") as f:
        json.dump(MEGATRON_METADATA, f)
