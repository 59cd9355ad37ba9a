"""Export a SamPO trainer checkpoint (or a converted one) to a Hugging Face model directory.

    python tools/convert_megatron_to_hf.py --load runs/llama3/checkpoints --hf-out llama3-sampo

``--load`` takes a checkpoint directory or a run's ``--save`` directory (its latest checkpoint).
Writes sharded safetensors, config.json, generation_config.json and the tokenizer, loadable with
``transformers.AutoModelForCausalLM.from_pretrained``. See docs/conversion.md.
"""

from __future__ import annotations

import argparse

from sampo_megatron.convert.cli import DTYPES, run_conversion, torch_dtype


def _size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit):
            return int(float(upper[: -len(unit)]) * factor)
    return int(upper)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--load", required=True, help="checkpoint directory, or a run's --save directory")
    parser.add_argument("--hf-out", required=True, help="output Hugging Face model directory")
    parser.add_argument(
        "--dtype", choices=list(DTYPES), default="auto", help="exported dtype (auto: the source model's, else the checkpoint's)"
    )
    parser.add_argument("--tokenizer", default=None, help="tokenizer to copy (default: the one the checkpoint names)")
    parser.add_argument("--architecture", default=None, help="Hugging Face class (default: the source model's, else inferred)")
    parser.add_argument("--max-shard-size", type=_size, default="5GB", help="largest safetensors file, e.g. 5GB, 500MB")
    parser.add_argument("--max-position-embeddings", type=int, default=4096, help="for a model without a source config")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --hf-out")
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="skip the allow-list check of the checkpoint's pickles (only for checkpoints you trust)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from sampo_megatron.convert import convert_megatron_to_hf

    return run_conversion(
        convert_megatron_to_hf,
        args.load,
        args.hf_out,
        dtype=torch_dtype(args.dtype),
        tokenizer=args.tokenizer,
        architecture=args.architecture,
        max_shard_bytes=args.max_shard_size,
        max_position_embeddings=args.max_position_embeddings,
        overwrite=args.overwrite,
        trust_checkpoint=args.trust_checkpoint,
        quiet=args.quiet,
    )
