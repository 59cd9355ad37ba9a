"""Pairwise preference objectives on sequence-level (length-debiased) log-probs.

Notation, per pair: ``pi_w, pi_l`` policy log-probs of chosen / rejected after the length-debiasing
transform, ``ref_w, ref_l`` the reference's, ``r_w = pi_w - ref_w``, ``r_l = pi_l - ref_l``,
``u = r_w - r_l``, ``sigma`` the logistic function, ``T_w, T_l`` response lengths. Each function returns
per-pair losses and the implicit rewards (by default ``beta * r``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .config import LossConfig
from .names import LOSS_TYPES
from .registry import Registry


@dataclass
class ResponseValues:
    """Sequence-level values of one side (chosen or rejected) of ``B`` pairs."""

    logps: torch.Tensor
    """``[B]`` policy log-prob (debiased sum)."""
    ref_logps: torch.Tensor
    """``[B]`` reference log-prob (debiased sum); zeros for reference-free losses."""
    count: torch.Tensor
    """``[B]`` effective token count of ``logps``."""
    length: torch.Tensor
    """``[B]`` response length ``T`` (all tokens)."""
    kl: torch.Tensor | None = None
    """``[B]`` sequential KL ``sum_t KL(pi_ref || pi_theta)`` (debiased), TDPO only."""

    @property
    def logratio(self) -> torch.Tensor:
        return self.logps - self.ref_logps


@dataclass
class PairValues:
    chosen: ResponseValues
    rejected: ResponseValues
    reward_mean: torch.Tensor | float = 0.0
    """Running mean of the implicit rewards (BCO's ``delta``)."""


@dataclass
class LossTerms:
    losses: torch.Tensor
    """``[B]`` per-pair loss."""
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


@dataclass(frozen=True)
class LossSpec:
    fn: Callable[[PairValues, LossConfig], LossTerms]
    reference_free: bool = False
    needs_token_kl: bool = False
    needs_reward_mean: bool = False
    reads_micro_batch: bool = False
    """A pair's loss depends on the other pairs of its micro-batch (batch means, a running mean
    updated per micro-batch): packing, which regroups pairs, would change it."""


LOSSES: Registry[LossSpec] = Registry("loss type", LOSS_TYPES)


def register_loss(name: str, **spec) -> Callable:
    def add(fn):
        LOSSES.register(name)(LossSpec(fn, **spec))
        return fn

    return add


def _rewards(pair: PairValues, losses: torch.Tensor, cfg: LossConfig) -> LossTerms:
    return LossTerms(losses, cfg.beta * pair.chosen.logratio.detach(), cfg.beta * pair.rejected.logratio.detach())


def _margin(pair: PairValues) -> torch.Tensor:
    return pair.chosen.logratio - pair.rejected.logratio


@register_loss("sigmoid")
def sigmoid(pair: PairValues, cfg: LossConfig) -> LossTerms:
    """DPO / cDPO: ``-(1 - eps) log sigma(beta u) - eps log sigma(-beta u)`` (eps = label_smoothing)."""
    logits = cfg.beta * _margin(pair)
    eps = cfg.label_smoothing
    return _rewards(pair, -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits), cfg)


@register_loss("robust")
def robust(pair: PairValues, cfg: LossConfig) -> LossTerms:
    """Robust DPO (Chowdhury et al. 2024): ``(-(1-eps) log sigma(beta u) + eps log sigma(-beta u)) / (1 - 2 eps)``."""
    logits = cfg.beta * _margin(pair)
    eps = cfg.label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)
    return _rewards(pair, losses, cfg)


@register_loss("ipo")
def ipo(pair: PairValues, cfg: LossConfig) -> LossTerms:
    """IPO (Azar et al. 2023, Eq. 17): ``(u - 1 / (2 beta))^2``."""
    return _rewards(pair, (_margin(pair) - 1 / (2 * cfg.beta)) ** 2, cfg)


@register_loss("hinge")
def hinge(pair: PairValues, cfg: LossConfig) -> LossTerms:
    """SLiC (Zhao et al. 2023): ``max(0, 1 - beta u)``."""
    return _rewards(pair, torch.relu(1 - cfg.beta * _margin(pair)), cfg)


