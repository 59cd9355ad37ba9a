"""The architecture a checkpoint carries: ``sampo_model.json`` next to its ``metadata.json``.

A torch_dist checkpoint holds tensors, not the model that owns them. The converter
(:mod:`sampo_megatron.convert`) and the trainer write this file into every checkpoint directory, so
that ``--load DIR`` / ``--ref-load DIR`` build the right model without the user repeating the
architecture flags, and so that the export back to Hugging Face knows what it is exporting::

    {
      "format": "sampo-megatron-model", "version": 1,
      "model": {...},        # ModelConfig fields that define the network (num_layers, ...)
      "hf": {...} | null,    # the source model's config.json / generation_config.json
      "tokenizer": "tokenizer" | "/abs/path" | null,   # relative paths are inside the checkpoint
      "dtype": "bfloat16" | null                       # dtype of the stored weights
    }
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import torch

from ..config import ModelConfig, RunConfig

ARCHITECTURE_FILE = "sampo_model.json"
FORMAT = "sampo-megatron-model"
VERSION = 1
# ModelConfig fields that are choices of a run, not properties of the weights.
_RUN_FIELDS = frozenset({"transformer_impl", "local_attention", "init_method_std"})


def architecture_fields() -> list[str]:
    """The ModelConfig fields a checkpoint's architecture sets."""
    return [f.name for f in dataclasses.fields(ModelConfig) if f.name not in _RUN_FIELDS]


@dataclass
class CheckpointArchitecture:
    """What ``sampo_model.json`` holds (see the module docstring)."""

    model: dict
    """ModelConfig architecture fields."""
    hf: dict | None = None
    """``{"config": {...}, "generation_config": {...} | None}`` of the Hugging Face source model."""
    tokenizer: str | None = None
    """Tokenizer directory (absolute once read)."""
    dtype: str | None = None
    """torch dtype name of the stored weights, e.g. ``bfloat16``."""

    def model_config(self, base: ModelConfig | None = None) -> ModelConfig:
        """``base`` (default: a default ModelConfig) with this architecture's fields."""
        return dataclasses.replace(base or ModelConfig(), **self.model)


def model_architecture(model: ModelConfig) -> dict:
    """The architecture fields of ``model``, as plain data."""
    return {name: getattr(model, name) for name in architecture_fields()}


def write_architecture(ckpt_dir: str, arch: CheckpointArchitecture) -> str:
    """Write ``ckpt_dir/sampo_model.json`` atomically; returns its path.

    A tokenizer path inside ``ckpt_dir`` is stored relative to it, so the directory can be moved.
    """
    tokenizer = arch.tokenizer
    if tokenizer is not None:
        tokenizer = os.path.abspath(tokenizer)
        inside = os.path.relpath(tokenizer, os.path.abspath(ckpt_dir))
        if not inside.startswith(os.pardir):
            tokenizer = inside
    data = {
        "format": FORMAT,
        "version": VERSION,
        "model": arch.model,
        "hf": arch.hf,
        "tokenizer": tokenizer,
        "dtype": arch.dtype,
    }
    path = os.path.join(ckpt_dir, ARCHITECTURE_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return path


def read_architecture(ckpt_dir: str) -> CheckpointArchitecture | None:
    """The architecture in ``ckpt_dir/sampo_model.json``, or ``None`` when the file is absent.

    Raises:
        ValueError: the file is not a sampo-megatron architecture file, or names fields this
            version does not know (written by a newer version).
    """
    path = os.path.join(ckpt_dir, ARCHITECTURE_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path}: not a sampo-megatron architecture file (format {FORMAT!r})")
    if data.get("version", 0) > VERSION:
        raise ValueError(f"{path}: version {data['version']} is newer than this sampo-megatron ({VERSION})")
    model = data.get("model") or {}
    unknown = sorted(set(model) - set(architecture_fields()))
    if unknown:
        raise ValueError(f"{path}: unknown model fields {unknown} (written by a newer sampo-megatron?)")
    tokenizer = data.get("tokenizer")
    if tokenizer is not None and not os.path.isabs(tokenizer):
        tokenizer = os.path.join(os.path.abspath(ckpt_dir), tokenizer)
    return CheckpointArchitecture(model=model, hf=data.get("hf"), tokenizer=tokenizer, dtype=data.get("dtype"))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def adopt_architecture(
    model: ModelConfig, explicit: frozenset[str] | None, sources: dict[str, str | None]
) -> CheckpointArchitecture | None:
    """Set ``model``'s architecture fields from the checkpoints the run starts from.

    Args:
        model: the run's ModelConfig, updated in place.
        explicit: names of the fields the user set (``RunConfig.explicit_flags``); ``None`` when
            unknown, in which case a field that differs from the ModelConfig default counts as set.
        sources: flag -> checkpoint directory (already resolved; ``None`` entries are skipped),
            e.g. ``{"--load": ..., "--ref-load": ...}``.

    Returns:
        The architecture found (the first source's), or ``None`` when no source carries one.

    Raises:
        ValueError: two sources carry different architectures, or a flag the user set disagrees
            with the checkpoint's architecture.
    """
    found: list[tuple[str, str, CheckpointArchitecture]] = []
    for flag, ckpt_dir in sources.items():
        if ckpt_dir and (arch := read_architecture(ckpt_dir)) is not None:
            found.append((flag, ckpt_dir, arch))
    if not found:
        return None
    flag0, dir0, arch0 = found[0]
    reference = model_architecture(arch0.model_config())
    for flag, ckpt_dir, arch in found[1:]:
        other = model_architecture(arch.model_config())
        diff = {k: (reference[k], other[k]) for k in reference if reference[k] != other[k]}
        if diff:
            details = ", ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in sorted(diff.items()))
            raise ValueError(f"{flag0} {dir0} and {flag} {ckpt_dir} hold different architectures ({details})")

    defaults = ModelConfig()
    conflicts = []
    for name, value in reference.items():
        current = getattr(model, name)
        given = name in explicit if explicit is not None else current != getattr(defaults, name)
        if given and current != value:
            conflicts.append(f"{_flag(name)} {current!r} (checkpoint: {value!r})")
    if conflicts:
        raise ValueError(
            f"{flag0} {dir0} carries its model architecture ({ARCHITECTURE_FILE}) and these flags "
            f"disagree with it: {'; '.join(conflicts)}. Leave them out: the checkpoint sets them."
        )
    for name, value in reference.items():
        setattr(model, name, value)
    return arch0


def run_architecture(
    cfg: RunConfig, vocab_size: int, source: CheckpointArchitecture | None, dtype: torch.dtype
) -> CheckpointArchitecture:
    """The architecture of a checkpoint the trainer saves.

    Args:
        cfg: the run's configuration (its ModelConfig, with the architecture already adopted).
        vocab_size: the model's vocabulary (the ModelConfig's, or the tokenizer's size).
        source: the architecture of the checkpoint the run started from: its Hugging Face config
            travels on, so the trained model exports with the source's config.
        dtype: dtype of the saved model weights.
    """
    model = dataclasses.replace(cfg.model, vocab_size=vocab_size)
    return CheckpointArchitecture(
        model=model_architecture(model),
        hf=source.hf if source is not None else None,
        tokenizer=cfg.data.tokenizer_model,
        dtype=str(dtype).removeprefix("torch."),
    )
