"""Generate responses from a Megatron checkpoint at any TP/PP layout (CPU or GPU).

    torchrun --nproc-per-node 2 tools/generate.py --load runs/x/checkpoints --prompts prompts.jsonl \
        --output out.jsonl --tensor-model-parallel-size 2 --max-new-tokens 64 [--temperature 0.7 --top-p 0.9]

Writes one JSON object per prompt, in prompt order: ``prompt``, ``response`` (text, without the
EOS), ``num_tokens`` (response tokens), ``stopped_at_eos``. ``--prompts`` is a ``.jsonl`` file with
a ``prompt`` field (a string or chat messages) or a text file with one prompt per line. Every
model / parallel / tokenizer flag of ``launch/pretrain_sampo.py`` is accepted (``--seq-length``
bounds prompt + response); the checkpoint's ``sampo_model.json`` sets the architecture and tokenizer.
With data parallelism (more processes than TP x PP) the prompts are dealt over the replicas.

For standard evaluators (docs/evaluation.md), ``--output-format``:

- ``alpaca_eval``: AlpacaEval's model-outputs JSON, a list of ``{"instruction", "output",
  "generator"}`` (plus ``dataset`` when the prompt record has one); ``--prompts`` may be AlpacaEval's
  own evaluation set (a JSON list with ``instruction``) or JSONL with ``instruction`` or ``prompt``.
- ``mt_bench``: MT-Bench answers (FastChat's ``model_answer/<model>.jsonl``: ``question_id``,
  ``answer_id``, ``model_id``, ``choices: [{"index": 0, "turns": [...]}]``, ``tstamp``) for
  MT-Bench's ``question.jsonl`` (``question_id``, ``turns``). Turn ``k`` is generated from the
  conversation so far, the model's own earlier answers included, rendered by ``--prompt-template``.

``--generator`` names the model in both (default: the name of the ``--load`` directory).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    parser.add_argument("--prompts", required=True, help="prompts: .jsonl with a 'prompt' field, or one prompt per line")
    parser.add_argument("--output", required=True, help="JSONL output: prompt, response, num_tokens, stopped_at_eos")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate at most per prompt")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: sampling temperature")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass for sampling")
    parser.add_argument("--generation-seed", type=int, default=1234, help="seed of the sampling draws")
    parser.add_argument("--generation-batch-size", type=int, default=16, help="prompts decoded together")
    parser.add_argument(
        "--output-format",
        choices=["jsonl", "alpaca_eval", "mt_bench"],
        default="jsonl",
        help="jsonl: one record per prompt; alpaca_eval: AlpacaEval's model outputs; mt_bench: MT-Bench answers",
    )
    parser.add_argument(
        "--generator", default=None, help="model name written by alpaca_eval / mt_bench (default: the --load directory's name)"
    )
    parser.add_argument("--no-kv-cache", dest="kv_cache", action="store_false",
                        help="re-run the whole sequence for every new token instead of megatron-core's key/value cache "
                             "(for comparison; sequence parallelism always decodes this way)")  # fmt: skip
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
    from sampo_megatron.generation.exports import alpaca_eval_records, answer_turns, mt_bench_records, read_eval_prompts

    from .train import exit_with, user_errors

    try:  # input problems: one line naming the file / flag, not a traceback per rank
        cfg = parse_config(rest)
        records = read_eval_prompts(args.prompts, args.output_format)
    except (FileNotFoundError, ValueError) as err:
        exit_with(err)
    try:
        from sampo_megatron.compat.notices import quiet_expected_notices

        quiet_expected_notices()  # before megatron-core is imported: its import-time warnings included
        from sampo_megatron.generation import GenerationConfig, encode_prompts, generate_sharded
        from sampo_megatron.generation.loading import close_distributed, load_for_generation
        from sampo_megatron.plan import resolve

        chunks, tokenizer, vocab_size = load_for_generation(resolve(cfg, purpose="generate"))
    except user_errors() as err:
        exit_with(err)
    gen = GenerationConfig(args.max_new_tokens, args.temperature, args.top_p, args.generation_seed, args.generation_batch_size,
                           kv_cache=args.kv_cache)  # fmt: skip
    generator = args.generator or os.path.basename(os.path.normpath(cfg.checkpoint.load))
    import torch.distributed as dist

    rank0 = dist.get_rank() == 0

    def respond(prompts: list) -> list:
        return generate_sharded(
            chunks, encode_prompts(prompts, tokenizer, cfg.data.prompt_template), gen, eos_id=tokenizer.eos_id,
            pad_id=tokenizer.pad_id, vocab_size=vocab_size, max_length=cfg.training.seq_length,
            sequence_parallel=cfg.parallel.sequence_parallel,
        )  # fmt: skip

    if rank0:
        print(
            f"generating for {len(records)} prompts (max {gen.max_new_tokens} new tokens, "
            f"{'greedy' if gen.temperature == 0 else f'temperature {gen.temperature}, top-p {gen.top_p}'}"
            f"{'' if gen.kv_cache else ', no key/value cache'}) ...",
            flush=True,
        )
    start = time.perf_counter()
    if args.output_format == "mt_bench":
        answers, results = answer_turns(records, respond, tokenizer.decode)
        output = mt_bench_records(records, answers, generator)
    else:
        results = respond([r["prompt"] for r in records])
        responses = [tokenizer.decode(g.response_ids) for g in results]
        if args.output_format == "alpaca_eval":
            output = alpaca_eval_records(records, responses, generator)
        else:
            output = [{"prompt": r["prompt"], "response": text, "num_tokens": g.num_tokens, "stopped_at_eos": g.stopped_at_eos}
                      for r, text, g in zip(records, responses, results)]  # fmt: skip
    if rank0:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as f:
            if args.output_format == "alpaca_eval":
                json.dump(output, f, ensure_ascii=False, indent=1)
                f.write("\n")
            else:
                for record in output:
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
        tokens = sum(g.num_tokens for g in results)
        print(
            f"wrote {len(output)} {args.output_format} records ({tokens} tokens, {time.perf_counter() - start:.1f} s) to {args.output}",
            flush=True,
        )
    close_distributed()
