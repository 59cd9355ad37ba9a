"""Hyper-parameters of the preference losses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..frozen import Freezable

LossType = Literal["sigmoid", "robust", "ipo", "hinge", "dpop", "bco_pair", "nca_pair", "sppo_hard", "kto_pair", "rdpo", "simpo",
                   "sigmoid_norm", "orpo", "sft", "tdpo1", "tdpo2"]  # fmt: skip
"""The names registered in :mod:`sampo_megatron.losses.pairwise` (tests/test_losses.py checks they agree)."""
LengthDebias = Literal["none", "sampo", "sampo_topk", "sanorm", "ld_dpo"]
"""The names registered in :mod:`sampo_megatron.losses.debias`."""


@dataclass
class LossConfig(Freezable):
    """What the preference loss computes. Field names match the trainer's ``--flags``."""

    loss_type: LossType = "sigmoid"
    """Pairwise objective, a name registered in :mod:`sampo_megatron.losses.pairwise`."""
    length_debias: LengthDebias = "none"
    """Length-debiasing transform of the per-token log-ratios: none, sampo, sampo_topk, sanorm or ld_dpo."""
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
    ld_alpha: float | None = None
    """LD-DPO weight in [0, 1] of the tokens past the pair's public prefix ``min(T_w, T_l)``
    (``--length-debias ld_dpo``; 1 is DPO, 0 keeps only the prefix)."""
    orpo_lambda: float = 0.1
    """ORPO weight ``lambda`` of the odds-ratio term added to the chosen response's mean NLL."""
    tdpo_alpha: float = 0.5
    """TDPO2 weight of the sequential-KL difference."""
    sft_weight: float = 0.0
    """Weight of the chosen response's mean NLL added to the loss (hybrid DPO+SFT)."""
    seed: int = 1234
    """Seed of the down-sampling draws."""

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise LossConfigError(problems)

    def problems(self) -> list[str]:
        """Every reason these settings are invalid, one line each (all of them, not the first)."""
        p = []
        if self.beta <= 0:
            p.append(f"beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            p.append(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.sampo_mask not in ("shared", "independent"):
            p.append(f"sampo_mask must be 'shared' or 'independent', got {self.sampo_mask!r}")
        if self.ld_alpha is not None and not 0.0 <= self.ld_alpha <= 1.0:
            p.append(f"ld_alpha must be in [0, 1], got {self.ld_alpha}")
        if self.length_debias == "ld_dpo" and self.ld_alpha is None:
            p.append("--length-debias ld_dpo needs --ld-alpha (the weight in [0, 1] of the tokens past the public prefix)")
        if self.ld_alpha is not None and self.length_debias != "ld_dpo":
            p.append(f"--ld-alpha is the weight of the ld_dpo transform; it does not combine with --length-debias "
                     f"{self.length_debias} (each transform sets the per-token weights): pass --length-debias ld_dpo")  # fmt: skip
        if self.orpo_lambda < 0:
            p.append(f"orpo_lambda must be >= 0, got {self.orpo_lambda}")
        if self.sft_weight < 0:
            p.append(f"sft_weight must be >= 0, got {self.sft_weight}")
        return p


class LossConfigError(ValueError):
    """Invalid :class:`LossConfig` settings; ``problems`` lists each (the message joins them)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems
