"""Down-sampling masks: counts, positions, determinism and uniformity (docs/architecture.md, "What SamPO computes")."""

import math

import torch

from sampo_megatron.losses import DEBIAS
from sampo_megatron.sampling import response_seeds, sampled_kept_mask, topk_kept_mask

from helpers import debias_inputs, mask_layout

CHOSEN = [5, 12, 9, 1, 30, 7]
REJECTED = [11, 4, 9, 8, 2, 7]


def test_counts_and_positions():
    inputs = debias_inputs(CHOSEN, REJECTED, list(range(6)))
    kept = DEBIAS["sampo"](inputs).policy.bool()
    t_m = torch.minimum(torch.tensor(CHOSEN), torch.tensor(REJECTED))
    assert torch.equal(kept.sum(1), torch.cat([t_m, t_m]))
    assert not (kept & ~inputs.response_mask).any(), "a prompt or padding position was kept"
    for row, (lw, ll) in enumerate(zip(CHOSEN, REJECTED)):
        shorter_rows = ([row] if lw <= ll else []) + ([row + 6] if ll <= lw else [])
        for r in shorter_rows:  # the shorter response, and both on a tie, keep everything
            assert torch.equal(kept[r], inputs.response_mask[r])


def test_independent_mode_draws_reference_separately():
    inputs = debias_inputs([40] * 4, [10] * 4, [0, 1, 2, 3], mode="independent")
    weights = DEBIAS["sampo"](inputs)
    assert torch.equal(weights.policy.sum(1), weights.reference.sum(1))
    assert not torch.equal(weights.policy[:4], weights.reference[:4])
    assert torch.equal(weights.policy[4:], weights.reference[4:])  # shorter side keeps all in both
    shared = DEBIAS["sampo"](debias_inputs([40] * 4, [10] * 4, [0, 1, 2, 3]))
    assert shared.policy is shared.reference


def test_same_masks_whatever_the_batch_split():
    full = DEBIAS["sampo"](debias_inputs(CHOSEN, REJECTED, list(range(100, 106)))).policy
    s = full.shape[1]
    for split in ([0, 1, 2], [3, 4, 5]), ([4], [0, 5, 2, 1, 3]):
        for part in split:
            inputs = debias_inputs([CHOSEN[i] for i in part], [REJECTED[i] for i in part], [100 + i for i in part])
            got = DEBIAS["sampo"](inputs).policy
            got = torch.nn.functional.pad(got, (0, s - got.shape[1]))
            expected = full[torch.tensor(part + [i + 6 for i in part])]
            assert torch.equal(got, expected)


def test_masks_change_with_sample_epoch_and_seed():
    base = DEBIAS["sampo"](debias_inputs([50], [20], [3])).policy
    for changed in (
        debias_inputs([50], [20], [4]),
        debias_inputs([50], [20], [3], epoch=1),
        debias_inputs([50], [20], [3], seed=8),
    ):
        assert not torch.equal(DEBIAS["sampo"](changed).policy, base)
    assert torch.equal(DEBIAS["sampo"](debias_inputs([50], [20], [3])).policy, base)


def test_inclusion_frequencies_are_uniform():
    """Each position is kept with probability T_m/T and each pair of positions with
    T_m (T_m - 1) / (T (T - 1)). Over N independent draws the observed frequency has standard
    deviation sqrt(p (1 - p) / N); every one must lie within 5 of them (for the 20 singles and 190
    pairs the chance of a false failure is below 1e-4 by a union bound)."""
    t, t_m, n = 20, 7, 20000
    lengths = torch.full((n,), t)
    index = torch.arange(t).expand(n, t)
    seeds = response_seeds(11, 0, torch.arange(n), torch.ones(n, dtype=torch.long))
    kept = sampled_kept_mask(index, lengths, torch.full((n,), t_m), seeds).double()
    assert (kept.sum(1) == t_m).all()

    p1 = t_m / t
    single = kept.mean(0)
    assert ((single - p1).abs() <= 5 * math.sqrt(p1 * (1 - p1) / n)).all(), single

    p2 = t_m * (t_m - 1) / (t * (t - 1))
    joint = (kept.T @ kept) / n
    off_diagonal = ~torch.eye(t, dtype=torch.bool)
    assert ((joint[off_diagonal] - p2).abs() <= 5 * math.sqrt(p2 * (1 - p2) / n)).all()


def test_topk_keeps_largest_logratios_with_index_tiebreak():
    logratios = torch.tensor([[0.0, 0.0, 0.0, 5.0, 1.0, 1.0, 3.0, 0.0], [0.0, 0.0, 0.0, 2.0, 2.0, 0.0, 0.0, 0.0]])
    index = torch.tensor([[-1, -1, -1, 0, 1, 2, 3, -1], [-1, -1, -1, 0, 1, -1, -1, -1]])
    kept = topk_kept_mask(logratios, index, torch.tensor([3, 1]))
    assert kept[0].tolist() == [False, False, False, True, True, False, True, False]
    assert kept[1].tolist() == [False, False, False, True, False, False, False, False]


def test_topk_debias_counts():
    mask, _, _ = mask_layout(CHOSEN, REJECTED)
    logratios = torch.randn(mask.shape, generator=torch.Generator().manual_seed(0))
    inputs = debias_inputs(CHOSEN, REJECTED, list(range(6)), logratios=logratios)
    kept = DEBIAS["sampo_topk"](inputs).policy.bool()
    t_m = torch.minimum(torch.tensor(CHOSEN), torch.tensor(REJECTED))
    assert torch.equal(kept.sum(1), torch.cat([t_m, t_m]))
    for row in range(12):
        kept_vals = logratios[row][kept[row]]
        dropped = logratios[row][inputs.response_mask[row] & ~kept[row]]
        if dropped.numel():
            assert kept_vals.min() >= dropped.max()
