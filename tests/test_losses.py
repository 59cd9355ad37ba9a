"""Every registered loss against its equation written out in float64 Python, pair by pair."""

import math

import pytest
import torch

from sampo_megatron.losses import DEBIAS, LOSSES, LossConfig, PreferenceInputs, RunningMean, preference_loss

from helpers import debias_inputs, mask_layout

CHOSEN = [6, 14, 9, 3]
REJECTED = [10, 5, 9, 12]
B = len(CHOSEN)


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x: float) -> float:
    return math.exp(logsig(x))


def _batch(seed=0):
    mask, index, _ = mask_layout(CHOSEN, REJECTED)
    gen = torch.Generator().manual_seed(seed)
    policy = (-torch.rand(mask.shape, generator=gen, dtype=torch.float64) * 3).requires_grad_(True)
    ref = -torch.rand(mask.shape, generator=gen, dtype=torch.float64) * 3
    kl = torch.rand(mask.shape, generator=gen, dtype=torch.float64)
    return mask, index, policy, ref, kl


def _sequence_values(mask, index, policy, ref, kl, debias, cfg):
    """Per response: (pi, ref, count, T, kl) in Python floats for the given debias."""
    weights = None
    if debias in ("sampo", "sampo_topk"):
        logratios = (policy - ref).detach()
        inputs = debias_inputs(CHOSEN, REJECTED, list(range(B)), seed=cfg.seed, mode=cfg.sampo_mask, logratios=logratios)
        weights = DEBIAS[debias](inputs)
    rows = []
    for r in range(2 * B):
        positions = [t for t in range(mask.shape[1]) if mask[r, t]]
        T = len(positions)
        partner_T = int(mask[(r + B) % (2 * B)].sum())
        weight = [1.0] * T  # per response position, policy and reference alike
        if debias == "none":
            kept_p = kept_r = positions
            count = T
        elif debias == "ld_dpo":  # the public prefix min(T_w, T_l) at 1, the rest at alpha
            kept_p = kept_r = positions
            prefix = min(T, partner_T)
            weight = [1.0 if k < prefix else cfg.ld_alpha for k in range(T)]
            count = prefix + cfg.ld_alpha * (T - prefix)
        elif debias == "sanorm":
            kept_p = kept_r = positions
            count = (T + partner_T) / 2
        else:
            kept_p = [t for t in positions if weights.policy[r, t] > 0]
            kept_r = [t for t in positions if weights.reference[r, t] > 0]
            count = min(T, partner_T)
        scale = (T + partner_T) / 2 / T if debias == "sanorm" else 1.0
        w = dict(zip(positions, weight))
        pi = scale * sum(w[t] * float(policy.detach()[r, t]) for t in kept_p)
        rf = scale * sum(w[t] * float(ref[r, t]) for t in kept_r)
        d = scale * sum(w[t] * float(kl[r, t]) for t in kept_p)
        rows.append(dict(pi=pi, ref=rf, count=count, T=T, kl=d, full_pi=sum(float(policy.detach()[r, t]) for t in positions)))
    return rows[:B], rows[B:]


def _expected(loss_type, w, l, cfg, batch_w, batch_l, delta):  # noqa: E741 (w, l: the paper's winner, loser)
    b = cfg.beta
    rw, rl = w["pi"] - w["ref"], l["pi"] - l["ref"]
    u = rw - rl
    eps = cfg.label_smoothing
    if loss_type == "sigmoid":
        return -(1 - eps) * logsig(b * u) - eps * logsig(-b * u)
    if loss_type == "robust":
        return (-(1 - eps) * logsig(b * u) + eps * logsig(-b * u)) / (1 - 2 * eps)
    if loss_type == "ipo":
        return (u - 1 / (2 * b)) ** 2
    if loss_type == "hinge":
        return max(0.0, 1 - b * u)
    if loss_type == "dpop":
        return -logsig(b * (u - cfg.dpop_lambda * max(0.0, w["ref"] - w["pi"])))
    if loss_type == "bco_pair":
        return -logsig(b * rw - delta) - logsig(-(b * rl - delta))
    if loss_type == "nca_pair":
        return -logsig(b * rw) - 0.5 * logsig(-b * rw) - 0.5 * logsig(-b * rl)
    if loss_type == "sppo_hard":
        return (rw - 0.5 / b) ** 2 + (rl + 0.5 / b) ** 2
    if loss_type == "kto_pair":
        zw = max(0.0, sum(x["pi"] - x["ref"] for x in batch_w) / B)
        zl = max(0.0, sum(x["pi"] - x["ref"] for x in batch_l) / B)
        return 0.5 * ((1 - sig(b * (rw - zl))) + (1 - sig(b * (zw - rl))))
    if loss_type == "rdpo":
        return -logsig(b * u - cfg.rdpo_alpha * (w["T"] - l["T"]))
    if loss_type == "simpo":
        return -logsig(b * (w["pi"] / w["count"] - l["pi"] / l["count"]) - cfg.simpo_gamma)
    if loss_type == "sigmoid_norm":
        return -logsig(b * (rw / w["count"] - rl / l["count"]))
    if loss_type == "orpo":
        mw, ml = w["pi"] / w["count"], l["pi"] / l["count"]
        log_odds_w, log_odds_l = mw - math.log(1 - math.exp(mw)), ml - math.log(1 - math.exp(ml))
        return -mw - cfg.orpo_lambda * logsig(log_odds_w - log_odds_l)
    if loss_type == "sft":
        return -w["pi"] / w["count"]
    if loss_type == "tdpo1":
        return -logsig(b * (u - (l["kl"] - w["kl"])))
    if loss_type == "tdpo2":
        return -logsig(b * (u - cfg.tdpo_alpha * (l["kl"] - w["kl"])))
    raise AssertionError(loss_type)


