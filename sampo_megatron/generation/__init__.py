"""Batched text generation from megatron-core GPTModel chunks at any TP/PP layout.

One module for ``tools/generate.py`` and the trainer's verbosity monitor: the model runs one
forward-only pipeline pass per new token, the last stage picks the next token, and the new tokens
are broadcast to every stage. No KV cache: each step recomputes the whole (short) batch.
"""

from .decode import Generation, GenerationConfig, generate, generate_sharded
from .prompts import encode_prompts, read_prompts
from .sampling import select_next_tokens, top_p_keep_mask, uniform_draws

__all__ = [
    "Generation",
    "GenerationConfig",
    "encode_prompts",
    "generate",
    "generate_sharded",
    "read_prompts",
    "select_next_tokens",
    "top_p_keep_mask",
    "uniform_draws",
]
