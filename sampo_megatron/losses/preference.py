"""From per-token log-probs to the pair loss and its metrics.

The steps, for ``B`` pairs laid out as ``R = 2B`` rows (chosen rows ``0..B-1``, rejected rows
``B..2B-1``, the same pair order in both halves):

1. response lengths ``T`` (summed over context-parallel ranks) and ``T_m = min(T_w, T_l)``;
2. the length-debiasing weights (:mod:`.debias`);
3. sequence values ``sum_t w_t logp_t`` for policy, reference and (TDPO) per-token KL, summed over CP;
4. the registered pairwise loss (:mod:`.pairwise`), plus ``sft_weight * (-pi_w^full / T_w)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..ops.context_parallel import sequence_count, sequence_sum
from ..sampling import CHOSEN, REJECTED
from .config import LossConfig
from .debias import DEBIAS, DebiasInputs
from .pairwise import LOSSES, PairValues, ResponseValues
from .running_mean import RunningMean


@dataclass
class PreferenceInputs:
    """Per-token inputs for ``B`` pairs (``R = 2B`` rows: chosen then rejected)."""

    policy_logps: torch.Tensor
    """``[R, S]`` policy log-prob of each target token (from :func:`vocab_parallel_logprobs`)."""
    response_mask: torch.Tensor
    """``[R, S]`` bool, true where the target token belongs to the response."""
    sample_ids: torch.Tensor
    """``[B]`` int64 id of each pair, the key of its down-sampling draw."""
    ref_logps: torch.Tensor | None = None
    """``[R, S]`` reference log-probs (``None`` for reference-free losses)."""
    token_kl: torch.Tensor | None = None
    """``[R, S]`` per-token ``KL(pi_ref || pi_theta)`` (TDPO)."""
    response_index: torch.Tensor | None = None
    """``[R, S]`` position inside the response, global over CP ranks, ``-1`` elsewhere. Derived from
    ``response_mask`` when the sequence is not split."""


@dataclass
class PreferenceLossOutput:
    losses: torch.Tensor
    """``[B]`` per-pair loss (reduce it as the batch layout requires)."""
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    """Detached ``[B]`` per-pair values, named as they are logged."""


def _split(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    half = values.shape[0] // 2
    return values[:half], values[half:]


def _response_values(pol, ref, counts, lengths, kl) -> tuple[ResponseValues, ResponseValues]:
    def side(i: int) -> ResponseValues:
        return ResponseValues(
            logps=_split(pol)[i],
            ref_logps=_split(ref)[i],
            count=_split(counts)[i],
            length=_split(lengths)[i],
            kl=None if kl is None else _split(kl)[i],
        )

    return side(0), side(1)


def preference_loss(
    inputs: PreferenceInputs,
    config: LossConfig,
    *,
    epoch: int = 0,
    cp_group=None,
    reward_mean: RunningMean | None = None,
) -> PreferenceLossOutput:
    """Per-pair preference loss with length debiasing, and the per-step metrics (docs/architecture.md).

    Args:
        inputs: per-token log-probs and masks.
        config: loss type, length debiasing and hyper-parameters.
        epoch: data epoch, part of the down-sampling key.
        cp_group: context-parallel group when the sequence is split across ranks.
        reward_mean: running reward mean for losses that need it (BCO); updated in place.

    Returns:
        Per-pair losses (same on every TP and CP rank) and detached per-pair metrics.
    """
    spec = LOSSES[config.loss_type]
    debias = DEBIAS[config.length_debias]
    rows = inputs.policy_logps.shape[0]
    if rows % 2 or inputs.sample_ids.shape[0] * 2 != rows:
        raise ValueError(f"expected 2B rows (chosen then rejected) for B={inputs.sample_ids.shape[0]} pairs, got {rows}")
    if inputs.ref_logps is None and not spec.reference_free:
        raise ValueError(f"loss type {config.loss_type!r} needs reference log-probs")
    if spec.needs_token_kl and inputs.token_kl is None:
        raise ValueError(f"loss type {config.loss_type!r} needs the per-token KL (token_kl)")

    mask = inputs.response_mask.bool()
    response_index = inputs.response_index
    if response_index is None:
        response_index = torch.where(mask, mask.long().cumsum(dim=1) - 1, -1)
    ref_logps = inputs.ref_logps.detach() if inputs.ref_logps is not None else torch.zeros_like(inputs.policy_logps)

    lengths = sequence_count(mask, cp_group)
    chosen_len, rejected_len = _split(lengths)
    pair_ids = inputs.sample_ids.to(torch.int64)
    weights = debias(
        DebiasInputs(
            response_mask=mask,
            response_index=response_index,
            lengths=lengths,
            partner_lengths=torch.cat([rejected_len, chosen_len]),
            sample_ids=torch.cat([pair_ids, pair_ids]),
            roles=torch.cat([torch.full_like(pair_ids, CHOSEN), torch.full_like(pair_ids, REJECTED)]),
            logratios=(inputs.policy_logps - ref_logps).detach(),
            seed=config.seed,
            epoch=epoch,
            sampo_mask=config.sampo_mask,
            cp_group=cp_group,
            ld_alpha=config.ld_alpha,
        )
    )

    policy_seq = sequence_sum(inputs.policy_logps, weights.policy, cp_group)
    ref_seq = sequence_sum(ref_logps, weights.reference, cp_group)
    full_policy = sequence_sum(inputs.policy_logps, mask, cp_group)
    full_ref = sequence_sum(ref_logps, mask, cp_group)
    kl_seq = full_kl = None
    if inputs.token_kl is not None:
        kl_seq = sequence_sum(inputs.token_kl, weights.policy, cp_group)
        full_kl = sequence_sum(inputs.token_kl, mask, cp_group)

    counts = weights.count.to(policy_seq.dtype)
    chosen, rejected = _response_values(policy_seq, ref_seq, counts, lengths, kl_seq)
    mean = 0.0
    if spec.needs_reward_mean:
        batch_rewards = config.beta * torch.cat([chosen.logratio, rejected.logratio]).detach()
        mean = reward_mean.update(batch_rewards) if reward_mean is not None else batch_rewards.mean()
    terms = spec.fn(PairValues(chosen, rejected, mean), config)
    losses = terms.losses
    if config.sft_weight > 0:
        chosen_full, _ = _split(full_policy)
        losses = losses + config.sft_weight * (-chosen_full / chosen_len.clamp(min=1))

    with torch.no_grad():
        full_chosen, full_rejected = _response_values(full_policy, full_ref, lengths.float(), lengths, full_kl)
        full_terms = spec.fn(PairValues(full_chosen, full_rejected, mean), config)
    metrics = {"loss": losses.detach()}
    for prefix, t, c, r in (("rewards", terms, chosen, rejected), ("rewards_full", full_terms, full_chosen, full_rejected)):
        metrics[f"{prefix}/chosen"] = t.chosen_rewards.detach()
        metrics[f"{prefix}/rejected"] = t.rejected_rewards.detach()
        metrics[f"{prefix}/margins"] = (t.chosen_rewards - t.rejected_rewards).detach()
        metrics[f"{prefix}/accuracies"] = (t.chosen_rewards > t.rejected_rewards).to(t.chosen_rewards.dtype)
    metrics["logps/chosen"], metrics["logps/rejected"] = chosen.logps.detach(), rejected.logps.detach()
    if kl_seq is not None:  # TDPO's sequential KL(pi_ref || pi_theta), debiased as the log-probs
        metrics["kl/chosen"], metrics["kl/rejected"] = chosen.kl.detach(), rejected.kl.detach()
    metrics["logps_full/chosen"], metrics["logps_full/rejected"] = full_chosen.logps.detach(), full_rejected.logps.detach()
    dtype = losses.dtype
    metrics["lengths/chosen"] = chosen_len.to(dtype)
    metrics["lengths/rejected"] = rejected_len.to(dtype)
    metrics["lengths/kept"] = torch.minimum(chosen_len, rejected_len).to(dtype)
    return PreferenceLossOutput(losses=losses, metrics=metrics)
