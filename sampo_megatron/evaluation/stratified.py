"""Held-out preference metrics split by length: the paper's long/short view of the implicit reward.

DPO's implicit reward grows with a response's length (Lu et al. 2024): on held-out pairs its
accuracy is high where the chosen response is the longer one and low where it is the shorter, and
the reward margin correlates with the length difference. SamPO's should not. For pairs with
implicit reward margins ``m`` (chosen minus rejected) and lengths ``T_w``, ``T_l``:

- ``accuracies_chosen_longer`` / ``margins_chosen_longer``: the share of pairs with ``m > 0``, and
  the mean ``m``, over the pairs with ``T_w > T_l``; ``..._chosen_shorter`` over ``T_w < T_l``
  (ties are in neither);
- ``margin_length_corr``: Pearson's correlation between ``m`` and ``T_w - T_l`` over all pairs.

A value that is not defined (a group without pairs; a correlation where ``m`` or the length
difference is constant, e.g. while the policy is the reference) is left out, not reported as 0.
"""

from __future__ import annotations

import math

import numpy as np


def length_stratified(margins, chosen_lengths, rejected_lengths) -> dict[str, float]:
    """The metrics above (float64), named without a prefix; plus ``pairs_chosen_longer`` and
    ``pairs_chosen_shorter``, the group sizes."""
    m = np.asarray(margins, dtype=np.float64)
    gap = np.asarray(chosen_lengths, dtype=np.float64) - np.asarray(rejected_lengths, dtype=np.float64)
    if not (m.shape == gap.shape and m.ndim == 1):
        raise ValueError(f"expected one margin and one length pair per pair, got {m.shape} and {gap.shape}")
    out: dict[str, float] = {}
    for name, group in (("chosen_longer", gap > 0), ("chosen_shorter", gap < 0)):
        out[f"pairs_{name}"] = float(group.sum())
        if group.any():
            out[f"accuracies_{name}"] = float((m[group] > 0).mean())
            out[f"margins_{name}"] = float(m[group].mean())
    if len(m) > 1 and m.std() > 0 and gap.std() > 0:
        corr = float(np.corrcoef(m, gap)[0, 1])
        if math.isfinite(corr):
            out["margin_length_corr"] = corr
    return out