def _expected_rewards(loss_type, x, cfg):
    if loss_type == "simpo":
        return cfg.beta * x["pi"] / x["count"]
    if loss_type in ("sft", "orpo"):
        return x["pi"] / x["count"]
    if loss_type == "sigmoid_norm":
        return cfg.beta * (x["pi"] - x["ref"]) / x["count"]
    if loss_type.startswith("tdpo"):
        return cfg.beta * (x["pi"] - x["ref"] + x["kl"])
    return cfg.beta * (x["pi"] - x["ref"])


ALL_LOSSES = LOSSES.names()


def test_every_registered_loss_is_covered():
    assert set(ALL_LOSSES) == {
        "sigmoid", "robust", "ipo", "hinge", "dpop", "bco_pair", "nca_pair", "sppo_hard",
        "kto_pair", "rdpo", "simpo", "sigmoid_norm", "orpo", "sft", "tdpo1", "tdpo2",
    }  # fmt: skip


def test_config_choices_and_planner_agree_with_the_registries():
    from typing import get_args

    from sampo_megatron.losses.config import LengthDebias, LossType
    from sampo_megatron.planning.shapes import TOKEN_KL_LOSSES

    assert sorted(get_args(LossType)) == ALL_LOSSES
    assert sorted(get_args(LengthDebias)) == DEBIAS.names()
    assert set(TOKEN_KL_LOSSES) == {name for name in ALL_LOSSES if LOSSES[name].needs_token_kl}


@pytest.mark.parametrize("debias", ["none", "sampo", "sampo_topk", "sanorm", "ld_dpo"])
@pytest.mark.parametrize("loss_type", ALL_LOSSES)
def test_loss_equals_written_out_equation(loss_type, debias):
    mask, index, policy, ref, kl = _batch()
    cfg = LossConfig(
        loss_type=loss_type, length_debias=debias, beta=0.3, label_smoothing=0.1 if loss_type == "robust" else 0.0,
        dpop_lambda=2.0, rdpo_alpha=0.05, simpo_gamma=0.4, tdpo_alpha=0.5, orpo_lambda=0.7, seed=5,
        ld_alpha=0.35 if debias == "ld_dpo" else None,
    )  # fmt: skip
    spec = LOSSES[loss_type]
    running = RunningMean()
    running.update(torch.tensor([0.2, -0.1, 0.4]))  # earlier batches
    prior_total, prior_count = running.total, running.count
    out = preference_loss(
        PreferenceInputs(
            policy_logps=policy,
            response_mask=mask,
            sample_ids=torch.arange(B),
            ref_logps=None if spec.reference_free else ref,
            token_kl=kl if spec.needs_token_kl else None,
        ),
        cfg,
        reward_mean=running,
    )
    if spec.reference_free:
        ref = torch.zeros_like(ref)
    chosen, rejected = _sequence_values(mask, index, policy, ref, kl, debias, cfg)
    batch_rewards = [cfg.beta * (x["pi"] - x["ref"]) for x in chosen + rejected]
    delta = (prior_total + sum(batch_rewards)) / (prior_count + len(batch_rewards))
    for i in range(B):
        expected = _expected(loss_type, chosen[i], rejected[i], cfg, chosen, rejected, delta)
        assert out.losses[i].item() == pytest.approx(expected, rel=1e-12, abs=1e-12), (i, expected)
        assert out.metrics["rewards/chosen"][i].item() == pytest.approx(
            _expected_rewards(loss_type, chosen[i], cfg), rel=1e-12, abs=1e-12
        )
        assert out.metrics["rewards/rejected"][i].item() == pytest.approx(
            _expected_rewards(loss_type, rejected[i], cfg), rel=1e-12, abs=1e-12
        )
        assert out.metrics["logps_full/chosen"][i].item() == pytest.approx(chosen[i]["full_pi"], rel=1e-12)
        assert out.metrics["lengths/kept"][i].item() == min(CHOSEN[i], REJECTED[i])
    margins = out.metrics["rewards/chosen"] - out.metrics["rewards/rejected"]
    assert torch.equal(out.metrics["rewards/margins"], margins)
    assert torch.equal(out.metrics["rewards/accuracies"], (margins > 0).double())


