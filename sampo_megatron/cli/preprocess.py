"""Tokenise preference data once into megatron-core indexed datasets for ``--data-path PREFIX``.

    python tools/preprocess_preference_data.py --input pairs.jsonl --output-prefix data/pairs \\
        --tokenizer-model TOKENIZER [--data-format auto] [--prompt-template auto] [--workers 4] \\
        [--on-bad-record error|skip] [--seq-length N] [--split-by-length long short]

Writes ``PREFIX_{prompt,chosen,rejected,sample}.{bin,idx}`` and ``PREFIX.json`` (written last), plus
``PREFIX_stats.json`` and ``PREFIX_stats.png`` (token-length distributions, share of pairs whose
chosen response is longer, mean T_w and T_l). ``--split-by-length long`` also writes
``PREFIX_long`` (pairs whose chosen response has more tokens), ``short`` writes ``PREFIX_short``
(fewer tokens); ties go to neither. See docs/data.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from sampo_megatron.data.errors import ON_BAD_RECORD, BadRecord
from sampo_megatron.data.layouts import DATA_FORMATS
from sampo_megatron.data.preprocess import SPLITS, PreprocessConfig, preprocess
from sampo_megatron.data.templates import PROMPT_TEMPLATES
from sampo_megatron.data.tokenizer import TOKENIZER_TYPES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", required=True, help=".jsonl, .json, .parquet file or a datasets save_to_disk directory")
    p.add_argument("--output-prefix", required=True, help="output path prefix (directories are created)")
    p.add_argument("--tokenizer-model", required=True, help="Hugging Face tokenizer directory or sentencepiece .model")
    p.add_argument("--tokenizer-type", default="auto", choices=TOKENIZER_TYPES)
    p.add_argument(
        "--data-format", default="auto", choices=DATA_FORMATS, help="record layout; auto detects it from the first record"
    )
    p.add_argument("--data-split", default="train", help="split of a DatasetDict directory")
    p.add_argument(
        "--prompt-template",
        default="auto",
        choices=PROMPT_TEMPLATES,
        help="auto: the tokenizer's chat template if it has one, else plain",
    )
    p.add_argument("--no-add-bos", dest="add_bos", action="store_false", help="do not put BOS in front of prompts")
    p.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)), help="tokenising processes")
    p.add_argument("--on-bad-record", default="error", choices=ON_BAD_RECORD)
    p.add_argument(
        "--seq-length",
        type=int,
        default=None,
        help="also drop pairs with no room for a response at this length (else checked when training)",
    )
    p.add_argument("--min-response-tokens", type=int, default=1)
    p.add_argument(
        "--split-by-length",
        nargs="+",
        default=(),
        choices=SPLITS,
        help="also write PREFIX_long (chosen longer) and/or PREFIX_short (chosen shorter)",
    )
    p.add_argument("--no-stats", dest="stats", action="store_false", help="skip PREFIX_stats.json / .png")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    args["split_by_length"] = tuple(args["split_by_length"])
    try:
        summary = preprocess(PreprocessConfig(**args))
    except BadRecord as bad:
        print(f"error: {bad}\n(--on-bad-record skip drops such records and counts them)", file=sys.stderr)
        return 1
    print(summary.pop("log_summary"))
    for name, path in summary["outputs"].items():
        print(f"wrote {name}: {path[: -len('.json')]} (.json + _prompt/_chosen/_rejected/_sample .bin/.idx)")
    for key in ("stats", "histogram"):
        if key in summary:
            print(f"{key}: {summary[key]}")
    print(json.dumps({k: summary[k] for k in ("records", "pairs", "tokens", "seconds", "tokens_per_s", "workers")}))
    return 0
