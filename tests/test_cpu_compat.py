"""megatron-core on CPU/gloo via ``sampo_megatron.compat.cpu``: parallel layouts match TP1/PP1.

Each test launches ``tests/workers/megatron_gpt_worker.py`` under torchrun: one training step of a
tiny GPTModel (SwiGLU, GQA, RMSNorm, RoPE; untied and tied embeddings) through megatron's pipeline
schedule, DDP, ``finalize_model_grads`` and an Adam step with gradient clipping. All runs start from
the same full weights, so losses, full gradients and updated weights must match the single-process
reference up to fp32 rounding.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import REPO_ROOT, WORKERS, run_torchrun, torchrun_env

pytestmark = pytest.mark.multiprocess  # torchrun / several processes (make test-fast leaves them out)

WORKER = "megatron_gpt_worker.py"
VARIANTS = ("untied", "tied")
# fp32 rounding: TP changes the summation order of the matmuls (measured max ~1.2e-6).
REL_TOL = 1e-5
CLIP_GRAD = 1.0  # the worker's clip_grad


def run_worker(tmp_path: Path, name: str, nproc: int, *args: str) -> dict:
    """Run the worker and return what rank 0 saved."""
    out = tmp_path / f"{name}.pt"
    run_torchrun(WORKER, nproc, "--out", str(out), *args)
    return torch.load(out)


def max_rel_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest elementwise difference, relative to the largest magnitude in ``expected``."""
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def assert_matches(result: dict, reference: dict, keys: tuple[str, ...]) -> None:
    """Losses, grad norm and the full tensors under ``keys`` agree with the reference."""
    for variant in VARIANTS:
        got, ref = result[variant], reference[variant]
        assert len(got["losses"]) == len(ref["losses"]) == 2
        assert got["losses"] == pytest.approx(ref["losses"], rel=REL_TOL)
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=REL_TOL)
        for key in keys:
            assert got[key].keys() == ref[key].keys()
            worst = {name: max_rel_diff(got[key][name], ref[key][name]) for name in ref[key]}
            bad = {name: d for name, d in worst.items() if not d <= REL_TOL}
            assert not bad, f"{variant} {key} differ beyond {REL_TOL}: {bad}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """TP=1, PP=1, one process."""
    result = run_worker(tmp_path_factory.mktemp("reference"), "reference", 1)
    assert result["compat_checks"]
    for variant in VARIANTS:
        # The step must actually clip, so that the clip path (clip_grads.py) is exercised.
        assert result[variant]["grad_norm"] > CLIP_GRAD
        assert len(result[variant]["grads"]) > 0
    return result


@pytest.mark.parametrize(
    ("name", "nproc", "args"),
    [
        ("tp2", 2, ("--tp", "2")),
        ("pp2", 2, ("--pp", "2")),
        ("tp2pp2", 4, ("--tp", "2", "--pp", "2")),  # 4 processes on 2 cores: oversubscribed
    ],
)
def test_model_parallel_matches_reference(reference: dict, tmp_path: Path, name: str, nproc: int, args: tuple[str, ...]) -> None:
    """TP / PP / TPxPP give the reference's losses, full gradients and updated weights."""
    result = run_worker(tmp_path, name, nproc, *args)
    assert_matches(result, reference, ("grads", "weights"))


def test_distributed_optimizer_dp2(reference: dict, tmp_path: Path) -> None:
    """DP=2 with the distributed optimizer (one micro-batch per rank) steps like the reference.

    Also checks a fully parallel dist_checkpointing save/load round trip of the stepped model.
    """
    ckpt = str(tmp_path / "ckpt")
    result = run_worker(tmp_path, "dopt", 2, "--distributed-optimizer", "--checkpoint-dir", ckpt)
    assert result["checkpoint_ok"]
    assert_matches(result, reference, ("weights",))


def test_compat_imports_megatron_only_when_applied_and_is_idempotent():
    """In a fresh interpreter (the pooled workers have megatron-core imported already): importing
    sampo_megatron.compat imports no megatron, applying it twice is harmless and leaves torch's own
    functions alone, and the shimmed modules see the CPU."""
    code = "import megatron_gpt_worker as w; w.check_compat_is_targeted(); print('targeted')"
    env = dict(torchrun_env(), PYTHONPATH=f"{REPO_ROOT}:{WORKERS}")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "targeted" in proc.stdout, proc.stderr[-3000:]
