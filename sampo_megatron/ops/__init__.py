"""Distributed math kernels: log-probs and KL over vocabulary shards, sums over CP-split sequences."""

from .context_parallel import sequence_count, sequence_sum
from .vocab_parallel import vocab_parallel_kl, vocab_parallel_logprobs

__all__ = ["sequence_count", "sequence_sum", "vocab_parallel_kl", "vocab_parallel_logprobs"]
