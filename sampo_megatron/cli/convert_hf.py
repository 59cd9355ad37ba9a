"""Convert a Hugging Face model directory into a checkpoint the SamPO trainer loads.

    python tools/convert_hf_to_megatron.py --hf-dir Llama-3-8B-Instruct --save ckpt/llama3-8b \
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2

Then ``launch/pretrain_sampo.py --load ckpt/llama3-8b --ref-load ckpt/llama3-8b`` (no architecture
or tokenizer flags needed). Supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM,
GPTNeoXForCausalLM. See docs/conversion.md.
"""

from __future__ import annotations

import argparse

from sampo_megatron.convert.cli import DTYPES, run_conversion, torch_dtype


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--hf-dir", required=True, help="Hugging Face model directory (config.json, weights, tokenizer)")
    parser.add_argument("--save", required=True, help="output checkpoint directory")
    parser.add_argument(
        "--tensor-model-parallel-size",
        type=int,
        default=1,
        help="TP size to check against the model; sets the vocabulary padding",
    )
    parser.add_argument(
        "--pipeline-model-parallel-size", type=int, default=1, help="PP size to check against the number of layers"
    )
    parser.add_argument(
        "--num-layers-per-virtual-pipeline-stage", type=int, default=None, help="VPP layers per virtual stage to check"
    )
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=128, help="vocabulary padding unit per TP rank")
    parser.add_argument("--dtype", choices=list(DTYPES), default="auto", help="stored dtype (auto: as in the source)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing converted checkpoint at --save")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from sampo_megatron.convert import convert_hf_to_megatron

    return run_conversion(
        convert_hf_to_megatron,
        args.hf_dir,
        args.save,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        num_layers_per_virtual_pipeline_stage=args.num_layers_per_virtual_pipeline_stage,
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        dtype=torch_dtype(args.dtype),
        overwrite=args.overwrite,
        quiet=args.quiet,
    )
