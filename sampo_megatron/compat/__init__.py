"""Every megatron-core workaround of sampo-megatron, keyed by the release line it is for.

- :mod:`.version`: the tested release lines (0.16 on Python 3.11, 0.19 on Python 3.12) and the
  start-up check (a clear error outside them; ``SAMPO_ALLOW_UNTESTED_MEGATRON=1`` to run anyway).
- :mod:`.cpu`: the CPU layer (active only without CUDA), with each site per release line.
- :mod:`.optimizer_state`: torch-Adam optimizer state at checkpoint save/load (both lines).
- :mod:`.checkpoint_writer`: stopping the torch_dist writer's helper process (both lines).
- :mod:`.async_save`: selecting megatron-core's own asynchronous save (the argument 0.19 added).
- :mod:`.notices`: log notices every run would print that no user can act on, filtered by release line.
- :mod:`.indexed_dataset`: releasing the index files megatron-core's index cache keeps mapped (both lines).
- :mod:`.output_layer`: what the response-logits hook relies on in the output layer (both lines).
- :mod:`.torch_compile`: megatron-core's import-time ``torch.compile`` wrappers not created without
  CUDA (both lines; the router's in 0.19): an import hook, installed when ``sampo_megatron`` is imported.

Each workaround asserts that what it patches exists in the installed release, so a release that
moves a site fails loudly instead of the patch becoming a silent no-op. Nothing here imports
megatron-core at import time, and importing the package imports nothing else either (the names below
are loaded on first use): ``sampo_megatron`` installs :mod:`.torch_compile`'s hook before torch is loaded.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ALLOW_UNTESTED_ENV": "version", "RELEASE_LINES": "version", "UnsupportedMegatronError": "version",
    "release_line": "version", "CompatError": "cpu", "apply_cpu_compat": "cpu", "model_parallel_manual_seed": "cpu",
}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


__all__ = [
    "ALLOW_UNTESTED_ENV",
    "RELEASE_LINES",
    "CompatError",
    "UnsupportedMegatronError",
    "apply_cpu_compat",
    "model_parallel_manual_seed",
    "release_line",
]
