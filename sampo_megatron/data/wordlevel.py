"""Word-level Hugging Face tokenizers for generated data (the shipped tiny assets, the length-bias
study, the benchmarks' workloads): exact round trips, written without transformers."""

from __future__ import annotations

import json
import os

from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
from tokenizers import models as tokenizer_models

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
"""Ids 0-3: padding, BOS, EOS, unknown."""
MAX_VOCAB = 1024


def train_tokenizer(lines: list[str]) -> Tokenizer:
    """Word-level tokenizer with exact round trips.

    Whitespace runs are normalised to one space; words carry a ``▁`` marker for the space before
    them (Metaspace) and punctuation is split off as its own token, so ``decode(encode(text))``
    gives back the normalised text ("Question: What is it?" stays as is).
    """
    tok = Tokenizer(tokenizer_models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"), pre_tokenizers.Punctuation()]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.WordLevelTrainer(vocab_size=MAX_VOCAB, min_frequency=1, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tok.train_from_iterator(lines, trainer)
    return tok


def write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def save_hf_dir(tok: Tokenizer, out: str) -> None:
    """Writes the files ``AutoTokenizer.from_pretrained(out)`` needs, by hand so that the output does
    not depend on the installed transformers version."""
    os.makedirs(out, exist_ok=True)
    tok.save(os.path.join(out, "tokenizer.json"))
    special = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    write_json(os.path.join(out, "special_tokens_map.json"), special)
    write_json(
        os.path.join(out, "tokenizer_config.json"),
        {
            **special,
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": 4096,
            # The Metaspace decoder already restores the spacing; the legacy clean-up would alter it.
            "clean_up_tokenization_spaces": False,
        },
    )
