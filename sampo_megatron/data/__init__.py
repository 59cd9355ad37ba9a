"""Data layer: readers for public preference layouts, chat templates, tokenizers, bad-record
handling, megatron-core indexed datasets, deterministic batching and collation.

Depends on torch, numpy and the tokenizer libraries; megatron-core is imported only by
:mod:`~sampo_megatron.data.indexed` (lazily), pyarrow / datasets only when such files are read.
"""

from .batches import MicroBatch, PairBatches, PairDataset, collate_pairs, split_for_rank
from .encoding import EncoderSpec, PairEncoder, resolve_layout
from .errors import ON_BAD_RECORD, REASONS, BadRecord, BadRecordLog, Location
from .layouts import DATA_FORMATS, LAYOUTS, PreferenceText, detect_layout
from .pairs import EncodedPair, PreferencePair, finalize_pair, truncate_pair, truncation_plan
from .reading import DataOptions, load_pairs, read_pairs_jsonl, read_raw_pairs
from .sources import iter_raw
from .templates import PROMPT_TEMPLATES, get_template
from .tokenizer import HuggingFaceTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "DATA_FORMATS",
    "LAYOUTS",
    "ON_BAD_RECORD",
    "PROMPT_TEMPLATES",
    "REASONS",
    "BadRecord",
    "BadRecordLog",
    "DataOptions",
    "EncodedPair",
    "EncoderSpec",
    "HuggingFaceTokenizer",
    "Location",
    "MicroBatch",
    "PairBatches",
    "PairDataset",
    "PairEncoder",
    "PreferencePair",
    "PreferenceText",
    "SentencePieceTokenizer",
    "Tokenizer",
    "collate_pairs",
    "detect_layout",
    "finalize_pair",
    "get_template",
    "iter_raw",
    "load_pairs",
    "load_tokenizer",
    "read_pairs_jsonl",
    "read_raw_pairs",
    "resolve_layout",
    "split_for_rank",
    "truncate_pair",
    "truncation_plan",
]
