"""Compatibility layers that let megatron-core run where it normally would not (CPU-only machines).

Nothing here imports megatron-core at import time; :func:`apply_cpu_compat` does, when it is called.
"""

from .cpu import apply_cpu_compat, model_parallel_manual_seed

__all__ = ["apply_cpu_compat", "model_parallel_manual_seed"]
