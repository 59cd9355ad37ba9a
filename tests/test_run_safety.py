"""Nothing silently wrong (issue 12), end to end under torchrun + gloo: non-finite steps, resumes that
change the run, damaged checkpoints, a killed launcher, a second run on the same directory,
checkpoints that would run code, and the tokenizer that travels with a checkpoint."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from sampo_megatron.checkpoint import digest_files, list_files, write_manifest

from helpers import (
    BASE,
    COMPARED,
    LAUNCH,
    REPO_ROOT,
    BackgroundRun,
    RunsCodeWhenUnpickled,
    assert_same_steps,
    run_torchrun,
    small_dataset,
    torchrun_env,
    train,
    trainer_pids,
)

pytestmark = pytest.mark.multiprocess  # torchrun / several processes (make test-fast leaves them out)

TP2 = ["--tensor-model-parallel-size", "2"]


def strict_json_lines(path: Path) -> list[dict]:
    """The metrics file, parsed as strict JSON (Python's json would accept bare NaN)."""

    def refuse(constant):
        raise ValueError(f"{path}: not valid JSON: {constant}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def marker(run: Path) -> str:
    return (run / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip()


def test_nonfinite_loss_stops_the_run_before_any_save(tmp_path):
    # lr 1e30: step 1 is finite, its update ruins the weights, step 2's loss and gradients are NaN.
    _, proc = train(
        tmp_path, "nan", 2, *TP2, "--lr", "1e30", "--train-iters", "4", "--save-interval", "1", check=False, save=True
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "error: iteration 2: the loss and the gradient norm are not finite" in out
    assert marker(tmp_path / "nan") == "1" and not (tmp_path / "nan" / "ckpt" / "iter_0000002").exists()
    metrics = strict_json_lines(tmp_path / "nan" / "metrics.jsonl")
    assert [m["iteration"] for m in metrics] == [1, 2]
    assert metrics[1]["loss"] is None and metrics[1]["nonfinite"] == "loss and gradient norm"


def test_skip_nonfinite_steps_skips_and_counts(tmp_path):
    env = torchrun_env(SAMPO_TEST_NAN_GRAD_AT="2")  # the gradients of step 2 become NaN (training/nonfinite.py)
    _, proc = train(tmp_path, "skip", 2, *TP2, "--train-iters", "4", env=env, check=False)
    assert proc.returncode != 0 and "iteration 2: the gradient norm is not finite" in proc.stdout + proc.stderr
    metrics, out = train(tmp_path, "skip2", 2, *TP2, "--train-iters", "4", "--skip-nonfinite-steps", env=env)
    assert "iteration 2: skipped" in out
    metrics = strict_json_lines(tmp_path / "skip2" / "metrics.jsonl")
    assert [m["skipped_steps"] for m in metrics] == [0, 1, 1, 1]
    assert metrics[1]["grad_norm"] is None and all(m["grad_norm"] is not None for m in metrics[2:])
    assert metrics[2]["lr"] == metrics[1]["lr"]  # the skipped step did not advance the schedule
    assert all(m["loss"] is not None for m in metrics)


def test_resume_refuses_changes_to_the_run(tmp_path):
    _, out = train(tmp_path, "run", 2, *TP2, "--train-iters", "3", save=True)
    assert "resolved configuration:" in out
    saved = json.loads((tmp_path / "run" / "ckpt" / "iter_0000003" / "run_config.json").read_text())
    assert saved["config"]["loss"]["length_debias"] == "sampo" and saved["derived"]["num_pairs"] == 256

    def resume(*flags):
        return train(tmp_path, "run", 2, *TP2, *flags, check=False, save=True)[1]

    proc = resume("--train-iters", "3", "--lr", "0.01")
    assert proc.returncode != 0 and "schedule: --lr: 0.05 in the checkpoint, 0.01 now" in proc.stderr
    proc = resume("--train-iters", "3", "--loss-type", "ipo", "--length-debias", "none", "--beta", "0.5")
    message = proc.stderr
    assert proc.returncode != 0
    for line in ("--loss-type: 'sigmoid' in the checkpoint, 'ipo' now", "--length-debias: 'sampo' in the checkpoint, 'none' now",
                 "--beta: 0.1 in the checkpoint, 0.5 now"):  # fmt: skip
        assert f"objective: {line}" in message
    proc = resume("--train-iters", "3", "--data-path", str(small_dataset(tmp_path, 64)))
    assert proc.returncode != 0 and "data: num_pairs: 256 in the checkpoint, 64 now" in proc.stderr

    # The override: the new schedule takes effect, exactly as a fresh run with these flags has it.
    resumed, out = train(
        tmp_path, "run", 2, *TP2, "--train-iters", "5", "--override-opt-param-scheduler", "--log-interval", "2", save=True
    )
    assert "schedule (--override-opt-param-scheduler): --train-iters: 3 in the checkpoint, 5 now" in out
    assert "applied: --log-interval: 1 in the checkpoint, 2 now" in out
    fresh, _ = train(tmp_path, "fresh", 2, *TP2, "--train-iters", "5")
    assert [m["lr"] for m in resumed[-2:]] == pytest.approx([m["lr"] for m in fresh[3:]], rel=1e-12)
    assert resumed[-2]["lr"] != pytest.approx(0.0)


def test_damaged_checkpoint_falls_back_and_continues_exactly(tmp_path, tp2_six_steps):
    straight, run_dir = tp2_six_steps
    shutil.copytree(run_dir, tmp_path / "run")  # the same flags below: its checkpoints and metrics file
    shard = tmp_path / "run" / "ckpt" / "iter_0000006" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[2000:2064] = bytes(b ^ 0xFF for b in data[2000:2064])  # 64 flipped bytes inside a tensor
    shard.write_bytes(data)

    metrics, out = train(tmp_path, "run", 2, *TP2, "--train-iters", "6", "--save-interval", "3", save=True)
    assert f"{shard}: its SHA-256 differs from the manifest's" in out
    assert "falling back to" in out and "iter_0000003 at iteration 3" in out
    # the metrics file keeps each iteration once: the lines past the fallback's iteration are redone
    assert [m["iteration"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert "dropped 3 line(s) past the resumed iteration 3" in out
    assert_same_steps(metrics[-3:], straight[3:], rel=1e-6, keys=COMPARED + ("lr",))

    (tmp_path / "run" / "ckpt" / "iter_0000006" / ".metadata").write_bytes(b"")
    _, proc = train(tmp_path, "run", 2, *TP2, "--train-iters", "6", "--no-checkpoint-fallback", check=False, save=True)
    assert proc.returncode != 0 and "iter_0000006/.metadata: 0 bytes" in proc.stderr


def test_killed_launcher_takes_its_ranks_along_and_the_run_resumes_exactly(tmp_path):
    # 40 steps: long enough that the run is still training while a second run tries the directory.
    # The runs that check the resume stop early with --exit-interval (it changes nothing else).
    flags = [*TP2, "--train-iters", "40", "--save-interval", "3", "--lr", "0.01"]
    run = BackgroundRun(tmp_path, "killed", 2, *flags)
    try:
        run.wait_for(lambda: (run.ckpt / "latest_checkpointed_iteration.txt").exists())
        # A second run on the same --save directory stops at once, naming the holder.
        _, second = train(tmp_path, "killed", 2, *flags, check=False, save=True)
        assert second.returncode != 0 and "is in use by another run: host" in second.stderr
        assert run.launcher.poll() is None, "the first run should still be training"
    finally:
        run.kill()  # torchrun's process group; its workers have their own sessions
    deadline = time.time() + 10
    while trainer_pids(str(run.dir)) and time.time() < deadline:
        time.sleep(0.2)
    assert trainer_pids(str(run.dir)) == [], "ranks outlived their launcher"
    at = run.marker()
    assert 3 <= at < 40

    stop = ["--exit-interval", str(at + 2)]  # two steps past the checkpoint
    resumed, out = train(tmp_path, "killed", 2, *flags, *stop, save=True)
    assert "took over the lock of a run that is gone" in out and f"at iteration {at}" in out
    straight, _ = train(tmp_path, "straight", 2, *flags, *stop)
    assert [m["iteration"] for m in straight] == list(range(1, at + 3))
    assert_same_steps(resumed[-2:], straight[at:], rel=1e-6, keys=COMPARED + ("lr",))


def test_checkpoint_pickles_that_would_run_code_are_refused(tmp_path):
    train(tmp_path, "run", 2, *TP2, "--train-iters", "1", save=True)
    evil = tmp_path / "evil"
    shutil.copytree(tmp_path / "run" / "ckpt" / "iter_0000001", evil)
    proof = tmp_path / "PROOF"
    (evil / ".metadata").write_bytes(pickle.dumps(RunsCodeWhenUnpickled(proof)))
    write_manifest(str(evil), digest_files(str(evil), list_files(str(evil))))  # a consistent manifest: not "damage"

    _, proc = train(tmp_path, "victim", 2, *TP2, "--train-iters", "1", "--load", str(evil), "--finetune", check=False)
    assert proc.returncode != 0 and f"{evil}/.metadata: the pickle names posix.system" in proc.stderr
    export = subprocess.run([os.sys.executable, str(REPO_ROOT / "tools" / "convert_megatron_to_hf.py"), "--load", str(evil),
                             "--hf-out", str(tmp_path / "hf"), "--quiet"], capture_output=True, text=True)  # fmt: skip
    assert export.returncode == 2 and "the pickle names posix.system" in export.stderr
    assert not proof.exists()


def test_tokenizer_travels_with_the_checkpoint(tmp_path):
    tokenizer = tmp_path / "tok"
    shutil.copytree(REPO_ROOT / "examples" / "data" / "tiny_tokenizer", tokenizer)
    train(tmp_path, "run", 2, *TP2, "--train-iters", "1", "--tokenizer-model", str(tokenizer), save=True)
    ckpt = tmp_path / "run" / "ckpt" / "iter_0000001"
    assert json.loads((ckpt / "sampo_model.json").read_text())["tokenizer"] == "tokenizer"
    assert (ckpt / "tokenizer" / "tokenizer.json").read_bytes() == (tokenizer / "tokenizer.json").read_bytes()

    # The run directory moves and the original tokenizer is gone: the checkpoint still has its own.
    moved = tmp_path / "moved"
    shutil.move(tmp_path / "run" / "ckpt", moved)
    shutil.rmtree(tokenizer)
    config = tmp_path / "no_tokenizer.yaml"
    config.write_text("".join(line for line in (REPO_ROOT / "examples" / "tiny_cpu.yaml").read_text().splitlines(keepends=True)
                              if not line.startswith("tokenizer-model")))  # fmt: skip
    args = [*BASE[2:], "--config", str(config), *TP2, "--train-iters", "2", "--load", str(moved), "--finetune",
            "--save", str(tmp_path / "next")]  # fmt: skip
    out = run_torchrun(LAUNCH, 2, *args)
    assert f"tokenizer_model={moved}/iter_0000001/tokenizer" in out and "saved checkpoint" in out

    # A tokenizer that contradicts the checkpoint's own is an error naming both.
    other = tmp_path / "other_tok"
    shutil.copytree(REPO_ROOT / "examples" / "data" / "tiny_tokenizer", other)
    definition = json.loads((other / "tokenizer.json").read_text())
    definition["normalizer"] = {"type": "Lowercase"}  # other ids for cased text
    (other / "tokenizer.json").write_text(json.dumps(definition))
    proc = run_torchrun(LAUNCH, 2, *args[:-2], "--save", str(tmp_path / "next2"), "--tokenizer-model", str(other), check=False)
    assert proc.returncode != 0
    assert f"--tokenizer-model {other} is not the tokenizer of the checkpoint" in proc.stderr
    assert f"{moved}/iter_0000001/tokenizer" in proc.stderr
