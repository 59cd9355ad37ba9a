"""One run per ``--save`` directory, and ranks that die with their launcher.

**The lock.** ``SAVE/.sampo_run.lock`` (JSON: host, PID, the process's start time, SLURM job id, a
heartbeat time) is created exclusively by global rank 0 before anything is written, refreshed every
:data:`HEARTBEAT_S` seconds by a daemon thread, and removed at a clean exit. A second run on the
same directory stops at once with a message naming the holder. A lock left by a process that is
gone is taken over: on the same host when that PID no longer runs the process that took it (the
start time tells a reused PID apart); from another host when its heartbeat is older than
:data:`STALE_AFTER_S`, or when it was taken by an earlier incarnation of the same SLURM job (a
requeued job resumes by itself). Taking over renames the stale file aside first (a rename succeeds
for one process only) and then creates a new one exclusively, so two runs racing for a stale lock
cannot both win.

**Dying with the launcher.** torchrun starts its workers in their own sessions, so killing
torchrun's process group leaves them running, re-parented to PID 1, still saving into the run
directory. :func:`die_with_launcher` asks the kernel (Linux ``prctl(PR_SET_PDEATHSIG)``) to SIGKILL
the process when its parent, the torchrun agent, dies. It acts only under torchrun: a rank started
by srun or mpirun dies with its step already, and a plain ``python launch/pretrain_sampo.py`` under
``nohup`` must outlive its shell. The processes a rank forks (megatron-core's checkpoint writers)
die with the rank in turn.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
import uuid

LOCK_FILE = ".sampo_run.lock"
HEARTBEAT_S = 15.0
STALE_AFTER_S = 120.0


class RunLockError(RuntimeError):
    """Another live run holds the ``--save`` directory."""


def _process_start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), or None when it does not run."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs: a zombie (dead, not yet reaped: a rank killed with its launcher is
    re-parented to PID 1, which in a container may never reap it) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _me() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "start_time": _process_start_time(os.getpid()),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "heartbeat": time.time(),
        "token": uuid.uuid4().hex,
    }


def holder_is_gone(holder: dict, now: float | None = None) -> str | None:
    """Why the holder of a lock is gone (the lock may be taken over), or None when it may be alive."""
    now = time.time() if now is None else now
    if holder.get("host") == socket.gethostname():
        pid = int(holder.get("pid", -1))
        if not _pid_alive(pid):
            return f"process {pid} on this host is gone"
        if holder.get("start_time") is not None and _process_start_time(pid) not in (None, holder["start_time"]):
            return f"PID {pid} now belongs to another process"
        return None
    job = os.environ.get("SLURM_JOB_ID")
    if job is not None and holder.get("slurm_job_id") == job:
        return f"it was taken by an earlier run of this SLURM job ({job})"
    age = now - float(holder.get("heartbeat", 0))
    if age > STALE_AFTER_S:
        return f"its heartbeat stopped {age:.0f} s ago"
    return None


class RunLock:
    """The lock of one run directory, held by the process that created it (see the module docstring)."""

    def __init__(self, save_dir: str) -> None:
        self.path = os.path.join(save_dir, LOCK_FILE)
        self.info: dict | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _create(self) -> bool:
        info = _me()
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
        self.info = info
        return True

    def _read(self) -> dict | None:
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # torn or empty: written by a process that died while writing it

    def acquire(self) -> str | None:
        """Take the lock; returns a note when a stale lock was taken over.

        Raises:
            RunLockError: a live run holds it (the message names host, PID and start).
        """
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        note = None
        for _ in range(3):
            if self._create():
                break
            holder = self._read()
            if holder is None:
                continue  # released meanwhile
            reason = "the lock file is unreadable" if not holder else holder_is_gone(holder)
            if reason is None:
                started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("heartbeat", 0))))
                raise RunLockError(
                    f"{os.path.dirname(self.path)} is in use by another run: host {holder.get('host')}, PID {holder.get('pid')}"
                    f"{', SLURM job ' + holder['slurm_job_id'] if holder.get('slurm_job_id') else ''} (last heartbeat "
                    f"{started}). Wait for it to finish, stop it, or use another --save directory. (A lock whose holder "
                    f"is gone is taken over by itself: {self.path})"
                )
            with contextlib.suppress(FileNotFoundError):
                os.rename(self.path, f"{self.path}.stale-{uuid.uuid4().hex[:8]}")  # only one taker succeeds
                note = f"took over the lock of a run that is gone ({reason}): {holder.get('host')} PID {holder.get('pid')}"
        else:
            raise RunLockError(f"{self.path}: could not take the lock (another run keeps taking it)")
        for stale in os.listdir(os.path.dirname(self.path)):
            if stale.startswith(LOCK_FILE + ".stale-"):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(os.path.dirname(self.path), stale))
        self._thread = threading.Thread(target=self._heartbeat, name="sampo-run-lock", daemon=True)
        self._thread.start()
        return note

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if self._read() != self.info:
                return  # taken from us (should not happen); do not overwrite the new holder's lock
            self.info = {**self.info, "heartbeat": time.time()}
            tmp = f"{self.path}.{self.info['token']}.tmp"
            with open(tmp, "w") as f:
                json.dump(self.info, f)
            os.replace(tmp, self.path)

    def release(self) -> None:
        """Remove the lock if this process still holds it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.info is not None and self._read() == self.info:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
        self.info = None


