"""Data layer: tokenizers, JSONL preference pairs, deterministic batching and collation.

Depends only on torch, numpy and the tokenizer libraries (never on megatron), so it can be tested
and used on its own.
"""

from .batches import PairBatches, PairDataset, collate_pairs, split_for_rank
from .pairs import PreferencePair, read_pairs_jsonl, tokenize_pair, truncate_pair
from .tokenizer import HuggingFaceTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "HuggingFaceTokenizer",
    "PairBatches",
    "PairDataset",
    "PreferencePair",
    "SentencePieceTokenizer",
    "Tokenizer",
    "collate_pairs",
    "load_tokenizer",
    "read_pairs_jsonl",
    "split_for_rank",
    "tokenize_pair",
    "truncate_pair",
]
