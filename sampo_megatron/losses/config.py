"""Hyper-parameters of the preference losses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

LossType = Literal["sigmoid", "robust", "ipo", "hinge", "dpop", "bco_pair", "nca_pair", "sppo_hard", "kto_pair", "rdpo", "simpo",
                   "sft", "tdpo1", "tdpo2"]  # fmt: skip
"""The names registered in :mod:`sampo_megatron.losses.pairwise` (tests/test_losses.py checks they agree)."""
LengthDebias = Literal["none", "sampo", "sampo_topk", "sanorm"]
"""The names registered in :mod:`sampo_megatron.losses.debias`."""


@dataclass
class LossConfig:
    """What the preference loss computes. Field names match the trainer's ``--flags``."""

    loss_type: LossType = "sigmoid"
    """Pairwise objective, a name registered in :mod:`sampo_megatron.losses.pairwise`."""
    length_debias: LengthDebias = "none"
    """Length-debiasing transform of the per-token log-ratios: none, sampo, sampo_topk or sanorm."""
    sampo_mask: Literal["shared", "independent"] = "shared"
    """``shared``: one draw per response applied to the log-ratio (paper Eq. 10); ``independent``:
    separate draws for policy and reference log-probs (the official code's behaviour)."""
    beta: float = 0.1
    """Inverse temperature of the implicit reward ``beta * log(pi / pi_ref)``."""
    label_smoothing: float = 0.0
    """Assumed label-flip probability for cDPO (``sigmoid``) and robust DPO."""
    dpop_lambda: float = 50.0
    """DPOP penalty weight on the chosen log-prob falling below the reference's."""
    rdpo_alpha: float = 0.01
    """R-DPO length regulariser ``alpha * (T_w - T_l)``."""
    simpo_gamma: float = 0.5
    """SimPO target reward margin ``gamma``."""
    tdpo_alpha: float = 0.5
    """TDPO2 weight of the sequential-KL difference."""
    sft_weight: float = 0.0
    """Weight of the chosen response's mean NLL added to the loss (hybrid DPO+SFT)."""
    seed: int = 1234
    """Seed of the down-sampling draws."""

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.sampo_mask not in ("shared", "independent"):
            raise ValueError(f"sampo_mask must be 'shared' or 'independent', got {self.sampo_mask!r}")
        if self.sft_weight < 0:
            raise ValueError(f"sft_weight must be >= 0, got {self.sft_weight}")
