"""Streaming safetensors: read one tensor (or a block of its rows), write a file tensor by tensor.

The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte
range) and the raw data. Reading with plain ``readinto`` (no memory map) keeps a file's pages out of
this process's resident set, and writing from a producer means a file never has to be held in
memory: both keep a conversion's peak memory at about one tensor, whatever the checkpoint's size.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from .errors import ConversionError

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
# The reference implementation refuses larger headers; a larger one means a corrupt file.
_MAX_HEADER_BYTES = 100_000_000


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    numel = 1
    for size in shape:
        numel *= size
    return numel * torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor of a safetensors file lives."""

    path: str
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    """Absolute byte offset of the data in the file."""
    nbytes: int


def read_header(path: str) -> dict[str, TensorInfo]:
    """The tensors of a safetensors file, by name.

    Raises:
        ConversionError: the file is not a valid safetensors file.
    """
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ConversionError(f"{path}: not a safetensors file (shorter than its header)")
        (length,) = struct.unpack("<Q", head)
        if length > _MAX_HEADER_BYTES:
            raise ConversionError(f"{path}: not a safetensors file (header of {length} bytes)")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConversionError(f"{path}: not a safetensors file ({err})") from None
    size = os.path.getsize(path)
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise ConversionError(f"{path}: tensor {name} has unsupported dtype {entry.get('dtype')!r}")
        shape = tuple(int(s) for s in entry["shape"])
        start, end = (int(x) for x in entry["data_offsets"])
        if end - start != _nbytes(dtype, shape) or 8 + length + end > size:
            raise ConversionError(f"{path}: tensor {name} has an inconsistent byte range (truncated file?)")
        tensors[name] = TensorInfo(path, name, dtype, shape, 8 + length + start, end - start)
    return tensors


def read_tensor(info: TensorInfo, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Read a tensor, or rows ``[start, stop)`` of its first dimension, into a new CPU tensor."""
    shape, offset, nbytes = info.shape, info.offset, info.nbytes
    if rows is not None:
        start, stop = rows
        if not shape or not 0 <= start <= stop <= shape[0]:
            raise ValueError(f"rows {rows} out of range for {info.name} of shape {shape}")
        row_bytes = nbytes // shape[0] if shape[0] else 0
        shape = (stop - start, *shape[1:])
        offset += start * row_bytes
        nbytes = (stop - start) * row_bytes
    out = torch.empty(nbytes, dtype=torch.uint8)
    view = memoryview(out.numpy())
    with open(info.path, "rb", buffering=0) as f:
        f.seek(offset)
        done = 0
        while done < nbytes:
            n = f.readinto(view[done:])
            if not n:
                raise ConversionError(f"{info.path}: unexpected end of file reading {info.name}")
            done += n
    return out.view(info.dtype).reshape(shape)


@dataclass(frozen=True)
class TensorEntry:
    """A tensor to be written: its name, dtype and shape (the data comes later, from a producer)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return _nbytes(self.dtype, self.shape)


# A producer returns the tensor, or its row blocks in order (so a huge tensor need not be whole).
Producer = Callable[[TensorEntry], "torch.Tensor | Iterable[torch.Tensor]"]


def _header_bytes(entries: list[TensorEntry], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt", **metadata}}
    offset = 0
    for entry in entries:
        if entry.dtype not in _NAMES:
            raise ConversionError(f"cannot write {entry.name}: dtype {entry.dtype} has no safetensors name")
        header[entry.name] = {
            "dtype": _NAMES[entry.dtype],
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    # Data starts 8-byte aligned, as the reference writer does (it pads the header with spaces).
    return raw + b" " * (-len(raw) % 8)


def write_safetensors(path: str, entries: list[TensorEntry], produce: Producer, metadata: dict[str, str] | None = None) -> None:
    """Write ``entries`` to ``path``, asking ``produce`` for each tensor's data in order.

    The file is written under a temporary name and renamed when complete.

    Raises:
        ConversionError: a produced tensor does not match its entry.
    """
    raw = _header_bytes(entries, metadata or {})
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for entry in entries:
            data = produce(entry)
            parts = [data] if isinstance(data, torch.Tensor) else data
            written = 0
            for part in parts:
                if part.dtype != entry.dtype:
                    raise ConversionError(f"{entry.name}: produced {part.dtype}, expected {entry.dtype}")
                flat = part.detach().contiguous().view(-1).view(torch.uint8)
                f.write(memoryview(flat.numpy()))
                written += flat.numel()
                del flat, part
            if written != entry.nbytes:
                raise ConversionError(f"{entry.name}: produced {written} bytes, expected {entry.nbytes} for shape {entry.shape}")
    os.replace(tmp, path)


def plan_shards(entries: list[TensorEntry], max_shard_bytes: int) -> list[list[TensorEntry]]:
    """Split ``entries`` (in order) into files of at most ``max_shard_bytes`` (a bigger tensor gets
    a file of its own)."""
    shards: list[list[TensorEntry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def shard_file_names(count: int) -> list[str]:
    """Hugging Face's names: ``model.safetensors``, or ``model-00001-of-00003.safetensors``, ..."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_index(out_dir: str, shards: list[list[TensorEntry]], names: list[str]) -> None:
    """``model.safetensors.index.json`` mapping every tensor to its file (only for several files)."""
    if len(shards) == 1:
        return
    index = {
        "metadata": {"total_size": sum(e.nbytes for shard in shards for e in shard)},
        "weight_map": {e.name: name for shard, name in zip(shards, names) for e in shard},
    }
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
        f.write("\n")
