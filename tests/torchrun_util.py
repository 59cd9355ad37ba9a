"""Launch multi-process test workers with torchrun on CPU (gloo)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKERS = Path(__file__).resolve().parent / "workers"


def torchrun_command(script: Path, nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(script), *args]


def torchrun_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO_ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}", **extra)
    return env


def run_torchrun(worker: str | Path, nproc: int, *args: str, timeout: float = 600, check: bool = True, env: dict | None = None):
    """Run ``tests/workers/<worker>`` (or a script path) under ``torchrun --standalone``.

    Returns:
        The combined output (``check=True``: raises AssertionError with its tail when any rank
        fails), or the CompletedProcess when ``check=False``.
    """
    script = worker if isinstance(worker, Path) else WORKERS / worker
    cmd = torchrun_command(script, nproc, *args)
    # Own session + files instead of pipes: a SIGKILLed rank can leave helper processes (megatron's
    # checkpoint writer Manager) that would hold pipes open; the whole session is killed afterwards.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        popen = subprocess.Popen(cmd, env=env or torchrun_env(), cwd=REPO_ROOT, stdout=out, stderr=err, start_new_session=True)
        try:
            returncode = popen.wait(timeout=timeout)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, signal.SIGKILL)
        out.seek(0), err.seek(0)
        proc = subprocess.CompletedProcess(cmd, returncode, out.read(), err.read())
    output = proc.stdout + proc.stderr
    if not check:
        return proc
    if proc.returncode != 0:
        raise AssertionError(f"torchrun {script.name} x{nproc} failed ({proc.returncode}):\n{output[-6000:]}")
    return output
