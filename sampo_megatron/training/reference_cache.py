"""The reference log-prob cache on disk (``--ref-mode cache``) and the fingerprint that guards it.

A cache holds the per-token reference log-probs of every pair, ``[pairs, 2 (chosen, rejected), S]``
float32, indexed by sample id. Nothing in it depends on the TP/PP/DP layout or on the loss and its
length debias (they read the per-token values), so one cache serves any of them. What it does
depend on is recorded as its *fingerprint* (:data:`FINGERPRINT_FIELDS`); a run whose fingerprint
differs refuses the cache and names what changed, instead of training on another run's numbers.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch
import torch.distributed as dist

from ..checkpoint import MANIFEST_FILE, list_files

FINGERPRINT_FIELDS = {
    "reference": "the reference model (--ref-load, --load or the initialisation)",
    "pairs": "the tokenised pairs (the data file, its order, --prompt-template, truncation to --seq-length)",
    "tokenizer": "the tokenizer (--tokenizer-model)",
    "num_pairs": "the number of pairs",
    "seq_length": "--seq-length",
}
"""What a cache's log-probs are a function of, and how an error names each."""


class CacheMismatchError(ValueError):
    """A reference cache was computed for something other than this run."""


def pairs_fingerprint(pairs) -> str:
    """SHA-256 of every pair's token ids, in dataset order (the cache is indexed by position)."""
    sha = hashlib.sha256(str(len(pairs)).encode())
    for pair in pairs:
        for ids in (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids):
            sha.update(len(ids).to_bytes(8, "little"))
            sha.update(np.asarray(ids, dtype=np.int64).tobytes())
    return sha.hexdigest()[:16]


def checkpoint_identity(ckpt_dir: str) -> str:
    """The content of a checkpoint: the hash of its manifest (which holds every file's SHA-256),
    or, for a checkpoint without one, of its file names and sizes."""
    manifest = os.path.join(ckpt_dir, MANIFEST_FILE)
    if os.path.isfile(manifest):
        with open(manifest, "rb") as f:
            return "manifest:" + hashlib.sha256(f.read()).hexdigest()[:16]
    listing = [(name, os.path.getsize(os.path.join(ckpt_dir, name))) for name in list_files(ckpt_dir)]
    return "files:" + hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]


def describe_mismatch(path: str, stored: dict | None, expected: dict) -> str:
    """The error for a cache whose fingerprint is not this run's: each field that differs, old and new."""
    remedy = "Delete it to have it recomputed, or give this run its own --ref-cache-dir"
    if stored is None:
        return f"reference cache {path} has no fingerprint (written by an older sampo-megatron). {remedy}"
    changed = [
        f"{FINGERPRINT_FIELDS.get(key, key)}: {stored.get(key)!r} -> {expected.get(key)!r}"
        for key in sorted(set(stored) | set(expected))
        if stored.get(key) != expected.get(key)
    ]
    return f"reference cache {path} was computed for a different run; changed: " + "; ".join(changed) + f". {remedy}"


class ReferenceCache:
    """Per-token reference log-probs of every pair, memory-mapped from
    ``<dir>/ref_logps_v<version>.npy``. A ``.json`` beside it (shape, version, fingerprint) is written
    last and marks the file complete, so an interrupted computation is redone, never read.

    Args:
        directory: where the cache lives (``--ref-cache-dir``).
        num_pairs: pairs in the dataset.
        seq_length: ``--seq-length``: the cache's rows are that wide whatever the micro-batch width.
    """

    def __init__(self, directory: str, num_pairs: int, seq_length: int) -> None:
        self.directory = directory
        self.shape = (num_pairs, 2, seq_length)
        self._version: int | None = None
        self._array: np.ndarray | None = None

    def _paths(self, version: int) -> tuple[str, str]:
        stem = os.path.join(self.directory, f"ref_logps_v{version}")
        return stem + ".npy", stem + ".json"

    def is_complete(self, version: int, fingerprint: dict) -> bool:
        """Whether the cache of ``version`` is complete.

        Raises:
            CacheMismatchError: it is complete but was computed from something ``fingerprint`` says
                this run does not use.
        """
        data, meta = self._paths(version)
        if not (os.path.isfile(data) and os.path.isfile(meta)):
            return False
        with open(meta) as f:
            stored = json.load(f).get("fingerprint")
        if stored != fingerprint:
            raise CacheMismatchError(describe_mismatch(data, stored, fingerprint))
        return True

    def build(self, version: int, steps, compute, fingerprint: dict) -> None:
        """Fill the cache for ``version``.

        Args:
            steps: iterable of lists of micro-batches (this rank's share of each global batch).
            compute: ``micro_batches -> list of [2P, S] tensors`` on ranks that write, else ``None``.
            fingerprint: what the log-probs are computed from (written with the completion marker).
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
            with open(meta + ".tmp", "w") as f:
                json.dump({"shape": list(self.shape), "version": version, "fingerprint": fingerprint}, f, indent=1)
            os.replace(meta + ".tmp", meta)
        dist.barrier()

    def close(self) -> None:
        """Unmap the cache file (the next :meth:`lookup` maps it again)."""
        self._array, self._version = None, None

    def lookup(self, version: int, sample_ids: torch.Tensor, width: int | None = None) -> torch.Tensor:
        """``[2P, width]`` reference log-probs of these pairs (chosen rows, then rejected rows);
        ``width`` defaults to the cache's sequence length."""
        if self._version != version:
            if not os.path.isfile(self._paths(version)[1]):
                raise FileNotFoundError(f"reference cache {self._paths(version)[0]} is missing or incomplete")
            self._array = np.load(self._paths(version)[0], mmap_mode="r")
            self._version = version
        rows = torch.from_numpy(np.ascontiguousarray(self._array[sample_ids.cpu().numpy(), :, :width]))
        return torch.cat([rows[:, 0], rows[:, 1]], dim=0)
