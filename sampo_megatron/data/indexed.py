"""Preference pairs in megatron-core indexed datasets (``.bin`` / ``.idx``).

A dataset with prefix ``P`` is five files:

- ``P_prompt``, ``P_chosen``, ``P_rejected`` (``.bin`` + ``.idx``): one sequence (and document) per
  pair, the untruncated token ids (prompt with BOS and header, responses with EOS); ``uint16`` when
  the vocabulary fits, else ``int32`` (megatron-core's ``DType.optimal_dtype``);
- ``P_sample`` (``.bin`` + ``.idx``, ``int64``): per pair ``[sample_id, source_position,
  keep_prefix, keep_suffix]`` (``source_position`` is the line or row in the input file);
- ``P.json``: metadata (tokenizer fingerprint, layout, template, counts). It is written last, so its
  presence marks a complete dataset; ``--data-path P`` is recognised by it.

Truncation to ``--seq-length`` and the model-dependent checks run when the data is loaded, with the
same :func:`~sampo_megatron.data.pairs.finalize_pair` the raw reader uses, so one preprocessed
dataset serves any sequence length and the batches equal those from the raw file bit for bit.
megatron-core is imported only here, lazily.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from .errors import BadRecord, BadRecordLog, Location
from .pairs import EncodedPair, PreferencePair, finalize_pair, room_problem, truncation_plan
from .tokenizer import Tokenizer

FORMAT = "sampo-preference-indexed"
VERSION = 1
FIELDS = ("prompt", "chosen", "rejected")
SAMPLE_FIELDS = ("sample_id", "source_position", "keep_prefix", "keep_suffix")


def metadata_path(prefix: str) -> str:
    return prefix + ".json"


def read_metadata(path: str) -> dict | None:
    """The metadata of the indexed dataset at prefix ``path`` (or at ``path`` = its ``.json``), else ``None``."""
    for candidate in (metadata_path(path), path):
        if candidate.endswith(".json") and os.path.isfile(candidate):
            try:
                with open(candidate, encoding="utf-8") as f:
                    head = f.read(1 << 20)
                meta = json.loads(head)
            except (OSError, ValueError):
                continue  # e.g. a large raw .json data file: not ours
            if isinstance(meta, dict) and meta.get("format") == FORMAT:
                meta["prefix"] = candidate[: -len(".json")]
                return meta
    return None


class IndexedPairWriter:
    """Writes encoded pairs to the five files of prefix ``prefix``.

    Args:
        prefix: Output prefix (its directory is created).
        vocab_size: The tokenizer's vocabulary size (picks the token dtype).
    """

    def __init__(self, prefix: str, vocab_size: int) -> None:
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder, get_bin_path

        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self.prefix = prefix
        if os.path.exists(metadata_path(prefix)):
            os.remove(metadata_path(prefix))  # an interrupted rewrite must not look complete
        self.dtype = DType.optimal_dtype(vocab_size)
        self.builders = {f: IndexedDatasetBuilder(get_bin_path(f"{prefix}_{f}"), dtype=self.dtype) for f in FIELDS}
        self.sample = IndexedDatasetBuilder(get_bin_path(f"{prefix}_sample"), dtype=np.int64)
        self.count = 0

    def add(self, pair: EncodedPair, source_position: int) -> int:
        """Appends ``pair``; returns its sample id (0, 1, 2, ... in the order added)."""
        for field, ids in zip(FIELDS, (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids)):
            # add_document takes any array-like: no torch tensor per sequence needed.
            self.builders[field].add_document(ids, [len(ids)])
        self.sample.add_document([self.count, source_position, pair.keep_prefix, pair.keep_suffix], [4])
        self.count += 1
        return self.count - 1

    def finalize(self, metadata: dict) -> str:
        """Writes the indices and then ``P.json``; returns the metadata path."""
        from megatron.core.datasets.indexed_dataset import get_idx_path

        for field, builder in self.builders.items():
            builder.finalize(get_idx_path(f"{self.prefix}_{field}"))
        self.sample.finalize(get_idx_path(f"{self.prefix}_sample"))
        meta = {"format": FORMAT, "version": VERSION, "num_pairs": self.count, "sample_fields": list(SAMPLE_FIELDS),
                "token_dtype": self.dtype.__name__, **metadata}  # fmt: skip
        with open(metadata_path(self.prefix), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
            f.write("\n")
        return metadata_path(self.prefix)


def check_tokenizer(meta: dict, tokenizer: Tokenizer) -> None:
    """Refuses a dataset tokenised with another tokenizer: its ids would mean other tokens, and may
    not even fit the model's vocabulary. Not a per-record problem, so ``skip`` does not apply.

    Raises:
        ValueError: naming the metadata file and its ``tokenizer`` field.
    """
    stored = meta["tokenizer"]
    if stored["fingerprint"] != tokenizer.fingerprint():
        raise ValueError(
            f"{metadata_path(meta['prefix'])}: field 'tokenizer': the dataset was tokenised with {stored['path']} "
            f"(vocabulary {stored['vocab_size']}, fingerprint {stored['fingerprint']}), but the tokenizer given "
            f"({tokenizer!r}, fingerprint {tokenizer.fingerprint()}) is a different one: its token ids would not "
            "match the model's vocabulary. Preprocess the data again with this tokenizer."
        )


class IndexedPairs(Sequence[PreferencePair]):
    """The pairs of an indexed dataset that pass the checks, fitted to ``seq_length``, read lazily.

    Opening it checks every pair once: lengths from the index, the largest token id of every
    sequence in one vectorised pass; a pair that might fail is materialised and goes through
    :func:`~sampo_megatron.data.pairs.finalize_pair`, so the decisions (and error messages) are those
    of the raw reader. Items are built on access from the memory-mapped ``.bin`` files.

    Args:
        meta: From :func:`read_metadata`.
        tokenizer: The run's tokenizer (must be the one the data was tokenised with).
        seq_length: Tokens per sequence.
        log: Applies ``--on-bad-record`` to pairs that fail a check.
        min_response_tokens: See :func:`~sampo_megatron.data.pairs.room_problem`.
        model_vocab_size: Ids must be below this; default the tokenizer's vocabulary size.
    """

    def __init__(
        self,
        meta: dict,
        tokenizer: Tokenizer,
        seq_length: int,
        log: BadRecordLog,
        min_response_tokens: int = 1,
        model_vocab_size: int | None = None,
    ) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        check_tokenizer(meta, tokenizer)
        self.meta = meta
        self.prefix = meta["prefix"]
        self.seq_length = seq_length
        self.min_response_tokens = min_response_tokens
        self.model_vocab_size = model_vocab_size if model_vocab_size is not None else tokenizer.vocab_size
        self.datasets = {f: IndexedDataset(f"{self.prefix}_{f}") for f in FIELDS}
        sample = IndexedDataset(f"{self.prefix}_sample")
        n = len(sample)
        self.samples = np.stack(sample[0:n]) if n else np.zeros((0, 4), dtype=np.int64)
        self.kept = self._check(log)

    def _location(self, i: int) -> Location:
        kind = self.meta.get("source_location", "line")
        return Location(self.meta.get("source", self.prefix), kind, int(self.samples[i, 1]))

    def close(self) -> None:
        """Unmap the dataset's files (reading a pair afterwards is an error)."""
        from ..compat.indexed_dataset import release_index_readers

        self.datasets = {}
        release_index_readers()  # megatron-core's index cache would keep them mapped

    def _encoded(self, i: int) -> EncodedPair:
        if not self.datasets:
            raise RuntimeError(f"indexed dataset {self.prefix} was closed")
        ids = [self.datasets[f][i].tolist() for f in FIELDS]
        return EncodedPair(*ids, keep_prefix=int(self.samples[i, 2]), keep_suffix=int(self.samples[i, 3]))

    def _max_ids(self, field: str) -> np.ndarray:
        """Largest token id of every sequence of ``field``, in one pass over the memory-mapped file."""
        ds = self.datasets[field]
        if len(ds) == 0:
            return np.zeros(0, dtype=np.int64)
        tokens = np.memmap(f"{self.prefix}_{field}.bin", dtype=ds.index.dtype, mode="r")
        starts = (ds.index.sequence_pointers // np.dtype(ds.index.dtype).itemsize).astype(np.int64)
        return np.maximum.reduceat(tokens, starts).astype(np.int64)

    def _check(self, log: BadRecordLog) -> np.ndarray:
        lengths = [self.datasets[f].sequence_lengths.astype(np.int64) for f in FIELDS]
        too_big = np.zeros(len(self.samples), dtype=bool)
        for field in FIELDS:
            too_big |= self._max_ids(field) >= self.model_vocab_size
        kept = []
        for i in range(len(self.samples)):
            p, c, r = int(lengths[0][i]), int(lengths[1][i]), int(lengths[2][i])
            prefix, suffix = int(self.samples[i, 2]), int(self.samples[i, 3])
            _, ck, rk = truncation_plan(p, c, r, self.seq_length, prefix, suffix)
            # Only these can fail; everything else provably passes finalize_pair.
            suspect = (
                too_big[i]
                or room_problem((p, c, r), self.seq_length, prefix, suffix, self.min_response_tokens) is not None
                or ck == rk  # the responses could be the same tokens once cut
            )
            if suspect:
                try:
                    self._finalize(i, 0)
                except BadRecord as bad:
                    log.handle(bad)
                    continue
            kept.append(i)
        return np.asarray(kept, dtype=np.int64)

    def _finalize(self, i: int, sample_id: int) -> PreferencePair:
        try:
            return finalize_pair(
                self._encoded(i), sample_id, self._location(i), self.seq_length, self.min_response_tokens, self.model_vocab_size
            )
        except BadRecord as bad:
            detail = f"{bad.detail} (pair {i} of indexed dataset {self.prefix})"
            raise BadRecord(bad.location, bad.reason, detail, bad.field) from None

    def __len__(self) -> int:
        return len(self.kept)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        return self._finalize(int(self.kept[index]), index)
