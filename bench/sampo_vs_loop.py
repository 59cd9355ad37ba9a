"""SamPO's down-sampling as the official code does it (a Python loop over pairs, policy and reference
drawn separately with ``torch.multinomial`` without replacement) against the project's vectorised
mask + loss (``preference_loss``, ``--length-debias sampo``), from per-token log-probs to the
policy's gradient.

Both compute the sigmoid DPO loss with SamPO (Eq. 10): for each pair ``T_m = min(T_w, T_l)``, the
longer response keeps ``T_m`` uniformly drawn tokens, then ``-log sigmoid(beta * (sum kept r^w -
sum kept r^l))``, averaged over pairs, and backward. The project's version is timed with
``--sampo-mask independent`` (separate draws for policy and reference, as the loop) and with the
default ``shared``. Each variant keeps its best of ``--repeats`` rounds (alternating).

    python bench/sampo_vs_loop.py [--repeats 25]

The last line is one JSON object; ``ratio_loop_over_ours`` per shape is ``t_loop / t_ours``
(independent draws), > 1 when the project's version is faster.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from _util import machine, print_result

from sampo_megatron.losses import LossConfig, PreferenceInputs, preference_loss

BETA = 0.1


def _downsampled_sums(logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The official per-pair loop: ``[2B]`` sums where the longer response of each pair keeps
    ``min(T_w, T_l)`` of its tokens, drawn by ``torch.multinomial`` without replacement."""
    pairs = logps.shape[0] // 2
    sums = []
    for i in range(pairs):
        chosen = logps[i][mask[i]]
        rejected = logps[pairs + i][mask[pairs + i]]
        keep = min(chosen.numel(), rejected.numel())
        if chosen.numel() > keep:
            chosen = chosen[torch.multinomial(torch.ones(chosen.numel()), keep, replacement=False)]
        if rejected.numel() > keep:
            rejected = rejected[torch.multinomial(torch.ones(rejected.numel()), keep, replacement=False)]
        sums.append((chosen.sum(), rejected.sum()))
    return torch.stack([s for s, _ in sums] + [s for _, s in sums])


def loop_loss(policy: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over pairs of ``-log sigmoid(beta * ((pi_w - ref_w) - (pi_l - ref_l)))``, down-sampled
    sums drawn separately for policy and reference (as the official code calls its log-prob
    function once per model)."""
    pi = _downsampled_sums(policy, mask)
    with torch.no_grad():
        rf = _downsampled_sums(ref, mask)
    pairs = pi.shape[0] // 2
    logits = (pi[:pairs] - rf[:pairs]) - (pi[pairs:] - rf[pairs:])
    return -F.logsigmoid(BETA * logits).mean()


def ours_loss(policy, ref, mask, sample_ids, sampo_mask: str) -> torch.Tensor:
    cfg = LossConfig(loss_type="sigmoid", length_debias="sampo", beta=BETA, sampo_mask=sampo_mask)
    return preference_loss(PreferenceInputs(policy, mask, sample_ids, ref), cfg).losses.mean()


def make_inputs(pairs: int, seq: int, gen: torch.Generator):
    """Per-token log-probs and masks: prompts of seq/8 tokens, responses of random lengths."""
    rows = 2 * pairs
    prompt = seq // 8
    lengths = torch.randint(seq // 8, seq - prompt, (rows,), generator=gen)
    position = torch.arange(seq)[None, :] - prompt
    mask = (position >= 0) & (position < lengths[:, None])
    policy = -torch.rand(rows, seq, generator=gen) * 5
    ref = policy + 0.01 * torch.randn(rows, seq, generator=gen)
    return policy, ref, mask, torch.arange(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repeats", type=int, default=25, help="rounds; each variant keeps its best (ms-scale timings need many)"
    )
    parser.add_argument("--shapes", default="8x512,8x4096,64x512,64x4096", help="PAIRSxTOKENS,...")
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    shapes = []
    for shape in args.shapes.split(","):
        pairs, seq = (int(x) for x in shape.split("x"))
        policy0, ref, mask, sample_ids = make_inputs(pairs, seq, gen)
        variants = {
            "loop": lambda p: loop_loss(p, ref, mask),
            "ours_independent": lambda p: ours_loss(p, ref, mask, sample_ids, "independent"),
            "ours_shared": lambda p: ours_loss(p, ref, mask, sample_ids, "shared"),
        }

        def timed(fn) -> float:
            policy = policy0.clone().requires_grad_(True)
            start = time.perf_counter()
            fn(policy).backward()
            return time.perf_counter() - start

        # Same expected value: with equal lengths the draws keep everything, so the losses agree.
        equal = mask.clone()
        equal[pairs:] = equal[:pairs]
        same = torch.allclose(
            loop_loss(policy0, ref, equal), ours_loss(policy0, ref, equal, sample_ids, "independent"), rtol=1e-4, atol=1e-6
        )
        for fn in variants.values():
            timed(fn)  # warm-up
        best = {name: float("inf") for name in variants}
        for _ in range(args.repeats):
            for name, fn in variants.items():
                best[name] = min(best[name], timed(fn))
        shapes.append(
            {
                "pairs": pairs,
                "tokens": seq,
                "seconds": {k: round(v, 6) for k, v in best.items()},
                "ratio_loop_over_ours": round(best["loop"] / best["ours_independent"], 2),
                "ratio_loop_over_ours_shared": round(best["loop"] / best["ours_shared"], 2),
                "equal_lengths_loss_agrees": bool(same),
            }
        )
        print(shapes[-1], flush=True)
    print_result(
        {
            "bench": "sampo_vs_loop",
            "shapes": shapes,
            "ours_faster_everywhere": all(s["ratio_loop_over_ours"] > 1 for s in shapes),
            "machine": machine(),
        }
    )


if __name__ == "__main__":
    main()
