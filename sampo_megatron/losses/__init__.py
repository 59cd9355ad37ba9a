"""Preference losses: pairwise objectives, length-debiasing transforms, and the pipeline joining them.

The names below load on first use (PEP 562): ``from sampo_megatron.losses.config import LossConfig``
and :mod:`.names` need no torch, so flag parsing and ``--help`` answer before torch loads.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "LossConfig": "config",
    "DEBIAS": "debias",
    "DebiasInputs": "debias",
    "DebiasWeights": "debias",
    "LOSSES": "pairwise",
    "LossTerms": "pairwise",
    "PairValues": "pairwise",
    "ResponseValues": "pairwise",
    "register_loss": "pairwise",
    "PreferenceInputs": "preference",
    "PreferenceLossOutput": "preference",
    "preference_loss": "preference",
    "RunningMean": "running_mean",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value
