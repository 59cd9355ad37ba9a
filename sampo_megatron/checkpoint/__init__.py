"""Checkpoint files as files: integrity manifests and the restricted reading of pickled metadata.

Torch only (no megatron-core, no process group): training/ and convert/ both build on it.
"""

from .manifest import MANIFEST_FILE, CheckpointDamagedError, digest_files, list_files, read_manifest, verify_files, write_manifest
from .safe_pickle import UnsafeCheckpointError, check_torch_dist_pickles

__all__ = [
    "MANIFEST_FILE",
    "CheckpointDamagedError",
    "UnsafeCheckpointError",
    "check_torch_dist_pickles",
    "digest_files",
    "list_files",
    "read_manifest",
    "verify_files",
    "write_manifest",
]
