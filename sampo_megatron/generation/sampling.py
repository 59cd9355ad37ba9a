"""Choosing the next token from full-vocabulary logits: greedy, temperature and top-p (nucleus).

Pure torch functions. The random draws are counter-based (a hash of seed, prompt index and step),
so a prompt's sample depends neither on the batch it is in nor on the TP/PP/DP layout.
"""

from __future__ import annotations

import torch

from ..sampling.hashing import hash_combine, mix32

_TWO_POW_32 = float(2**32)


def uniform_draws(seed: int, prompt_indices: torch.Tensor, step: int | torch.Tensor) -> torch.Tensor:
    """One uniform number in ``[0, 1)`` per prompt for decoding step ``step``.

    ``u = hash(seed, prompt index, step) / 2**32`` with the counter-based 32-bit hash of
    :mod:`sampo_megatron.sampling.hashing`: every rank computes the same draws without
    communication.

    Args:
        seed: generation seed.
        prompt_indices: ``[B]`` int64 index of each row's prompt in the whole prompt set.
        step: index of the token being generated (0 for the first new token); one for all rows,
            or ``[B]`` int64, one per row.

    Returns:
        ``[B]`` float64.
    """
    state = mix32(torch.full_like(prompt_indices, seed & 0xFFFFFFFF, dtype=torch.int64))
    state = hash_combine(hash_combine(state, prompt_indices.to(torch.int64)), step)
    return state.double() / _TWO_POW_32


def top_p_keep_mask(sorted_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus of each row of descending-sorted probabilities.

    Keeps the smallest prefix whose mass reaches ``top_p``: token ``k`` is kept when the mass
    before it, ``sum_{j<k} p_j``, is below ``top_p`` (so the most likely token is always kept).

    Args:
        sorted_probs: ``[B, V]`` probabilities sorted in descending order along the last dim.
        top_p: nucleus mass in ``(0, 1]``.

    Returns:
        ``[B, V]`` bool.
    """
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    return mass_before < top_p


def select_next_tokens(logits: torch.Tensor, temperature: float, top_p: float, uniforms: torch.Tensor | None) -> torch.Tensor:
    """The next token of each row.

    Greedy (``temperature == 0``): ``argmax_v logits_v`` (the lowest id among equal maxima).
    Sampling: ``p = softmax(logits / temperature)`` restricted to the top-p nucleus and renormalised,
    then inverse-CDF sampling: the first token (in descending-probability order, ties by id) whose
    cumulative mass exceeds ``u * (nucleus mass)``. Computed in float64.

    Args:
        logits: ``[B, V]`` logits over the real vocabulary (no padding columns).
        temperature: 0 for greedy, else > 0.
        top_p: nucleus mass in ``(0, 1]`` (1 keeps every token).
        uniforms: ``[B]`` draws in ``[0, 1)`` (:func:`uniform_draws`); unused when greedy.

    Returns:
        ``[B]`` int64 token ids.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    if uniforms is None:
        raise ValueError("sampling (temperature > 0) needs uniform draws")
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    # A stable sort keeps equal probabilities in id order, so the draw is well defined.
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    nucleus = top_p_keep_mask(sorted_probs, top_p)
    cdf = torch.where(nucleus, sorted_probs, torch.zeros_like(sorted_probs)).cumsum(dim=-1)
    threshold = uniforms.to(cdf.device).double().unsqueeze(-1) * cdf[:, -1:]
    # First position whose cumulative mass exceeds the threshold; the bound guards rounding at u -> 1.
    position = torch.minimum((cdf <= threshold).sum(dim=-1), nucleus.sum(dim=-1) - 1)
    return order.gather(-1, position.unsqueeze(-1)).squeeze(-1)
