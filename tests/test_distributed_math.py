"""Multi-rank (torchrun + gloo) math equals the single-process float64 reference (docs/architecture.md:
the loss and the vocab-parallel log-prob op)."""

from pathlib import Path

import pytest
import torch

from sampo_megatron.losses import LossConfig, PreferenceInputs, preference_loss

import math_worker as W  # tests/workers is on pytest's pythonpath (pyproject.toml)
from helpers import run_torchrun
from reference import kl_reference, logprobs_reference, max_rel_error

pytestmark = pytest.mark.multiprocess  # torchrun / several processes (make test-fast leaves them out)

# name: (TP, CP, processes); DP = processes / (TP * CP)
LAYOUTS = {"tp2": (2, 1, 2), "tp4": (4, 1, 4), "cp2": (1, 2, 2), "tp2_cp2": (2, 2, 4), "dp2": (1, 1, 2)}


@pytest.fixture(scope="module")
def grids(tmp_path_factory):
    out = {}
    for name, (tp, cp, nproc) in LAYOUTS.items():
        d = tmp_path_factory.mktemp(name)
        run_torchrun("math_worker.py", nproc, "--tp", str(tp), "--cp", str(cp), "--out", str(d))
        files = sorted(Path(d).glob("rank*.pt"), key=lambda p: int(p.stem[4:]))
        out[name] = [torch.load(p, weights_only=False) for p in files]
    return out


def assemble(ranks, key, axes):
    """Put each rank's local tensor back at its (seq, rows, vocab) coordinates of the full tensor.

    ``axes`` names, per axis of the local tensor, which coordinate list indexes it.
    """
    sizes = {"seq": W.S, "rows": 2 * W.B, "vocab": W.V}
    full = torch.full([sizes[a] for a in axes], float("nan"), dtype=torch.float64)
    for r in ranks:
        grid = torch.meshgrid(*[r[a] for a in axes], indexing="ij")
        full[grid] = r[key].double()
    assert not full.isnan().any(), f"{key}: some coordinates were produced by no rank"
    return full


def reference_grads(fn, x, up):
    x = x.double().requires_grad_(True)
    out = fn(x)
    (out * up.double()).sum().backward()
    return out.detach(), x.grad


UPSTREAM = torch.randn(W.S, 2 * W.B, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_logprobs_and_grads_match_float64(grids, layout):
    policy, ref, target, _, _ = W.full_inputs()
    ranks = grids[layout]
    exp_out, exp_grad = reference_grads(lambda x: logprobs_reference(x, target), policy, UPSTREAM)
    assert max_rel_error(assemble(ranks, "logprobs_fp32", ["seq", "rows"]), exp_out) <= 1e-5
    assert max_rel_error(assemble(ranks, "grad_fp32", ["seq", "rows", "vocab"]), exp_grad) <= 1e-5

    bf16 = policy.bfloat16().double()
    exp_out, exp_grad = reference_grads(lambda x: logprobs_reference(x, target), bf16, UPSTREAM)
    assert max_rel_error(assemble(ranks, "logprobs_bf16", ["seq", "rows"]), exp_out) <= 1e-5
    grad = assemble(ranks, "grad_bf16", ["seq", "rows", "vocab"])
    assert ((grad - exp_grad).abs() <= exp_grad.abs() * 2**-8 + 1e-30).all()

    exp_kl, exp_kl_grad = reference_grads(lambda x: kl_reference(ref, x), policy, UPSTREAM)
    assert max_rel_error(assemble(ranks, "kl", ["seq", "rows"]), exp_kl) <= 1e-5
    assert max_rel_error(assemble(ranks, "kl_grad", ["seq", "rows", "vocab"]), exp_kl_grad) <= 1e-5


def _single_process(debias):
    """The same loss on one process, float64 log-probs from the full vocabulary."""
    policy, ref, target, mask, _ = W.full_inputs()
    x = policy.double().requires_grad_(True)
    pol = logprobs_reference(x, target).t()
    refl = logprobs_reference(ref, target).t()
    cfg = LossConfig(
        length_debias=debias,
        sampo_mask="independent" if debias == "sampo" else "shared",
        seed=3,
        ld_alpha=0.3 if debias == "ld_dpo" else None,
    )
    out = preference_loss(PreferenceInputs(pol, mask, torch.arange(W.B), refl), cfg, epoch=2)
    out.losses.sum().backward()
    return out, x.grad


@pytest.mark.parametrize("debias", ["sampo", "sampo_topk", "sanorm", "ld_dpo"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_loss_metrics_and_grads_equal_single_process(grids, layout, debias):
    expected, expected_grad = _single_process(debias)
    ranks = grids[layout]
    losses = torch.full((W.B,), float("nan"), dtype=torch.float64)
    for r in ranks:
        pairs = r["rows"][: len(r["rows"]) // 2]
        torch.testing.assert_close(r[f"{debias}_losses"].double(), expected.losses[pairs], rtol=1e-5, atol=1e-6)
        for name, value in r[f"{debias}_metrics"].items():
            torch.testing.assert_close(value.double(), expected.metrics[name][pairs], rtol=1e-5, atol=1e-5, msg=name)
        losses[pairs] = r[f"{debias}_losses"].double()
    assert not losses.isnan().any()
    grad = assemble(ranks, f"{debias}_grad", ["seq", "rows", "vocab"])
    assert max_rel_error(grad, expected_grad) <= 1e-5


@pytest.mark.parametrize("debias", ["sampo", "sampo_topk"])
def test_masks_identical_across_ranks_and_layouts(grids, debias):
    _, _, _, mask, _ = W.full_inputs()
    reference = None
    for layout, ranks in grids.items():
        for kind in ("policy", "ref"):
            full = assemble(ranks, f"{debias}_{kind}_weights", ["rows", "seq"]).T  # assemble as [rows, seq]
            if reference is None:
                reference = {}
            reference.setdefault(kind, full)
            assert torch.equal(full, reference[kind]), f"{layout} {kind} mask differs"
        # every TP peer (same cp/dp coordinates) holds the very same local mask
        for a in ranks:
            for b in ranks:
                if (a["cp_rank"], a["dp_rank"]) == (b["cp_rank"], b["dp_rank"]):
                    assert torch.equal(a[f"{debias}_policy_weights"], b[f"{debias}_policy_weights"])
    kept = reference["policy"].T.bool()
    assert not (kept & ~mask).any()
    # every rank's assembled mask keeps T_m = min(T_w, T_l) positions of each response (paper Eq. 10,
    # written out here from the response lengths, not by the library)
    lengths = mask.sum(dim=1)
    t_m = torch.minimum(lengths[: W.B], lengths[W.B :])
    for kind in ("policy", "ref"):
        assert reference[kind].T.bool().sum(dim=1).tolist() == torch.cat([t_m, t_m]).tolist(), kind
    if debias == "sampo":
        assert not torch.equal(reference["policy"], reference["ref"])  # independent draws
