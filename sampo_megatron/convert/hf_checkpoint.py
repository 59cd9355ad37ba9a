"""A Hugging Face model directory on disk: config, weights (read one tensor at a time), tokenizer files."""

from __future__ import annotations

import json
import os

import torch

from .errors import ConversionError
from .safetensors_io import TensorInfo, read_header, read_tensor

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"


def read_json(path: str, what: str) -> dict:
    """Parse a JSON object file, with errors that name the file."""
    if not os.path.isfile(path):
        raise ConversionError(f"missing file: {path} ({what})")
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path}: invalid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    return data


class _BinFile:
    """A PyTorch ``pytorch_model*.bin`` file, memory-mapped (tensors are read on access)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._tensors: dict[str, torch.Tensor] | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        if self._tensors is None:
            try:
                self._tensors = torch.load(self.path, map_location="cpu", mmap=True, weights_only=True)
            except Exception as err:  # torch raises many types for a corrupt or legacy file
                raise ConversionError(f"{self.path}: cannot read PyTorch weights ({err}); convert it to safetensors") from None
        return self._tensors


class HFCheckpoint:
    """A model directory as written by ``save_pretrained``.

    Weights are found through ``model.safetensors.index.json``, ``model.safetensors``, or the
    PyTorch equivalents; only headers are read up front.

    Raises:
        ConversionError: the directory, ``config.json``, the weights or a shard named by the
            index is missing, or a file is corrupt.
    """

    def __init__(self, path: str) -> None:
        if not os.path.isdir(path):
            raise ConversionError(f"{path}: no such directory (expected a Hugging Face model directory)")
        self.path = path
        self.config = read_json(os.path.join(path, CONFIG_FILE), "the model's config")
        generation = os.path.join(path, GENERATION_CONFIG_FILE)
        self.generation_config = read_json(generation, "generation config") if os.path.isfile(generation) else None
        self._safetensors: dict[str, TensorInfo] = {}
        self._bin: dict[str, _BinFile] = {}
        self._find_weights()

    def _file(self, name: str, index: str) -> str:
        path = os.path.join(self.path, name)
        if not os.path.isfile(path):
            raise ConversionError(f"missing file: {path} (named by {index})")
        return path

    def _find_weights(self) -> None:
        p = lambda name: os.path.join(self.path, name)  # noqa: E731
        if os.path.isfile(p("model.safetensors.index.json")):
            weight_map = read_json(p("model.safetensors.index.json"), "weights index").get("weight_map", {})
            headers = {f: read_header(self._file(f, "model.safetensors.index.json")) for f in sorted(set(weight_map.values()))}
            for name, file in weight_map.items():
                if name not in headers[file]:
                    raise ConversionError(f"{p(file)}: has no tensor {name} (named by model.safetensors.index.json)")
                self._safetensors[name] = headers[file][name]
        elif os.path.isfile(p("model.safetensors")):
            self._safetensors = read_header(p("model.safetensors"))
        elif os.path.isfile(p("pytorch_model.bin.index.json")):
            weight_map = read_json(p("pytorch_model.bin.index.json"), "weights index").get("weight_map", {})
            files = {f: _BinFile(self._file(f, "pytorch_model.bin.index.json")) for f in set(weight_map.values())}
            self._bin = {name: files[file] for name, file in weight_map.items()}
        elif os.path.isfile(p("pytorch_model.bin")):
            file = _BinFile(p("pytorch_model.bin"))
            self._bin = {name: file for name in file.tensors()}
        else:
            raise ConversionError(
                f"missing file: no weights in {self.path} (expected model.safetensors, "
                "model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json)"
            )

    def names(self) -> list[str]:
        """Every tensor name in the checkpoint."""
        return sorted([*self._safetensors, *self._bin])

    def __contains__(self, name: str) -> bool:
        return name in self._safetensors or name in self._bin

    def _bin_tensor(self, name: str) -> torch.Tensor:
        tensor = self._bin[name].tensors().get(name)
        if tensor is None:
            raise ConversionError(f"{self._bin[name].path}: has no tensor {name} (named by its index)")
        return tensor

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._safetensors:
            return self._safetensors[name].shape
        return tuple(self._bin_tensor(name).shape)

    def dtype(self, name: str) -> torch.dtype:
        if name in self._safetensors:
            return self._safetensors[name].dtype
        return self._bin_tensor(name).dtype

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor ``name`` (or rows ``[start, stop)`` of it) as a new CPU tensor."""
        if name in self._safetensors:
            return read_tensor(self._safetensors[name], rows)
        tensor = self._bin_tensor(name)
        return (tensor if rows is None else tensor[rows[0] : rows[1]]).clone()
