"""A persistent pool of gloo ranks for the multi-rank tests: one pool per world size (1, 2 and 4),
started lazily once per pytest session, so a test pays a job's own seconds instead of a torchrun
launch's (importing torch, megatron-core and transformers in every rank, the rendezvous).

A test submits a job, an importable function and its arguments (:meth:`RankPool.run`); every rank
runs it and the results come back in rank order, with what the ranks printed meanwhile. A failure
of any kind fails that test only and restarts the pool, so the next test starts clean:

- an exception on some rank: each failing rank's traceback, and the ranks' output;
- a job that runs past its timeout, or a rank that dies (SIGKILL, a crash): the ranks' output and
  what became of each rank;
- a job that left state behind in a rank (runtime/leftovers.py: megatron-core's parallel state,
  process groups, signal handlers, open files, threads, child processes): the list of it.

Patterned on DeepSpeed's ``tests/unit/common.py`` (``DistributedTest`` with ``reuse_dist_env``) and
torch's ``MultiProcessTestCase``. Jobs that run a script (:func:`run_script`) are how the torchrun
workers and ``launch/pretrain_sampo.py`` run in the pool (tests/helpers.py).
"""

from __future__ import annotations

import contextlib
import io
import os
import runpy
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from multiprocessing.connection import Connection, wait
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "pool_worker.py"
START_TIMEOUT_S = 180.0
GRACE_S = 20.0
"""After one rank failed, how long the others get to finish (they may wait in a collective)."""


class PoolJobError(AssertionError):
    """A pool job failed: raised in the test that submitted it."""


class RankError(str):
    """The traceback of a job's exception on one rank (``raise_errors=False``)."""


