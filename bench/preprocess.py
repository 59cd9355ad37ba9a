"""Throughput of ``tools/preprocess_preference_data.py``: tokens written per second with 1 and 2
worker processes (1 = tokenise in the main process), best of ``--repeats`` runs each.

By default the input is the shipped tiny pairs repeated to ``--records`` records (word-level tiny
tokenizer); ``--input`` / ``--tokenizer-model`` measure your own data and tokenizer instead.
Tokens counted are those written (prompt + chosen + rejected, BOS/EOS included). CPU seconds of the
main process and of the workers are reported too: on a machine shared with other jobs the wall time
mostly measures the contention, the CPU time still shows how the work divides. The last line is one
JSON object.

    python bench/preprocess.py [--records 20000] [--repeats 2] [--input FILE --tokenizer-model DIR]
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time

from _util import machine, print_result

from sampo_megatron.data.preprocess import PreprocessConfig, preprocess

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TINY = os.path.join(ROOT, "examples", "data")


def synthetic_input(directory: str, records: int) -> str:
    """The shipped pairs (both sets) repeated to ``records`` lines."""
    lines = []
    for name in ("tiny_pairs.jsonl", "length_bias_pairs.jsonl"):
        with open(os.path.join(TINY, name), encoding="utf-8") as f:
            lines += [line for line in f if line.strip()]
    path = os.path.join(directory, "bench_pairs.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for i in range(records):
            f.write(lines[i % len(lines)])
    return path


def _children_cpu() -> float:
    """CPU seconds of finished child processes (the pool's workers once it has closed)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--input", default=None)
    parser.add_argument("--tokenizer-model", default=os.path.join(TINY, "tiny_tokenizer"))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    result: dict = {"machine": machine()}
    with tempfile.TemporaryDirectory() as tmp:
        data = args.input or synthetic_input(tmp, args.records)
        for workers in args.workers:
            best = None
            for r in range(args.repeats):
                cpu, children = time.process_time(), _children_cpu()
                summary = preprocess(PreprocessConfig(data, os.path.join(tmp, f"w{workers}_{r}", "out"), args.tokenizer_model,
                                                      workers=workers, progress=False, stats=False))  # fmt: skip
                summary["main_cpu_s"] = time.process_time() - cpu
                summary["worker_cpu_s"] = _children_cpu() - children
                if best is None or summary["tokens_per_s"] > best["tokens_per_s"]:
                    best = summary
            print(f"{workers} worker(s): {best['pairs']} pairs, {best['tokens']} tokens in {best['seconds']:.2f} s "
                  f"= {best['tokens_per_s']:,.0f} tokens/s (CPU s: main {best['main_cpu_s']:.2f}, "
                  f"workers {best['worker_cpu_s']:.2f})")  # fmt: skip
            result[f"tokens_per_s_{workers}_workers"] = round(best["tokens_per_s"])
            result[f"cpu_s_{workers}_workers"] = {"main": round(best["main_cpu_s"], 2), "workers": round(best["worker_cpu_s"], 2)}
            result.update(pairs=best["pairs"], tokens=best["tokens"])
    if 1 in args.workers and 2 in args.workers:
        result["speedup_2_vs_1"] = round(result["tokens_per_s_2_workers"] / result["tokens_per_s_1_workers"], 3)
    result.update(
        input=args.input or f"tiny pairs x {args.records}",
        tokenizer=os.path.relpath(args.tokenizer_model),
        load_average_1min=os.getloadavg()[0],
    )
    print_result(result)


if __name__ == "__main__":
    main()
