"""The trainer end to end under torchrun + gloo on CPU: layouts, reference, resume, resharding."""

import json
import math
import shutil

import pytest

from helpers import BASE, COMPARED, assert_same_steps, run_torchrun, small_dataset, torchrun_env, train

pytestmark = pytest.mark.multiprocess  # torchrun / several processes (make test-fast leaves them out)

# name: (processes, flags)
LAYOUTS = {
    "tp2": (2, ["--tensor-model-parallel-size", "2"]),
    "pp2": (2, ["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "2"]),
    "pp2_interleaved": (2, ["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "2",
                            "--num-layers-per-virtual-pipeline-stage", "1"]),
    "dp2": (2, ["--tensor-model-parallel-size", "1"]),
    "tp2_pp2": (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
    # Optional features that the local spec / CPU need help with (models/gpt.py, compat/cpu.py).
    # torch norms under sequence parallelism: their gradients must be all-reduced over TP
    "tp2_sequence_parallel": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "dp2_distributed_optimizer": (2, ["--tensor-model-parallel-size", "1", "--use-distributed-optimizer"]),
}  # fmt: skip


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("baseline")
    metrics, _ = train(tmp, "single", 1, "--tensor-model-parallel-size", "1", "--tensorboard-dir", str(tmp / "tb"))
    assert list((tmp / "tb").glob("events.out.tfevents.*")), "no TensorBoard event file"
    return metrics


def test_first_step_policy_equals_reference(baseline):
    first = baseline[0]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards_full/margins"):
        assert first[key] == 0.0
    assert first["loss"] == pytest.approx(math.log(2), rel=1e-7)
    assert baseline[-1]["rewards/margins"] != 0.0


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_parallel_layouts_reproduce_single_process(tmp_path, baseline, layout):
    nproc, flags = LAYOUTS[layout]
    metrics, out = train(tmp_path, layout, nproc, *flags, save=True)
    assert len(metrics) == 3
    assert_same_steps(metrics, baseline, rel=1e-5)
    assert "saved checkpoint" in out  # the final checkpoint (distributed optimizer: fully_reshardable)


def test_reference_replica_is_frozen_and_unchanged(tmp_path):
    result = tmp_path / "result.json"
    flags = [*BASE, "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "2", "--train-iters", "4"]
    run_torchrun("trainer_worker.py", 2, "--out", str(result), *flags, "--save", str(tmp_path / "ckpt"),
                 "--metrics-file", str(tmp_path / "metrics.jsonl"))  # fmt: skip
    checks = json.loads(result.read_text())
    assert checks == {key: True for key in checks} and len(checks) == 6, checks


def test_reference_cache_matches_replica(tmp_path, baseline):
    metrics, _ = train(tmp_path, "cache", 1, "--tensor-model-parallel-size", "1", "--ref-mode", "cache", save=True)
    assert_same_steps(metrics, baseline, rel=1e-6)
    assert (tmp_path / "cache" / "ckpt" / "ref_cache" / "ref_logps_v0.json").exists()


@pytest.mark.parametrize("ref_mode", ["replica", "cache"])
def test_iterative_reference_update_restarts_rewards_each_epoch(tmp_path, ref_mode):
    data = small_dataset(tmp_path, 16)  # 2 steps per epoch at global batch 8
    metrics, out = train(
        tmp_path, ref_mode, 2, "--tensor-model-parallel-size", "2", "--data-path", str(data),
        "--ref-update", "epoch", "--ref-mode", ref_mode, "--train-iters", "6", save=True,
    )  # fmt: skip
    assert [m["epoch"] for m in metrics] == [0, 0, 1, 1, 2, 2]
    # At an epoch's start the reference is the policy: rewards 0 up to rounding. (The replica's
    # weights need no gradient, and megatron-core's layers then take another code path, which on a
    # packed row at TP 2 rounds one ulp away: rewards ~1e-7. Mid-epoch they are ~0.1.)
    for m in metrics:
        at_epoch_start = m["iteration"] % 2 == 1
        restarted = abs(m["rewards/margins"]) < 1e-6 and abs(m["rewards/chosen"]) < 1e-6
        assert restarted == at_epoch_start, m
        if at_epoch_start:
            assert m["loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert out.count("reference updated to the current policy") == 2


@pytest.mark.parametrize(
    "layout",
    [
        ["--tensor-model-parallel-size", "2"],
        # DP=2, Adam state sharded over DP: fully_reshardable save/load, per-parameter Adam steps
        ["--tensor-model-parallel-size", "1", "--use-distributed-optimizer"],
    ],
    ids=["tp2", "dp2_distributed_optimizer"],
)
def test_resume_after_sigkill_continues_exactly(tmp_path, request, layout):
    flags = [*layout, "--train-iters", "6"]
    if layout == ["--tensor-model-parallel-size", "2"]:  # the shared run (its checkpoint at 3 changes no number)
        straight = request.getfixturevalue("tp2_six_steps")[0]
    else:
        straight, _ = train(tmp_path, "straight", 2, *flags)

    # Save at 3; at 6 the process writes the checkpoint and is SIGKILLed before the marker.
    interrupted, out = train(
        tmp_path, "resumed", 2, *flags, "--save-interval", "3",
        env=torchrun_env(SAMPO_TEST_KILL_BEFORE_MARKER="6"), check=False, save=True,
    )  # fmt: skip
    assert out.returncode != 0 and "SIGKILL" in out.stderr + out.stdout
    ckpt = tmp_path / "resumed" / "ckpt"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    assert (ckpt / "iter_0000006").exists()  # written, never marked: must not be loaded
    for f in (ckpt / "iter_0000006").iterdir():  # and even a torn write of it is never read
        if f.is_file():
            f.write_bytes(b"torn")

    resumed, out = train(tmp_path, "resumed", 2, *flags, "--save-interval", "3", save=True)
    assert "resumed from" in out and "iter_0000003 at iteration 3" in out
    steps = [m for m in resumed if m["iteration"] > 3][-3:]
    assert [m["iteration"] for m in steps] == [4, 5, 6]
    assert_same_steps(steps, straight[3:], rel=1e-6, keys=COMPARED + ("lr",))


def test_checkpoint_reshards_from_tp2_to_pp2(tmp_path, tp2_six_steps):
    straight, run_dir = tp2_six_steps
    source = tmp_path / "tp2" / "ckpt"
    shutil.copytree(run_dir / "ckpt", source)
    (source / "latest_checkpointed_iteration.txt").write_text("3\n")  # continue from step 3
    continued, out = train(
        tmp_path, "pp2", 2, "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "2",
        "--train-iters", "6", "--load", str(source),
    )  # fmt: skip
    assert "at iteration 3" in out
    assert_same_steps(continued, straight[3:], rel=1e-5)


def test_distributed_optimizer_checkpoint_resumes_with_the_regular_optimizer(tmp_path):
    """DP2 with --use-distributed-optimizer saves at step 3; the regular fp32 optimizer resumes from it
    and continues as the uninterrupted run (moments and Adam's step carried over). The other way
    round is refused with a clear error instead of megatron-core's KeyError."""
    dp2 = ["--tensor-model-parallel-size", "1", "--train-iters", "6"]
    straight, _ = train(tmp_path, "distopt", 2, *dp2, "--use-distributed-optimizer", "--save-interval", "3", save=True)
    source = tmp_path / "distopt" / "ckpt"
    (source / "latest_checkpointed_iteration.txt").write_text("3\n")
    continued, out = train(tmp_path, "regular", 2, *dp2, "--load", str(source), "--save-interval", "5", save=True)
    assert "at iteration 3" in out
    assert_same_steps(continued, straight[3:], rel=1e-5)

    regular = tmp_path / "regular" / "ckpt"
    _, proc = train(tmp_path, "back", 2, *dp2, "--use-distributed-optimizer", "--load", str(regular), check=False, save=True)
    assert proc.returncode != 0
    assert "saved without --use-distributed-optimizer" in proc.stdout + proc.stderr


# bf16 rounds weights, activations and gradients to an 8-bit significand (unit roundoff
# 2**-8 = 3.9e-3), while the log-softmax, the log-prob sums, the loss and Adam's master weights stay
# fp32. A sequence log-prob sums ~25 tokens whose rounding errors partly cancel, and the loss near
# log 2 moves by beta/2 per unit of margin, so both stay well inside 2 bf16 ulps (2**-7 = 7.8e-3;
# measured: <= 2e-3). Margins are differences of nearly equal log-probs: compared absolutely, at a
# quarter of their size here (measured: <= 4e-3). fp32 layouts agree to ~1e-7 instead.
BF16_REL = 2**-7
BF16_MARGIN_ABS = 2e-2


def test_bf16_trains_within_bf16_rounding_of_fp32(tmp_path, baseline):
    metrics, out = train(tmp_path, "bf16", 2, "--tensor-model-parallel-size", "2", "--bf16", save=True)
    assert [m["iteration"] for m in metrics] == [1, 2, 3]
    # policy and reference are the same bf16 model at step 1
    assert metrics[0]["loss"] == pytest.approx(math.log(2), rel=1e-7)
    assert metrics[0]["rewards/margins"] == 0.0 and metrics[0]["rewards/chosen"] == 0.0
    for a, e in zip(metrics, baseline):
        for key in ("loss", "logps/chosen", "logps/rejected", "logps_full/chosen"):
            assert a[key] == pytest.approx(e[key], rel=BF16_REL), (a["iteration"], key, a[key], e[key])
        for key in ("rewards/margins", "rewards_full/margins"):
            assert a[key] == pytest.approx(e[key], abs=BF16_MARGIN_ABS), (a["iteration"], key, a[key], e[key])
    assert metrics[-1]["rewards/margins"] != 0.0  # the updates were applied
    # and the run really was bf16: its log-probs are off fp32 by far more than fp32 summation order
    assert max(abs(a["logps/chosen"] / e["logps/chosen"] - 1) for a, e in zip(metrics, baseline)) > 2e-5
    assert "saved checkpoint" in out  # the bf16 optimizer's checkpoint (fp32 main params)
