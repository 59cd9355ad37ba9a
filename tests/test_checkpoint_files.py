"""Checkpoint files as files (sampo_megatron/checkpoint, training/run_lock.py, training/run_config.py):
manifests, fallback, the pickle allow-list, the run lock, processes that die with their launcher, config
comparison. No model; one process, except the launcher test's small Python processes."""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sampo_megatron.checkpoint import UnsafeCheckpointError, check_torch_dist_pickles, digest_files, list_files, write_manifest
from sampo_megatron.config import RunConfig
from sampo_megatron.runtime.checkpointing import CheckpointLoadError, select_checkpoint, verify_checkpoint
from sampo_megatron.training import run_lock
from sampo_megatron.training.run_config import ConfigChangeError, check_resume, compare

from helpers import RunsCodeWhenUnpickled


def fake_checkpoint(run: Path, iteration: int) -> Path:
    ckpt = run / f"iter_{iteration:07d}"
    ckpt.mkdir(parents=True)
    (ckpt / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    (ckpt / "__0_0.distcp").write_bytes(os.urandom(4096))
    (ckpt / "common.pt").write_bytes(os.urandom(512))
    (ckpt / "tokenizer").mkdir()
    (ckpt / "tokenizer" / "tokenizer.json").write_text("{}")
    write_manifest(str(ckpt), digest_files(str(ckpt), list_files(str(ckpt))))
    (run / "latest_checkpointed_iteration.txt").write_text(f"{iteration}\n")
    return ckpt


DAMAGE = {
    "flipped": lambda f: f.write_bytes(bytes(b ^ 0xFF if 100 <= i < 164 else b for i, b in enumerate(f.read_bytes()))),
    "truncated": lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2]),
    "deleted": lambda f: f.unlink(),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_shard_is_named(tmp_path, damage):
    ckpt = fake_checkpoint(tmp_path, 3)
    assert verify_checkpoint(str(ckpt)) == []
    DAMAGE[damage](ckpt / "__0_0.distcp")
    problems = verify_checkpoint(str(ckpt))
    assert len(problems) == 1 and str(ckpt / "__0_0.distcp") in problems[0]


def test_empty_common_pt_is_named(tmp_path):
    ckpt = fake_checkpoint(tmp_path, 3)
    (ckpt / "common.pt").write_bytes(b"")
    assert "common.pt: 0 bytes, the manifest says 512" in verify_checkpoint(str(ckpt))[0]


def test_a_file_the_save_did_not_write_is_named(tmp_path):
    """megatron-core 0.19 writes no common.pt but reads one when it is there: a stray (e.g. empty)
    file changes what loads, so a file absent from the manifest is damage."""
    ckpt = fake_checkpoint(tmp_path, 3)
    (ckpt / "common.pt").unlink()
    write_manifest(str(ckpt), digest_files(str(ckpt), list_files(str(ckpt))))
    (ckpt / "common.pt").write_bytes(b"")
    assert verify_checkpoint(str(ckpt)) == [f"{ckpt / 'common.pt'}: not part of the checkpoint (absent from its manifest)"]


def test_damaged_latest_falls_back_to_the_newest_sound_one(tmp_path, capsys):
    fake_checkpoint(tmp_path, 3)
    fake_checkpoint(tmp_path, 6)
    latest = fake_checkpoint(tmp_path, 9)
    DAMAGE["flipped"](latest / "__0_0.distcp")
    DAMAGE["truncated"](tmp_path / "iter_0000006" / "common.pt")
    with pytest.raises(CheckpointLoadError, match=r"iter_0000009/__0_0.distcp: its SHA-256 differs"):
        select_checkpoint(str(tmp_path), fallback=False)
    assert select_checkpoint(str(tmp_path)) == str(tmp_path / "iter_0000003")
    out = capsys.readouterr().out
    assert "iter_0000009 is damaged" in out and "iter_0000006 does not verify either" in out and "falling back to" in out
    # the marker names what was loaded; the damaged checkpoint is kept aside, out of the way of the next save
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    assert (tmp_path / "iter_0000009.damaged").is_dir() and not (tmp_path / "iter_0000009").exists()
    assert select_checkpoint(str(tmp_path / "iter_0000003")) == str(tmp_path / "iter_0000003")


def test_no_sound_checkpoint_is_an_error(tmp_path):
    latest = fake_checkpoint(tmp_path, 3)
    DAMAGE["deleted"](latest / "common.pt")
    with pytest.raises(CheckpointLoadError, match="no older checkpoint"):
        select_checkpoint(str(tmp_path))
    assert select_checkpoint(str(tmp_path), verify=False) == str(latest)  # --no-verify-checkpoint