def test_hybrid_sft_term_adds_chosen_mean_nll():
    mask, index, policy, ref, kl = _batch(seed=3)
    base = preference_loss(PreferenceInputs(policy, mask, torch.arange(B), ref), LossConfig(length_debias="sampo"))
    mixed = preference_loss(
        PreferenceInputs(policy, mask, torch.arange(B), ref), LossConfig(length_debias="sampo", sft_weight=0.7)
    )
    for i in range(B):
        nll = -sum(float(policy.detach()[i, t]) for t in range(mask.shape[1]) if mask[i, t]) / CHOSEN[i]
        assert (mixed.losses[i] - base.losses[i]).item() == pytest.approx(0.7 * nll, rel=1e-12)


def test_full_sequence_rewards_ignore_down_sampling():
    mask, index, policy, ref, kl = _batch(seed=4)
    cfg = LossConfig(length_debias="sampo", beta=0.2)
    out = preference_loss(PreferenceInputs(policy, mask, torch.arange(B), ref), cfg)
    full = preference_loss(PreferenceInputs(policy, mask, torch.arange(B), ref), LossConfig(beta=0.2))
    assert torch.allclose(out.metrics["rewards_full/chosen"], full.metrics["rewards/chosen"], rtol=1e-12)
    assert not torch.allclose(out.metrics["rewards/rejected"], out.metrics["rewards_full/rejected"])


def test_gradient_flows_only_through_kept_tokens():
    mask, index, policy, ref, kl = _batch(seed=2)
    cfg = LossConfig(length_debias="sampo")
    out = preference_loss(PreferenceInputs(policy, mask, torch.arange(B), ref), cfg)
    out.losses.sum().backward()
    inputs = debias_inputs(CHOSEN, REJECTED, list(range(B)), seed=cfg.seed)
    kept = DEBIAS["sampo"](inputs).policy.bool()
    assert (policy.grad[~kept] == 0).all()
    assert (policy.grad[kept] != 0).all()


def test_policy_equal_to_reference_gives_zero_rewards_and_log2():
    mask, index, policy, _, _ = _batch(seed=5)
    for debias in ("none", "sampo", "sampo_topk", "sanorm"):
        out = preference_loss(PreferenceInputs(policy, mask, torch.arange(B), policy.detach()), LossConfig(length_debias=debias))
        assert (out.metrics["rewards/chosen"] == 0).all() and (out.metrics["rewards/margins"] == 0).all()
        assert torch.allclose(out.losses, torch.full((B,), math.log(2), dtype=torch.float64), rtol=0, atol=1e-15)


def test_clear_errors():
    mask, index, policy, ref, kl = _batch()
    with pytest.raises(ValueError, match="unknown loss type 'nope'"):
        preference_loss(PreferenceInputs(policy, mask, torch.arange(B), ref), LossConfig(loss_type="nope"))
    with pytest.raises(ValueError, match="unknown length debias"):
        preference_loss(PreferenceInputs(policy, mask, torch.arange(B), ref), LossConfig(length_debias="x"))
    with pytest.raises(ValueError, match="needs reference log-probs"):
        preference_loss(PreferenceInputs(policy, mask, torch.arange(B)), LossConfig())
    with pytest.raises(ValueError, match="needs the per-token KL"):
        preference_loss(PreferenceInputs(policy, mask, torch.arange(B), ref), LossConfig(loss_type="tdpo2"))
    with pytest.raises(ValueError, match="beta"):
        LossConfig(beta=0)