@register_loss("dpop")
def dpop(pair: PairValues, cfg: LossConfig) -> LossTerms:
    """DPOP (Pal et al. 2024): ``-log sigma(beta (u - lambda max(0, ref_w - pi_w)))``."""
    penalty = torch.clamp(pair.chosen.ref_logps - pair.chosen.logps, min=0)
    return _rewards(pair, -F.logsigmoid(cfg.beta * (_margin(pair) - cfg.dpop_lambda * penalty)), cfg)


@register_loss("bco_pair", needs_reward_mean=True, reads_micro_batch=True)
def bco_pair(pair: PairValues, cfg: LossConfig) -> LossTerms:
    """BCO (Jung et al. 2024), paired: ``-log sigma(beta r_w - delta) - log sigma(-(beta r_l - delta))``.

    ``delta`` is the running mean of the rewards ``beta r`` over the batches seen so far.
    """
    delta = pair.reward_mean
    losses = -F.logsigmoid(cfg.beta * pair.chosen.logratio - delta) - F.logsigmoid(-(cfg.beta * pair.rejected.logratio - delta))
    return _rewards(pair, losses, cfg)


@register_loss("nca_pair")
def nca_pair(pair: PairValues, cfg: LossConfig) -> LossTerms:
    """NCA (Chen et al. 2024): ``-log sigma(beta r_w) - 1/2 log sigma(-beta r_w) - 1/2 log sigma(-beta r_l)``."""
    chosen, rejected = cfg.beta * pair.chosen.logratio, cfg.beta * pair.rejected.logratio
    losses = -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)
    return _rewards(pair, losses, cfg)


@register_loss("sppo_hard")
def sppo_hard(pair: PairValues, cfg: LossConfig) -> LossTerms:
    """SPPO with hard labels (Wu et al. 2024, Eq. 4.7): ``(r_w - 1/(2 beta))^2 + (r_l + 1/(2 beta))^2``."""
    half_inv_beta = 0.5 / cfg.beta
    losses = (pair.chosen.logratio - half_inv_beta) ** 2 + (pair.rejected.logratio + half_inv_beta) ** 2
    return _rewards(pair, losses, cfg)


@register_loss("kto_pair", reads_micro_batch=True)
def kto_pair(pair: PairValues, cfg: LossConfig) -> LossTerms:
    """KTO on pairs (Ethayarajh et al. 2024, HALOs Eq. 7), as TRL's ``kto_pair``.

    ``z_w = max(0, mean_batch r_w)``, ``z_l = max(0, mean_batch r_l)`` (the KL of one half estimated
    from the other); per pair ``[(1 - sigma(beta (r_w - z_l))) + (1 - sigma(beta (z_w - r_l)))] / 2``.
    The batch means are over this micro-batch's pairs.
    """
    chosen, rejected = pair.chosen.logratio, pair.rejected.logratio
    chosen_kl, rejected_kl = chosen.mean().clamp(min=0), rejected.mean().clamp(min=0)
    losses = 0.5 * (
        (1 - torch.sigmoid(cfg.beta * (chosen - rejected_kl))) + (1 - torch.sigmoid(cfg.beta * (chosen_kl - rejected)))
    )
    return _rewards(pair, losses, cfg)


@register_loss("rdpo")
def rdpo(pair: PairValues, cfg: LossConfig) -> LossTerms:
    """R-DPO (Park et al. 2024, Eq. 9): ``-log sigma(beta u - alpha (T_w - T_l))``."""
    length_gap = (pair.chosen.length - pair.rejected.length).to(pair.chosen.logps.dtype)
    return _rewards(pair, -F.logsigmoid(cfg.beta * _margin(pair) - cfg.rdpo_alpha * length_gap), cfg)


@register_loss("simpo", reference_free=True)
def simpo(pair: PairValues, cfg: LossConfig) -> LossTerms:
    """SimPO (Meng et al. 2024, Eq. 6), reference-free: ``-log sigma(beta (pi_w / T_w - pi_l / T_l) - gamma)``.

    Rewards are ``beta * pi / T`` (average log-prob over the counted tokens).
    """
    chosen = cfg.beta * pair.chosen.logps / pair.chosen.count
    rejected = cfg.beta * pair.rejected.logps / pair.rejected.count
    return LossTerms(-F.logsigmoid(chosen - rejected - cfg.simpo_gamma), chosen.detach(), rejected.detach())


