"""Runs the math layer on a (DP x CP x TP) gloo grid and saves each rank's results.

Rank layout: rank = (dp * CP + cp) * TP + tp (TP innermost, as megatron-core). Every rank builds the
same full inputs from a fixed seed, keeps its vocabulary shard (TP), its sequence slice (CP, the
load-balanced 2*CP-chunk split megatron-core uses) and its pairs (DP: pair i goes to rank i % DP).
"""

import argparse
import os

import torch
import torch.distributed as dist

from sampo_megatron.losses import DEBIAS, DebiasInputs, LossConfig, PreferenceInputs, preference_loss
from sampo_megatron.ops import vocab_parallel_kl, vocab_parallel_logprobs
from sampo_megatron.runtime.distributed import close_distributed, init_distributed

B, S, V = 4, 24, 96
PROMPT = 4


def full_inputs():
    gen = torch.Generator().manual_seed(1234)
    policy = torch.randn(S, 2 * B, V, generator=gen) * 2
    ref = policy + 0.3 * torch.randn(S, 2 * B, V, generator=gen)
    target = torch.randint(0, V, (S, 2 * B), generator=gen)
    lengths = torch.tensor([5, 17, 9, 3, 12, 4, 9, 20])  # chosen 0..3, rejected 4..7
    pos = torch.arange(S)[None, :] - PROMPT
    mask = (pos >= 0) & (pos < lengths[:, None])  # [2B, S]
    return policy, ref, target, mask, torch.where(mask, pos, -1)


def cp_positions(cp_size: int, cp_rank: int) -> torch.Tensor:
    chunk = S // (2 * cp_size)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk)
    second = torch.arange((2 * cp_size - 1 - cp_rank) * chunk, (2 * cp_size - cp_rank) * chunk)
    return torch.cat([first, second])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--cp", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    tp, cp = args.tp, args.cp
    dp = world // (tp * cp)
    tp_rank, cp_rank, dp_rank = rank % tp, (rank // tp) % cp, rank // (tp * cp)

    tp_group = cp_group = None
    for d in range(dp):
        for c in range(cp):
            g = dist.new_group([(d * cp + c) * tp + t for t in range(tp)])
            if (d, c) == (dp_rank, cp_rank):
                tp_group = g
        for t in range(tp):
            g = dist.new_group([(d * cp + c) * tp + t for c in range(cp)])
            if (d, t) == (dp_rank, tp_rank):
                cp_group = g

    policy, ref, target, mask, index = full_inputs()
    pairs = torch.arange(dp_rank, B, dp)
    rows = torch.cat([pairs, pairs + B])
    seq = cp_positions(cp, cp_rank)
    vocab = torch.arange(tp_rank * V // tp, (tp_rank + 1) * V // tp)
    local = lambda x: x[seq][:, rows][..., vocab]  # noqa: E731  [S_local, R_local, V/TP]

    results = {"rank": rank, "tp_rank": tp_rank, "cp_rank": cp_rank, "dp_rank": dp_rank, "seq": seq, "rows": rows, "vocab": vocab}

    # 1. log-probs and gradients (fp32 and bf16), a fixed upstream gradient
    up = torch.randn(S, 2 * B, generator=torch.Generator().manual_seed(7))[seq][:, rows]
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        x = local(policy).to(dtype).requires_grad_(True)
        out = vocab_parallel_logprobs(x, target[seq][:, rows], tp_group, chunk_size=5)
        (out * up).sum().backward()
        results[f"logprobs_{name}"], results[f"grad_{name}"] = out.detach(), x.grad

    # 2. TDPO's per-token KL
    x = local(policy).requires_grad_(True)
    kl = vocab_parallel_kl(local(ref), x, tp_group, chunk_size=4)
    (kl * up).sum().backward()
    results["kl"], results["kl_grad"] = kl.detach(), x.grad

    # 3. the full SamPO loss (and TopK) from sharded logits, sums over CP
    loc_mask, loc_index = mask[rows][:, seq], index[rows][:, seq]
    for debias in ("sampo", "sampo_topk", "sanorm", "ld_dpo"):
        x = local(policy).requires_grad_(True)
        pol_logps = vocab_parallel_logprobs(x, target[seq][:, rows], tp_group).t()
        ref_logps = vocab_parallel_logprobs(local(ref), target[seq][:, rows], tp_group).t()
        cfg = LossConfig(
            length_debias=debias,
            sampo_mask="independent" if debias == "sampo" else "shared",
            seed=3,
            ld_alpha=0.3 if debias == "ld_dpo" else None,
        )
        out = preference_loss(
            PreferenceInputs(pol_logps, loc_mask, pairs, ref_logps, response_index=loc_index), cfg, epoch=2, cp_group=cp_group
        )
        out.losses.sum().backward()
        results[f"{debias}_losses"] = out.losses.detach()
        results[f"{debias}_metrics"] = out.metrics
        results[f"{debias}_grad"] = x.grad
        lengths = mask[rows].sum(1)
        weights = DEBIAS[debias](
            DebiasInputs(
                response_mask=loc_mask, response_index=loc_index, lengths=lengths,
                partner_lengths=torch.cat([lengths[len(pairs):], lengths[: len(pairs)]]),
                sample_ids=torch.cat([pairs, pairs]), roles=torch.tensor([0] * len(pairs) + [1] * len(pairs)),
                logratios=(pol_logps - ref_logps).detach(), seed=3, epoch=2, sampo_mask=cfg.sampo_mask, cp_group=cp_group,
                ld_alpha=cfg.ld_alpha,
            )
        )  # fmt: skip
        results[f"{debias}_policy_weights"], results[f"{debias}_ref_weights"] = weights.policy, weights.reference

    torch.save(results, os.path.join(args.out, f"rank{rank}.pt"))
    dist.barrier()
    for group in {tp_group, cp_group}:  # this rank's groups (the others' are not created here)
        dist.destroy_process_group(group)
    close_distributed()


if __name__ == "__main__":
    main()
