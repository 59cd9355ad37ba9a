"""Independent float64 references the tests compare against."""

from __future__ import annotations

import torch


def logprobs_reference(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """float64 ``log_softmax(logits)[target]`` over the full vocabulary."""
    return logits.double().log_softmax(-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)


def kl_reference(ref_logits: torch.Tensor, policy_logits: torch.Tensor) -> torch.Tensor:
    """float64 ``sum_v p_ref (log p_ref - log p_pol)``."""
    ref_logp = ref_logits.double().log_softmax(-1)
    pol_logp = policy_logits.double().log_softmax(-1)
    return (ref_logp.exp() * (ref_logp - pol_logp)).sum(-1)


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |a - e| / max |e|`` (scale-relative, robust to entries near zero)."""
    actual, expected = actual.detach(), expected.detach().double()
    return float((actual.double() - expected).abs().max() / expected.abs().max().clamp(min=1e-30))
