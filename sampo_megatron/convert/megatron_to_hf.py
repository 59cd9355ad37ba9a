"""megatron-core torch_dist checkpoint (converted, or saved by the trainer) -> Hugging Face directory.

Writes sharded safetensors (``model-0000k-of-0000n.safetensors`` + index), ``config.json``,
``generation_config.json`` and the tokenizer, loadable with
``transformers.AutoModelForCausalLM.from_pretrained``. The architecture comes from the checkpoint's
``sampo_model.json``; the TP vocabulary padding is dropped. Tensors are read one layer at a time and
written as they come, so memory stays at about one layer.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator

import torch

from ..checkpoint import CheckpointDamagedError, UnsafeCheckpointError, check_torch_dist_pickles, read_manifest, verify_files
from ..data.tokenizer import copy_tokenizer, tokenizer_files
from ..models.architecture import read_architecture
from .errors import ConversionError
from .families import FAMILIES, Family, export_hf_config, family_of, infer_family
from .hf_checkpoint import CONFIG_FILE, GENERATION_CONFIG_FILE
from .layouts import Rule, rules_for, to_hf
from .progress import Progress, stderr_lines
from .safetensors_io import TensorEntry, plan_shards, shard_file_names, write_index, write_safetensors
from .torch_dist_reader import TorchDistReader, resolve_checkpoint_dir

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9


def _dtype_named(name: object) -> torch.dtype | None:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) else None


def _check_shapes(reader: TorchDistReader, rules: list[Rule], model, layers: int) -> None:
    for rule in rules:
        if rule.megatron not in reader:
            raise ConversionError(f"{reader.path}: the checkpoint has no {rule.megatron} (is it a model of this architecture?)")
        got = reader.shape(rule.megatron)
        want = rule.megatron_shape(model, padded_vocab=got[0] if rule.kind == "vocab" else 0)
        if rule.per_layer:
            want = (layers, *want)
        if got != want or (rule.kind == "vocab" and got[0] < model.vocab_size):
            raise ConversionError(f"{reader.path}: {rule.megatron} has shape {got}, the architecture implies {want}")


class _LayerCache:
    """Produces Hugging Face tensors in file order, reading each megatron tensor (one layer) once
    and keeping it only until all its Hugging Face parts are written."""

    def __init__(self, reader: TorchDistReader, model, dtype: torch.dtype, sources: dict[str, tuple[Rule, int | None]]) -> None:
        self.reader, self.model, self.dtype, self.sources = reader, model, dtype, sources
        self._pending: dict[tuple[str, int | None], dict[str, torch.Tensor]] = {}

    def _vocab_blocks(self, rule: Rule) -> Iterator[torch.Tensor]:
        # Along the stored chunks, so each is read once; rows past the vocabulary are TP padding.
        vocab = self.model.vocab_size
        bounds = [b for b in self.reader.chunk_row_bounds(rule.megatron) if b < vocab] + [vocab]
        for start, stop in zip(bounds, bounds[1:]):
            yield self.reader.read_rows(rule.megatron, start, stop).to(self.dtype)

    def __call__(self, entry: TensorEntry) -> torch.Tensor | Iterator[torch.Tensor]:
        rule, layer = self.sources[entry.name]
        if rule.kind == "vocab":
            return self._vocab_blocks(rule)
        slot = (rule.megatron, layer)
        if slot not in self._pending:
            tensor = self.reader.read_layer(rule.megatron, layer) if rule.per_layer else self.reader.read_full(rule.megatron)
            self._pending[slot] = dict(zip(rule.hf_names(layer), to_hf(rule, tensor, self.model)))
        parts = self._pending[slot]
        tensor = parts.pop(entry.name).to(self.dtype)
        if not parts:
            del self._pending[slot]
        return tensor


def _entries(rules: list[Rule], layers: int, dtype: torch.dtype) -> tuple[list[TensorEntry], dict[str, tuple[Rule, int | None]]]:
    """Hugging Face tensors in the order of a ``save_pretrained`` file: embeddings, layers, head."""
    entries, sources = [], {}

    def add(rule: Rule, layer: int | None) -> None:
        for name, shape in zip(rule.hf_names(layer), rule.shapes):
            entries.append(TensorEntry(name, dtype, tuple(shape)))
            sources[name] = (rule, layer)

    head = [r for r in rules if not r.per_layer and r.megatron != "embedding.word_embeddings.weight"]
    for rule in rules:
        if rule.megatron == "embedding.word_embeddings.weight":
            add(rule, None)
    for layer in range(layers):
        for rule in rules:
            if rule.per_layer:
                add(rule, layer)
    for rule in head:
        add(rule, None)
    return entries, sources


def _generation_config(config: dict) -> dict:
    import transformers

    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    data: dict = {k: config[k] for k in keys if config.get(k) is not None}
    return {"_from_model_config": True, **data, "transformers_version": transformers.__version__}


def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def _check_files(ckpt: str, trust_checkpoint: bool) -> None:
    """Refuse a damaged checkpoint (manifest mismatch) and, unless trusted, pickles outside the
    allow-list, before anything of it is unpickled."""
    try:
        manifest = read_manifest(ckpt)
        problems = verify_files(ckpt, manifest, sorted(manifest)) if manifest is not None else []
        if not trust_checkpoint:
            check_torch_dist_pickles(ckpt)
    except (CheckpointDamagedError, UnsafeCheckpointError) as err:
        problems = [str(err)]
    if problems:
        raise ConversionError(f"{ckpt} cannot be exported: " + "; ".join(problems))


def convert_megatron_to_hf(
    load: str,
    hf_out: str,
    *,
    dtype: torch.dtype | None = None,
    tokenizer: str | None = None,
    architecture: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    max_position_embeddings: int = 4096,
    overwrite: bool = False,
    trust_checkpoint: bool = False,
    emit: Callable[[str], None] | None = stderr_lines,
) -> str:
    """Export a checkpoint to a Hugging Face model directory (see the module docstring).

    Args:
        load: a checkpoint directory, or a trainer ``--save`` directory (its latest checkpoint).
        hf_out: output directory (created; must be empty unless ``overwrite``).
        dtype: dtype of the exported weights; default: the source model's (its config.json
            ``dtype``), else the checkpoint's.
        tokenizer: tokenizer directory to copy; default: the one the checkpoint names.
        architecture: Hugging Face class to export as; default: the source model's, else inferred.
        max_shard_bytes: maximum size of one safetensors file.
        max_position_embeddings: for a config written without a source config.
        overwrite: replace the files in an existing ``hf_out``.
        trust_checkpoint: skip the allow-list check of the checkpoint's pickles (checkpoint/safe_pickle.py);
            its files are verified against its manifest either way, when it has one.
        emit: sink for progress lines (``None``: silent).

    Returns:
        The checkpoint directory that was exported.

    Raises:
        ConversionError: no checkpoint or no ``sampo_model.json`` there, an unknown architecture,
            or tensors that do not match the architecture.
    """
    ckpt = resolve_checkpoint_dir(load)
    arch = read_architecture(ckpt)  # JSON: safe to read before the checks
    if arch is None:
        raise ConversionError(f"{ckpt}: missing file sampo_model.json (the architecture); only checkpoints written by "
                              "the converter or by this trainer can be exported")  # fmt: skip
    _check_files(ckpt, trust_checkpoint)
    model = arch.model_config()
    if model.vocab_size is None:
        raise ConversionError(f"{ckpt}/sampo_model.json: no vocab_size")
    source = (arch.hf or {}).get("config")
    if architecture is not None:
        if architecture not in FAMILIES:
            raise ConversionError(f"unsupported architecture {architecture!r}; supported: {', '.join(FAMILIES)}")
        family: Family = FAMILIES[architecture]
    else:
        family = family_of(source, f"{ckpt}/sampo_model.json") if source else infer_family(model)
    reader = TorchDistReader(ckpt)
    source_dtype = _dtype_named((source or {}).get("dtype", (source or {}).get("torch_dtype")))
    out_dtype = dtype or source_dtype or reader.dtype("embedding.word_embeddings.weight")
    config = export_hf_config(model, family, source, out_dtype, max_position_embeddings)
    rules = rules_for(family.layout, model)
    _check_shapes(reader, rules, model, model.num_layers)

    if os.path.isdir(hf_out) and os.listdir(hf_out) and not overwrite:
        raise ConversionError(f"{hf_out}: exists and is not empty (pass --overwrite to replace its files)")
    os.makedirs(hf_out, exist_ok=True)
    for stale in os.listdir(hf_out):  # shards of an earlier export would confuse from_pretrained
        if stale.endswith((".safetensors", ".safetensors.index.json")):
            os.remove(os.path.join(hf_out, stale))
    entries, sources = _entries(rules, model.num_layers, out_dtype)
    shards = plan_shards(entries, max_shard_bytes)
    names = shard_file_names(len(shards))
    progress = Progress("megatron->hf", sum(e.nbytes for e in entries), emit)
    progress.message(
        f"{ckpt} -> {family.architecture} in {hf_out} ({len(shards)} file(s), {str(out_dtype).removeprefix('torch.')})"
    )
    produce = _LayerCache(reader, model, out_dtype, sources)

    def produce_and_count(entry: TensorEntry):
        data = produce(entry)
        if isinstance(data, torch.Tensor):
            progress.advance(entry.nbytes, entry.name)
            return data
        return _counted(data, progress, entry.name)

    for shard, name in zip(shards, names):
        write_safetensors(os.path.join(hf_out, name), shard, produce_and_count, metadata={"format": "pt"})
    write_index(hf_out, shards, names)
    _write_json(os.path.join(hf_out, CONFIG_FILE), config)
    generation = (arch.hf or {}).get("generation_config") or _generation_config(config)
    _write_json(os.path.join(hf_out, GENERATION_CONFIG_FILE), generation)
    tok = tokenizer or arch.tokenizer
    if tok and os.path.isdir(tok) and tokenizer_files(tok):
        copy_tokenizer(tok, hf_out)
    elif tok and os.path.isfile(tok):  # a sentencepiece model file
        shutil.copyfile(tok, os.path.join(hf_out, os.path.basename(tok)))
    else:
        progress.message(f"warning: no tokenizer copied ({tok or 'none recorded'}); pass --tokenizer")
    progress.message("done")
    return ckpt


def _counted(blocks: Iterator[torch.Tensor], progress: Progress, what: str) -> Iterator[torch.Tensor]:
    for block in blocks:
        progress.advance(block.numel() * block.element_size(), what)
        yield block