@register_loss("sigmoid_norm")
def sigmoid_norm(pair: PairValues, cfg: LossConfig) -> LossTerms:
    """Length-normalised DPO (Tülu 3, Lambert et al. 2024; TRL's ``sigmoid_norm``):
    ``-log sigma(beta (r_w / T_w - r_l / T_l))``, each log-ratio averaged over its own counted tokens.

    ``T`` is the effective token count (the response length with ``--length-debias none``). Not
    ``sanorm``, which rescales both sums by the pair's mean length. ``beta`` acts on a per-token
    log-ratio, so it is far larger than DPO's: Tülu 3 uses 5 where DPO uses 0.1. Rewards ``beta r / T``.
    """
    chosen = cfg.beta * pair.chosen.logratio / pair.chosen.count
    rejected = cfg.beta * pair.rejected.logratio / pair.rejected.count
    return LossTerms(-F.logsigmoid(chosen - rejected), chosen.detach(), rejected.detach())


def _log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
    """``log(p / (1 - p))`` for ``p = exp(mean_logp) < 1``, without cancellation near ``p = 1``."""
    return mean_logp - torch.log(-torch.expm1(mean_logp))


@register_loss("orpo", reference_free=True)
def orpo(pair: PairValues, cfg: LossConfig) -> LossTerms:
    """ORPO (Hong et al. 2024, Eqs. 6-7), reference-free, with ``m = pi / T`` the mean log-prob per
    counted token and ``odds(y) = e^m / (1 - e^m)``:

    ``-m_w - lambda log sigma(log odds(y_w) - log odds(y_l))``

    (the chosen response's NLL plus ``lambda`` times the odds-ratio loss; ``beta`` is unused).
    Rewards are the mean log-probs ``m`` (TRL reports ``lambda m``; the accuracies are the same).
    """
    chosen = pair.chosen.logps / pair.chosen.count
    rejected = pair.rejected.logps / pair.rejected.count
    odds_ratio = -F.logsigmoid(_log_odds(chosen) - _log_odds(rejected))
    return LossTerms(-chosen + cfg.orpo_lambda * odds_ratio, chosen.detach(), rejected.detach())


@register_loss("sft", reference_free=True)
def sft(pair: PairValues, cfg: LossConfig) -> LossTerms:
    """Supervised fine-tuning on the chosen responses (an SFT warm-up): ``-pi_w / T_w``, the mean
    negative log-likelihood per counted token of the chosen response; the rejected one is unused.

    Rewards are the mean log-probs ``pi / T`` (no ``beta``). Use with ``--length-debias none`` for
    the plain token-mean NLL.
    """
    chosen = pair.chosen.logps / pair.chosen.count
    rejected = pair.rejected.logps / pair.rejected.count
    return LossTerms(-chosen, chosen.detach(), rejected.detach())


def _tdpo(pair: PairValues, cfg: LossConfig, kl_weight: float, detach_chosen_kl: bool) -> LossTerms:
    chosen_kl, rejected_kl = pair.chosen.kl, pair.rejected.kl
    if chosen_kl is None or rejected_kl is None:
        raise ValueError("TDPO needs the per-token KL(pi_ref || pi_theta) (token_kl)")
    kl_gap = rejected_kl - (chosen_kl.detach() if detach_chosen_kl else chosen_kl)
    losses = -F.logsigmoid(cfg.beta * (_margin(pair) - kl_weight * kl_gap))
    return LossTerms(
        losses,
        cfg.beta * (pair.chosen.logratio + chosen_kl).detach(),
        cfg.beta * (pair.rejected.logratio + rejected_kl).detach(),
    )


@register_loss("tdpo1", needs_token_kl=True)
def tdpo1(pair: PairValues, cfg: LossConfig) -> LossTerms:
    """TDPO1 (Zeng et al. 2024, Eq. 18): ``-log sigma(beta (u - (D_l - D_w)))``, ``D`` = sequential KL.

    Rewards ``beta (r + D)``.
    """
    return _tdpo(pair, cfg, kl_weight=1.0, detach_chosen_kl=False)


@register_loss("tdpo2", needs_token_kl=True)
def tdpo2(pair: PairValues, cfg: LossConfig) -> LossTerms:
    """TDPO2 (Zeng et al. 2024, Eq. 20): ``-log sigma(beta (u - alpha (D_l - sg(D_w))))``."""
    return _tdpo(pair, cfg, kl_weight=cfg.tdpo_alpha, detach_chosen_kl=True)


LOSSES.check_complete()
