"""Read regions of tensors (one layer, a block of rows) from a megatron-core torch_dist checkpoint.

Whatever layout wrote the checkpoint (TP/PP shards as chunks, or whole layers from the converter),
``torch.distributed.checkpoint`` assembles any requested region from the chunks that overlap it.
No process group and no megatron import is needed: the planner below asks only for the requested
regions, so the export holds about one layer in memory.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from ..checkpoint.layout import iteration_dir, marked_iteration
from .errors import ConversionError


def resolve_checkpoint_dir(path: str) -> str:
    """The torch_dist checkpoint directory ``path`` designates (via its marker, or itself).

    Raises:
        ConversionError: no checkpoint there.
    """
    try:
        iteration = marked_iteration(path)
    except ValueError as err:
        raise ConversionError(str(err)) from None
    if iteration is not None:
        path = iteration_dir(path, iteration)
    if not os.path.isfile(os.path.join(path, "metadata.json")) or not os.path.isfile(os.path.join(path, ".metadata")):
        raise ConversionError(f"{path}: no torch_dist checkpoint there (missing file metadata.json or .metadata)")
    return path


class _RegionLoadPlanner(DefaultLoadPlanner):
    """Loads the requested regions ``{(key, offsets): destination tensor}`` and nothing else."""

    def __init__(self, regions: dict[tuple[str, tuple[int, ...]], torch.Tensor]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._regions = regions

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        self.metadata = metadata
        self.is_coordinator = is_coordinator

    def create_local_plan(self) -> LoadPlan:
        items = []
        for (key, offsets), dest in self._regions.items():
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=dest.shape)
            items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [chunk])
        return LoadPlan(items)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return self._regions[(index.fqn, tuple(index.offset))]

    def load_bytes(self, read_item, value) -> None:  # only tensors are requested
        raise AssertionError(f"unexpected object read {read_item.dest_index.fqn}")


class TorchDistReader:
    """Tensor metadata of a torch_dist checkpoint, and reads of regions of its tensors."""

    def __init__(self, ckpt_dir: str) -> None:
        self.path = ckpt_dir
        self._storage = dcp.FileSystemReader(ckpt_dir)
        self._tensors = {
            key: md
            for key, md in self._storage.read_metadata().state_dict_metadata.items()
            if isinstance(md, TensorStorageMetadata)
        }

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self._tensors[key].properties.dtype

    def chunk_row_bounds(self, key: str) -> list[int]:
        """Sorted row offsets at which the stored chunks of ``key`` start (reading along them reads
        each stored chunk once)."""
        return sorted({int(chunk.offsets[0]) for chunk in self._tensors[key].chunks})

    def read(self, requests: list[tuple[str, tuple[int, ...], tuple[int, ...]]]) -> list[torch.Tensor]:
        """Read regions ``(key, offsets, sizes)``, in the checkpoint's dtype."""
        regions = {}
        for key, offsets, sizes in requests:
            if key not in self._tensors:
                raise ConversionError(f"{self.path}: checkpoint has no tensor {key}")
            regions[(key, tuple(offsets))] = torch.empty(sizes, dtype=self.dtype(key))
        with warnings.catch_warnings():  # single-process use is intended, not a missing process group
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({}, storage_reader=self._storage, planner=_RegionLoadPlanner(regions), no_dist=True)
        return [regions[(key, tuple(offsets))] for key, offsets, _ in requests]

    def read_full(self, key: str) -> torch.Tensor:
        """A whole tensor."""
        shape = self.shape(key)
        (tensor,) = self.read([(key, (0,) * len(shape), shape)])
        return tensor

    def read_layer(self, key: str, layer: int) -> torch.Tensor:
        """Layer ``layer`` of a stacked ``decoder.layers.*`` tensor."""
        shape = self.shape(key)
        (tensor,) = self.read([(key, (layer,) + (0,) * (len(shape) - 1), (1, *shape[1:]))])
        return tensor[0]

    def read_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of a (non-stacked) tensor."""
        shape = self.shape(key)
        (tensor,) = self.read([(key, (start,) + (0,) * (len(shape) - 1), (stop - start, *shape[1:]))])
        return tensor