def test_metadata_pickle_outside_the_allow_list_is_refused(tmp_path):
    ckpt = fake_checkpoint(tmp_path, 3)
    proof = tmp_path / "PROOF"
    (ckpt / ".metadata").write_bytes(pickle.dumps(RunsCodeWhenUnpickled(proof)))
    write_manifest(str(ckpt), digest_files(str(ckpt), list_files(str(ckpt))))  # a consistent manifest: not "damage"
    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata: the pickle names posix.system"):
        check_torch_dist_pickles(str(ckpt))
    assert not proof.exists()
    problems = verify_checkpoint(str(ckpt))
    assert len(problems) == 1 and "posix.system" in problems[0] and not proof.exists()
    assert verify_checkpoint(str(ckpt), trust=True) == []  # --trust-checkpoint skips the allow-list


def _lock_file(run: Path, **holder) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / run_lock.LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time(),
                                                      "start_time": None, **holder}))  # fmt: skip


def test_a_live_holder_keeps_the_lock(tmp_path):
    _lock_file(tmp_path)  # this very process, alive
    with pytest.raises(run_lock.RunLockError, match=f"in use by another run: host {socket.gethostname()}, PID {os.getpid()}"):
        run_lock.RunLock(str(tmp_path)).acquire()
    _lock_file(tmp_path, host="elsewhere", pid=1)  # another host with a fresh heartbeat
    with pytest.raises(run_lock.RunLockError, match="host elsewhere, PID 1"):
        run_lock.RunLock(str(tmp_path)).acquire()


@pytest.mark.parametrize(
    "holder, reason",
    [
        ({"pid": 2**22 + 7}, "is gone"),  # a PID above the kernel's maximum: no such process
        ({"host": "elsewhere", "heartbeat": time.time() - 3600}, "heartbeat stopped"),
        ({"start_time": "1"}, "now belongs to another process"),  # this PID, but started at another time
    ],
    ids=["dead_pid", "stale_heartbeat", "reused_pid"],
)
def test_a_gone_holder_is_taken_over(tmp_path, holder, reason):
    _lock_file(tmp_path, **holder)
    lock = run_lock.RunLock(str(tmp_path))
    assert reason in lock.acquire()
    assert json.loads((tmp_path / run_lock.LOCK_FILE).read_text())["token"] == lock.info["token"]
    assert [p.name for p in tmp_path.iterdir()] == [run_lock.LOCK_FILE]  # the stale file is cleaned up
    lock.release()
    assert not (tmp_path / run_lock.LOCK_FILE).exists()


def test_a_holder_that_is_a_zombie_is_gone(tmp_path):
    """A rank killed with its launcher is re-parented to PID 1, which in a container may never reap
    it: dead, yet its PID answers signal 0. Its lock is taken over."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.time() + 30
    while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":  # exited, not reaped
        assert time.time() < deadline
        time.sleep(0.05)
    try:
        os.kill(child.pid, 0)  # the PID still answers
        _lock_file(tmp_path, pid=child.pid, start_time=run_lock._process_start_time(child.pid))
        assert "is gone" in run_lock.RunLock(str(tmp_path)).acquire()
    finally:
        child.wait()


def test_requeued_slurm_job_takes_over_its_own_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    _lock_file(tmp_path, host="node017", slurm_job_id="4242")
    assert "earlier run of this SLURM job" in run_lock.RunLock(str(tmp_path)).acquire()


# A "rank" under a "launcher": it arms die_with_launcher, then forks two children the way
# megatron-core's checkpoint writers are forked: one from the main thread, one from a thread that
# ends at once (prctl(2): the parent-death signal may fire when the forking thread ends, so that
# child watches its parent process instead).
_RANK = """
import multiprocessing, os, sys, threading, time
from sampo_megatron.training.run_lock import die_with_launcher
assert die_with_launcher()
fork = multiprocessing.get_context("fork")
writers = [fork.Process(target=time.sleep, args=(600,))]
writers[0].start()
def start_from_a_thread():
    writers.append(fork.Process(target=time.sleep, args=(600,)))
    writers[1].start()
