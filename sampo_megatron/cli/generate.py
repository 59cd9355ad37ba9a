"""Generate responses from a Megatron checkpoint at any TP/PP layout (CPU or GPU).

    torchrun --nproc-per-node 2 tools/generate.py --load runs/x/checkpoints --prompts prompts.jsonl \
        --output out.jsonl --tensor-model-parallel-size 2 --max-new-tokens 64 [--temperature 0.7 --top-p 0.9]

Writes one JSON object per prompt, in prompt order: ``prompt``, ``response`` (text, without the
EOS), ``num_tokens`` (response tokens), ``stopped_at_eos``. ``--prompts`` is a ``.jsonl`` file with
a ``prompt`` field (a string or chat messages) or a text file with one prompt per line. Every
model / parallel / tokenizer flag of ``launch/pretrain_sampo.py`` is accepted (``--seq-length``
bounds prompt + response); the checkpoint's ``sampo_model.json`` sets the architecture and tokenizer.
With data parallelism (more processes than TP x PP) the prompts are dealt over the replicas.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

for message in ("Transformer Engine and Apex are not installed", "Apex is not installed", "full scope is deprecated"):
    warnings.filterwarnings("ignore", message=message)


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    parser.add_argument("--prompts", required=True, help="prompts: .jsonl with a 'prompt' field, or one prompt per line")
    parser.add_argument("--output", required=True, help="JSONL output: prompt, response, num_tokens, stopped_at_eos")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate at most per prompt")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: sampling temperature")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass for sampling")
    parser.add_argument("--generation-seed", type=int, default=1234, help="seed of the sampling draws")
    parser.add_argument("--generation-batch-size", type=int, default=16, help="prompts decoded together")
    if {"-h", "--help"} & set(sys.argv[1:] if argv is None else argv):
        from sampo_megatron.config import build_parser

        parser.print_help()
        print("\nmodel, parallel, tokenizer and checkpoint flags (as launch/pretrain_sampo.py):")
        build_parser().print_help()
        sys.exit(0)
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> None:
    args, rest = parse_args(argv)
    from sampo_megatron.config import parse_config
    from sampo_megatron.generation import GenerationConfig, encode_prompts, generate_sharded, read_prompts
    from sampo_megatron.generation.loading import close_distributed, load_for_generation

    cfg = parse_config(rest)
    prompts = read_prompts(args.prompts)
    chunks, tokenizer, vocab_size = load_for_generation(cfg)
    gen = GenerationConfig(args.max_new_tokens, args.temperature, args.top_p, args.generation_seed, args.generation_batch_size)
    import torch.distributed as dist

    rank0 = dist.get_rank() == 0
    if rank0:
        print(
            f"generating for {len(prompts)} prompts (max {gen.max_new_tokens} new tokens, "
            f"{'greedy' if gen.temperature == 0 else f'temperature {gen.temperature}, top-p {gen.top_p}'}) ...",
            flush=True,
        )
    start = time.perf_counter()
    results = generate_sharded(
        chunks, encode_prompts(prompts, tokenizer, cfg.data.prompt_template), gen, eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id, vocab_size=vocab_size, max_length=cfg.training.seq_length,
        sequence_parallel=cfg.parallel.sequence_parallel,
    )  # fmt: skip
    if rank0:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as f:
            for prompt, g in zip(prompts, results):
                record = {
                    "prompt": prompt,
                    "response": tokenizer.decode(g.response_ids),
                    "num_tokens": g.num_tokens,
                    "stopped_at_eos": g.stopped_at_eos,
                }
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        tokens = sum(g.num_tokens for g in results)
        print(
            f"wrote {len(results)} responses ({tokens} tokens, {time.perf_counter() - start:.1f} s) to {args.output}", flush=True
        )
    close_distributed()
