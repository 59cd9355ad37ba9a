"""Hugging Face model directory -> megatron-core torch_dist checkpoint the trainer loads.

Output directory::

    OUT/metadata.json, .metadata, __0_*.distcp, common.pt   the torch_dist checkpoint (model weights)
    OUT/sampo_model.json                                     architecture + source HF config
    OUT/tokenizer/                                           the source's tokenizer files
    OUT/manifest.json                                        size and SHA-256 of every file (checked on load)

``--load OUT`` and ``--ref-load OUT`` then build the right model (no architecture flags) and
``--tokenizer-model`` defaults to ``OUT/tokenizer``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable

import torch

from ..checkpoint import digest_files, list_files, write_manifest
from ..config import ModelConfig
from ..data.tokenizer import copy_tokenizer
from ..models.architecture import ARCHITECTURE_FILE, CheckpointArchitecture, model_architecture, write_architecture
from ..models.gpt import padded_vocab_size
from ..validation import split_rule_problems
from .errors import ConversionError
from .families import model_from_hf
from .hf_checkpoint import CONFIG_FILE, HFCheckpoint
from .layouts import EXTRA_STATE_MODULES, IGNORED_HF_SUFFIXES, LAYER_PREFIX, Rule, fuse_qkv, rules_for
from .progress import Progress, stderr_lines
from .torch_dist_writer import Chunk, ObjectSpec, TensorSpec, write_torch_dist

TOKENIZER_DIR = "tokenizer"
# Embedding rows are written (and read) in blocks of about this size, so a large vocabulary is
# never held whole.
BLOCK_BYTES = 32 * 2**20


def check_layout(model: ModelConfig, tp: int, pp: int, vpp_layers: int | None) -> None:
    """Refuse a TP / PP / VPP layout megatron-core cannot split this model into (the trainer's rules,
    sampo_megatron/validation.py).

    Raises:
        ConversionError: naming what does not divide what.
    """
    problems = split_rule_problems(model, tp, pp, vpp_layers)
    if problems:
        raise ConversionError("cannot use this parallel layout: " + "; ".join(problems))


def _check_hf_tensors(hf: HFCheckpoint, rules: list[Rule], model: ModelConfig) -> None:
    expected: dict[str, tuple[int, ...]] = {}
    for rule in rules:
        for layer in range(model.num_layers) if rule.per_layer else [None]:
            expected.update(zip(rule.hf_names(layer), rule.shapes))
    missing = [name for name in expected if name not in hf]
    if missing:
        raise ConversionError(f"{hf.path}: the weights lack {len(missing)} tensors the config implies, e.g. {missing[:5]}")
    wrong = [(n, hf.shape(n), s) for n, s in expected.items() if tuple(hf.shape(n)) != tuple(s)]
    if wrong:
        name, got, want = wrong[0]
        raise ConversionError(f"{hf.path}: {name} has shape {got} but config.json implies {want} ({len(wrong)} tensors differ)")
    tied = not model.untie_embeddings_and_output_weights
    unexpected = [
        n for n in hf.names()
        if n not in expected and not n.endswith(IGNORED_HF_SUFFIXES) and not (tied and n == "lm_head.weight")
    ]  # fmt: skip
    if unexpected:
        raise ConversionError(
            f"{hf.path}: {len(unexpected)} tensors are not part of the architecture and would be dropped, e.g. {unexpected[:5]}"
        )


def _tensor_spec(rule: Rule, hf: HFCheckpoint, model: ModelConfig, padded: int, dtype: torch.dtype | None) -> TensorSpec:
    first = rule.hf_names(0 if rule.per_layer else None)[0]
    spec_dtype = dtype or hf.dtype(first)
    shape = rule.megatron_shape(model, padded)
    if not rule.per_layer:
        spec = TensorSpec(rule.megatron, shape, spec_dtype)
        if rule.kind == "vocab":
            (name,), vocab = rule.hf_names(None), model.vocab_size
            row_bytes = max(1, shape[1] * torch.empty((), dtype=spec_dtype).element_size())
            block = max(1, BLOCK_BYTES // row_bytes)
            for start in range(0, vocab, block):
                stop = min(vocab, start + block)
                spec.chunks.append(Chunk((start, 0), (stop - start, shape[1]), lambda n=name, r=(start, stop): hf.read(n, r)))
            if padded > vocab:  # the TP padding rows: never a target, zero like megatron's own padding
                spec.chunks.append(Chunk((vocab, 0), (padded - vocab, shape[1]), lambda: torch.zeros(padded - vocab, shape[1])))
        else:
            (name,) = rule.hf_names(None)
            spec.chunks.append(Chunk((0,) * len(shape), shape, lambda n=name: hf.read(n)))
        return spec

    spec = TensorSpec(rule.megatron, (model.num_layers, *shape), spec_dtype)
    rest = (0,) * (len(shape) - 1)
    for layer in range(model.num_layers):
        names = rule.hf_names(layer)
        if rule.kind == "glu":
            # [gate; up] as two chunks: each is read straight into place, no concatenation copy.
            rows = rule.shapes[0][0]
            for i, name in enumerate(names):
                spec.chunks.append(Chunk((layer, i * rows, *rest), (1, rows, *shape[1:]), lambda n=name: hf.read(n)[None]))
        elif rule.kind == "qkv":
            spec.chunks.append(
                Chunk((layer, 0, *rest), (1, *shape), lambda ns=names: fuse_qkv(*(hf.read(n) for n in ns), model)[None])
            )
        else:
            (name,) = names
            spec.chunks.append(Chunk((layer, 0, *rest), (1, *shape), lambda n=name: hf.read(n)[None]))
    return spec


def _extra_states(model: ModelConfig) -> list[ObjectSpec]:
    # megatron's ShardedObject unique key is "<key>/shard_<layer>_<layers>"; the local spec's
    # linear layers keep no extra state (None).
    layers = model.num_layers
    return [
        ObjectSpec(f"{LAYER_PREFIX}{module}._extra_state/shard_{i}_{layers}", None)
        for i in range(layers)
        for module in EXTRA_STATE_MODULES
    ]


def _prepare_output(save_dir: str, overwrite: bool) -> None:
    if os.path.isdir(save_dir) and os.listdir(save_dir):
        is_ours = any(os.path.exists(os.path.join(save_dir, f)) for f in (ARCHITECTURE_FILE, "metadata.json", ".metadata"))
        if not overwrite:
            raise ConversionError(f"{save_dir}: exists and is not empty (pass --overwrite to replace a converted checkpoint)")
        if not is_ours:
            raise ConversionError(f"{save_dir}: refusing to overwrite a directory that holds no converted checkpoint")
        shutil.rmtree(save_dir)
    os.makedirs(save_dir, exist_ok=True)


def convert_hf_to_megatron(
    hf_dir: str,
    save_dir: str,
    *,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    num_layers_per_virtual_pipeline_stage: int | None = None,
    make_vocab_size_divisible_by: int = 128,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    emit: Callable[[str], None] | None = stderr_lines,
) -> ModelConfig:
    """Convert a Hugging Face model directory into a torch_dist checkpoint (see the module docstring).

    The checkpoint holds full tensors and loads into any layout; the parallel sizes are checked
    against the model and set the vocabulary padding (a multiple of
    ``make_vocab_size_divisible_by x TP``, as megatron pads).

    Args:
        hf_dir: the Hugging Face model directory (config.json, safetensors or .bin weights, tokenizer).
        save_dir: output directory (created; must be empty unless ``overwrite``).
        tensor_model_parallel_size: TP size the checkpoint is meant for.
        pipeline_model_parallel_size: PP size the checkpoint is meant for.
        num_layers_per_virtual_pipeline_stage: VPP layers per virtual stage, if interleaving.
        make_vocab_size_divisible_by: vocabulary padding unit (per TP rank).
        dtype: dtype to store; default: each tensor's own.
        overwrite: replace an existing converted checkpoint in ``save_dir``.
        emit: sink for progress lines (``None``: silent).

    Returns:
        The model's architecture.

    Raises:
        ConversionError: unsupported architecture, a layout that does not divide the model, a
            missing or inconsistent file.
    """
    hf = HFCheckpoint(hf_dir)
    family, model = model_from_hf(hf.config, os.path.join(hf_dir, CONFIG_FILE))
    model.make_vocab_size_divisible_by = make_vocab_size_divisible_by
    check_layout(model, tensor_model_parallel_size, pipeline_model_parallel_size, num_layers_per_virtual_pipeline_stage)
    padded = padded_vocab_size(model.vocab_size, make_vocab_size_divisible_by, tensor_model_parallel_size)
    rules = rules_for(family.layout, model)
    _check_hf_tensors(hf, rules, model)
    tensors = [_tensor_spec(rule, hf, model, padded, dtype) for rule in rules]

    _prepare_output(save_dir, overwrite)
    tokenizer_dir = os.path.join(save_dir, TOKENIZER_DIR)
    progress = Progress("hf->megatron", sum(_nbytes(t) for t in tensors), emit)
    progress.message(
        f"{family.architecture}: {model.num_layers} layers, hidden {model.hidden_size}, vocabulary {model.vocab_size} "
        f"padded to {padded} for TP {tensor_model_parallel_size} -> {save_dir}"
    )
    if not copy_tokenizer(hf_dir, tokenizer_dir):
        tokenizer_dir = None
        progress.message(f"warning: no tokenizer files in {hf_dir}; give the trainer --tokenizer-model")
    write_architecture(
        save_dir,
        CheckpointArchitecture(
            model=model_architecture(model),
            hf={"config": hf.config, "generation_config": hf.generation_config},
            tokenizer=tokenizer_dir,
            dtype=str(tensors[0].dtype).removeprefix("torch."),
        ),
    )
    write_torch_dist(save_dir, tensors, _extra_states(model), on_written=lambda key, n: progress.advance(n, key))
    # Size and SHA-256 of every file, verified before a load (sampo_megatron/checkpoint/manifest.py).
    write_manifest(save_dir, digest_files(save_dir, list_files(save_dir)))
    progress.message("done")
    return model


def _nbytes(spec: TensorSpec) -> int:
    numel = 1
    for size in spec.shape:
        numel *= size
    return numel * torch.empty((), dtype=spec.dtype).element_size()
