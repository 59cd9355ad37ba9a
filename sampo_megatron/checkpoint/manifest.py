"""A checkpoint's manifest: the size and SHA-256 of every file, written before the latest marker
moves and verified before a load.

``iter_XXXXXXX/manifest.json``::

    {"format": "sampo-checkpoint-manifest", "version": 1, "algorithm": "sha256",
     "files": {"__0_0.distcp": {"size": 631149, "sha256": "..."}, "common.pt": {...}, ...}}

Hashing reads every byte once; the trainer spreads the files over the ranks (each hashes about
1/world of them), so the cost is the size of the checkpoint divided by the number of ranks, at the
storage's read speed or SHA-256's (~1-2 GB/s per core), whichever is slower (docs/checkpoints.md).
"""

from __future__ import annotations

import hashlib
import json
import os

MANIFEST_FILE = "manifest.json"
FORMAT = "sampo-checkpoint-manifest"
VERSION = 1
_CHUNK = 8 << 20


class CheckpointDamagedError(RuntimeError):
    """A checkpoint's files do not match its manifest (or the manifest itself is unreadable)."""


def list_files(ckpt_dir: str) -> list[str]:
    """Every file under ``ckpt_dir`` (relative paths, sorted), except the manifest and temporaries."""
    names = []
    for root, _, files in os.walk(ckpt_dir):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), ckpt_dir)
            if rel != MANIFEST_FILE and not name.endswith(".tmp"):
                names.append(rel)
    return sorted(names)


def _digest(path: str) -> dict:
    sha = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": sha.hexdigest()}


def digest_files(ckpt_dir: str, names: list[str]) -> dict[str, dict]:
    """``{name: {"size", "sha256"}}`` of the given files of ``ckpt_dir``."""
    return {name: _digest(os.path.join(ckpt_dir, name)) for name in names}


def write_manifest(ckpt_dir: str, files: dict[str, dict]) -> str:
    """Write ``ckpt_dir/manifest.json`` atomically (fsynced); returns its path."""
    path = os.path.join(ckpt_dir, MANIFEST_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"format": FORMAT, "version": VERSION, "algorithm": "sha256", "files": files}, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_manifest(ckpt_dir: str) -> dict[str, dict] | None:
    """The manifest's ``files``, or None when the checkpoint has no manifest.

    Raises:
        CheckpointDamagedError: the manifest exists but cannot be read.
    """
    path = os.path.join(ckpt_dir, MANIFEST_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
        if data.get("format") != FORMAT or data.get("algorithm") != "sha256" or not isinstance(data.get("files"), dict):
            raise ValueError("not a sampo-megatron checkpoint manifest")
    except (OSError, ValueError, AttributeError) as err:
        raise CheckpointDamagedError(f"{path}: unreadable manifest ({err})") from None
    return data["files"]


def verify_files(ckpt_dir: str, manifest: dict[str, dict], names: list[str]) -> list[str]:
    """Problems of the given manifest entries (missing file, wrong size, wrong checksum), each
    naming the file; empty when they all match."""
    problems = []
    for name in names:
        expected = manifest[name]
        path = os.path.join(ckpt_dir, name)
        if not os.path.isfile(path):
            problems.append(f"{path}: missing")
            continue
        size = os.path.getsize(path)
        if size != expected["size"]:
            problems.append(f"{path}: {size} bytes, the manifest says {expected['size']} (truncated or overwritten)")
            continue
        if _digest(path)["sha256"] != expected["sha256"]:
            problems.append(f"{path}: its SHA-256 differs from the manifest's (the file's bytes changed)")
    return problems
