"""Preference losses: pairwise objectives, length-debiasing transforms, and the pipeline joining them."""

from .config import LossConfig
from .debias import DEBIAS, DebiasInputs, DebiasWeights
from .pairwise import LOSSES, LossTerms, PairValues, ResponseValues, register_loss
from .preference import PreferenceInputs, PreferenceLossOutput, preference_loss
from .running_mean import RunningMean

__all__ = [
    "DEBIAS",
    "LOSSES",
    "DebiasInputs",
    "DebiasWeights",
    "LossConfig",
    "LossTerms",
    "PairValues",
    "PreferenceInputs",
    "PreferenceLossOutput",
    "ResponseValues",
    "RunningMean",
    "preference_loss",
    "register_loss",
]
