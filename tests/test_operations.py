"""Production operations (issue 17): early exits that save first (signal, time and step budgets),
checkpoint retention, the metrics file across runs, the ETA, and Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from sampo_megatron.config import OperationsConfig
from sampo_megatron.runtime.checkpointing import _older_checkpoints, prune_checkpoints, resolve_checkpoint
from sampo_megatron.training.exit import ExitConditions
from sampo_megatron.training.metrics import MetricsLogger, MissingPackageError, format_duration, prepare_metrics_file

from helpers import COMPARED, BackgroundRun, assert_same_steps, read_metrics, torchrun_env, train, trainer_pids
from wandb_history import read_history

TP2 = ["--tensor-model-parallel-size", "2"]


# ------------------------------------------------------------------------------ unit
def test_a_fresh_run_moves_an_earlier_metrics_file_aside(tmp_path):
    path = tmp_path / "m.jsonl"
    assert prepare_metrics_file(str(path), 0) is None  # nothing there
    path.write_text('{"iteration": 1}\n')
    (tmp_path / "m.jsonl.1").write_text("taken\n")
    message = prepare_metrics_file(str(path), 0)
    assert not path.exists() and (tmp_path / "m.jsonl.2").read_text() == '{"iteration": 1}\n'
    assert "moved to" in message and "m.jsonl.2" in message


def test_a_resumed_run_keeps_each_iteration_once(tmp_path):
    path = tmp_path / "m.jsonl"
    lines = [json.dumps({"iteration": i, "loss": 0.1 * i}) for i in range(6)]
    path.write_text("\n".join(lines) + '\n{"iteration": 6, "lo')  # steps past the checkpoint, then a cut line
    message = prepare_metrics_file(str(path), 3)
    assert [json.loads(line)["iteration"] for line in path.read_text().splitlines()] == [0, 1, 2, 3]
    assert "dropped 3 line(s)" in message
    assert prepare_metrics_file(str(path), 3) is None  # nothing more to drop


def fake_checkpoint(save: Path, iteration: int, complete: bool = True) -> Path:
    ckpt = save / f"iter_{iteration:07d}"
    ckpt.mkdir(parents=True)
    if complete:
        (ckpt / "metadata.json").write_text("{}")
    return ckpt


def test_keep_last_deletes_only_older_complete_checkpoints(tmp_path):
    for i in (1, 2, 3, 4):
        fake_checkpoint(tmp_path, i)
    in_progress = fake_checkpoint(tmp_path, 5, complete=False)  # a newer save not yet complete
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("4\n")
    # left by a run SIGKILLed while deleting: renamed, half removed (its metadata.json still there)
    fake_checkpoint(tmp_path, 0)
    (tmp_path / "iter_0000000").rename(tmp_path / "iter_0000000.deleting")
    assert resolve_checkpoint(str(tmp_path)) == str(tmp_path / "iter_0000004")  # the latest loads
    assert "iter_0000000.deleting" not in str(_older_checkpoints(str(tmp_path), str(tmp_path / "iter_0000004")))
    deleted = prune_checkpoints(str(tmp_path), 2)
    assert [Path(d).name for d in deleted] == ["iter_0000001", "iter_0000002"]  # oldest first
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "iter_0000003", "iter_0000004", "iter_0000005", "latest_checkpointed_iteration.txt"
    ]  # fmt: skip
    assert in_progress.exists()
    with pytest.raises(ValueError, match="--keep-last must be >= 1"):
        prune_checkpoints(str(tmp_path), 0)


def test_exit_conditions_without_distributed():
    interval = ExitConditions(OperationsConfig(exit_interval=3))
    assert interval.should_exit(2) is None and interval.should_exit(3) == "--exit-interval 3 reached"
    budget = ExitConditions(OperationsConfig(exit_duration_in_mins=1), start=time.monotonic() - 61)
    assert budget.should_exit(1) == "--exit-duration-in-mins 1 reached"
    assert ExitConditions(OperationsConfig()).should_exit(5) is None
    handler = ExitConditions(OperationsConfig(exit_signal_handler=True))
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # recorded, not fatal
        time.sleep(0.05)
        assert handler.should_exit(1) == "SIGTERM received"
    finally:
        handler.restore()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert format_duration(3725.4) == "1:02:05"


# ------------------------------------------------------------------------------ end to end
STEPS = 8
HANDLER = [*TP2, "--train-iters", str(STEPS), "--save-interval", "3", "--lr", "0.01", "--exit-signal-handler"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """An uninterrupted run: its metrics and its --save directory (checkpoints at 3, 6 and 8)."""
    tmp = tmp_path_factory.mktemp("straight")
    metrics, _ = train(tmp, "straight", 2, *HANDLER, save=True)
    return metrics, tmp / "straight" / "ckpt"


@pytest.fixture(scope="module")
def straight(straight_run):
    return straight_run[0]


@pytest.mark.multiprocess
@pytest.mark.parametrize("moment", ["startup", "cache_build", "mid_training", "during_save", "between_steps"])
def test_sigterm_saves_and_the_same_command_resumes_exactly(tmp_path, straight, moment):
    # cache_build: the reference log-probs are read from a cache computed before the first step
    # (the same values as the replica's, which the straight run uses)
    flags = [*HANDLER, "--ref-mode", "cache"] if moment == "cache_build" else HANDLER
    run = BackgroundRun(tmp_path, "run", 2, *flags)
    try:
        if moment == "startup":  # the data is read, the model not built yet, no step has run
            run.wait_for(lambda: "data: " in run.output())
        elif moment == "cache_build":  # 32 forward-only steps over the epoch, before step 1
            run.wait_for(lambda: "computing reference log-probs" in run.output())
        elif moment == "mid_training":
            run.wait_for(lambda: run.metrics.exists() and len(run.metrics.read_text().splitlines()) >= 2)
        elif moment == "during_save":  # the periodic save at iteration 3 has begun
            run.wait_for(lambda: (run.ckpt / "iter_0000003").exists())
        else:  # the save at iteration 3 is complete (its marker written), step 4 not yet begun or just
            run.wait_for(lambda: (run.ckpt / "latest_checkpointed_iteration.txt").exists() and run.marker() == 3)
        for pid in trainer_pids(str(run.dir), workers_only=True):  # as SLURM signals each task
            os.kill(pid, signal.SIGTERM)
        assert run.launcher.wait(timeout=120) == 0, run.output()[-3000:]
    finally:
        run.kill()
    out = run.output()
    assert "exiting after iteration" in out and "SIGTERM received" in out, out[-3000:]
    last = read_metrics(run.metrics)[-1]["iteration"]
    assert run.marker() == last  # nothing lost: the checkpoint is the last finished step
    if moment == "cache_build":  # the signal came before step 1: it ran, and the run stopped
        assert last == 1 and "reference cache: 32 steps in" in out
    if last < STEPS:
        _, out = train(tmp_path, "run", 2, *flags, save=True)
        assert f"at iteration {last}" in out
    everything = read_metrics(run.metrics)
    assert [m["iteration"] for m in everything] == list(range(1, STEPS + 1))  # each iteration once
    assert_same_steps(everything, straight, rel=1e-6, keys=COMPARED + ("lr",))


@pytest.mark.multiprocess
def test_step_budget_exits_saves_and_keeps_the_last_checkpoints(tmp_path, straight):
    flags = [*HANDLER, "--exit-interval", "5", "--keep-last", "2"]
    first, out = train(tmp_path, "run", 2, *flags, save=True)
    assert [m["iteration"] for m in first] == [1, 2, 3, 4, 5]
    assert "exiting after iteration 5 of 8: --exit-interval 5 reached" in out and "ETA " in out and "elapsed " in out
    ckpt = tmp_path / "run" / "ckpt"
    assert sorted(p.name for p in ckpt.glob("iter_*")) == ["iter_0000003", "iter_0000005"]
    _, out = train(tmp_path, "run", 2, *flags, save=True)
    assert "at iteration 5" in out and "deleted checkpoint" in out
    assert sorted(p.name for p in ckpt.glob("iter_*")) == ["iter_0000006", "iter_0000008"]
    everything = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert_same_steps(everything, straight, rel=1e-6, keys=COMPARED + ("lr",))


@pytest.mark.multiprocess
@pytest.mark.parametrize("handler", [False, True], ids=["no_handler", "exit_signal_handler"])
def test_ctrl_c_stops_a_two_rank_run_within_seconds(tmp_path, handler):
    flags = ["--exit-signal-handler"] if handler else []
    run = BackgroundRun(tmp_path, "run", 2, *TP2, "--train-iters", "200", "--lr", "0.01", *flags)
    try:
        run.wait_for(lambda: run.metrics.exists())
        sent = time.monotonic()
        os.killpg(run.launcher.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the launcher's group
        run.launcher.wait(timeout=60)
        took = time.monotonic() - sent
    finally:
        run.kill()
    deadline = time.time() + 10
    while trainer_pids(str(run.dir)) and time.time() < deadline:
        time.sleep(0.1)
    assert trainer_pids(str(run.dir)) == []
    assert took < 10, (took, run.output()[-3000:])
    if handler:  # it finished its step and saved it: nothing lost
        assert "exiting after iteration" in run.output(), run.output()[-3000:]
        assert run.marker() == read_metrics(run.metrics)[-1]["iteration"]


def state_files(ckpt: Path) -> dict[str, str]:
    """SHA-256 of each file of a checkpoint (its manifest), without the two that record how and when
    it was written: run_config.json (the flags, --async-save included) and torch's .metadata (a
    save id)."""
    files = json.loads((ckpt / "manifest.json").read_text())["files"]
    return {name: entry["sha256"] for name, entry in files.items() if name not in ("run_config.json", ".metadata")}


@pytest.mark.multiprocess
def test_async_save_writes_the_same_checkpoints_and_resumes_the_same(tmp_path, straight_run):
    straight, straight_ckpt = straight_run
    flags = [*HANDLER, "--async-save"]
    first, out = train(tmp_path, "run", 2, *flags, save=True)  # saves 3 and 6 in the background, 8 awaited before exiting
    assert out.index(f"saved checkpoint {tmp_path / 'run' / 'ckpt' / 'iter_0000008'}") < out.index("checkpoints: ")
    ckpt = tmp_path / "run" / "ckpt"
    for name in ("iter_0000003", "iter_0000006", "iter_0000008"):
        assert state_files(ckpt / name) == state_files(straight_ckpt / name), name  # bitwise
    assert_same_steps(first, straight, rel=0, keys=COMPARED + ("lr",))
    # resume from the checkpoint written in the background at 3, as after a crash at step 4-5
    (ckpt / "latest_checkpointed_iteration.txt").write_text("3\n")
    _, out = train(tmp_path, "run", 2, *flags, save=True)
    assert "at iteration 3" in out
    assert_same_steps(read_metrics(tmp_path / "run" / "metrics.jsonl"), straight, rel=1e-6, keys=COMPARED + ("lr",))


def test_wandb_without_the_package_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    from sampo_megatron.training.wandb_writer import WandbWriter

    with pytest.raises(MissingPackageError, match=r"pip install 'sampo-megatron\[wandb\]'"):
        MetricsLogger(True, 3, wandb=lambda: WandbWriter("p", None, str(tmp_path), {}))


@pytest.mark.multiprocess
def test_wandb_offline_history_holds_the_metrics_file_values(tmp_path):
    env = torchrun_env(WANDB_MODE="offline", WANDB_SILENT="true")
    metrics, _ = train(tmp_path, "run", 1, "--tensor-model-parallel-size", "1", "--wandb-project", "sampo-test",
                       "--wandb-exp-name", "tiny", env=env, save=True)  # fmt: skip
    # --wandb-save-dir defaults to <--save>/wandb (Megatron-LM), where W&B makes its own wandb/
    runs = list((tmp_path / "run" / "ckpt" / "wandb" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, runs
    history = read_history(runs[0])
    assert [row["_step"] for row in history] == [m["iteration"] for m in metrics] == [1, 2, 3]
    for row, line in zip(history, metrics):
        numeric = {k: v for k, v in line.items() if k not in ("iteration", "time") and isinstance(v, (int, float))}
        assert len(numeric) > 20 and {k: row.get(k) for k in numeric} == numeric
