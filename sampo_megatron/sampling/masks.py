"""Rank-consistent down-sampling masks (SamPO, Lu et al. 2024, Eq. 10 and App. G).

For a pair with response lengths ``T_w`` and ``T_l`` let ``T_m = min(T_w, T_l)``. The shorter response
keeps all its tokens; the longer keeps ``T_m`` positions drawn uniformly without replacement.

The draw is a pure function of ``(seed, epoch, sample id, role, position within the response)``: each
position gets the key ``mix32(h(seed, epoch, sample id, role) ^ position)`` and a response keeps the
``T_m`` positions with the smallest keys. ``mix32`` is a bijection, so keys within a response are
distinct and the kept set is a uniformly random ``T_m``-subset. Every rank (TP, CP, PP stage)
computes the same mask with no communication, whatever the micro-batch split, and a resumed run
redraws exactly what an uninterrupted one would have drawn.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..ops.vocab_parallel import _group_size
from .hashing import hash_combine, mix32

CHOSEN, REJECTED = 0, 1
"""Response roles (the pair member)."""
POLICY_STREAM, REFERENCE_STREAM = 0, 1
"""Draw streams: ``--sampo-mask independent`` draws the reference's positions from a second stream."""

_SALT = 0x5A3D0F1B
_NO_KEY = 1 << 32  # larger than every 32-bit key: padding past a response's end


def role_code(role: torch.Tensor | int, stream: int = POLICY_STREAM) -> torch.Tensor | int:
    """Role field of the hash: pair member (chosen/rejected) and draw stream."""
    return role + 2 * stream


def response_seeds(seed: int, epoch: int, sample_ids: torch.Tensor, roles: torch.Tensor) -> torch.Tensor:
    """Per-response hash state ``h(seed, epoch, sample id, role)``, int64 in ``[0, 2**32)``."""
    state = hash_combine(hash_combine(_SALT, int(seed)), int(epoch))  # the same for every row: Python ints
    state = hash_combine(state, sample_ids.to(torch.int64))
    return hash_combine(state, torch.as_tensor(roles, dtype=torch.int64, device=sample_ids.device))


def position_keys(response_seed: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Sampling key of each position: ``mix32(response_seed ^ position)``; distinct within a response."""
    return mix32(response_seed ^ positions)


def sampled_kept_mask(
    response_index: torch.Tensor,
    lengths: torch.Tensor,
    keep_counts: torch.Tensor,
    response_seed: torch.Tensor,
) -> torch.Tensor:
    """Keep, in each response, the ``keep_counts`` positions with the smallest keys.

    Args:
        response_index: ``[R, S]`` index of each local position inside its response (global over CP
            ranks), ``-1`` at prompt and padding positions.
        lengths: ``[R]`` response token counts ``T`` over the whole sequence.
        keep_counts: ``[R]`` how many positions each response keeps (``<= lengths``).
        response_seed: ``[R]`` from :func:`response_seeds`.

    Returns:
        ``[R, S]`` bool, true at kept response positions; never at prompt or padding positions.
    """
    is_response = response_index >= 0
    # Only responses that give up tokens need a draw (the longer one of each pair): the others keep
    # every position, so the hashing and sorting run on about half the rows or fewer.
    drawn = (keep_counts < lengths).nonzero().squeeze(1)
    if drawn.numel() == 0:
        return is_response
    lengths, keep_counts, response_seed = lengths[drawn], keep_counts[drawn], response_seed[drawn]
    positions = torch.arange(int(lengths.max()), device=lengths.device)
    all_keys = position_keys(response_seed[:, None], positions[None, :])
    all_keys = torch.where(positions[None, :] < lengths[:, None], all_keys, _NO_KEY)
    threshold = all_keys.sort(dim=1).values.gather(1, (keep_counts - 1).clamp(min=0)[:, None]).squeeze(1)
    threshold = torch.where(keep_counts > 0, threshold, -1)

    local_keys = position_keys(response_seed[:, None], response_index[drawn].clamp(min=0))
    kept = is_response.clone()
    kept[drawn] = is_response[drawn] & (local_keys <= threshold[:, None])
    return kept


def topk_kept_mask(
    scores: torch.Tensor,
    response_index: torch.Tensor,
    keep_counts: torch.Tensor,
    cp_group=None,
) -> torch.Tensor:
    """Keep, in each response, the ``keep_counts`` positions with the largest ``scores`` (SamPO-TopK).

    Ties are broken by the lower position index, so exactly ``keep_counts`` positions are kept and
    every rank picks the same ones. Under context parallelism the scores of the whole sequence are
    gathered over ``cp_group`` (``[R, S]`` fp32, small) before ranking.

    Args:
        scores: ``[R, S]`` per-token log-ratios on this rank's slice (detached).
        response_index: ``[R, S]`` position inside the response (global), ``-1`` elsewhere.
        keep_counts: ``[R]`` how many positions to keep.
        cp_group: context-parallel group or ``None``.

    Returns:
        ``[R, S]`` bool kept mask for this rank's slice.
    """
    scores = scores.detach().float()
    cp_size = _group_size(cp_group)
    local_len = scores.shape[1]
    if cp_size > 1:
        score_parts = [torch.empty_like(scores) for _ in range(cp_size)]
        index_parts = [torch.empty_like(response_index) for _ in range(cp_size)]
        dist.all_gather(score_parts, scores.contiguous(), group=cp_group)
        dist.all_gather(index_parts, response_index.contiguous(), group=cp_group)
        all_scores, all_index = torch.cat(score_parts, dim=1), torch.cat(index_parts, dim=1)
        local_offset = dist.get_rank(cp_group) * local_len
    else:
        all_scores, all_index, local_offset = scores, response_index, 0

    is_response = all_index >= 0
    # Canonical order: by position inside the response, then a stable descending sort by score.
    by_position = torch.where(is_response, all_index, torch.iinfo(torch.int64).max).argsort(dim=1, stable=True)
    ordered_scores = torch.where(is_response, all_scores, float("-inf")).gather(1, by_position)
    by_score = ordered_scores.sort(dim=1, descending=True, stable=True).indices
    order = by_position.gather(1, by_score)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order).contiguous())
    kept = is_response & (rank < keep_counts[:, None])
    return kept[:, local_offset : local_offset + local_len]
