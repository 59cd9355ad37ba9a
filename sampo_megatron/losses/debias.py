"""Length-debiasing transforms: per-token weights that turn per-token log-probs into sequence values.

Every transform is a weighted sum ``sum_t w_t * logp_t`` over response tokens, with an *effective
token count* used by losses that average (SimPO). For a pair with lengths ``T_w``, ``T_l`` and
``T_m = min(T_w, T_l)`` (Lu et al. 2024):

- ``none``       (DPO):      ``w_t = 1``;                                   count ``T``
- ``sampo``      (Eq. 10):   ``w_t = 1`` on ``T_m`` uniformly drawn positions; count ``T_m``
- ``sampo_topk`` (App. G):   ``w_t = 1`` on the ``T_m`` positions of largest ``r_t``; count ``T_m``
- ``sanorm``     (Eq. 9):    ``w_t = (T_w + T_l) / (2 T)``;                 count ``(T_w + T_l) / 2``
- ``ld_dpo``     (LD-DPO, Liu et al. 2024): ``w_t = 1`` on the public prefix ``t < T_m``,
  ``w_t = alpha`` past it (only the longer response has such tokens);   count ``T_m + alpha (T - T_m)``

Policy and reference log-probs get their own weights so that ``--sampo-mask independent`` can draw
them separately; with shared weights ``sum w (logp - ref) = sum w logp - sum w ref``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..sampling import (
    CHOSEN,
    POLICY_STREAM,
    REFERENCE_STREAM,
    REJECTED,
    response_seeds,
    role_code,
    sampled_kept_mask,
    topk_kept_mask,
)
from .names import LENGTH_DEBIAS
from .registry import Registry


@dataclass
class DebiasInputs:
    """Everything a transform may look at, for ``R = 2B`` responses (chosen rows, then rejected rows)."""

    response_mask: torch.Tensor
    """``[R, S]`` bool, response tokens on this rank's slice of the sequence."""
    response_index: torch.Tensor
    """``[R, S]`` int64 position inside the response (global over CP), ``-1`` elsewhere."""
    lengths: torch.Tensor
    """``[R]`` response lengths ``T`` over the whole sequence."""
    partner_lengths: torch.Tensor
    """``[R]`` the other response's length in the same pair."""
    sample_ids: torch.Tensor
    """``[R]`` sample id of each response's pair."""
    roles: torch.Tensor
    """``[R]`` CHOSEN or REJECTED."""
    logratios: torch.Tensor | None
    """``[R, S]`` detached per-token ``log pi - log pi_ref`` (TopK ranks these)."""
    seed: int
    epoch: int
    sampo_mask: str
    cp_group: object = None
    ld_alpha: float | None = None
    """LD-DPO's weight of the tokens past the public prefix."""

    @property
    def keep_counts(self) -> torch.Tensor:
        return torch.minimum(self.lengths, self.partner_lengths)


@dataclass
class DebiasWeights:
    policy: torch.Tensor
    """``[R, S]`` weights of the policy's per-token log-probs."""
    reference: torch.Tensor
    """``[R, S]`` weights of the reference's per-token log-probs."""
    count: torch.Tensor
    """``[R]`` effective token count (float)."""


DEBIAS: Registry[Callable[[DebiasInputs], DebiasWeights]] = Registry("length debias", LENGTH_DEBIAS)


def _sampled_weights(inputs: DebiasInputs, streams: tuple[int, ...]) -> list[torch.Tensor]:
    """One kept mask per draw stream, all streams drawn in one batched call (rows stacked)."""
    n = len(streams)
    roles = torch.cat([role_code(inputs.roles, stream) for stream in streams])
    seeds = response_seeds(inputs.seed, inputs.epoch, inputs.sample_ids.repeat(n), roles)
    kept = sampled_kept_mask(inputs.response_index.repeat(n, 1), inputs.lengths.repeat(n), inputs.keep_counts.repeat(n), seeds)
    return list(kept.float().chunk(n))


@DEBIAS.register("none")
def no_debias(inputs: DebiasInputs) -> DebiasWeights:
    weights = inputs.response_mask.float()
    return DebiasWeights(weights, weights, inputs.lengths.float())


@DEBIAS.register("sampo")
def sampo(inputs: DebiasInputs) -> DebiasWeights:
    if inputs.sampo_mask == "shared":
        policy = reference = _sampled_weights(inputs, (POLICY_STREAM,))[0]
    else:
        policy, reference = _sampled_weights(inputs, (POLICY_STREAM, REFERENCE_STREAM))
    return DebiasWeights(policy, reference, inputs.keep_counts.float())


@DEBIAS.register("sampo_topk")
def sampo_topk(inputs: DebiasInputs) -> DebiasWeights:
    if inputs.logratios is None:
        raise ValueError("sampo_topk ranks per-token log-ratios; pass the per-token log-probs")
    kept = topk_kept_mask(inputs.logratios, inputs.response_index, inputs.keep_counts, inputs.cp_group).float()
    return DebiasWeights(kept, kept, inputs.keep_counts.float())


@DEBIAS.register("sanorm")
def sanorm(inputs: DebiasInputs) -> DebiasWeights:
    # float64 weights: sequence_sum casts them to the log-probs' dtype, so float64 inputs stay exact.
    mean_length = (inputs.lengths + inputs.partner_lengths).double() / 2
    scale = mean_length / inputs.lengths.clamp(min=1).double()
    weights = inputs.response_mask.double() * scale[:, None]
    return DebiasWeights(weights, weights, mean_length)


@DEBIAS.register("ld_dpo")
def ld_dpo(inputs: DebiasInputs) -> DebiasWeights:
    """LD-DPO's desensitised likelihood ``log pi^(y) = sum_{t < T_m} log pi_t + alpha sum_{t >= T_m} log pi_t``.

    Applied to the policy and the reference alike, as the paper's loss divides ``pi^_theta`` by
    ``pi^_ref`` (TRL does the same; ms-swift weights the policy only). ``alpha = 1`` is DPO.
    """
    if inputs.ld_alpha is None:
        raise ValueError("--length-debias ld_dpo needs --ld-alpha")
    # float64 weights, as sanorm's: float64 inputs stay exact.
    prefix = inputs.response_index < inputs.keep_counts[:, None]
    alpha = torch.full(prefix.shape, inputs.ld_alpha, dtype=torch.float64, device=prefix.device)
    weights = torch.where(prefix, 1.0, alpha) * inputs.response_mask.double()
    keep = inputs.keep_counts.double()
    return DebiasWeights(weights, weights, keep + inputs.ld_alpha * (inputs.lengths.double() - keep))


DEBIAS.check_complete()

__all__ = ["CHOSEN", "DEBIAS", "DebiasInputs", "DebiasWeights", "REJECTED"]
