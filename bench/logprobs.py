"""Time and peak memory of the vocab-parallel log-prob op (forward + backward) against the plain
``log_softmax(logits.float()).gather(target)``, at sequence 4096 and vocabulary 152064 (Qwen); and
of the fused output layer + log-prob op (``--fused-logprobs``, ops/fused_logprobs.py) against
today's output layer + op, from ``n`` = 8192 hidden states of width 1024 at TP=2.

Each configuration runs in a fresh process (``torchrun`` with gloo for TP=2) so peaks do not mix.
Memory is the resident-set high-water mark above the RSS with the inputs already allocated (the
logits; for the fused comparison the hidden states and the weight shard), as a multiple of the
logits' own size, resp. as the ratio fused / today (``fused_peak_ratio``, target <= 0.15). At TP=2
the plain version must all-gather the vocabulary first. The last line is one JSON object.

    python bench/logprobs.py [--seq 4096] [--vocab 152064] [--repeats 2] [--fused-positions 8192 --hidden 1024]
    python bench/logprobs.py --only-fused        # the fused comparison alone
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.distributed as dist
from _util import Activation, best_time, machine, peak_rss_window, print_result

from sampo_megatron.ops import fused_linear_logprobs, vocab_parallel_logprobs


def _plain(logits, target, tp_group):
    if tp_group is not None:
        parts = [torch.empty_like(logits) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, logits.detach().contiguous())
        parts[dist.get_rank()] = logits
        logits = torch.cat(parts, dim=-1)
    return logits.float().log_softmax(-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)


def _hidden_worker(args, tp_group) -> None:
    """``output_layer`` (today: logits = x W^T, then the op, in-place backward as in training) or
    ``fused`` from ``n`` hidden states; fp32, one step measured (after one warm-up)."""
    vocab_local = args.vocab // args.tp
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.fused_positions, args.hidden, generator=gen).requires_grad_(True)
    weight = (torch.randn(vocab_local, args.hidden, generator=gen) * 0.02).requires_grad_(True)
    target = torch.randint(0, args.vocab, (args.fused_positions,), generator=gen)

    def step():
        hidden.grad = weight.grad = None
        if args.impl == "fused":
            out = fused_linear_logprobs(hidden, weight, target, tp_group)
        else:
            out = vocab_parallel_logprobs(hidden @ weight.t(), target, tp_group, inplace_backward=True)
        out.sum().backward()
        if args.impl != "fused" and tp_group is not None:
            dist.all_reduce(hidden.grad, group=tp_group)  # the output layer's input gradient (the fused op's own)

    step()  # warm-up: the gradients exist from here on, in both
    with peak_rss_window() as peak:
        start = time.perf_counter()
        step()
        seconds = time.perf_counter() - start
    stats = torch.tensor([peak["extra_bytes"], seconds], dtype=torch.float64)
    if tp_group is not None:
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    if tp_group is None or dist.get_rank() == 0:
        logits_bytes = args.fused_positions * vocab_local * 4
        print("RESULT " + json.dumps({"seconds": stats[1].item(), "extra_bytes": stats[0].item(), "logits_bytes": logits_bytes}))


def _worker(args) -> None:
    tp_group = None
    if args.tp > 1:
        dist.init_process_group("gloo")
        tp_group = dist.group.WORLD
    if args.impl in ("fused", "output_layer"):
        _hidden_worker(args, tp_group)
        if tp_group is not None:
            dist.destroy_process_group()
        return
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
    flags = ["--worker", "--seq", str(args.seq), "--vocab", str(args.vocab), "--repeats", str(args.repeats),
             "--fused-positions", str(args.fused_positions), "--hidden", str(args.hidden)]  # fmt: skip
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
    parser.add_argument("--fused-positions", type=int, default=8192, help="hidden states of the fused comparison")
    parser.add_argument("--hidden", type=int, default=1024, help="their width")
    parser.add_argument("--only-fused", action="store_true", help="run the fused comparison only")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--impl", default="ours", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return _worker(args)

    fused = {impl: _run({"tp": 2, "dtype": "fp32", "impl": impl}, args) for impl in ("output_layer", "fused")}
    fused_row = {
        "positions": args.fused_positions, "hidden": args.hidden, "tp": 2, "logits_bytes": fused["fused"]["logits_bytes"],
        "output_layer_extra_bytes": fused["output_layer"]["extra_bytes"], "fused_extra_bytes": fused["fused"]["extra_bytes"],
        "output_layer_seconds": round(fused["output_layer"]["seconds"], 2), "fused_seconds": round(fused["fused"]["seconds"], 2),
        "fused_peak_ratio": round(fused["fused"]["extra_bytes"] / fused["output_layer"]["extra_bytes"], 3),
        "fused_time_ratio": round(fused["fused"]["seconds"] / fused["output_layer"]["seconds"], 3),
    }  # fmt: skip
    print(json.dumps(fused_row), flush=True)
    if args.only_fused:
        print_result({"bench": "logprobs", "vocab": args.vocab, "fused": fused_row, "fused_peak_ratio": fused_row["fused_peak_ratio"],
                      "fused_time_ratio": fused_row["fused_time_ratio"], "machine": machine()})  # fmt: skip
        return
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
            "fused": fused_row,
            "fused_peak_ratio": fused_row["fused_peak_ratio"],
            "fused_time_ratio": fused_row["fused_time_ratio"],
            "machine": machine(),
        }
    )


if __name__ == "__main__":
    main()
