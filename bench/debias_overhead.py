"""What SamPO's down-sampling costs: log-prob + loss + backward with ``--length-debias sampo``
against ``none``, at 8 pairs x 4096 tokens and vocabulary 8192 (a small vocabulary, so the mask's
share of the time is not hidden behind a large projection).

The two variants alternate over ``--repeats`` rounds and each keeps its fastest round. The last line
is one JSON object; ``overhead`` is ``t_sampo / t_none - 1`` (0.05 = 5%).

    python bench/debias_overhead.py [--pairs 8] [--seq 4096] [--vocab 8192] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import torch
from _util import Activation, machine, print_result

from sampo_megatron.losses import LossConfig, PreferenceInputs, preference_loss
from sampo_megatron.ops import vocab_parallel_logprobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(0)
    rows = 2 * args.pairs
    logits = torch.randn(rows, args.seq, args.vocab, generator=gen)
    target = torch.randint(0, args.vocab, (rows, args.seq), generator=gen)
    ref_logps = -torch.rand(rows, args.seq, generator=gen) * 5
    lengths = torch.randint(args.seq // 4, args.seq - args.prompt, (rows,), generator=gen)
    position = torch.arange(args.seq)[None, :] - args.prompt
    mask = (position >= 0) & (position < lengths[:, None])
    sample_ids = torch.arange(args.pairs)
    anchor = torch.zeros(1, requires_grad=True)

    def step(debias: str) -> float:
        start = time.perf_counter()
        logps = vocab_parallel_logprobs(Activation.apply(anchor, logits), target)
        out = preference_loss(PreferenceInputs(logps, mask, sample_ids, ref_logps), LossConfig(length_debias=debias))
        out.losses.mean().backward()
        return time.perf_counter() - start

    step("none"), step("sampo")  # warm-up
    times = {"none": [], "sampo": []}
    for _ in range(args.repeats):
        for debias in times:
            times[debias].append(step(debias))
    best = {k: min(v) for k, v in times.items()}

    # The draw itself, alone: keys, sort and threshold for all 2 x pairs responses.
    def draw() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            preference_loss(PreferenceInputs(ref_logps, mask, sample_ids, ref_logps), LossConfig(length_debias="sampo"))
        return time.perf_counter() - start

    def no_draw() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            preference_loss(PreferenceInputs(ref_logps, mask, sample_ids, ref_logps), LossConfig(length_debias="none"))
        return time.perf_counter() - start

    loss_only = {"sampo": min(draw() for _ in range(20)), "none": min(no_draw() for _ in range(20))}
    print_result(
        {
            "bench": "debias_overhead",
            "pairs": args.pairs,
            "seq": args.seq,
            "vocab": args.vocab,
            "seconds_none": round(best["none"], 4),
            "seconds_sampo": round(best["sampo"], 4),
            "overhead": round(best["sampo"] / best["none"] - 1, 4),
            "loss_only_seconds_none": round(loss_only["none"], 5),
            "loss_only_seconds_sampo": round(loss_only["sampo"], 5),
            "machine": machine(),
        }
    )


if __name__ == "__main__":
    main()
