"""Sums over a sequence that is split across context-parallel ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .vocab_parallel import _group_size


class _AllReduceSumSameLoss(torch.autograd.Function):
    """All-reduce SUM whose backward is the identity.

    Every CP rank computes the same pair loss from the summed values, so ``dL/ds_r = dL/dS`` for each
    rank's partial sum ``s_r``; the gradient reduction over the data-parallel x context-parallel
    group later adds the ranks' parameter gradients together.
    """

    @staticmethod
    def forward(ctx, partial, group):
        total = partial.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None


def sequence_sum(values: torch.Tensor, mask: torch.Tensor, cp_group=None) -> torch.Tensor:
    """``sum_t mask[..., t] * values[..., t]`` over the last dimension, across context-parallel ranks.

    Args:
        values: ``[..., S_local]`` per-token values on this rank's slice of the sequence.
        mask: ``[..., S_local]`` bool or 0/1 weights of the positions that count.
        cp_group: context-parallel process group, or ``None`` when the sequence is not split.

    Returns:
        ``[...]`` the sum over the whole sequence, identical on every CP rank.
    """
    partial = (values * mask.to(values.dtype)).sum(dim=-1)
    if _group_size(cp_group) == 1:
        return partial
    return _AllReduceSumSameLoss.apply(partial, cp_group)


def sequence_count(mask: torch.Tensor, cp_group=None) -> torch.Tensor:
    """Number of positions set in ``mask`` along the last dimension, over the whole (CP-split) sequence."""
    count = mask.to(torch.int64).sum(dim=-1)
    if _group_size(cp_group) > 1:
        dist.all_reduce(count, op=dist.ReduceOp.SUM, group=cp_group)
    return count