def test_ld_dpo_weights_the_public_prefix_fully_and_the_excess_by_alpha():
    # pair 0: T_w 3 < T_l 5; pair 1: T_w 4 > T_l 2; pair 2: a tie (everything is the public prefix)
    inputs = debias_inputs([3, 4, 2], [5, 2, 2], [0, 1, 2])
    inputs.ld_alpha = 0.25
    weights = DEBIAS["ld_dpo"](inputs)
    expected = {0: [1, 1, 1], 1: [1, 1, 0.25, 0.25], 2: [1, 1], 3: [1, 1, 1, 0.25, 0.25], 4: [1, 1], 5: [1, 1]}
    for row, values in expected.items():
        assert weights.policy[row][inputs.response_mask[row]].tolist() == values, row
    assert torch.equal(weights.policy, weights.reference)
    assert weights.count.tolist() == [3, 2 + 2 * 0.25, 2, 3 + 2 * 0.25, 2, 2]


def test_ld_dpo_at_alpha_one_is_dpo_and_at_zero_keeps_only_the_prefix():
    mask, index, policy, ref, kl = _batch(seed=6)
    dpo = preference_loss(PreferenceInputs(policy, mask, torch.arange(B), ref), LossConfig())
    one = preference_loss(PreferenceInputs(policy, mask, torch.arange(B), ref), LossConfig(length_debias="ld_dpo", ld_alpha=1.0))
    assert torch.equal(one.losses, dpo.losses)
    zero = preference_loss(PreferenceInputs(policy, mask, torch.arange(B), ref), LossConfig(length_debias="ld_dpo", ld_alpha=0.0))
    prefix = mask & (index < torch.tensor([min(c, r) for c, r in zip(CHOSEN + REJECTED, REJECTED + CHOSEN)])[:, None])
    logratio = ((policy.detach() - ref) * prefix).sum(1)
    expected = -torch.nn.functional.logsigmoid(0.1 * (logratio[:B] - logratio[B:]))
    assert torch.allclose(zero.losses, expected, rtol=1e-12, atol=0)


def test_orpo_equals_trl_form_and_reads_no_reference():
    """TRL's ORPO: ``nll - lambda * logsigmoid(log_odds)``, log-odds from mean log-probs, no reference."""
    mask, index, policy, ref, kl = _batch(seed=7)
    out = preference_loss(PreferenceInputs(policy, mask, torch.arange(B)), LossConfig(loss_type="orpo", orpo_lambda=0.2))
    mean = (policy.detach() * mask).sum(1) / mask.sum(1)
    mw, ml = mean[:B], mean[B:]
    log_odds = (mw - ml) - (torch.log1p(-torch.exp(mw)) - torch.log1p(-torch.exp(ml)))
    assert torch.allclose(out.losses, -mw - 0.2 * torch.nn.functional.logsigmoid(log_odds), rtol=1e-12, atol=0)


def test_length_debias_combination_errors():
    with pytest.raises(ValueError, match="ld_dpo needs --ld-alpha"):
        LossConfig(length_debias="ld_dpo")
    with pytest.raises(ValueError, match="does not combine with --length-debias sampo"):
        LossConfig(length_debias="sampo", ld_alpha=0.5)
    with pytest.raises(ValueError, match=r"ld_alpha must be in \[0, 1\]"):
        LossConfig(length_debias="ld_dpo", ld_alpha=1.5)
    with pytest.raises(ValueError, match="orpo_lambda"):
        LossConfig(loss_type="orpo", orpo_lambda=-1)


def test_loss_config_reports_every_problem_together():
    from sampo_megatron.config import ConfigFileError, parse_config
    from sampo_megatron.losses.config import LossConfigError

    with pytest.raises(LossConfigError) as err:
        LossConfig(beta=0.0, label_smoothing=0.7, length_debias="ld_dpo", orpo_lambda=-1.0)
    assert err.value.problems == [
        "beta must be > 0, got 0.0",
        "label_smoothing must be in [0, 0.5), got 0.7",
        "--length-debias ld_dpo needs --ld-alpha (the weight in [0, 1] of the tokens past the public prefix)",
        "orpo_lambda must be >= 0, got -1.0",
    ]
    with pytest.raises(ConfigFileError) as err:  # the flags: one line each, as the other rules are listed
        parse_config(["--beta", "0", "--length-debias", "ld_dpo"])
    assert str(err.value).splitlines() == [
        "invalid configuration:",
        "  - beta must be > 0, got 0.0",
        "  - --length-debias ld_dpo needs --ld-alpha (the weight in [0, 1] of the tokens past the public prefix)",
    ]