thread = threading.Thread(target=start_from_a_thread)
thread.start(); thread.join()
time.sleep(1.5)  # past the thread's end and the watcher's first look at its parent
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(" ".join(str(p) for p in [os.getpid(), *(w.pid for w in writers)]))
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(600)
"""


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a killed orphan may linger as a zombie until PID 1 reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_killed_launcher_takes_its_rank_and_the_ranks_forked_writers_along(tmp_path):
    pids_file = tmp_path / "pids"
    env = {**os.environ, "TORCHELASTIC_RUN_ID": "test", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    launcher = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; subprocess.run(sys.argv[1:])",
                                 sys.executable, "-c", _RANK, str(pids_file)], env=env)  # fmt: skip
    try:
        deadline = time.time() + 120
        while not pids_file.exists():
            assert launcher.poll() is None and time.time() < deadline, "the rank did not start its writers"
            time.sleep(0.05)
        pids = [int(p) for p in pids_file.read_text().split()]
        assert len(pids) == 3 and all(_running(p) for p in pids), "a forked child died while the rank runs"
    finally:
        launcher.kill()
        launcher.wait()
    deadline = time.time() + 10
    while any(_running(p) for p in pids) and time.time() < deadline:
        time.sleep(0.1)
    assert [p for p in pids if _running(p)] == [], "processes outlived the launcher (rank, main-thread child, thread's child)"


def _record(**changes) -> dict:
    cfg = RunConfig()
    for dotted, value in changes.items():
        section, name = dotted.split("__")
        setattr(getattr(cfg, section), name, value)
    return {"config": json.loads(json.dumps(cfg.to_dict())), "derived": {"num_pairs": 256, "data_fingerprint": "abc"}}


def test_a_run_config_written_before_the_sections_split_compares_field_by_field():
    """run_config.json of a run saved when optimizer, schedule, precision, recompute and operations
    flags were training flags: the same run resumes, a changed flag is named in its section now."""
    from sampo_megatron.config.schema import TRAINING_SPLIT

    def legacy(record: dict) -> dict:
        config = {section: dict(fields) for section, fields in record["config"].items() if section not in set(TRAINING_SPLIT.values())}
        for name, section in TRAINING_SPLIT.items():
            config["training"][name] = record["config"][section][name]
        return {**record, "config": config}

    old = legacy(_record())
    assert "lr" in old["config"]["training"] and "optimizer" not in old["config"]
    same = compare(old, _record())
    assert (same.objective, same.data, same.schedule, same.applied) == ([], [], [], [])
    changed = compare(old, _record(optimizer__lr=1e-5, precision__bf16=True, operations__exit_interval=3))
    assert changed.schedule == [("optimizer.lr", 1e-6, 1e-5)]
    assert sorted(c[0] for c in changed.applied) == ["operations.exit_interval", "precision.bf16"]
    assert check_resume(old, _record(), "ckpt", override_schedule=False) == []  # the same run resumes
    with pytest.raises(ConfigChangeError, match="--lr: 1e-06 in the checkpoint, 1e-05 now"):
        check_resume(old, _record(optimizer__lr=1e-5), "ckpt", override_schedule=False)


def test_config_changes_are_sorted():
    saved = _record()
    changes = compare(
        saved, _record(loss__beta=0.5, optimizer__lr=1e-5, logging__log_interval=5, parallel__tensor_model_parallel_size=2)
    )
    assert changes.objective == [("loss.beta", 0.1, 0.5)]
    assert changes.schedule == [("optimizer.lr", 1e-6, 1e-5)]
    assert sorted(c[0] for c in changes.applied) == ["logging.log_interval", "parallel.tensor_model_parallel_size"]
    moved = _record(data__data_path="/elsewhere/pairs.jsonl")  # same pairs (same fingerprint): applied
    assert [c[0] for c in compare(saved, moved).applied] == ["data.data_path"]
    other = _record()
    other["derived"]["data_fingerprint"] = "def"
    assert compare(saved, other).data == [("derived.data_fingerprint", "abc", "def")]


def test_a_field_added_since_the_checkpoint_counts_only_when_set():
    """A checkpoint written before a flag existed (e.g. --orpo-lambda) resumes while the flag keeps
    its default; setting it is a change like any other."""
    saved = _record()
    del saved["config"]["loss"]["orpo_lambda"]
    assert compare(saved, _record()).objective == []
    assert compare(saved, _record(loss__orpo_lambda=0.5)).objective == [("loss.orpo_lambda", "<absent>", 0.5)]


def test_check_resume_names_each_refused_change_and_lists_the_rest():
    saved = _record()
    with pytest.raises(ConfigChangeError) as err:
        check_resume(saved, _record(loss__loss_type="ipo", loss__length_debias="sampo", training__train_iters=10), "ckpt", False)
    message = str(err.value)
    assert "objective: --loss-type: 'sigmoid' in the checkpoint, 'ipo' now" in message
    assert "objective: --length-debias: 'none' in the checkpoint, 'sampo' now" in message
    assert "schedule: --train-iters: None in the checkpoint, 10 now" in message and "--override-opt-param-scheduler" in message
    lines = check_resume(saved, _record(training__train_iters=10, logging__log_interval=5), "ckpt", True)
    assert "  schedule (--override-opt-param-scheduler): --train-iters: None in the checkpoint, 10 now" in lines
    assert "  applied: --log-interval: 1 in the checkpoint, 5 now" in lines
    assert check_resume(saved, _record(), "ckpt", False) == []