class RankPool:
    """``world_size`` ranks in one gloo group, kept between jobs."""

    def __init__(self, world_size: int, warm: bool = True) -> None:
        """
        Args:
            world_size: ranks in the group.
            warm: import the trainer's stack (megatron-core, transformers) when the ranks start, as
                every job here needs it; False: torch and the process group only (the pool's own tests).
        """
        self.world_size = world_size
        self.warm = warm
        self.procs: list[subprocess.Popen] = []
        self.store = None
        """The rendezvous store the ranks joined (they are its clients)."""
        self.conns: list[Connection] = []
        self.logs: list[io.TextIOWrapper] = []
        self.starts = 0
        """How many times the ranks were started (1 + restarts)."""
        self.jobs = 0
        """How many jobs were submitted."""
        self.last_streams = ("", "")
        """``(stdout, stderr)`` of the last job that completed."""

    @property
    def alive(self) -> bool:
        return bool(self.procs) and all(p.poll() is None for p in self.procs)

    def start(self) -> None:
        self.stop()
        # The rendezvous store lives here, as torchrun's agent hosts it for its workers: bound to a
        # port the OS picks, so a pool started while other launches run (pytest-xdist's other
        # worker) cannot lose its port to them between choosing and binding it.
        from torch.distributed import TCPStore

        self.store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        port = self.store.port
        path = os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests"), str(REPO_ROOT / "tests" / "workers"),
                                str(REPO_ROOT / "tools"), str(REPO_ROOT / "examples" / "length_bias")])  # fmt: skip
        for rank in range(self.world_size):
            ours, theirs = socket.socketpair()
            env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(self.world_size),
                       LOCAL_WORLD_SIZE=str(self.world_size), GROUP_RANK="0", MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=f"{path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")  # fmt: skip
            out, err = (tempfile.TemporaryFile("w+", errors="replace") for _ in range(2))
            proc = subprocess.Popen([sys.executable, str(WORKER), str(theirs.fileno()), "warm" if self.warm else "cold"], env=env, cwd=REPO_ROOT,
                                    stdout=out, stderr=err, pass_fds=(theirs.fileno(),), start_new_session=True)  # fmt: skip
            theirs.close()
            self.procs.append(proc)
            self.conns.append(Connection(os.dup(ours.fileno())))
            ours.close()
            self.logs += [out, err]
        self.starts += 1
        deadline = time.monotonic() + START_TIMEOUT_S
        pending = set(range(self.world_size))
        while pending:
            ready = wait([self.conns[r] for r in pending], timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                self._fail(f"the {self.world_size}-rank pool did not start within {START_TIMEOUT_S:.0f} s")
            for conn in ready:
                rank = self.conns.index(conn)
                try:
                    conn.recv()
                except EOFError:
                    self._fail(f"rank {rank} of the {self.world_size}-rank pool died while starting")
                pending.discard(rank)

    def streams(self, offsets: list[int] | None = None) -> tuple[str, str]:
        """What the ranks wrote to their standard output and error (since ``offsets``), each
        concatenated in rank order."""
        texts = []
        for i, log in enumerate(self.logs):
            log.flush()
            log.seek(offsets[i] if offsets else 0)
            texts.append(log.read())
            log.seek(0, io.SEEK_END)
        return "".join(texts[0::2]), "".join(texts[1::2])

    def output(self, offsets: list[int] | None = None) -> str:
        """Both streams of every rank (since ``offsets``), standard output first."""
        return "".join(self.streams(offsets))

    def _states(self) -> str:
        lines = []
        for rank, proc in enumerate(self.procs):
            code = proc.poll()
            if code is None:
                lines.append(f"rank {rank}: running (killed by the pool)")
            elif code < 0:
                lines.append(f"rank {rank}: killed by {signal.Signals(-code).name}")
            else:
                lines.append(f"rank {rank}: exited with {code}")
        return "\n".join(lines)

    def _fail(self, headline: str, offsets: list[int] | None = None, details: str = "") -> None:
        """Stop the ranks (the next job restarts them) and raise with their output."""
        states = self._states()  # before the ranks still running are killed
        output = self.output(offsets)
        self._kill()
        raise PoolJobError(f"{headline}\n{states}\n{details}--- output of the ranks ---\n{output[-8000:]}")

    def _kill(self) -> None:
        """Stop the ranks at once (the next job restarts them)."""
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        for proc in self.procs:
            proc.wait()
        self._close_handles()

    def run(self, target: str, *args, timeout: float = 600, raise_errors: bool = True, **kwargs) -> tuple[list, str]:
        """Run ``target`` (``"module:function"``) with ``args`` and ``kwargs`` on every rank.

        Args:
            raise_errors: False: an exception on a rank is that rank's result (a :class:`RankError`),
                as a launched process's traceback and exit status would be.

        Returns:
            ``(results, output)``: each rank's return value in rank order, and what the ranks printed
            (:meth:`last_streams` has the two streams apart).

        Raises:
            PoolJobError: an exception on any rank (unless ``raise_errors`` is False), a rank that
                died, the timeout, or state left behind.
        """
        if not self.alive:
            self.start()
        self.jobs += 1
        offsets = []
        for log in self.logs:
            log.seek(0, io.SEEK_END)
            offsets.append(log.tell())
        for conn in self.conns:
            conn.send(("job", target, args, kwargs))
        replies: dict[int, tuple] = {}
        deadline = time.monotonic() + timeout
        while len(replies) < self.world_size:
            waiting = [c for r, c in enumerate(self.conns) if r not in replies]
            ready = wait(waiting, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                failed = {r: rep for r, rep in replies.items() if rep[0] == "error"}
                if failed:
                    break
                self._fail(f"job {target} ran past its timeout of {timeout:.0f} s", offsets)
            for conn in ready:
                rank = self.conns.index(conn)
                try:
                    replies[rank] = conn.recv()
                except (EOFError, OSError):
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.procs[rank].wait(timeout=10)  # its end of the pipe closes a moment before it is reaped
                    self._fail(f"job {target}: rank {rank} died", offsets)
                if replies[rank][0] == "error":  # the others get a grace period, not the whole timeout
                    deadline = min(deadline, time.monotonic() + GRACE_S)
        self.last_streams = self.streams(offsets)
        output = "".join(self.last_streams)
        errors = {r: rep[1] for r, rep in sorted(replies.items()) if rep[0] == "error"}
        missing = [r for r in range(self.world_size) if r not in replies]
        if (errors or missing) and raise_errors:
            details = "".join(f"--- rank {r} ---\n{tb}" for r, tb in errors.items())
            if missing:
                details += f"(ranks {missing} had not finished {GRACE_S:.0f} s after the failure)\n"
            self._fail(f"job {target} failed on rank(s) {sorted(errors)}", offsets, details)
        leaked = {r: rep[2] for r, rep in sorted(replies.items()) if rep[2]}
        if leaked:
            details = "".join(f"--- rank {r} ---\n  " + "\n  ".join(items) + "\n" for r, items in leaked.items())
            self._fail(f"job {target} left state behind (the pool restarts)", offsets, details)
        if missing:  # ranks stuck after another's failure: killed, the next job restarts the pool
            self._kill()
        results = [RankError(f"did not finish {GRACE_S:.0f} s after another rank failed") for _ in range(self.world_size)]
        for r, rep in replies.items():
            results[r] = RankError(rep[1]) if rep[0] == "error" else rep[1]
        return results, output

    def _close_handles(self) -> None:
        for conn in self.conns:
            conn.close()
        for log in self.logs:
            log.close()
        self.procs, self.conns, self.logs = [], [], []
        self.store = None  # the ranks are gone (stopped or killed): their store goes too

    def stop(self) -> None:
        """Ask the ranks to leave; kill what does not within 10 s."""
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(("stop",))
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self._close_handles()


_POOLS: dict[int, RankPool] = {}


def pool(world_size: int) -> RankPool:
    """The session's pool of ``world_size`` ranks (started on first use)."""
    if world_size not in _POOLS:
        _POOLS[world_size] = RankPool(world_size)
    return _POOLS[world_size]


def pool_summary() -> str:
    """One line: each pool's size, how many jobs it ran and how often its ranks were started."""
    parts = [f"{n} rank{'s' if n > 1 else ''}: {p.jobs} jobs, started {p.starts}x" for n, p in sorted(_POOLS.items())]
    return f"rank pools (tests/pool.py): {'; '.join(parts)}" if parts else ""


def stop_pools() -> None:
    for p in _POOLS.values():
        p.stop()
    _POOLS.clear()


# ------------------------------------------------------------------------------------ jobs
def run_script(script: str, argv: list[str], env: dict[str, str] | None = None) -> int:
    """Run ``script`` as ``__main__`` with ``argv`` (and the variables ``env`` set meanwhile), as a
    launch would; its exit status (0 when it returns, the code of a ``SystemExit``)."""
    sys.argv = [script, *argv]
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code
        if code is not None and not isinstance(code, int):
            print(code, file=sys.stderr)  # as the interpreter prints sys.exit("message")
        return 0 if code is None else code if isinstance(code, int) else 1
    except BaseException:
        traceback.print_exc()  # as the interpreter would, before exiting with status 1
        raise
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        sys.stdout.flush()
        sys.stderr.flush()
    return 0
