"""Generation with megatron-core's key/value cache against re-running the whole sequence per token.

The model is ``bench/vs_trl.py``'s (``_dpo_workload.py``: random-init Llama, 4 layers, hidden 256,
vocabulary 8000, fp32, converted with the project's tool), one process, 2 threads. The same 4 prompts
(64 tokens, from the workload's pairs) are decoded greedily to 32, 128 and 512 new tokens, with the
cache (the default) and with ``--no-kv-cache``, after an untimed warm-up of both. The two sides alternate (A, B, A, B, ...) for
``--rounds`` rounds at each length, and the report takes the median of the per-round ratios, with
their spread (min, max): a load spike then moves one round, not the result. Both sides must produce
the same tokens (checked; a difference exits non-zero).

    python bench/generate.py [--work-dir DIR] [--lengths 32,128,512] [--rounds 3] [--threads 2]

The last line is one JSON object: per length, each side's median tokens/s and ``ratio`` (cache /
no cache: median, min, max over rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from _dpo_workload import Workload, build
from _util import machine, print_result

PROMPTS = 4


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "sampo_bench_generate"))
    parser.add_argument("--lengths", default="32,128,512")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    torch.set_num_threads(args.threads)
    work = Workload(max_length=64 + max(lengths) + 64)
    paths = build(work, Path(args.work_dir))

    from sampo_megatron.config import parse_config
    from sampo_megatron.generation import GenerationConfig, generate
    from sampo_megatron.generation.loading import close_distributed, load_for_generation
    from sampo_megatron.plan import resolve

    os.environ.setdefault("MASTER_PORT", "29617")
    cfg = parse_config(["--load", paths["megatron"], "--seq-length", str(work.max_length), "--tensor-model-parallel-size", "1"])
    chunks, tokenizer, vocab_size = load_for_generation(resolve(cfg, purpose="generate"))
    with open(paths["pairs"]) as f:
        pairs = [json.loads(line) for line in f][:PROMPTS]
    prompt_ids = [tokenizer.encode(p["prompt"])[:64] for p in pairs]
    for kv_cache in (True, False):  # untimed warm-up of both paths (first-call allocations)
        generate(chunks, prompt_ids, GenerationConfig(max_new_tokens=4, batch_size=PROMPTS, kv_cache=kv_cache),
                 eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, vocab_size=vocab_size, max_length=work.max_length)  # fmt: skip
    results = {}
    for new_tokens in lengths:
        base = GenerationConfig(max_new_tokens=new_tokens, batch_size=PROMPTS)
        sides = {"kv_cache": replace(base, kv_cache=True), "no_cache": replace(base, kv_cache=False)}
        rates: dict[str, list[float]] = {name: [] for name in sides}
        outputs = {}
        for _ in range(args.rounds):
            for name, gen in sides.items():
                start = time.perf_counter()
                out = generate(chunks, prompt_ids, gen, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                               vocab_size=vocab_size, max_length=work.max_length)  # fmt: skip
                seconds = time.perf_counter() - start
                rates[name].append(sum(g.num_tokens for g in out) / seconds)
                outputs[name] = [g.response_ids for g in out]
        if outputs["kv_cache"] != outputs["no_cache"]:
            print(f"FAILED: the cache changed the greedy output at {new_tokens} new tokens", file=sys.stderr)
            return 1
        ratios = [a / b for a, b in zip(rates["kv_cache"], rates["no_cache"])]
        results[str(new_tokens)] = {
            "tokens_per_s": {name: statistics.median(r) for name, r in rates.items()},
            "ratio": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "new_tokens_generated": sum(len(r) for r in outputs["kv_cache"]),
        }
        print(f"{new_tokens:4d} new tokens: cache {results[str(new_tokens)]['tokens_per_s']['kv_cache']:8.1f} tokens/s, "
              f"no cache {results[str(new_tokens)]['tokens_per_s']['no_cache']:8.1f} tokens/s, ratio "
              f"{results[str(new_tokens)]['ratio']:.2f} (rounds {min(ratios):.2f}-{max(ratios):.2f})", flush=True)  # fmt: skip
    close_distributed()
    print_result({"bench": "generate", "prompts": PROMPTS, "rounds": args.rounds, "workload": asdict(work),
                  "machine": machine(), "lengths": results})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