def lock_save_dir(save_dir: str | None) -> RunLock | None:
    """Global rank 0 takes the lock of ``save_dir`` (collective): every rank gets the outcome, so
    that all of them stop together when another run holds it.

    Returns:
        The lock on rank 0 (None elsewhere, and without a ``--save`` directory).

    Raises:
        RunLockError: on every rank, when a live run holds the directory.
    """
    import torch.distributed as dist

    if not save_dir:
        return None
    lock, outcome = None, [None, None]
    if dist.get_rank() == 0:
        lock = RunLock(save_dir)
        try:
            outcome = [None, lock.acquire()]
        except RunLockError as err:
            outcome = [str(err), None]
    dist.broadcast_object_list(outcome, src=0)
    error, note = outcome
    if error is not None:
        raise RunLockError(error)
    if note and dist.get_rank() == 0:
        print(note, flush=True)
    return lock


def _die_with_parent() -> bool:
    """Have the kernel SIGKILL this process when the thread that started it ends (Linux
    ``prctl(PR_SET_PDEATHSIG)``); kills it at once when its parent is already gone.

    Returns:
        True when the parent-death signal was set.
    """
    import ctypes

    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_PDEATHSIG = 1
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return False
    if os.getppid() != parent or parent == 1:  # the parent died before the signal was armed
        os.kill(os.getpid(), signal.SIGKILL)
    return True


_forked_by_main_thread = True
"""Set in the parent just before each fork (the child inherits the value)."""
_fork_hook_registered = False


def _before_fork() -> None:
    global _forked_by_main_thread
    _forked_by_main_thread = threading.current_thread() is threading.main_thread()


def _watch_parent(parent: int, interval_s: float = 0.5) -> None:
    while os.getppid() == parent:
        time.sleep(interval_s)
    os.kill(os.getpid(), signal.SIGKILL)


def _child_dies_with_rank() -> None:
    """In a process forked by a rank: die with the rank.

    The kernel's parent-death signal fires when the forking *thread* ends, so it is armed only
    for forks from the main thread (which lives as long as the rank); a child forked by another
    thread polls its parent instead.
    """
    if _forked_by_main_thread:
        _die_with_parent()
    else:
        threading.Thread(target=_watch_parent, args=(os.getppid(),), name="sampo-die-with-rank", daemon=True).start()


def die_with_launcher() -> bool:
    """Under torchrun, have the kernel SIGKILL this process when its parent (the torchrun agent)
    dies, and every process it forks when it dies.

    The forked processes matter: megatron-core's checkpoint save forks writer processes (also for
    a synchronous save, and one more for ``--async-save``). A rank killed during a save would leave
    them writing into the run directory, unseen by the lock, after its launcher is gone.

    Returns:
        True when the parent-death signal was set.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ or not os.path.exists("/proc/self"):
        return False
    global _fork_hook_registered
    if not _die_with_parent():
        return False
    if not _fork_hook_registered:  # once per process (hooks cannot be unregistered)
        os.register_at_fork(before=_before_fork, after_in_child=_child_dies_with_rank)
        _fork_hook_registered = True
    return True
