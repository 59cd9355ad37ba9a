"""Read a torch_dist checkpoint's pickles with an allow-list before torch reads them without one.

A torch_dist checkpoint holds two kinds of pickle that torch loads with no restriction:
``.metadata`` (``FileSystemReader.read_metadata`` calls ``pickle.load``) and the non-tensor items
inside the ``.distcp`` files (``DefaultLoadPlanner.load_bytes`` calls
``torch.load(weights_only=False)``). Either can run arbitrary code when a checkpoint from elsewhere
is loaded. (``common.pt`` is read by megatron-core with ``torch.load``'s default, which is
``weights_only=True`` on the torch versions this project supports.)

:func:`check_torch_dist_pickles` unpickles both first with a restricted unpickler: ``.metadata``
may name only the torch.distributed.checkpoint metadata classes, ``torch.Size``, torch dtypes and
layouts and a ``pathlib`` path; the byte items only what ``torch.load(weights_only=True)`` admits.
Unpickling calls exactly the globals the pickle names, so when the restricted pass succeeds, the
unrestricted one that follows calls only admitted ones. The check runs before every load (trainer, generation,
export); a checkpoint it refuses is not opened at all. The files must not change between the check
and the load (a checkpoint on storage that someone else can write to while it is being loaded is
outside this protection), which docs/checkpoints.md states as the trust boundary.
"""

from __future__ import annotations

import io
import os
import pickle

import torch

METADATA_FILE = ".metadata"

# (module, name) pairs torch_dist metadata consists of (torch 2.x FileSystemWriter + megatron's planner).
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {"SavePlan", "WriteItem", "WriteItemType", "TensorWriteData"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "collections": {"OrderedDict"},
    "pathlib": {"PosixPath", "PurePosixPath"},  # StorageMeta.checkpoint_id as torch's writer records it
}  # fmt: skip


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint's pickled data names something outside the allow-list."""


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str) -> None:
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str):
        allowed = name in _METADATA_CLASSES.get(module, ())
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            allowed = True
        if not allowed:
            raise UnsafeCheckpointError(
                f"{self._path}: the pickle names {module}.{name}, which torch_dist metadata never holds: refusing to "
                "load this checkpoint (it could run code). If you trust its source, pass --trust-checkpoint"
            )
        return super().find_class(module, name)


def _load_metadata(path: str):
    with open(path, "rb") as f:
        try:
            return _MetadataUnpickler(f, path).load()
        except UnsafeCheckpointError:
            raise
        except Exception as err:  # a damaged pickle raises many types
            raise UnsafeCheckpointError(
                f"{path}: not a readable torch_dist metadata pickle ({type(err).__name__}: {err})"
            ) from None


def check_torch_dist_pickles(ckpt_dir: str) -> None:
    """Unpickle ``ckpt_dir``'s ``.metadata`` and its byte items with allow-lists.

    Raises:
        UnsafeCheckpointError: a pickle names a global outside the allow-list, or cannot be read;
            the message names the file (and item).
    """
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

    path = os.path.join(ckpt_dir, METADATA_FILE)
    if not os.path.isfile(path):
        return  # not a torch_dist checkpoint; the loader reports that
    metadata = _load_metadata(path)
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"{path}: holds a {type(metadata).__name__}, not torch_dist Metadata")
    byte_items = {fqn for fqn, item in metadata.state_dict_metadata.items() if isinstance(item, BytesStorageMetadata)}
    for index, info in (metadata.storage_data or {}).items():
        if index.fqn not in byte_items:
            continue
        where = f"{os.path.join(ckpt_dir, info.relative_path)} (item {index.fqn})"
        if getattr(info, "transform_descriptors", None):
            raise UnsafeCheckpointError(
                f"{where}: transformed (e.g. compressed) items cannot be checked; pass --trust-checkpoint"
            )
        with open(os.path.join(ckpt_dir, info.relative_path), "rb") as f:
            f.seek(info.offset)
            blob = f.read(info.length)
        try:
            torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        except Exception as err:
            raise UnsafeCheckpointError(
                f"{where}: not loadable with torch.load(weights_only=True) ({str(err).splitlines()[0]}); refusing to "
                "load it unrestricted. If you trust the checkpoint's source, pass --trust-checkpoint"
            ) from None
