"""Distributed math kernels: log-probs and KL over vocabulary shards (from logits, or fused with the
output layer from the hidden states), sums over CP-split sequences."""

from .context_parallel import sequence_count, sequence_sum
from .fused_logprobs import fused_linear_logprobs
from .vocab_parallel import vocab_parallel_kl, vocab_parallel_logprobs

__all__ = ["fused_linear_logprobs", "sequence_count", "sequence_sum", "vocab_parallel_kl", "vocab_parallel_logprobs"]
