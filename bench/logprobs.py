"""Time and peak memory of the vocab-parallel log-prob op (forward + backward) against the plain
``log_softmax(logits.float()).gather(target)``, at sequence 4096 and vocabulary 152064 (Qwen).

Each configuration runs in a fresh process (``torchrun`` with gloo for TP=2) so peaks do not mix.
Memory is the resident-set high-water mark above the RSS with the logits already allocated, as a
multiple of the logits' own size. At TP=2 the plain version must all-gather the vocabulary first.
The last line is one JSON object.

    python bench/logprobs.py [--seq 4096] [--vocab 152064] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch
import torch.distributed as dist
from _util import Activation, best_time, machine, peak_rss_window, print_result

from sampo_megatron.ops import vocab_parallel_logprobs


def _plain(logits, target, tp_group):
    if tp_group is not None:
        parts = [torch.empty_like(logits) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, logits.detach().contiguous())
        parts[dist.get_rank()] = logits
        logits = torch.cat(parts, dim=-1)
    return logits.float().log_softmax(-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)


def _worker(args) -> None:
    tp_group = None
    if args.tp > 1:
        dist.init_process_group("gloo")
        tp_group = dist.group.WORLD
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    vocab_local = args.vocab // args.tp
    gen = torch.Generator().manual_seed(0)
    logits = torch.empty(args.seq, vocab_local, dtype=dtype)
    for start in range(0, args.seq, 256):  # fill in slices: no full-size fp32 temporary
        logits[start : start + 256] = torch.randn(min(256, args.seq - start), vocab_local, generator=gen)
    target = torch.randint(0, args.vocab, (args.seq,), generator=gen)
    anchor = torch.zeros(1, requires_grad=True)
    # The in-place variant overwrites the logits with their gradient: restore them, untimed, each run.
    pristine = logits.clone() if args.impl == "ours_inplace" else None

    def restore():
        if pristine is not None:
            logits.copy_(pristine)

    def step():
        x = Activation.apply(anchor, logits)
        if args.impl == "plain":
            out = _plain(x, target, tp_group)
        else:
            out = vocab_parallel_logprobs(x, target, tp_group, inplace_backward=args.impl == "ours_inplace")
        out.sum().backward()

    step()  # warm-up
    restore()
    with peak_rss_window() as peak:
        step()
    seconds = best_time(step, args.repeats, setup=restore)
    if tp_group is not None:
        stats = torch.tensor([peak["extra_bytes"], seconds], dtype=torch.float64)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        peak["extra_bytes"], seconds = stats.tolist()
    if tp_group is None or dist.get_rank() == 0:
        logits_bytes = logits.numel() * logits.element_size()
        print("RESULT " + json.dumps({"seconds": seconds, "extra_over_logits": peak["extra_bytes"] / logits_bytes}))
    if tp_group is not None:
        dist.destroy_process_group()


def _run(cfg: dict, args) -> dict:
    flags = ["--worker", "--seq", str(args.seq), "--vocab", str(args.vocab), "--repeats", str(args.repeats)]
    flags += ["--tp", str(cfg["tp"]), "--dtype", cfg["dtype"], "--impl", cfg["impl"]]
    # A fixed mmap threshold and trimming make freed memory leave the process, so RSS tracks live tensors.
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // cfg["tp"])))
    env.update(MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    if cfg["tp"] > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cfg['tp']}", __file__]
    else:
        cmd = [sys.executable, __file__]
    proc = subprocess.run(cmd + flags, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{cfg} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=152064)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--impl", default="ours", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return _worker(args)

    rows = []
    for tp in (1, 2):
        for dtype in ("fp32", "bf16"):
            measured = {impl: _run({"tp": tp, "dtype": dtype, "impl": impl}, args) for impl in ("ours", "ours_inplace", "plain")}
            row = {"tp": tp, "dtype": dtype}
            for impl, m in measured.items():
                row[f"{impl}_seconds"] = round(m["seconds"], 3)
                row[f"{impl}_extra_over_logits"] = round(m["extra_over_logits"], 3)
            row["speedup_vs_plain"] = round(measured["plain"]["seconds"] / measured["ours"]["seconds"], 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print_result(
        {
            "bench": "logprobs",
            "seq": args.seq,
            "vocab": args.vocab,
            "configs": rows,
            "peak_extra_over_logits": max(r["ours_extra_over_logits"] for r in rows),
            "peak_extra_over_logits_inplace": max(r["ours_inplace_extra_over_logits"] for r in rows),
            "naive_peak_extra_over_logits": max(r["plain_extra_over_logits"] for r in rows),
            "machine": machine(),
        }
    )


if __name__ == "__main__":
    main()
