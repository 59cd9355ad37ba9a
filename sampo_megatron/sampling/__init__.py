"""Rank-consistent down-sampling masks for SamPO."""

from .masks import (
    CHOSEN,
    POLICY_STREAM,
    REFERENCE_STREAM,
    REJECTED,
    position_keys,
    response_seeds,
    role_code,
    sampled_kept_mask,
    topk_kept_mask,
)

__all__ = [
    "CHOSEN",
    "POLICY_STREAM",
    "REFERENCE_STREAM",
    "REJECTED",
    "position_keys",
    "response_seeds",
    "role_code",
    "sampled_kept_mask",
    "topk_kept_mask",
]
